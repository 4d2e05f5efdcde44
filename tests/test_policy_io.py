"""The policy artifact: round trip, fit checks naming the field, refusal of bad files, fuzzing of both files."""

from __future__ import annotations

import json
import os
import pickle
import re
from collections import Counter
from pathlib import Path

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from l2c_testing import ddim_sample, ddim_timesteps, dit_inputs, tiny_dit, tiny_dit_pipeline, tiny_pixart
from safetensors.torch import load_file, save_file

import l2c
from l2c import Action
from l2c.policy_io import parse_preset


@pytest.fixture(autouse=True)
def _no_grad():
    """No autograd in these tests (scoped per test: the process-wide grad mode is left alone)."""
    with torch.no_grad():
        yield


CONFIG, WEIGHTS = "config.json", "policy.safetensors"
FUZZ = settings(
    max_examples=80,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)


def save_bound(policy, directory: Path, model=None, steps: int = 4, scheduler: str | None = "DDIMScheduler") -> Path:
    model = model if model is not None else tiny_dit()
    return policy.bind(model, ddim_timesteps(steps), scheduler).save_pretrained(directory)


@pytest.fixture
def saved(tmp_path) -> Path:
    """A valid saved static:interval=2 policy for the 2-block tiny DiT and DDIM with 4 steps (750, 500, 250, 0)."""
    return save_bound(l2c.load_policy("static:interval=2"), tmp_path / "policy")


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    """A directory and a pristine copy of a valid artifact's two files; each fuzz example starts from the copy."""
    path = save_bound(l2c.load_policy("static:interval=2"), tmp_path_factory.mktemp("fuzz") / "policy")
    return path, (path / CONFIG).read_text(), (path / WEIGHTS).read_bytes()


def restore(fuzz_dir) -> Path:
    path, config, weights = fuzz_dir
    (path / CONFIG).write_text(config)
    (path / WEIGHTS).write_bytes(weights)
    return path


def edit_config(directory: Path, edit) -> None:
    config = json.loads((directory / CONFIG).read_text())
    edit(config)
    (directory / CONFIG).write_text(json.dumps(config))


def mentions(message: str, *words) -> bool:
    return all(re.search(rf"(?<![\w.]){re.escape(str(w))}(?![\w])", message) for w in words)


# -- round trip -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["full", "static:interval=3,first_full=1,last_full=2"])
def test_save_load_round_trip(tmp_path, preset):
    model = tiny_dit()
    timesteps = ddim_timesteps(10)
    bound = l2c.load_policy(preset).bind(model, timesteps, "DDIMScheduler")
    bound.provenance = {"made_by": "test_policy_io", "seed": 0}
    path = bound.save_pretrained(tmp_path / "policy", model_card=False)
    assert sorted(os.listdir(path)) == [CONFIG, WEIGHTS]
    assert sorted(os.listdir(tmp_path)) == ["policy"]  # no staging directory left behind

    loaded = l2c.load_policy(path)
    assert type(loaded) is type(bound) and loaded.kind == bound.kind
    assert loaded.params() == bound.params()
    assert loaded.target == bound.target
    assert loaded.target.model == l2c.model_spec(model)
    assert loaded.target.scheduler == "DDIMScheduler"
    assert loaded.target.timesteps == tuple(float(t) for t in timesteps)
    assert loaded.provenance == {"made_by": "test_policy_io", "seed": 0}
    spec = l2c.model_spec(model)
    ours, theirs = bound.plan_for(spec, timesteps), loaded.plan_for(spec, timesteps)
    assert torch.equal(ours.actions, theirs.actions) and torch.equal(ours.token_ratio, theirs.token_ratio)
    tensors = load_file(path / WEIGHTS)
    assert torch.equal(tensors["plan.actions"], ours.actions)

    # The loaded policy needs no timesteps argument and runs exactly like the in-memory one.
    x, labels = dit_inputs()
    runtime = bound.apply(model, timesteps=timesteps)
    expected, _ = ddim_sample(model, x, labels, 10)
    runtime.remove()
    runtime = loaded.apply(model)
    got, _ = ddim_sample(model, x, labels, 10)
    runtime.remove()
    assert torch.equal(got, expected)

    bound.save_pretrained(path)  # overwriting an existing policy directory works
    assert l2c.load_policy(str(path)).params() == bound.params()


def test_saving_an_unbound_policy_raises(tmp_path):
    with pytest.raises(ValueError, match="bind"):
        l2c.load_policy("static:interval=2").save_pretrained(tmp_path / "policy")
    assert not (tmp_path / "policy").exists()


# -- fit checks -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("field", "model_factory", "ours", "theirs"),
    [
        ("num_blocks", lambda: tiny_dit(num_layers=3), 2, 3),
        ("hidden_size", lambda: tiny_dit(attention_head_dim=4), 16, 8),
        ("branches", lambda: tiny_pixart(), "('attn1', 'ff')", "('attn1', 'attn2', 'ff')"),
        ("num_tokens", lambda: tiny_dit(sample_size=16), 16, 64),
    ],
)
def test_model_mismatch_names_the_field_and_both_values(saved, field, model_factory, ours, theirs):
    policy = l2c.load_policy(saved)
    model = model_factory()
    with pytest.raises(ValueError) as error:
        policy.apply(model)
    message = str(error.value)
    assert f"'{field}'" in message and str(ours) in message and str(theirs) in message, message
    assert "_diffusers_hook" not in model.__dict__  # nothing was attached


def test_scheduler_mismatch_names_both_classes(saved):
    policy = l2c.load_policy(saved)
    pipe = tiny_dit_pipeline(scheduler=DPMSolverMultistepScheduler())
    with pytest.raises(ValueError) as error:
        policy.apply(pipe)
    assert mentions(str(error.value), "'scheduler'", "'DDIMScheduler'", "'DPMSolverMultistepScheduler'")


def test_step_count_and_timestep_mismatches(saved):
    policy = l2c.load_policy(saved)
    model = tiny_dit()
    with pytest.raises(ValueError) as error:
        policy.apply(model, timesteps=ddim_timesteps(6))
    assert mentions(str(error.value), "'num_steps'", 4, 6)
    with pytest.raises(ValueError) as error:
        policy.apply(model, timesteps=[800, 600, 400, 0])
    assert mentions(str(error.value), "'timesteps'", 750.0, 800.0)

    # Without a timesteps argument the policy's own table is used; a timestep outside it is refused.
    runtime = policy.apply(model)
    x, labels = dit_inputs()
    with pytest.raises(ValueError) as error:
        model(x, timestep=torch.tensor([800]), class_labels=labels)
    assert mentions(str(error.value), "'timesteps'", 800, 750.0)
    runtime.remove()


def test_pipeline_sampling_with_another_step_count_is_refused(saved):
    policy = l2c.load_policy(saved)
    pipe = tiny_dit_pipeline()
    runtime = policy.apply(pipe)
    pipe(class_labels=[1], num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="pt")
    assert runtime.executed == Counter({Action.COMPUTE: 8, Action.REUSE: 8})
    with pytest.raises(ValueError, match="timesteps") as error:  # DDIM 5 steps start at 800
        pipe(class_labels=[1], num_inference_steps=5, output_type="pt")
    assert mentions(str(error.value), 800)


def test_pipeline_sampling_with_a_subset_of_the_steps_is_refused(saved):
    policy = l2c.load_policy(saved)
    pipe = tiny_dit_pipeline()
    policy.apply(pipe)
    with pytest.raises(ValueError, match="num_steps|timesteps"):
        pipe(class_labels=[1], num_inference_steps=2, output_type="pt")


# -- bad files ------------------------------------------------------------------------------------------------------
def test_corrupted_and_truncated_weights_are_format_errors(saved):
    data = (saved / WEIGHTS).read_bytes()
    for bad in (data[:8] + b"\xff" * 12 + data[20:], data[: len(data) // 2], data[:7], b""):
        (saved / WEIGHTS).write_bytes(bad)
        with pytest.raises(l2c.PolicyFormatError, match=WEIGHTS):
            l2c.load_policy(saved)


@pytest.mark.parametrize("name", [CONFIG, WEIGHTS])
def test_missing_file_is_a_format_error(saved, name):
    (saved / name).unlink()
    with pytest.raises(l2c.PolicyFormatError, match="missing"):
        l2c.load_policy(saved)


@pytest.mark.parametrize("key", ["format_version", "kind", "params", "model", "scheduler", "provenance"])
def test_missing_config_key_is_named(saved, key):
    edit_config(saved, lambda c: c.pop(key))
    with pytest.raises(l2c.PolicyFormatError, match=re.escape(f"missing keys ['{key}']")):
        l2c.load_policy(saved)


@pytest.mark.parametrize(
    ("where", "field"), [((), "unexpected keys ['surprise']"), (("scheduler",), "'scheduler'"), (("model",), "'model'")]
)
def test_extra_config_key_is_named(saved, where, field):
    def edit(config):
        node = config
        for key in where:
            node = node[key]
        node["surprise"] = 1

    edit_config(saved, edit)
    with pytest.raises(l2c.PolicyFormatError) as error:
        l2c.load_policy(saved)
    assert field in str(error.value) and "surprise" in str(error.value)


def test_nested_missing_keys_are_named(saved):
    edit_config(saved, lambda c: c["scheduler"].pop("timesteps"))
    with pytest.raises(l2c.PolicyFormatError, match="timesteps"):
        l2c.load_policy(saved)
    edit_config(saved, lambda c: c["scheduler"].update(timesteps=[750.0, 500.0, 250.0, 0.0]))
    edit_config(saved, lambda c: c["model"].pop("hidden_size"))
    with pytest.raises(l2c.PolicyFormatError, match="hidden_size"):
        l2c.load_policy(saved)


def test_newer_format_version_is_refused(saved):
    edit_config(saved, lambda c: c.update(format_version=2))
    with pytest.raises(l2c.PolicyFormatError) as error:
        l2c.load_policy(saved)
    assert mentions(str(error.value), "'format_version'", 2)


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda c: c.update(kind="nope"), "kind"),
        (lambda c: c.update(format_version="1"), "format_version"),
        (lambda c: c["params"].update(interval=0), "params"),
        (lambda c: c["params"].update(interval=3), "plan.actions"),  # config and saved plan disagree
        (lambda c: c["scheduler"].update(num_steps=5), "scheduler.num_steps"),
        (lambda c: c["scheduler"].update(timesteps=[]), "scheduler.timesteps"),
        (lambda c: c["model"].update(num_blocks="2"), "model.num_blocks"),
        (lambda c: c["model"].update(num_blocks=3), "actions"),  # saved plan has 2 blocks
    ],
)
def test_wrong_config_values_are_format_errors(saved, edit, field):
    edit_config(saved, edit)
    with pytest.raises(l2c.PolicyFormatError, match=re.escape(field)):
        l2c.load_policy(saved)


def test_invalid_json_is_a_format_error(saved):
    (saved / CONFIG).write_text('{"format_version": 1,')
    with pytest.raises(l2c.PolicyFormatError, match="JSON"):
        l2c.load_policy(saved)
    (saved / CONFIG).write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(l2c.PolicyFormatError):
        l2c.load_policy(saved)


def test_missing_plan_tensor_is_a_format_error(saved):
    tensors = load_file(saved / WEIGHTS)
    save_file({"plan.token_ratio": tensors["plan.token_ratio"]}, str(saved / WEIGHTS))
    with pytest.raises(l2c.PolicyFormatError, match="plan.actions"):
        l2c.load_policy(saved)


UNPICKLED = []


def _tripwire(tag):
    UNPICKLED.append(tag)
    return tag


class Payload:
    def __reduce__(self):
        return (_tripwire, ("executed",))


@pytest.mark.parametrize("writer", ["torch.save", "torch.save-legacy", "pickle-2", "pickle-0"])
def test_pickle_in_place_of_safetensors_is_refused_without_unpickling(saved, monkeypatch, writer):
    tensors = {"plan.actions": torch.zeros(4, 2, 2, dtype=torch.int8), "payload": Payload()}
    file = saved / WEIGHTS
    if writer == "torch.save":
        torch.save(tensors, file)
    elif writer == "torch.save-legacy":
        torch.save(tensors, file, _use_new_zipfile_serialization=False)
    else:
        file.write_bytes(pickle.dumps(tensors, protocol=int(writer[-1])))

    def refuse(*args, **kwargs):
        raise AssertionError("l2c tried to unpickle a policy file")

    for target, name in ((torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")):
        monkeypatch.setattr(target, name, refuse)
    with pytest.raises(l2c.PolicyFormatError) as error:
        l2c.load_policy(saved)
    message = str(error.value)
    assert WEIGHTS in message
    assert "pickle" in message if writer != "pickle-0" else "safetensors" in message
    assert UNPICKLED == []


# -- presets --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "word"),
    [
        ("static:interval=0", "interval"),
        ("static:foo=1", "foo"),
        ("static:interval=x", "interval"),
        ("static:interval=1.5", "interval"),
        ("static:interval", "interval"),
        ("static:first_full=-1", "first_full"),
        ("full:interval=2", "interval"),
    ],
)
def test_invalid_preset_options_raise_value_error(text, word):
    with pytest.raises(ValueError, match=word):
        l2c.load_policy(text)


def test_presets_parse_to_typed_params():
    policy = l2c.load_policy("static:interval=3,first_full=1,last_full=2")
    assert isinstance(policy, l2c.StaticPolicy)
    assert policy.params() == {"interval": 3, "first_full": 1, "last_full": 2}
    assert policy.describe() == "static:interval=3,first_full=1,last_full=2"
    assert l2c.load_policy(policy.describe()) == policy
    assert isinstance(l2c.load_policy("full"), l2c.FullPolicy)


def test_unknown_policy_name_in_parse_preset_raises_value_error():
    with pytest.raises(ValueError, match="unknown policy 'nosuchpolicy'"):
        parse_preset("nosuchpolicy:interval=2")


@pytest.mark.parametrize("text", ["nosuchpolicy", "Static:interval=2"])
def test_unknown_policy_name_raises_value_error(text):
    with pytest.raises(ValueError, match="unknown policy"):
        l2c.load_policy(text)


# -- inputs that once escaped as another exception class ---------------------------------------------------------
@pytest.mark.parametrize("kind", [[], {"a": 1}])
def test_unhashable_kind_is_a_format_error(saved, kind):
    edit_config(saved, lambda c: c.update(kind=kind))
    with pytest.raises(l2c.PolicyFormatError, match="kind"):
        l2c.load_policy(saved)


def test_huge_integer_timestep_is_a_format_error(saved):
    (saved / CONFIG).write_text((saved / CONFIG).read_text().replace("750.0", "1" + "0" * 400))
    with pytest.raises(l2c.PolicyFormatError, match="timesteps"):
        l2c.load_policy(saved)


@pytest.mark.parametrize(
    ("key", "dtype"),
    [
        ("plan.actions", torch.complex64),
        ("plan.token_ratio", torch.float8_e4m3fn),
        ("plan.token_ratio", torch.float8_e5m2),
        ("plan.token_ratio", torch.complex64),
    ],
)
def test_exotic_plan_dtype_is_a_format_error(saved, key, dtype):
    tensors = load_file(saved / WEIGHTS)
    tensors[key] = tensors[key].to(dtype)
    save_file(tensors, str(saved / WEIGHTS))
    with pytest.raises(l2c.PolicyFormatError):
        l2c.load_policy(saved)


# -- fuzzing --------------------------------------------------------------------------------------------------------
def loads_or_format_error(directory: Path) -> str:
    """The contract: a policy, or a ValueError (PolicyFormatError is one); any other exception fails the test."""
    try:
        policy = l2c.load_policy(directory)
    except l2c.PolicyFormatError:
        return "format-error"
    except ValueError:
        return "value-error"
    assert isinstance(policy, l2c.CachePolicy)
    return "loaded"


SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
KINDS = st.sampled_from(sorted(l2c.POLICY_KINDS)) | VALUES


def json_paths(node, prefix=()):
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    found = []
    for key, child in items:
        found.append(prefix + (key,))
        found.extend(json_paths(child, prefix + (key,)))
    return found


def node_at(config, path):
    for key in path:
        config = config[key]
    return config


@FUZZ
@given(data=st.data())
def test_fuzzed_config_loads_or_raises_a_format_error(fuzz_dir, data):
    saved = restore(fuzz_dir)
    config = json.loads((saved / CONFIG).read_text())
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        paths = json_paths(config)
        operation = data.draw(st.sampled_from(["drop", "set", "set", "add"]), label="operation")
        if operation in ("drop", "set") and paths:
            path = data.draw(st.sampled_from(paths), label="path")
            parent = node_at(config, path[:-1])
            if operation == "drop":
                del parent[path[-1]]
            else:
                parent[path[-1]] = data.draw(KINDS if path == ("kind",) else VALUES, label="value")
        else:
            dicts = [()] + [p for p in paths if isinstance(node_at(config, p), dict)]
            path = data.draw(st.sampled_from(dicts), label="dict")
            key = data.draw(st.sampled_from(["kind", "interval", "timesteps", "num_blocks"]) | st.text(max_size=5))
            node_at(config, path)[key] = data.draw(KINDS if path + (key,) == ("kind",) else VALUES, label="value")
    (saved / CONFIG).write_text(json.dumps(config))
    event(loads_or_format_error(saved))


@FUZZ
@given(data=st.data())
def test_fuzzed_weight_bytes_load_or_raise_a_format_error(fuzz_dir, data):
    saved = restore(fuzz_dir)
    original = (saved / WEIGHTS).read_bytes()
    mode = data.draw(st.sampled_from(["random", "flip", "truncate"]), label="mode")
    if mode == "random":
        content = data.draw(st.binary(max_size=300), label="bytes")
    elif mode == "flip":
        content = bytearray(original)
        for _ in range(data.draw(st.integers(1, 6), label="flips")):
            content[data.draw(st.integers(0, len(original) - 1))] = data.draw(st.integers(0, 255))
        content = bytes(content)
    else:
        content = original[: data.draw(st.integers(0, len(original) - 1), label="length")]
    (saved / WEIGHTS).write_bytes(content)
    outcome = loads_or_format_error(saved)
    event(f"{mode}: {outcome}")
    assert outcome != "loaded" or mode == "flip"


PLAN_DTYPES = [torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float8_e4m3fn]
PLAN_DTYPES += [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64]


@FUZZ
@given(data=st.data())
def test_fuzzed_plan_tensors_load_or_raise_a_format_error(fuzz_dir, data):
    saved = restore(fuzz_dir)
    tensors = load_file(saved / WEIGHTS)
    for key in ("plan.actions", "plan.token_ratio", "extra"):
        operation = data.draw(st.sampled_from(["keep", "drop", "cast", "poke", "replace"]), label=key)
        tensor = tensors.get(key, torch.zeros(4, 2, 2))
        if operation == "drop":
            tensors.pop(key, None)
            continue
        if operation == "cast":
            tensor = tensor.to(data.draw(st.sampled_from(PLAN_DTYPES)))
        elif operation == "poke":
            index = tuple(data.draw(st.integers(0, n - 1)) for n in tensor.shape)
            value = data.draw(st.sampled_from([-1, 0, 1, 2, 3, 127, 0.5, 1.5, float("nan"), float("inf")]))
            tensor = tensor.clone().double()
            tensor[index] = value
            tensor = tensor.to(data.draw(st.sampled_from(PLAN_DTYPES)))
        elif operation == "replace":
            shape = data.draw(st.lists(st.integers(0, 4), max_size=4), label="shape")
            tensor = torch.randint(-2, 4, shape).to(data.draw(st.sampled_from(PLAN_DTYPES)))
        if operation != "keep" or key in tensors:
            tensors[key] = tensor.contiguous()
    save_file(tensors, str(saved / WEIGHTS))
    event(loads_or_format_error(saved))
