"""``python -m testbed.objectstore [flags]``: start the ObjectCache S3 server (``--help`` lists the flags)."""

from testbed.objectstore.server import main

raise SystemExit(main())
