"""The real system: object format and protocol (``wire``), the S3 server with gather (``objectstore``), the
client (``client``), the layerwise prefill engine (``engine``), the experiment harness (``harness``),
sim-vs-real validation (``validation``) and benchmarks (``bench``)."""

from pathlib import Path

# The checkout's root: configs/, results/ and the shell scripts are found from here.
REPO_ROOT = Path(__file__).resolve().parent.parent
