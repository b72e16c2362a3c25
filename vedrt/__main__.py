"""`python -m vedrt ...`, the same as the `vedrt` command."""

import sys

from vedrt.cli import main

sys.exit(main())
