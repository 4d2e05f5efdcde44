"""l2c: learned and training-free caching policies for diffusers diffusion transformers.

The names below load on first use (PEP 562), so that importing a light submodule (`l2c.options`, for a command
line's `--help`) does not import torch and diffusers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .adapters import ModelSpec, find_branches, model_spec
    from .plan import Action, Plan
    from .policies import POLICY_KINDS, CachePolicy, FullPolicy, StaticPolicy
    from .policy_io import PolicyFormatError, load_policy
    from .runtime import CacheRuntime

_EXPORTS = {
    "ModelSpec": "adapters",
    "find_branches": "adapters",
    "model_spec": "adapters",
    "Action": "plan",
    "Plan": "plan",
    "POLICY_KINDS": "policies",
    "CachePolicy": "policies",
    "FullPolicy": "policies",
    "StaticPolicy": "policies",
    "PolicyFormatError": "policy_io",
    "load_policy": "policy_io",
    "CacheRuntime": "runtime",
}

__all__ = [
    "POLICY_KINDS",
    "Action",
    "CachePolicy",
    "CacheRuntime",
    "FullPolicy",
    "ModelSpec",
    "Plan",
    "PolicyFormatError",
    "StaticPolicy",
    "find_branches",
    "load_policy",
    "model_spec",
]


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:  # a submodule not imported yet (`l2c.plots`), as eager imports used to make available
        try:
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as error:
            if error.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
