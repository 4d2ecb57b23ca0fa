"""The scheduler core must stay pure: no simulator, GPU, S3 or config framework imports, no clock."""

import ast
import pathlib
import subprocess
import sys

FORBIDDEN = ("simpy", "torch", "boto3", "botocore", "hydra", "omegaconf", "aiohttp")


def test_import_scheduler_pulls_in_no_forbidden_module():
    code = (
        "import sys, scheduler, scheduler.policies; "
        "import pkgutil, importlib; "
        "[importlib.import_module('scheduler.' + m.name) for m in pkgutil.iter_modules(scheduler.__path__)]; "
        f"bad = [m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r}]; "
        "print(','.join(bad)); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, f"scheduler imported forbidden modules: {out.stdout} {out.stderr}"


def test_scheduler_never_reads_the_clock():
    root = pathlib.Path(__file__).resolve().parents[2] / "scheduler"
    for path in root.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                call = f"{node.value.id}.{node.attr}"
                assert call not in {
                    "time.time",
                    "time.monotonic",
                    "time.perf_counter",
                    "datetime.now",
                    "datetime.utcnow",
                }, f"{path.name} reads the clock via {call}"
            if isinstance(node, ast.ImportFrom) and node.module in {"time", "datetime"}:
                raise AssertionError(f"{path.name} imports from {node.module}")
