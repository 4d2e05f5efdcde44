"""Policies: each turns signals into plans for the shared runtime; `POLICY_KINDS` maps names to classes."""

from .base import CachePolicy, PolicyTarget
from .full import FullPolicy
from .learned import LayerRouterPolicy
from .static import StaticPolicy

POLICY_KINDS: dict[str, type[CachePolicy]] = {cls.kind: cls for cls in (FullPolicy, StaticPolicy, LayerRouterPolicy)}

__all__ = ["POLICY_KINDS", "CachePolicy", "FullPolicy", "LayerRouterPolicy", "PolicyTarget", "StaticPolicy"]
