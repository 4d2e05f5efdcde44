"""Bad input not covered elsewhere (test_policy_io.py, test_infer.py and test_l2c.py hold the rest): routers that do
not fit, a newer format through the CLI, out-of-range CLI/config values, and property tests of the plan validator.

Each error names the file or flag, the field and the value, and nothing is written.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from l2c_testing import FixedPlanPolicy, ddim_sample, ddim_timesteps, dit_inputs, tiny_dit
from safetensors.torch import load_file, save_file

import infer
import l2c
import train
from l2c import Action, Plan
from l2c.import_l2c import import_official_router
from l2c.policies import LayerRouterPolicy

STEPS = 4


@pytest.fixture(scope="module")
def tiny_dit_dir(tmp_path_factory) -> Path:
    """A 2-block tiny DiT saved as a transformer directory (`--model <dir>`)."""
    path = tmp_path_factory.mktemp("tiny-dit") / "transformer"
    tiny_dit().save_pretrained(path)
    return path


def released_router(path: Path, blocks: int, steps: int = STEPS) -> Path:
    """A router in the release's format (`torch.save` dict, `routers["{i}.prob"]` of 2·blocks logits)."""
    generator = torch.Generator().manual_seed(0)
    routers = {f"{i}.prob": torch.randn(2 * blocks, generator=generator) for i in range(steps)}
    torch.save({"routers": routers}, path)
    return path


# ------------------------------------------------------------------------------------------------------------------
# Published L2C routers whose shapes do not fit
# ------------------------------------------------------------------------------------------------------------------


def test_import_of_a_router_for_another_block_count_exits_2_naming_it(tmp_path, tiny_dit_dir, capsys):
    router = released_router(tmp_path / "router.pt", blocks=28)
    code = infer.main(["import-l2c", str(router), "--model", str(tiny_dit_dir), "--out", str(tmp_path / "policy")])
    assert code == 2
    message = capsys.readouterr().err
    assert str(router) in message and "'num_blocks' 2" in message and "56 branches" in message, message
    assert not (tmp_path / "policy").exists()


def test_an_imported_router_applied_to_a_model_of_another_width_names_hidden_size(tmp_path):
    spec = l2c.model_spec(tiny_dit())
    policy = import_official_router(released_router(tmp_path / "router.pt", blocks=2), 0.1, model=spec)
    policy.apply(tiny_dit()).remove()  # fits the model it was imported for
    with pytest.raises(ValueError, match=r"field 'hidden_size' is 16 in the policy, 8 in the model"):
        policy.apply(tiny_dit(attention_head_dim=4))


def saved_router(tmp_path: Path) -> Path:
    spec = l2c.model_spec(tiny_dit())
    policy = import_official_router(released_router(tmp_path / "router.pt", blocks=2), 0.1, model=spec)
    policy.target = None
    return policy.bind(tiny_dit(), ddim_timesteps(STEPS), "DDIMScheduler").save_pretrained(tmp_path / "policy")


@pytest.mark.parametrize("shape", [(STEPS, 28, 2), (STEPS + 1, 2, 2), (STEPS, 2, 3), (STEPS * 4,)])
def test_saved_router_logits_that_do_not_fit_the_config_name_file_field_and_shapes(tmp_path, shape):
    path = saved_router(tmp_path)
    tensors = load_file(path / "policy.safetensors")
    tensors["router.logits"] = torch.zeros(shape)
    save_file(tensors, str(path / "policy.safetensors"))
    with pytest.raises(l2c.PolicyFormatError) as error:
        l2c.load_policy(path)
    message = str(error.value)
    assert str(path / "policy.safetensors") in message and f"'router.logits' has shape {shape}" in message, message
    assert "(steps, blocks, branches) = (4, 2, 2)" in message


# ------------------------------------------------------------------------------------------------------------------
# The CLIs
# ------------------------------------------------------------------------------------------------------------------


def sample_cli(tmp_path: Path, *extra: str) -> int:
    argv = ["sample", "--model", "embedded:digits", "--steps", "4", "--num-samples", "2", "--no-progress"]
    try:
        return infer.main([*argv, "--out", str(tmp_path / "out"), *extra])
    except SystemExit as exit_info:  # argparse's own refusal of a flag
        return exit_info.code


def test_a_policy_of_a_newer_format_exits_2_naming_file_and_version(tmp_path, capsys):
    path = saved_router(tmp_path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "format_version": 99}))
    assert sample_cli(tmp_path, "--policy", str(path)) == 2
    message = capsys.readouterr().err
    assert str(path / "config.json") in message and "'format_version' is 99" in message and "upgrade" in message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--policy", "toca:ratio=-0.5"], ["'ratio'", "-0.5"]),
        (["--policy", "duca:interval=0"], ["'interval'", "0"]),
        (["--policy", "static:interval=-3"], ["'interval'", "-3"]),
        (["--policy", "Full"], ["unknown policy", "'Full'"]),
        (["--steps", "-1"], ["--steps", "-1"]),
        (["--num-samples", "0"], ["--num-samples", "0"]),
        (["--batch-size", "0"], ["--batch-size", "0"]),
        (["--scheduler", "nosuch"], ["--scheduler", "nosuch"]),
    ],
)
def test_invalid_sample_values_exit_2_naming_flag_and_value(tmp_path, capsys, extra, words):
    assert sample_cli(tmp_path, *extra) == 2
    message = capsys.readouterr().err
    assert all(word in message for word in words), message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("threshold", ["1.5", "-0.1"])
def test_import_with_a_threshold_outside_0_1_exits_2(tmp_path, capsys, tiny_dit_dir, threshold):
    router = released_router(tmp_path / "router.pt", blocks=2)
    argv = ["import-l2c", str(router), "--model", str(tiny_dit_dir), "--threshold", threshold]
    assert infer.main([*argv, "--out", str(tmp_path / "policy")]) == 2
    assert f"field 'threshold' must be in [0, 1], got {threshold}" in capsys.readouterr().err
    assert not (tmp_path / "policy").exists()


@pytest.mark.parametrize(
    ("flag", "value", "words"),
    [
        ("--model.init_args.steps", "0", "field 'steps' must be ≥ 2, got 0"),
        ("--model.init_args.refresh_interval", "0", "field 'refresh_interval' must be ≥ 2, got 0"),
        ("--model.init_args.export_budget", "1.5", "field 'export_budget' must be in [0, 1], got 1.5"),
        ("--model.init_args.export_budget", "-0.5", "field 'export_budget' must be in [0, 1], got -0.5"),
    ],
)
def test_invalid_training_config_values_stop_before_anything_is_written(tmp_path, monkeypatch, flag, value, words):
    argv = ["train.py", "fit", "--config", "configs/l2c/digits-ddim20.yaml", flag, value,
            "--model.init_args.export_dir", str(tmp_path / "policy"), "--trainer.default_root_dir", str(tmp_path),
            "--trainer.logger", "false"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.chdir(Path(train.__file__).parent)
    with pytest.raises((ValueError, SystemExit)) as error:
        train.main()
    assert words in str(error.value) or words in str(error.value.__context__), error.value
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("policy", "words"),
    [
        ("toca:ratio=2", "field 'ratio' must be a number in (0, 1], got 2.0"),
        ("toca:ratio=0", "field 'ratio' must be a number in (0, 1], got 0.0"),
        ("duca:ratio=1.5", "field 'ratio' must be a number in (0, 1], got 1.5"),
        ("toca:interval_weight=1", "field 'interval_weight' must be a number in [0, 1), got 1.0"),
        ("toca:ff_factor=inf", "field 'ff_factor' must be a finite number ≥ 0, got inf"),
        ("toca:grid=0", "field 'grid' must be an integer ≥ 1, got 0"),
        ("dato:prune=1", "field 'prune' must be a number in [0, 1), got 1.0"),
        ("dato:cell=1", "field 'cell' must be an integer ≥ 2, got 1"),
        ("static:first_full=-1", "field 'first_full' must be an integer ≥ 0, got -1"),
        ("adacache:probe_block=-2", "field 'probe_block' must be an integer ≥ -1, got -2"),
        ("blockcache:threshold=nan", "field 'threshold' must be a finite number ≥ 0, got nan"),
    ],
)
def test_out_of_range_preset_knobs_exit_2_in_one_line(tmp_path, capsys, policy, words):
    assert sample_cli(tmp_path, "--policy", policy) == 2
    message = capsys.readouterr().err
    assert words in message and message.count("\n") == 1, message
    assert not (tmp_path / "out").exists()


def test_every_declared_knob_range_names_a_field_of_its_policy():
    import dataclasses

    for kind, cls in l2c.POLICY_KINDS.items():
        fields = {f.name for f in dataclasses.fields(cls)}
        assert set(cls.knob_ranges) <= fields, (kind, set(cls.knob_ranges) - fields)
        cls()  # the defaults are in range (blockcache's uncalibrated default included)


def test_an_existing_file_as_out_exits_2_in_one_line(tmp_path, capsys):
    (tmp_path / "out").write_text("not a directory")
    assert sample_cli(tmp_path) == 2
    message = capsys.readouterr().err
    assert message == f"error: --out {tmp_path / 'out'}: is an existing file, expected a directory (new or existing)\n"


def train_cli(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    argv = ["fit", "--config", "configs/l2c/digits-ddim20.yaml", "--model.init_args.export_dir", str(tmp_path / "p"),
            "--trainer.default_root_dir", str(tmp_path / "root"), "--trainer.logger", "false", *extra]  # fmt: skip
    root = Path(train.__file__).parent
    return subprocess.run([sys.executable, "train.py", *argv], cwd=root, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize(
    ("extra", "line"),
    [
        (["--model.export_budget", "1.5"], "error: l2c trainer: field 'export_budget' must be in [0, 1], got 1.5"),
        (["--model.teacher", "/nonexistent/teacher/dir"], "error: model '/nonexistent/teacher/dir': not an embedded"),
    ],
)
def test_train_py_refuses_bad_input_in_one_line_without_a_traceback(tmp_path, extra, line):
    done = train_cli(tmp_path, *extra)
    assert done.returncode == 2, done.stderr
    errors = [text for text in done.stderr.splitlines() if "rror" in text]
    assert len(errors) == 1 and errors[0].startswith(line), done.stderr
    assert "Traceback" not in done.stderr and "Namespace(" not in done.stderr
    assert not (tmp_path / "p").exists()


def test_train_py_reports_the_trainer_message_not_the_wrapping_union_error():
    try:
        try:
            raise ValueError("l2c trainer: field 'steps' must be ≥ 2, got 0")
        except ValueError as inner:
            raise ValueError("Does not validate against any of the Union subtypes") from inner
    except ValueError as outer:
        assert train.refusal(outer) == "l2c trainer: field 'steps' must be ≥ 2, got 0"


# ------------------------------------------------------------------------------------------------------------------
# Property tests: the plan validator
# ------------------------------------------------------------------------------------------------------------------

PROPERTY = settings(max_examples=80, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
FLAWS = ["none"] * 5 + ["shape", "code", "action dtype", "ratio dtype", "ratio value", "first step"]
BAD_RATIOS = [0.0, -0.5, 1.5, float("nan"), float("inf")]
SHAPE = (STEPS, 2, 2)  # the tiny DiT: 2 blocks × (attn1, ff)


@st.composite
def plans(draw) -> Plan:
    """A legal plan (random actions after an all-compute first step, ratios in (0, 1]) with at most one flaw."""
    flaw = draw(st.sampled_from(FLAWS), label="flaw")
    shape = draw(st.sampled_from([(STEPS, 2, 3), (STEPS - 1, 2, 2), (STEPS, 2)])) if flaw == "shape" else SHAPE
    count = int(torch.tensor(shape).prod())
    codes = draw(st.lists(st.sampled_from([0, 1, 2]), min_size=count, max_size=count))
    ratios = draw(st.lists(st.floats(1e-6, 1.0), min_size=count, max_size=count))
    actions, ratio = torch.tensor(codes).view(shape), torch.tensor(ratios, dtype=torch.float64).view(shape)
    if len(shape) == 3 and flaw != "first step":
        actions[0] = Action.COMPUTE
    if flaw == "code":
        actions.view(-1)[draw(st.integers(0, count - 1))] = draw(st.sampled_from([3, -1, 127]))
    if flaw == "ratio value":
        ratio.view(-1)[draw(st.integers(0, count - 1))] = draw(st.sampled_from(BAD_RATIOS))
    action_dtype = draw(st.sampled_from([torch.bool, torch.float32])) if flaw == "action dtype" else torch.int8
    ratio_dtype = torch.int64 if flaw == "ratio dtype" else draw(st.sampled_from([torch.float32, torch.float64]))
    return Plan(actions.to(action_dtype), ratio.to(ratio_dtype))


@PROPERTY
@given(plan=plans())
def test_a_plan_the_validator_accepts_runs_exactly_as_written(plan):
    """The validator's contract: ValueError naming a field, or a plan the runtime executes slot by slot."""
    try:
        plan.validate(*SHAPE, source="fuzz")
    except ValueError as error:
        assert str(error).startswith("fuzz: field '"), error
        return
    model, (x, labels) = tiny_dit(), dit_inputs()
    with torch.no_grad(), FixedPlanPolicy(make=lambda spec, n: plan).apply(model, ddim_timesteps(STEPS)) as runtime:
        out, _ = ddim_sample(model, x, labels, STEPS)
    assert torch.isfinite(out).all()
    codes, counts = plan.actions.long().unique(return_counts=True)
    expected = Counter({Action(int(code)): int(count) for code, count in zip(codes, counts)})
    assert runtime.executed == expected


# ------------------------------------------------------------------------------------------------------------------
# Property tests: the loader on fuzzed router tensors and l2c params
# ------------------------------------------------------------------------------------------------------------------

LOGIT_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.bool]


@pytest.fixture(scope="module")
def router_dir(tmp_path_factory) -> tuple[Path, bytes, str]:
    path = saved_router(tmp_path_factory.mktemp("router"))
    return path, (path / "policy.safetensors").read_bytes(), (path / "config.json").read_text()


@PROPERTY
@given(data=st.data())
def test_fuzzed_router_policies_load_or_raise_the_format_error(router_dir, data):
    path, weights, config = router_dir
    (path / "policy.safetensors").write_bytes(weights)
    tensors = load_file(path / "policy.safetensors")
    if data.draw(st.booleans(), label="replace logits"):
        shape = data.draw(st.lists(st.integers(0, 5), max_size=4), label="shape")
        values = torch.randn(shape) * data.draw(st.sampled_from([1.0, 1e6, float("inf"), float("nan")]))
        tensors["router.logits"] = values.to(data.draw(st.sampled_from(LOGIT_DTYPES)))
    elif data.draw(st.booleans(), label="drop logits"):
        tensors.pop("router.logits")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "policy.safetensors"))
    edited = json.loads(config)
    key = data.draw(st.sampled_from(["refresh_interval", "threshold", "budget", "nothing"]), label="param")
    if key != "nothing":
        value = st.none() | st.booleans() | st.integers(-3, 30) | st.floats(allow_nan=True) | st.text(max_size=3)
        edited["params"][key] = data.draw(value, label="value")
    (path / "config.json").write_text(json.dumps(edited))
    try:
        policy = l2c.load_policy(path)
    except l2c.PolicyFormatError as error:
        assert str(path) in str(error)
        return
    assert isinstance(policy, LayerRouterPolicy) and policy.logits.shape == (STEPS, 2, 2)
