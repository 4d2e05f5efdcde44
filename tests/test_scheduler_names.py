"""`--scheduler`: what reports, model cards and policies name is the scheduler that ran (flow-euler on a flow-matching
model, whichever of auto / ddim / euler was asked), an incompatible choice fails with one line, and policies saved
before still load and apply."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import get_args, get_type_hints

import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

import infer
import l2c
from l2c import Action
from l2c.adapters import model_spec
from l2c.evaluate import SamplingSetup, SideBySide, report
from l2c.models import load_model, make_scheduler, model_scheduler_config, resolve_scheduler
from l2c.options import SCHEDULER_CHOICES

ROOT = Path(__file__).resolve().parents[1]
OLD_FLUX_POLICY = ROOT / "docs" / "bench" / "policies" / "flux-forecast-050"  # written before the names were fixed
FLOW = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0}
DDPM = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000}


@pytest.fixture(scope="module")
def flux_digits():
    return load_model("embedded:digits-flux")


@pytest.mark.parametrize("name", ["auto", "ddim", "euler", "flow-euler"])
def test_a_flow_model_samples_with_flow_euler_and_says_so(name):
    assert resolve_scheduler(name, FLOW) == "flow-euler"
    assert type(make_scheduler(name, FLOW)) is FlowMatchEulerDiscreteScheduler


def test_other_models_sample_with_what_is_asked_and_auto_is_ddim():
    assert [resolve_scheduler(n, DDPM) for n in ("auto", "ddim", "ddpm", "dpm", "euler")] == [
        "ddim", "ddim", "ddpm", "dpm", "euler",
    ]  # fmt: skip
    assert type(make_scheduler("auto", DDPM)) is DDIMScheduler
    assert resolve_scheduler("auto", {"num_train_timesteps": 1000}) == "ddim"  # a directory without scheduler/


@pytest.mark.parametrize(
    ("name", "config", "says"),
    [
        ("ddpm", FLOW, "--scheduler 'ddpm': the model is flow-matching (FlowMatchEulerDiscreteScheduler); it samples "
                       "with flow-euler only"),
        ("dpm", FLOW, "--scheduler 'dpm': the model is flow-matching"),
        ("flow-euler", DDPM, "--scheduler 'flow-euler': the model is not flow-matching (scheduler config: "
                             "DDPMScheduler); expected one of ['auto', 'ddim', 'ddpm', 'dpm', 'euler']"),
        ("heun", DDPM, "--scheduler 'heun': expected one of"),
    ],
)  # fmt: skip
def test_an_incompatible_choice_fails_naming_flag_value_and_what_the_model_supports(name, config, says):
    with pytest.raises(ValueError, match="^" + says.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        make_scheduler(name, config)


def test_the_shipped_models_resolve_from_their_directories_without_loading():
    assert resolve_scheduler("auto", model_scheduler_config("embedded:digits-flux")) == "flow-euler"
    assert resolve_scheduler("auto", model_scheduler_config("embedded:digits")) == "ddim"


def test_infer_reports_and_saves_the_scheduler_that_ran_on_a_flow_model(tmp_path):
    common = ["--model", "embedded:digits-flux", "--policy", "static:interval=2", "--steps", "4",
              "--num-samples", "2", "--no-progress", "--no-beside"]  # fmt: skip
    for asked in ([], ["--scheduler", "ddim"]):  # the default, and what older commands pass
        out = tmp_path / f"out{len(asked)}"
        assert infer.main(["sample", *common, *asked, "--out", str(out), "--save-policy", str(out / "policy")]) == 0
        assert json.loads((out / "report.json").read_text())["scheduler"] == "flow-euler"
        saved = l2c.load_policy(out / "policy")
        assert saved.target.scheduler == "FlowMatchEulerDiscreteScheduler"
        assert saved.provenance["metrics"]["scheduler"] == "flow-euler"
        card = (out / "policy" / "README.md").read_text()
        assert "- scheduler: FlowMatchEulerDiscreteScheduler, 4 steps" in card
        assert "; `--scheduler flow-euler` in infer.py" in card
        assert "--steps 4 --scheduler flow-euler --out out/" in card and "ddim" not in card


def test_infer_on_the_dit_digits_still_reports_ddim(tmp_path):
    argv = ["sample", "--policy", "full", "--steps", "2", "--num-samples", "2", "--no-progress", "--out", str(tmp_path)]
    assert infer.main(argv) == 0
    assert json.loads((tmp_path / "report.json").read_text())["scheduler"] == "ddim"


def test_infer_refuses_ddpm_on_a_flow_model_in_one_line(tmp_path, capsys):
    argv = ["sample", "--model", "embedded:digits-flux", "--scheduler", "ddpm", "--steps", "2", "--out", str(tmp_path)]
    assert infer.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: --scheduler 'ddpm': the model is flow-matching")
    assert not (tmp_path / "report.json").exists()


def test_compare_names_the_scheduler_that_runs_and_refuses_an_incompatible_one():
    from l2c import compare

    parse = infer.build_parser(["compare"]).parse_args
    args = parse(["compare", "--quick", "--json", "x.json", "--model", "embedded:digits-flux"])
    assert compare.config_from_args(args).scheduler == "flow-euler"  # the JSON's setup and the plot's title
    args = parse(["compare", "--quick", "--json", "x.json", "--model", "embedded:digits-flux", "--scheduler", "ddim"])
    assert compare.config_from_args(args).scheduler == "flow-euler"
    assert compare.config_from_args(parse(["compare", "--quick", "--json", "x.json"])).scheduler == "ddim"
    bad = [sys.executable, str(ROOT / "bench" / "compare.py"), "--quick", "--json", "x.json",
           "--model", "embedded:digits-flux", "--scheduler", "ddpm"]  # fmt: skip
    done = subprocess.run(bad, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 2 and "error: --scheduler 'ddpm': the model is flow-matching" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_trainer_records_the_scheduler_that_ran(flux_digits):
    from predictors.frozen_teacher import FrozenTeacherModule
    from predictors.l2c_trainer import RolloutRouterTrainer

    hint = get_type_hints(FrozenTeacherModule.__init__)["scheduler"]
    assert get_args(hint) == SCHEDULER_CHOICES  # the trainers' choices are infer.py's

    module = RolloutRouterTrainer(teacher="embedded:digits-flux", steps=4, scheduler="ddim", export_budget=0.5)
    assert type(module.sampler) is FlowMatchEulerDiscreteScheduler
    policy = module.exported_policy(steps_trained=0)
    assert policy.provenance["scheduler"] == "flow-euler" and module.hparams.scheduler == "ddim"
    assert policy.target.scheduler == "FlowMatchEulerDiscreteScheduler"
    with pytest.raises(ValueError, match="^l2c trainer: field 'scheduler' 'dpm': the model is flow-matching"):
        RolloutRouterTrainer(teacher="embedded:digits-flux", steps=4, scheduler="dpm", export_budget=0.5)


def test_a_flux_policy_saved_before_the_fix_still_loads_and_applies(flux_digits):
    """docs/bench/policies/flux-forecast-050 records `scheduler: ddim` in its provenance (the trainer's argument then)
    and FlowMatchEulerDiscreteScheduler in its file's scheduler field: it loads as it did and runs on the model."""
    config = json.loads((OLD_FLUX_POLICY / "config.json").read_text())
    assert config["provenance"]["scheduler"] == "ddim" and config["format_version"] == 1
    policy = l2c.load_policy(OLD_FLUX_POLICY)
    assert policy.target.scheduler == "FlowMatchEulerDiscreteScheduler" and len(policy.timesteps) == 20

    setup = SamplingSetup(model="embedded:digits-flux", steps=20, num_samples=4, batch_size=4, flops_samples=1)
    bench = SideBySide(flux_digits, setup, progress=False)
    assert bench.setup.scheduler == "flow-euler"
    policy.check_timesteps(bench.timesteps)  # the table the policy was made for is the one `auto` samples
    pipe = SimpleNamespace(scheduler=make_scheduler("ddim", flux_digits.scheduler_config))  # what `ddim` builds
    policy.check_model(model_spec(flux_digits.transformer), pipeline=pipe)  # `apply(pipe)`'s scheduler check passes
    with torch.no_grad():
        result = report(bench.run(policy), bench.setup, None)
    assert result["scheduler"] == "flow-euler"
    assert result["executed"][Action.FORECAST.name.lower()] > 0
    assert 0.4 < result["flops_ratio"] < 0.7 and result["psnr_db"] > 30
