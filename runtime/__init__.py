"""kubetune.runtime: the FineTuneJob spec, the plan, data, models, stages, storage and the CLI."""

from importlib.metadata import PackageNotFoundError, version

try:
    # pyproject.toml is the one place the version is written; the Makefile, the chart and the image
    # labels follow it (tests/chart checks them)
    __version__ = version("kubetune")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
