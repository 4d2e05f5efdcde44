"""bench/gpu.py's CPU smoke run (`--quick`): every row, eager and compiled, with the numbers the GPU run reports."""

from __future__ import annotations

import json

import pytest

from bench import gpu


@pytest.fixture(scope="module")
def quick_rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu") / "gpu.json"
    assert gpu.main(["--quick", "--steps", "4", "--json", str(out), "--no-progress"]) == 0
    return json.loads(out.read_text())


def test_every_method_runs_eager_and_compiled(quick_rows):
    rows = quick_rows["rows"]
    names = {row["method"].split(" taylorseer:")[0].split(" threshold")[0] for row in rows}
    assert names == {
        "no hooks", "full", "static every-2", "static every-3", "ToCa", "DuCa",
        "TaylorSeer (l2c)", "TaylorSeer (diffusers)", "FBCache (diffusers)",
    }  # fmt: skip
    assert sorted({(row["steps"], row["compiled"]) for row in rows}) == [(4, False), (4, True)]
    assert len(rows) == 2 * len(names)
    assert quick_rows["setup"]["compile_backend"] == "eager" and quick_rows["setup"]["device"] == "cpu"


def test_its_numbers_follow_their_definitions(quick_rows):
    by = {(row["method"], row["compiled"]): row for row in quick_rows["rows"]}
    base = by[("no hooks", False)]
    assert base["speedup"] == 1.0 and base["flops_ratio"] == 1.0
    assert by[("full", False)]["flops_ratio"] == 1.0
    # static every-2 over 4 steps computes steps 0 and 2 of the blocks: about half the FLOPs, not all
    assert 0.4 < by[("static every-2", False)]["flops_ratio"] < 0.75
    for row in quick_rows["rows"]:
        assert row["speedup"] == pytest.approx(base["wall_s"] / row["wall_s"])
        assert row["efficiency"] == pytest.approx(row["speedup"] * row["flops_ratio"])
        assert row["peak_bytes"] is None and row["syncs_per_step"] is None  # CUDA-only measurements
    # both TaylorSeers run the same knobs, so they spend the same FLOPs
    seers = [row for row in quick_rows["rows"] if row["method"].startswith("TaylorSeer") and not row["compiled"]]
    assert len(seers) == 2 and seers[0]["flops_ratio"] == pytest.approx(seers[1]["flops_ratio"])


def test_without_a_gpu_the_full_run_says_to_use_quick(capsys):
    if gpu.torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(SystemExit):
        gpu.main(["--json", "/tmp/never-written.json"])
    assert "--quick" in capsys.readouterr().err
