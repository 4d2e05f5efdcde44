"""Command-line option types and names that import nothing heavy: `infer.py --help` answers without torch.

`parse_classes` is also the trainer's (`data.conditions`): a class spec means the same classes to both.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

SCHEDULERS = {  # --scheduler name → diffusers class name
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "dpm": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "flow-euler": "FlowMatchEulerDiscreteScheduler",  # flow-matching models (Flux, SD3, Wan, Qwen-Image) only
}
AUTO_SCHEDULER = "auto"  # the default: flow-euler on a flow-matching model, ddim on any other
SCHEDULER_CHOICES = (AUTO_SCHEDULER, *sorted(SCHEDULERS))
SCHEDULER_HELP = (
    "auto (default): the model's own kind, flow-euler (FlowMatchEulerDiscreteScheduler) for a flow-matching model, "
    "ddim otherwise; reports name the scheduler that ran"
)
DTYPE_NAMES = ("bf16", "fp16", "fp32")
# The preset names `l2c.policies.POLICY_KINDS` registers (tests/test_cli.py checks they agree): a misspelt `--policy`
# is refused from these before torch, diffusers or a model loads.
PRESET_NAMES = (
    "adacache", "blockcache", "dato", "duca", "full", "l2c", "static", "taylorseer", "toca", "tokencache",
)  # fmt: skip

ClassSpec = str | int | Sequence[int]  # "0-9", "1,3,5", "0-3,7"; n: classes 0 … n−1; or the classes themselves


def parse_classes(spec: ClassSpec) -> tuple[int, ...]:
    """The class labels a spec names, in order: `"0-9"` → 0 … 9, `"1,3,5"`, `"0-3,7"`, `10` → 0 … 9.

    Raises ValueError naming the spec and what was expected (distinct non-negative integers, ranges low-high).
    """
    if isinstance(spec, bool):
        raise ValueError(f"classes {spec!r}: expected a class count, a list of classes or ranges such as 0-9")
    if isinstance(spec, int):
        if spec < 1:
            raise ValueError(f"classes {spec!r}: a class count must be ≥ 1")
        return tuple(range(spec))
    if isinstance(spec, str):
        classes: list[int] = []
        for item in spec.replace(" ", "").split(","):
            low, dash, high = item.partition("-")
            if not (low.isdigit() and (not dash or high.isdigit())):
                raise ValueError(f"classes {spec!r}: {item!r} is not a class or a range low-high (e.g. 0-9 or 1,3,5)")
            if dash and int(high) < int(low):
                raise ValueError(f"classes {spec!r}: range {item!r} ends below its start")
            classes += range(int(low), int(high if dash else low) + 1)
    else:
        classes = list(spec)
        if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in classes):
            raise ValueError(f"classes {spec!r}: expected non-negative integers")
    if not classes or len(set(classes)) != len(classes):
        raise ValueError(f"classes {spec!r}: expected at least one class, each named once")
    return tuple(classes)


def class_spec(text: str) -> tuple[int, ...]:
    """argparse type of `--classes`."""
    try:
        return parse_classes(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer ≥ 1, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer ≥ 0, got {text}")
    return value


def device_count(text: str) -> int | str:
    if text == "auto":
        return text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected an integer ≥ 1 or 'auto', got {text!r}")
    return int(text)


def unknown_policy(name: str) -> str:
    return f"unknown policy {name!r}: expected one of {sorted(PRESET_NAMES)} or a policy directory"


def check_policy_source(text: str) -> None:
    """Refuse a `--policy` that is neither a directory, a hub id (`owner/name`) nor a preset name, importing nothing."""
    if "/" in text or Path(text).exists():
        return
    name = text.partition(":")[0]
    if name not in PRESET_NAMES:
        raise ValueError(unknown_policy(name))
