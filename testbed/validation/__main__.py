"""``python -m testbed.validation [hydra overrides]``: run the sim-vs-testbed validation."""

from testbed.validation.validate import main

raise SystemExit(main())
