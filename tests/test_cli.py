"""infer.py as a user meets it: start-up without heavy imports, `--classes`, calibrating Block Caching.

Start-up is tested in fresh interpreters (what a `python infer.py ...` imports); the rest runs `infer.main`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import infer
from data.conditions import ClassConditionDataModule, ClassConditions
from l2c.evaluate import SamplingSetup
from l2c.options import parse_classes

ROOT = Path(__file__).resolve().parents[1]
PROBE = """
import json, sys
import infer
try:
    code = infer.main(sys.argv[1:])
except SystemExit as exit_info:
    code = exit_info.code
heavy = sorted(name for name in ("torch", "diffusers", "lightning") if name in sys.modules)
print(json.dumps({"code": code, "heavy": heavy}), file=sys.stderr)
"""


def probe(*argv: str) -> tuple[dict, str, float]:
    """Run infer.py's main with `argv` in a fresh interpreter: its exit code and which heavy packages it imported."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", PROBE, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)
    elapsed = time.perf_counter() - start
    *message, last = done.stderr.strip().splitlines()
    return json.loads(last), "\n".join(message), elapsed


def test_help_imports_neither_torch_nor_lightning():
    for argv in (["--help"], ["sample", "--help"], ["fid", "--help"]):
        result, _, elapsed = probe(*argv)
        assert result == {"code": 0, "heavy": []}, (argv, result)
        assert elapsed < 10, elapsed  # ≈0.3 s alone on this machine; generous for a shared one


def test_a_bad_policy_answers_before_any_model_loads_or_lightning_imports(tmp_path):
    for command in ("sample", "fid"):
        result, message, _ = probe(command, "--policy", "nosuchpolicy", "--out", str(tmp_path / "out"))
        assert result["code"] == 2 and "lightning" not in result["heavy"], result
        assert message.startswith("error: unknown policy 'nosuchpolicy'") and message.count("\n") == 0, message
        assert result["heavy"] == [], result  # refused from the preset names alone: no torch, no diffusers
    assert not (tmp_path / "out").exists()


def test_the_light_preset_names_are_the_registered_policy_kinds():
    from l2c.options import PRESET_NAMES
    from l2c.policies import POLICY_KINDS

    assert PRESET_NAMES == tuple(sorted(POLICY_KINDS))


def test_the_policy_is_checked_before_the_model_loads(tmp_path, monkeypatch, capsys):
    import l2c.models

    monkeypatch.setattr(l2c.models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    assert infer.main(["sample", "--policy", "toca:ratio=2", "--out", str(tmp_path / "out")]) == 2
    assert "field 'ratio' must be a number in (0, 1], got 2.0" in capsys.readouterr().err


# -- --classes ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("spec", "classes"),
    [("0-9", tuple(range(10))), ("1,3,5", (1, 3, 5)), ("0-2,7", (0, 1, 2, 7)), (4, (0, 1, 2, 3)), ([2, 0], (2, 0))],
)
def test_class_specs(spec, classes):
    assert parse_classes(spec) == classes


@pytest.mark.parametrize("spec", ["", "3-1", "a", "1,1", "-2", "1-", 0, True, [1, -1]])
def test_bad_class_specs_name_the_spec(spec):
    with pytest.raises(ValueError, match="classes"):
        parse_classes(spec)


def test_the_trainer_data_and_infer_describe_the_same_conditions():
    """`data.classes: "0-4"` in a training config and `infer.py --classes 0-4` give the same label sequence."""
    setup_labels = SamplingSetup(num_samples=12, classes=parse_classes("0-4")).labels(10)
    data = ClassConditionDataModule(classes="0-4", samples_per_epoch=12)
    data.setup()
    assert [int(data.train_set[i][0]) for i in range(12)] == setup_labels.tolist() == [0, 1, 2, 3, 4] * 2 + [0, 1]
    # num_classes alone is the same as before: 0 … C−1 (and the same as --classes 0-9)
    assert torch.equal(ClassConditions(10, 12).labels, SamplingSetup(num_samples=12).labels(10))
    assert torch.equal(ClassConditions(10, 12).labels, SamplingSetup(num_samples=12, classes=(*range(10),)).labels(10))


def test_sample_with_a_subset_of_classes(tmp_path):
    out = tmp_path / "out"
    argv = ["sample", "--policy", "static:interval=2", "--steps", "4", "--num-samples", "4", "--classes", "3,7"]
    assert infer.main([*argv, "--no-progress", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["classes"] == [3, 7]
    assert 0.5 < report["flops_ratio"] < 0.6


@pytest.mark.parametrize(("classes", "words"), [("5,12", "[12]"), ("3-1", "ends below its start"), ("x", "'x'")])
def test_classes_the_model_lacks_exit_2_before_any_work(tmp_path, capsys, classes, words):
    argv = ["sample", "--steps", "4", "--num-samples", "2", "--classes", classes, "--out", str(tmp_path / "out")]
    try:
        code = infer.main(argv)
    except SystemExit as exit_info:
        code = exit_info.code
    assert code == 2
    assert words in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# -- calibrating Block Caching from the command line -----------------------------------------------------------------
def test_an_uncalibrated_blockcache_stops_before_any_sampling(tmp_path, capsys, monkeypatch):
    import l2c.evaluate

    monkeypatch.setattr(l2c.evaluate, "sample", lambda *a, **k: pytest.fail("sampling ran"))
    argv = ["sample", "--policy", "blockcache", "--steps", "4", "--num-samples", "2", "--out", str(tmp_path / "out")]
    assert infer.main(argv) == 2
    message = capsys.readouterr().err
    assert "not calibrated" in message and "--calibration-samples N" in message and message.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_calibration_samples_calibrate_blockcache_on_other_noise_and_report_the_cost(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["sample", "--policy", "blockcache:threshold=0.2", "--calibration-samples", "3", "--steps", "6"]
    assert infer.main([*argv, "--num-samples", "2", "--seed", "5", "--no-progress", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["calibration"]["samples"] == 3 and report["calibration"]["seed"] == 6  # not the evaluation's 5
    assert report["calibration"]["wall_s"] > 0
    assert report["flops_ratio"] < 1.0 and "reuse" in report["executed"]
    assert "calibrated on 3 uncached samples (seed 6)" in capsys.readouterr().out


def test_calibration_samples_for_a_policy_that_needs_none_exit_2(tmp_path, capsys):
    argv = ["sample", "--policy", "static", "--calibration-samples", "2", "--steps", "4", "--out", str(tmp_path / "o")]
    assert infer.main(argv) == 2
    assert "--calibration-samples 2: --policy static needs none" in capsys.readouterr().err
