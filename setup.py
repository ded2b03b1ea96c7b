"""Map the `runtime/` and `operator/` folders to `kubetune.runtime` and `kubetune.operator`."""
from pathlib import Path

from setuptools import setup

ROOTS = {"kubetune.runtime": "runtime", "kubetune.operator": "operator"}


def _packages():
    found, dirs = [], {}
    for name, folder in ROOTS.items():
        for init in sorted(Path(folder).rglob("__init__.py")):
            rel = init.parent.relative_to(folder).parts
            pkg = ".".join((name, *rel))
            found.append(pkg)
            dirs[pkg] = str(init.parent)
    return found, dirs


packages, package_dir = _packages()
setup(
    packages=packages,
    package_dir=package_dir,
    package_data={"kubetune.runtime": ["resources/*", "resources/**/*"]},
)
