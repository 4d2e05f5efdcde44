"""Shared pytest setup: make the repository and the test helpers importable, keep torch single-threaded."""

import sys
from pathlib import Path

import torch

for path in (Path(__file__).resolve().parents[1], Path(__file__).resolve().parent):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

# Tiny models on a shared 2-core machine: one intra-op thread avoids spin-wait contention with the other process
# (about 10x faster here) and keeps results independent of the thread count.
torch.set_num_threads(1)
