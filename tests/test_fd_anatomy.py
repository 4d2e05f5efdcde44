"""bench/fd_anatomy.py: its blur, and its rows on the embedded digits teacher (terms that add up, a distance of 0
from the uncached samples to themselves, one paired difference per seed)."""

from __future__ import annotations

import json

import pytest
import torch

from bench.fd_anatomy import OPERATIONS, blur3x3, main


def test_blur3x3_keeps_constants_and_spreads_a_point_by_its_kernel():
    images = torch.zeros(2, 1, 5, 5)
    images[0, 0, 2, 2] = 1.0
    assert torch.equal(blur3x3(images, 0.0), images)
    blurred = blur3x3(images, 0.1)
    expected = torch.tensor([0.1, 0.8, 0.1])
    assert torch.allclose(blurred[0, 0, 1:4, 1:4], expected[:, None] * expected[None, :])
    assert float(blurred[0].sum()) == pytest.approx(1.0) and torch.equal(blurred[1], images[1])  # mass kept
    assert torch.allclose(blur3x3(torch.full((1, 1, 4, 4), 0.3), 0.2), torch.full((1, 1, 4, 4), 0.3))


def test_rows_on_the_embedded_teacher(tmp_path):
    out = tmp_path / "anatomy.json"
    args = ["--num-samples", "8", "--batch-size", "8", "--seeds", "0", "1", "--policy", "static:interval=2"]
    assert main([*args, "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    rows = {row["method"]: row for row in record["rows"]}
    assert list(rows) == ["uncached", "static:interval=2", *(operation.name for operation in OPERATIONS)]
    assert record["real_feature_spread"] > 0
    for row in rows.values():
        assert abs(row["fd_location"] + row["fd_spread_term"] - row["fd_digits"]) < 1e-9
        assert len(row["paired_per_seed"]) == 2
    assert rows["uncached"]["fd_to_uncached"] < 1e-6 and rows["uncached"]["paired_per_seed"] == [0.0, 0.0]
    static = rows["static:interval=2"]
    assert 0.4 < static["flops_ratio"] < 0.6 and static["fd_to_uncached"] > 0 and static["psnr_db"] < 100
