"""bench/overhead.py on a small DiT: the JSON columns, efficiency = speedup / ideal speedup, exact cache bytes."""

import json
import math

import pytest
import torch

from bench import overhead

COLUMNS = {"method", "wall_s", "flops_ratio", "ideal_speedup", "speedup", "efficiency"}


def test_overhead_rows_on_a_small_dit(tmp_path, capsys):
    out = tmp_path / "overhead.json"
    argv = ["--layers", "2", "--heads", "2", "--head-dim", "8", "--latent-size", "8", "--steps", "4"]
    assert overhead.main([*argv, "--repeats", "2", "--json", str(out), "--no-progress"]) == 0
    rows = {row["method"]: row for row in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"no hooks", "full", "static every-2"}  # the released router needs 28 blocks and 20 steps
    assert "skipped the official router" in capsys.readouterr().out
    for row in rows.values():
        assert COLUMNS <= set(row) and len(row["wall_s_runs"]) == 2
        assert row["ideal_speedup"] == pytest.approx(1 / row["flops_ratio"])
        assert row["efficiency"] == pytest.approx(row["speedup"] / row["ideal_speedup"])
    assert rows["no hooks"]["speedup"] == 1.0 and rows["full"]["flops_ratio"] == 1.0
    # Steps 0 and 2 of 4 compute the blocks; the patch embedding and output head run at every step.
    assert 0.5 < rows["static every-2"]["flops_ratio"] < 0.65
    # The cache holds, per sample, every branch's output (16 tokens × 16 channels, fp32); no token ages: a plan that
    # never recomputes part of a branch does not keep them.
    per_branch = 16 * 16 * 4
    assert rows["full"]["cache_bytes_per_sample"] == 2 * 2 * per_branch  # 2 blocks × (attn1, ff)
    assert rows["no hooks"]["cache_bytes_per_sample"] == 0
    assert rows["full"]["activation_bytes_per_sample"] > rows["full"]["cache_bytes_per_sample"]


def test_the_released_router_fits_a_28_block_dit_at_ddim_20():
    if not overhead.ROUTER.is_file():
        pytest.skip(f"fixture {overhead.ROUTER} not present")
    setup = overhead.OverheadSetup(heads=2, head_dim=8, latent_size=4)
    notes = []
    rows = overhead.policies(overhead.build_model(setup), setup, notes)
    assert notes == []
    router = rows["l2c router (official DDIM-20, threshold 0.1)"]
    assert router.reuse_summary(20) == "computed 312 of 560 branch slots in reuse steps"  # the fixture's statistic


def test_compiled_rows_and_the_runtime_cost_per_branch_call(tmp_path, capsys):
    out = tmp_path / "overhead.json"
    argv = ["--layers", "2", "--heads", "2", "--head-dim", "8", "--latent-size", "8", "--steps", "4", "--repeats", "1"]
    assert overhead.main([*argv, "--compile", "eager", "--json", str(out), "--no-progress"]) == 0
    result = json.loads(out.read_text())
    rows = {row["method"]: row for row in result["rows"]}
    eager = ("no hooks", "full", "static every-2")
    assert set(rows) == {*eager, *(overhead.compiled_name(name, "eager") for name in eager)}
    for name in eager:
        compiled = rows[overhead.compiled_name(name, "eager")]
        assert compiled["flops_ratio"] == rows[name]["flops_ratio"]  # the same work, compiled
        assert compiled["cache_bytes_per_sample"] == rows[name]["cache_bytes_per_sample"]  # and the same cache
        assert compiled["compiled_gain"] == pytest.approx(rows[name]["wall_s"] / compiled["wall_s"])
    cost = result["setup"]["runtime_cost"]
    assert cost["branch_calls_per_run"] == 4 * 2 * 2  # steps × blocks × (attn1, ff)
    assert cost["us_per_branch_call"] == pytest.approx(1e6 * (cost["full_s"] - cost["no_hooks_s"]) / 16)
    for key in ("cpu_us_per_branch_call", "us_per_branch_call_median", "cpu_us_per_branch_call_median"):
        assert math.isfinite(cost[key])
    assert "µs thread CPU per branch call" in capsys.readouterr().out


def test_cache_memory_counts_a_forecasting_branchs_newest_history_entry_once():
    """The newest history entry is the very tensor of the stored output: the bytes are not doubled."""
    from l2c.extension import BranchStore, Computed

    output, older = torch.zeros(2, 4, 8), torch.zeros(2, 4, 8)
    store = BranchStore(output=output, age=torch.zeros(2, 4, dtype=torch.long))
    store.history = [Computed(1, 1.0, output), Computed(0, 2.0, older)]
    assert overhead.tensor_bytes(store) == 2 * (2 * 4 * 8 * 4) + 2 * 4 * 8


def test_flux_shaped_rows_at_a_tiny_width(tmp_path):
    """`--family flux`: double then single blocks (3 branches each), shared block weights, static every-2's FLOPs."""
    # FluxOverheadSetup's default text and pooled widths are Flux.1's (4096, 768); tiny ones here.
    out = tmp_path / "flux.json"
    argv = ["--family", "flux", "--layers", "2", "--single-layers", "2", "--heads", "2", "--head-dim", "8"]
    argv += ["--latent-size", "4", "--text-tokens", "2", "--text-dim", "16", "--pooled-dim", "16", "--steps", "4"]
    assert overhead.main([*argv, "--repeats", "1", "--json", str(out), "--no-progress"]) == 0
    result = json.loads(out.read_text())
    rows = {row["method"]: row for row in result["rows"]}
    assert set(rows) == {"no hooks", "full", "static every-2"}
    assert result["setup"]["runtime_cost"]["branch_calls_per_run"] == 4 * (2 + 2) * 3  # steps × blocks × branches
    assert rows["full"]["flops_ratio"] == 1.0 and 0.5 < rows["static every-2"]["flops_ratio"] < 0.65
    model = overhead.build_model(overhead.FluxOverheadSetup(layers=2, single_layers=3, heads=2, head_dim=8))
    assert len(model.transformer_blocks) == 2 and len(model.single_transformer_blocks) == 3
    first, last = model.single_transformer_blocks[0], model.single_transformer_blocks[-1]
    assert first is not last and first.proj_out.weight.data_ptr() == last.proj_out.weight.data_ptr()
