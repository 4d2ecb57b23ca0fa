"""Where a notebook reads its results and writes its figures (``notebooks/*.ipynb``), never over committed files.

Results: ``$OBJECTCACHE_RESULTS`` when set, else the latest run when there is one (``<root>/results/sim``
holding ``<name>/requests.csv``, what ``python -m sim`` writes), else the committed golden results
(``<root>/results/golden``).  Figures: ``$OBJECTCACHE_FIGURES`` when set, else ``<results>/figures`` of a run,
else (golden results, which are committed) a fresh temporary directory.  ``root`` is ``$OBJECTCACHE_ROOT``,
else the checkout this module is in.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class NotebookPaths:
    """``results``: the directory holding ``<name>/``; ``figures``: where figures go; ``source``: ``env``,
    ``latest run`` or ``golden``."""

    results: Path
    figures: Path
    source: str


def locate(name: str, runs: str | None = "results/sim") -> NotebookPaths:
    """Results and figure directories for the experiment ``name`` (see the module docstring); ``runs`` is
    where runs are looked for, relative to the root (None: only the environment or the golden results)."""
    root = Path(os.environ.get("OBJECTCACHE_ROOT", REPO_ROOT))
    golden = root / "results" / "golden"
    if os.environ.get("OBJECTCACHE_RESULTS"):
        results, source = Path(os.environ["OBJECTCACHE_RESULTS"]), "env"
    elif runs is not None and (root / runs / name / "requests.csv").exists():
        results, source = root / runs, "latest run"
    else:
        results, source = golden, "golden"
    if os.environ.get("OBJECTCACHE_FIGURES"):
        figures = Path(os.environ["OBJECTCACHE_FIGURES"])
    elif results.resolve() != golden.resolve():
        figures = results / "figures"
    else:
        figures = Path(tempfile.mkdtemp(prefix=f"objectcache-{name}-figures-"))
    return NotebookPaths(results, figures, source)
