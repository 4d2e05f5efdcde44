"""TokenCache export at a FLOPs target (`export_flops`): the tables compare's tuning would choose, recorded."""

from __future__ import annotations

import json

import lightning as L
import pytest
from test_tokencache import quiet_trainer, save_tiny_teacher

import l2c
from data.conditions import ClassConditionDataModule
from l2c import compare
from l2c.models import load_model
from l2c.policies.tokencache import TokenCachePolicy
from predictors.tokencache_trainer import TUNING_RUN_SEED, TokenCacheTrainer

STEPS = 8


def fit(tmp_path, export_flops: float) -> TokenCacheTrainer:
    """Two optimizer steps of the rate objective on a tiny DiT, exported to tmp_path / "policy" at `export_flops`."""
    save_tiny_teacher(tmp_path / "teacher")
    module = TokenCacheTrainer(
        teacher=str(tmp_path / "teacher"), steps=STEPS, guidance_scale=2.0, ff_inner_dim=16, init_score=0.05,
        export_dir=str(tmp_path / "policy"), export_flops=export_flops, export_tune_samples=2, calibration_samples=2,
    )  # fmt: skip
    L.seed_everything(0, verbose=False)
    data = ClassConditionDataModule(num_classes=10, samples_per_epoch=4, batch_size=2, seed=100)
    quiet_trainer(2, tmp_path).fit(module, data)
    return module


def test_export_flops_keeps_the_best_calibration_table_at_the_target(tmp_path):
    fit(tmp_path, export_flops=0.5)
    policy = l2c.load_policy(tmp_path / "policy")
    assert isinstance(policy, TokenCachePolicy)
    config = json.loads((tmp_path / "policy" / "config.json").read_text())
    tuning = config["provenance"]["export_tuning"]
    assert tuning["export_flops"] == 0.5 and tuning["seed"] == TUNING_RUN_SEED and tuning["samples"] == 2
    candidates, kept = tuning["candidates"], tuning["kept"]
    assert len(candidates) >= 2  # tables of 2 … 4 full steps of 8, TPRR's and one interval's
    assert kept["psnr_db"] == max(c["psnr_db"] for c in candidates)
    assert {k: config["params"][k] for k in ("full_steps", "tprr", "token_budget")} == {
        k: kept[k] for k in ("full_steps", "tprr", "token_budget")
    }
    # The saved plan's FLOPs, counted as compare counts them (2 samples of its own calibration noise, seed 1).
    setup = compare.CompareConfig(model=str(tmp_path / "teacher"), steps=STEPS, guidance_scale=2.0)
    flops = compare.CalibrationSet.of_config(load_model(setup.model), setup).plan_flops.flops_ratio(policy)
    assert abs(flops - 0.5) <= compare.SEER_TOLERANCE
    assert flops == pytest.approx(kept["flops_ratio"])  # a plan's FLOPs do not depend on the noise


def test_an_unreachable_target_is_refused_and_nothing_is_written(tmp_path):
    with pytest.raises(ValueError, match=r"'export_flops' is 0\.2.*reach FLOPs ratios 0\.\d+ .* to 1"):
        fit(tmp_path, export_flops=0.2)  # at most 1.6 of 8 steps full: no table of 2 or more
    assert not (tmp_path / "policy").exists()


def test_a_text_conditioned_teacher_is_refused_before_training(tmp_path):
    from l2c_testing import tiny_pixart_pipeline

    tiny_pixart_pipeline().save_pretrained(tmp_path / "pixart")
    with pytest.raises(ValueError, match="'export_flops'.*text-conditioned"):
        TokenCacheTrainer(teacher=str(tmp_path / "pixart"), steps=4, ff_inner_dim=16, export_flops=0.5)
