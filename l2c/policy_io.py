"""The policy artifact: a directory with `config.json` and `policy.safetensors`; never a pickle.

Loading checks everything it reads and raises `PolicyFormatError` naming the file, the field, the
value found and what was expected. Saving writes into a temporary sibling directory and renames
it into place, so a crash never leaves a half-written policy that loads.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import shutil
import tempfile
import typing
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .adapters import ModelSpec
from .model_card import METRICS, write_model_card
from .options import unknown_policy
from .plan import Plan
from .policies import POLICY_KINDS, CachePolicy, PolicyTarget
from .policies.base import StepMatch

# Format 1 holds every action code of `Action` (FORECAST = 3 included) and any tensors a policy saves (e.g. learned
# forecast weights, `forecast.weights`): adding them changed no existing field, so every older file reads as before
# (an older l2c refuses a forecasting file at its unknown action code 3, naming the field).
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "policy.safetensors"
CONFIG_KEYS = {"format_version", "kind", "params", "model", "scheduler", "provenance"}
SCHEDULER_KEYS = {"class", "num_steps", "timesteps"}
PICKLE_MAGIC = (b"\x80", b"PK\x03\x04")  # a pickle protocol header, or torch.save's zip container


class PolicyFormatError(ValueError):
    """A policy file that is not what l2c writes: the message names file, field, value and expectation."""


def save_policy(
    policy: CachePolicy,
    directory: str | Path,
    metrics: dict | None = None,
    name: str | None = None,
    model_card: bool = True,
) -> Path:
    """Write `policy` (bound to its model) with its model card (`README.md`, `plan.png`; `l2c.model_card`).

    `metrics`: numbers measured against the uncached model (e.g. `infer.py sample`'s flops_ratio and psnr_db), kept
    in the provenance and shown on the card; `name`: how the card tells users to load it (a hub id);
    `model_card=False`: the two files loading reads, nothing else.
    """
    if metrics:
        policy = copy.copy(policy)
        policy.provenance = {**policy.provenance, METRICS: dict(metrics)}
    if policy.target is None:
        raise ValueError(
            f"policy {policy.describe()!r} is not bound to a model: call policy.bind(model, timesteps, "
            "scheduler) before save_pretrained"
        )
    directory = Path(directory)
    target = policy.target
    plan = policy.plan_for(target.model, torch.tensor(target.timesteps))
    config = {
        "format_version": FORMAT_VERSION,
        "kind": policy.kind,
        "params": policy.params(),
        **target.to_dict(),
        "provenance": policy.provenance,
    }
    tensors = {"plan.actions": plan.actions, "plan.token_ratio": plan.token_ratio, **policy.tensors()}
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        (staging / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(staging / WEIGHTS_NAME))
        if model_card:
            write_model_card(staging, policy, plan, name)
        # Renames only: the old policy is whole until the new one is in place (never half-deleted), and a crash
        # between the two renames leaves it whole in the hidden sibling `retired`.
        retired = staging.with_name(staging.name + ".old")
        if directory.exists():
            os.replace(directory, retired)
        os.replace(staging, directory)
        shutil.rmtree(retired, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def load_policy(source: str | Path, step_match: StepMatch | None = None) -> CachePolicy:
    """A policy from a preset name (`static:interval=2`), a local directory, or a hub repository id.

    `step_match="index"`: apply it to runs whose timestep table differs from the saved one (e.g. Flux at another
    resolution), step i of the plan at step i of the run; by default such a run is refused, naming both tables.
    """
    return _load(source).matching(step_match)


def _load(source: str | Path) -> CachePolicy:
    text = str(source)
    path = Path(text)
    if path.exists():
        return _load_directory(path)
    if "/" not in text:  # neither a path nor a hub id: a preset name, or a typo of one
        return parse_preset(text)
    return _load_directory(_download(text))


def parse_preset(text: str) -> CachePolicy:
    """`kind[:key=value,...]` → a policy; values are converted to the field's declared type."""
    name, _, rest = text.partition(":")
    if name not in POLICY_KINDS:
        raise ValueError(unknown_policy(name))
    cls = POLICY_KINDS[name]
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.init and not f.kw_only}
    params = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            raise ValueError(f"policy {name!r}: unknown option {item!r}; options are {sorted(fields)} as key=value")
        params[key] = _convert(name, key, value, hints[key])
    return cls(**params)


def _convert(policy: str, key: str, value: str, hint: object) -> object:
    base = next((t for t in typing.get_args(hint) if t is not type(None)), hint)
    try:
        if base is bool:
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(value)
            return value.lower() in ("true", "1")
        return base(value) if base in (int, float, str) else json.loads(value)
    except (ValueError, json.JSONDecodeError):
        raise ValueError(
            f"policy {policy!r}: option {key!r} expects {getattr(base, '__name__', base)}, got {value!r}"
        ) from None


def _download(repo_id: str) -> Path:
    if repo_id.count("/") != 1:
        raise FileNotFoundError(f"policy {repo_id!r}: no such directory, preset or hub repository id")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=[CONFIG_NAME, WEIGHTS_NAME]))
    except Exception as error:  # noqa: BLE001 - hub errors come in many classes; report the cause
        raise FileNotFoundError(
            f"policy {repo_id!r}: not a local directory, and the hub download failed: {error}"
        ) from error


def _fail(path: Path, field: str, value: object, expected: str) -> typing.NoReturn:
    raise PolicyFormatError(f"{path}: field '{field}' is {value!r}, expected {expected}")


def _read_config(path: Path) -> dict:
    file = path / CONFIG_NAME
    if not file.is_file():
        raise PolicyFormatError(f"{file}: missing; a policy directory holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise PolicyFormatError(f"{file}: not valid JSON ({error})") from error
    if not isinstance(config, dict):
        _fail(file, "<root>", type(config).__name__, "a JSON object")
    missing, extra = sorted(CONFIG_KEYS - set(config)), sorted(set(config) - CONFIG_KEYS)
    if missing or extra:
        raise PolicyFormatError(
            f"{file}: missing keys {missing}, unexpected keys {extra}; expected {sorted(CONFIG_KEYS)}"
        )
    version = config["format_version"]
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        _fail(file, "format_version", version, "a positive integer")
    if version > FORMAT_VERSION:
        _fail(file, "format_version", version, f"≤ {FORMAT_VERSION} (written by a newer l2c; upgrade l2c)")
    if not isinstance(config["kind"], str) or config["kind"] not in POLICY_KINDS:
        _fail(file, "kind", config["kind"], f"one of {sorted(POLICY_KINDS)}")
    for key, kind in (("params", dict), ("model", dict), ("scheduler", dict), ("provenance", dict)):
        if not isinstance(config[key], kind):
            _fail(file, key, config[key], "a JSON object")
    return config


def _read_target(file: Path, config: dict) -> PolicyTarget:
    try:
        model = ModelSpec.from_dict(config["model"])
    except (ValueError, TypeError) as error:
        raise PolicyFormatError(f"{file}: field 'model': {error}") from error
    for name, kind in (("num_blocks", int), ("hidden_size", int), ("family", str)):
        if not isinstance(getattr(model, name), kind):
            _fail(file, f"model.{name}", getattr(model, name), kind.__name__)
    scheduler = config["scheduler"]
    missing, extra = sorted(SCHEDULER_KEYS - set(scheduler)), sorted(set(scheduler) - SCHEDULER_KEYS)
    if missing or extra:
        raise PolicyFormatError(f"{file}: field 'scheduler': missing keys {missing}, unexpected keys {extra}")
    timesteps = scheduler["timesteps"]
    if not isinstance(timesteps, list) or not timesteps or not all(_is_timestep(t) for t in timesteps):
        _fail(file, "scheduler.timesteps", timesteps, "a non-empty list of finite numbers")
    if scheduler["num_steps"] != len(timesteps):
        _fail(file, "scheduler.num_steps", scheduler["num_steps"], f"{len(timesteps)} (the length of timesteps)")
    return PolicyTarget(model, scheduler["class"], tuple(float(t) for t in timesteps))


def _is_timestep(value: object) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return abs(value) < 1e12 and math.isfinite(value)


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    file = path / WEIGHTS_NAME
    if not file.is_file():
        raise PolicyFormatError(f"{file}: missing; a policy directory holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    with open(file, "rb") as handle:
        head = handle.read(9)
    # A safetensors file opens with its header's length (8 bytes, whose first may be 0x80) and then "{".
    if head.startswith(PICKLE_MAGIC) and head[8:9] != b"{":
        raise PolicyFormatError(
            f"{file}: is a pickle / torch.save file; l2c never unpickles a policy (expected safetensors)"
        )
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise PolicyFormatError(f"{file}: not a readable safetensors file ({error})") from error


def _load_directory(path: Path) -> CachePolicy:
    config = _read_config(path)
    file = path / CONFIG_NAME
    target = _read_target(file, config)
    tensors = _read_tensors(path)
    cls = POLICY_KINDS[config["kind"]]
    try:
        policy = cls.from_artifact(config["params"], tensors, target)
    except (TypeError, ValueError) as error:
        raise PolicyFormatError(
            f"{file}: field 'params' {config['params']!r} does not make a {cls.kind} policy: {error}"
        ) from error
    policy.provenance = config["provenance"]
    _check_plan(path, policy, tensors)
    return policy


def _check_plan(path: Path, policy: CachePolicy, tensors: dict[str, torch.Tensor]) -> None:
    file = path / WEIGHTS_NAME
    for key in ("plan.actions", "plan.token_ratio"):
        if key not in tensors:
            _fail(file, key, None, "a tensor (the plan the policy was saved with)")
    target = policy.target
    saved = Plan(tensors["plan.actions"], tensors["plan.token_ratio"])
    try:
        saved.validate(len(target.timesteps), target.model.num_blocks, len(target.model.branches), source=str(file))
    except ValueError as error:
        raise PolicyFormatError(str(error)) from error
    try:  # e.g. router logits whose shape does not fit the model and steps the config names
        plan = policy.plan_for(target.model, torch.tensor(target.timesteps))
    except ValueError as error:
        raise PolicyFormatError(f"{file}: {error}") from error
    if not torch.equal(plan.actions.to(saved.actions.dtype), saved.actions) or not torch.allclose(
        plan.token_ratio, saved.token_ratio.float()
    ):
        raise PolicyFormatError(f"{file}: field 'plan.actions' disagrees with the plan its config.json describes")


class HubClient(typing.Protocol):
    """What `push_policy` calls on `huggingface_hub.HfApi` (a test passes a local stand-in)."""

    def create_repo(self, repo_id: str, *, private: bool | None = None, exist_ok: bool = False) -> object: ...

    def upload_folder(self, *, repo_id: str, folder_path: str | Path, commit_message: str | None = None) -> object: ...


def push_policy(
    policy: CachePolicy,
    repo_id: str,
    *,
    metrics: dict | None = None,
    private: bool | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    api: HubClient | None = None,
) -> str:
    """Save `policy` with its model card into a temporary directory and upload it as hub repository `repo_id`
    (created if missing); `l2c.load_policy(repo_id)` loads it back. Returns the repository id."""
    if repo_id.count("/") != 1:
        raise ValueError(f"push_to_hub: repo_id {repo_id!r} is not a hub repository id (expected owner/name)")
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="l2c-push-") as scratch:
        directory = save_policy(policy, Path(scratch) / "policy", metrics=metrics, name=repo_id)
        api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(
            repo_id=repo_id, folder_path=directory, commit_message=commit_message or f"l2c policy {policy.describe()}"
        )
    return repo_id
