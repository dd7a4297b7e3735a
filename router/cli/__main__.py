"""`python -m router.cli ...`: the same as the `maverick` console script."""

import sys

from router.cli.commands import main

sys.exit(main())
