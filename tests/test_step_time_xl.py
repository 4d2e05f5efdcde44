"""bench/l2c_step_time.py --xl: the peak-memory probe and the real-size row's arithmetic at a tiny shape."""

from __future__ import annotations

import json
import os

import pytest
import torch

from bench.l2c_step_time import MMAP_THRESHOLD, main, peak_above_now, probe_environment


def test_peak_above_now_sees_a_touched_allocation():
    size = 64 * 2**20

    def allocate() -> None:
        block = torch.ones(size // 4)  # written, so resident
        del block

    assert peak_above_now(allocate) >= 0.9 * size


@pytest.mark.slow
def test_xl_row_at_a_tiny_shape(tmp_path):
    out = tmp_path / "xl.json"
    main(["--xl", "--layers", "2", "--heads", "2", "--head-dim", "8", "--latent-size", "8", "--steps", "4",
          "--repeats", "1", "--json", str(out)])  # fmt: skip
    (row,) = json.loads(out.read_text())["rows"]
    assert row["shape"] == "2 blocks, hidden 16, 16 tokens"
    assert row["malloc_mmap_threshold"] == str(MMAP_THRESHOLD) and "MALLOC_MMAP_THRESHOLD_" not in os.environ
    assert row["forwards_per_sampling_step"] == pytest.approx(row["step_s"] / row["teacher_forward_s"] / 4)
    assert row["peak_train_bytes"] > 0 and row["peak_one_step_bytes"] > 0


def test_probe_environment_sets_then_restores(monkeypatch):
    monkeypatch.setenv("L2C_PROBE_TEST", "before")
    with probe_environment("L2C_PROBE_TEST", "during"):
        assert os.environ["L2C_PROBE_TEST"] == "during"
    assert os.environ["L2C_PROBE_TEST"] == "before"
    monkeypatch.delenv("L2C_PROBE_TEST")
    with probe_environment("L2C_PROBE_TEST", "during"):
        assert os.environ["L2C_PROBE_TEST"] == "during"
    assert "L2C_PROBE_TEST" not in os.environ
    with probe_environment("L2C_PROBE_TEST", None):  # None: as it is
        assert "L2C_PROBE_TEST" not in os.environ
