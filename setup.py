"""Map the `runtime/` and `operator/` folders to `kubetune.runtime` and `kubetune.operator`."""
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

EXAMPLES = Path("examples")


class BuildWithExamples(build_py):
    """The board's presets are the example FineTuneJobs: a wheel carries a copy of examples/*.yaml
    in kubetune/runtime/board/examples/ (a source checkout reads examples/ itself)."""

    def run(self):
        super().run()
        target = Path(self.build_lib) / "kubetune" / "runtime" / "board" / "examples"
        target.mkdir(parents=True, exist_ok=True)
        for f in sorted(EXAMPLES.glob("*.yaml")):
            self.copy_file(str(f), str(target / f.name))

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
    package_data={"kubetune.runtime": ["resources/*", "resources/**/*"],
                  "kubetune.runtime.board": ["API.md", "static/*", "static/**/*"]},
    cmdclass={"build_py": BuildWithExamples},
)
