"""`python bench/<name>.py` puts only bench/ on sys.path: this puts the checkout holding it first, so the script
imports this checkout's `l2c`, `predictors` and `data`, as `python -m bench.<name>` from its root does, and not a
copy installed from elsewhere. Each script imports it only when it runs as a file (no `__package__`)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
