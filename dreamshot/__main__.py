"""`python -m dreamshot ...`: the `dreamshot` command line (`dreamshot.cli`), for an environment whose scripts are
not on PATH."""

import sys

from dreamshot.cli import main

sys.exit(main())
