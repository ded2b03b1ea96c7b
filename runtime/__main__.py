"""`python -m kubetune.runtime …`: the runtime image's entrypoint (same commands as `kubetune`)."""

import sys

from .cli import main

sys.exit(main())
