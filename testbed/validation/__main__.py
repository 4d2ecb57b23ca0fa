"""``python -m testbed.validation [hydra overrides]``: run the sim-vs-testbed validation."""

import sys

from testbed.validation.validate import main

sys.exit(main())
