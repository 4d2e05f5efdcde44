"""l2c: learned and training-free caching policies for diffusers diffusion transformers."""

from .adapters import ModelSpec, find_branches, model_spec
from .plan import Action, Plan
from .policies import POLICY_KINDS, CachePolicy, FullPolicy, StaticPolicy
from .policy_io import PolicyFormatError, load_policy
from .runtime import CacheRuntime

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
