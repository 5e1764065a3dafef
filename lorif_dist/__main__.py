"""`python -m lorif_dist ...` is the `lorif` command."""

import sys

from lorif_dist.cli import main

sys.exit(main())
