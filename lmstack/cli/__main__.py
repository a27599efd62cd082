"""`python -m lmstack.cli VERB ...` (what torchrun runs): the same entry point as the `lmstack` script."""

import sys

from lmstack.cli import main

sys.exit(main())
