"""Policies: each turns signals into plans for the shared runtime; `POLICY_KINDS` maps names to classes."""

from .adacache import AdaCachePolicy
from .base import CachePolicy, PolicyTarget
from .blockcache import BlockCachePolicy
from .dato import DaToPolicy
from .duca import DuCaPolicy
from .full import FullPolicy
from .learned import LayerRouterPolicy
from .static import StaticPolicy
from .taylorseer import TaylorSeerPolicy
from .toca import ToCaPolicy
from .tokencache import TokenCachePolicy

POLICY_KINDS: dict[str, type[CachePolicy]] = {
    cls.kind: cls
    for cls in (
        FullPolicy,
        StaticPolicy,
        LayerRouterPolicy,
        ToCaPolicy,
        DuCaPolicy,
        BlockCachePolicy,
        AdaCachePolicy,
        DaToPolicy,
        TokenCachePolicy,
        TaylorSeerPolicy,
    )
}

__all__ = [
    "POLICY_KINDS",
    "AdaCachePolicy",
    "BlockCachePolicy",
    "CachePolicy",
    "DaToPolicy",
    "DuCaPolicy",
    "FullPolicy",
    "LayerRouterPolicy",
    "PolicyTarget",
    "StaticPolicy",
    "ToCaPolicy",
    "TokenCachePolicy",
]
