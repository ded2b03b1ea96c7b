"""`python -m kubetune.operator` — the same as `kubetune operator`."""

from .main import main

main()
