"""The caches users would pick instead of l2c, applied to the same diffusers model for side-by-side comparison.

diffusers' own First Block Cache and TaylorSeer hooks, and cache-dit's DBCache (the optional extra
`pip install .[peers]`). Each peer has the interface `SideBySide` uses for policies: `apply(model, timesteps)`
returns a context manager whose value has `executed` and `plan`, and `describe()` names the setting. A peer is
applied for one sampling run, with the cache context its hooks need, and removed afterwards, leaving the model as
it was (hooks, patched `forward`s and every attribute the peer added). `executed` counts the branch calls that
really ran (COMPUTE) and those the peer skipped or predicted (REUSE), read from counters installed on each
branch's own forward before the peer attaches, so they only count when the branch itself computes.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from .adapters import find_blocks, find_branches
from .plan import Action

CONTEXT = "cond_uncond"  # the context name diffusers pipelines use for one batched conditional + null call
os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "error")  # cache-dit logs every apply at INFO; read at its import


def _instance_keys(module: nn.Module) -> set[str]:
    """Attribute and submodule names set on this instance (a peer may add either)."""
    return set(vars(module)) | {f"_modules.{name}" for name in module._modules}


def _count_calls(module: nn.Module, count: Callable[[], None]) -> None:
    """Count the calls of `module`'s own computation: an instance `forward` installed before a peer attaches, so a
    peer that replaces the module's forward (a diffusers hook) runs it only when it really computes the branch,
    and one that skips the whole block never reaches it. Works for leaf branches too (Flux single blocks'
    `proj_mlp` / `proj_out`), where a forward hook on the module would fire on predicted calls as well."""
    forward = module.forward

    @functools.wraps(forward)
    def counted(*args, **kwargs):
        count()
        return forward(*args, **kwargs)

    module.forward = counted


class PeerRun:
    """One application of a peer to one model: counts model calls and branch computations, then undoes it all."""

    plan = None  # peers decide at run time; there is no plan to show

    def __init__(self, model: nn.Module, before: dict[nn.Module, set[str]]) -> None:
        """Install the counters; the peer attaches after this (`attach`), so the counters sit under its hooks."""
        self.model, self._before = model, before
        self._order = {module: list(module._modules) for module in model.modules()}
        self._detach: Callable[[], None] = lambda: None
        self.branches = find_branches(model)
        self.calls, self.computed = 0, 0
        self.handles = [model.register_forward_hook(self._count_call)]
        for branch in self.branches:
            _count_calls(branch.module, self._count_branch)

    def attach(self, detach: Callable[[], None]) -> PeerRun:
        self._detach = detach
        return self

    def _count_call(self, *_) -> None:
        self.calls += 1

    def _count_branch(self, *_) -> None:
        self.computed += 1

    @property
    def executed(self) -> Counter[Action]:
        total = self.calls * len(self.branches)
        return Counter({Action.COMPUTE: self.computed, Action.REUSE: total - self.computed})

    def __enter__(self) -> PeerRun:
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self._detach()
        # whatever the peer or the counters left on an instance (hook registries, patched and counted forwards)
        for module, keys in self._before.items():
            for key in _instance_keys(module) - keys:
                delattr(module, key.removeprefix("_modules."))
        # cache-dit re-sets the block lists it wrapped, which moves them to the end of `_modules`; diffusers' hooks
        # take the first listed block list as the head (FBCache on Flux would then lead with the single blocks)
        for module, names in self._order.items():
            for name in names:
                module._modules[name] = module._modules.pop(name)


@dataclass
class Peer:
    """Base of the peer adapters: subclasses are dataclasses of their knobs and implement `attach`."""

    method: ClassVar[str]  # the name rows and plots use
    note: ClassVar[str] = ""

    def attach(self, model: nn.Module, num_steps: int) -> Callable[[], None]:
        """Apply the peer to `model` for a run of `num_steps` steps; return the function that removes it."""
        raise NotImplementedError

    @classmethod
    def unavailable(cls, model: nn.Module) -> str | None:
        """Why this peer cannot run on `model` here (not installed, unsupported blocks), or None if it can."""
        return None

    def describe(self) -> str:
        knobs = ",".join(f"{k}={v}" for k, v in vars(self).items())
        return f"{self.name}:{knobs}"

    @property
    def name(self) -> str:
        return type(self).__name__.lower()

    def apply(self, target: nn.Module, timesteps: torch.Tensor | list | None = None) -> PeerRun:
        if timesteps is None:
            raise ValueError(f"{self.describe()}: apply(model, timesteps) needs the run's timesteps (its step count)")
        reason = self.unavailable(target)
        if reason is not None:
            raise RuntimeError(f"{self.describe()} cannot run on {type(target).__name__}: {reason}")
        before = {module: _instance_keys(module) for module in target.modules()}
        run = PeerRun(target, before)
        try:
            return run.attach(self.attach(target, len(timesteps)))
        except BaseException:
            run.__exit__()  # the counters come off again
            raise


def _with_context(model: nn.Module) -> None:
    """Point every stateful diffusers hook under `model` at the batched cond/uncond cache context."""
    from diffusers.hooks import HookRegistry
    from diffusers.hooks.hooks import CacheContext, _set_cache_context

    HookRegistry.check_if_exists_or_initialize(model).invalidate_child_registries_cache()
    _set_cache_context(model, CacheContext(CONTEXT))


def _remover(model: nn.Module, *hook_names: str) -> Callable[[], None]:
    def detach() -> None:
        from diffusers.hooks import HookRegistry

        registry = HookRegistry.check_if_exists_or_initialize(model)
        for name in hook_names:
            registry.remove_hook(name, recurse=True)
        registry.invalidate_child_registries_cache()

    return detach


@dataclass
class FBCache(Peer):
    """diffusers' First Block Cache: skip every block after the first when the first block's residual barely moved.

    The decision is one per model call, on the mean change over the whole batch, so a sample's result depends on
    the rest of its batch (l2c decides per sample).
    """

    method: ClassVar[str] = "FBCache (diffusers)"
    note: ClassVar[str] = "decides per batch (mean residual change of the whole batch)"
    threshold: float = 0.05

    @classmethod
    def unavailable(cls, model: nn.Module) -> str | None:
        from diffusers.hooks._helpers import TransformerBlockRegistry

        block = type(find_blocks(model)[0])
        try:
            TransformerBlockRegistry.get(block)
        except ValueError:
            return f"diffusers has no block metadata for {block.__name__} (TransformerBlockRegistry)"
        return None

    def attach(self, model: nn.Module, num_steps: int) -> Callable[[], None]:
        from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache
        from diffusers.hooks.first_block_cache import _FBC_BLOCK_HOOK, _FBC_LEADER_BLOCK_HOOK

        apply_first_block_cache(model, FirstBlockCacheConfig(threshold=self.threshold))
        _with_context(model)
        return _remover(model, _FBC_LEADER_BLOCK_HOOK, _FBC_BLOCK_HOOK)


@dataclass
class TaylorSeer(Peer):
    """diffusers' TaylorSeer cache on every attention and MLP branch: compute every `interval` steps, predict the
    branch output by a Taylor expansion in between (factors kept in float32, not the bfloat16 default)."""

    method: ClassVar[str] = "TaylorSeer (diffusers)"
    note: ClassVar[str] = "hooks on attn1/attn2/ff (DiT names do not match diffusers' default patterns)"
    interval: int = 5
    warmup: int = 3
    order: int = 1

    def attach(self, model: nn.Module, num_steps: int) -> Callable[[], None]:
        from diffusers.hooks import TaylorSeerCacheConfig, apply_taylorseer_cache
        from diffusers.hooks.taylorseer_cache import _TAYLORSEER_CACHE_HOOK

        # diffusers' default patterns end in `attn` (Flux's names); DiT and PixArt blocks name theirs attn1/attn2/ff.
        modules = {module: name for name, module in model.named_modules()}
        patterns = [re.escape(modules[b.module]) for b in find_branches(model)]
        config = TaylorSeerCacheConfig(
            cache_interval=self.interval,
            disable_cache_before_step=self.warmup,
            max_order=self.order,
            taylor_factors_dtype=torch.float32,
            cache_identifiers=patterns,
        )
        apply_taylorseer_cache(model, config)
        _with_context(model)
        return _remover(model, _TAYLORSEER_CACHE_HOOK)


@dataclass
class DBCache(Peer):
    """cache-dit's DBCache: the first `front` blocks always run; the rest are skipped when their input residual
    changed less than `threshold` since the last computed step (after `warmup` steps that always compute)."""

    method: ClassVar[str] = "DBCache (cache-dit)"
    note: ClassVar[str] = "decides per batch; cache-dit patches the transformer's forward (undone after each run)"
    threshold: float = 0.08
    front: int = 1
    back: int = 0
    warmup: int = 2

    @classmethod
    def unavailable(cls, model: nn.Module) -> str | None:
        if importlib.util.find_spec("cache_dit") is None:
            return "cache-dit is not installed (pip install .[peers])"
        if type(model).__name__ not in ("DiTTransformer2DModel", "FluxTransformer2DModel"):
            name = type(model).__name__
            return f"only DiT and Flux transformers are wired here (cache-dit adapts per class), not {name}"
        return None

    def attach(self, model: nn.Module, num_steps: int) -> Callable[[], None]:
        import cache_dit

        config = cache_dit.DBCacheConfig(
            Fn_compute_blocks=self.front,
            Bn_compute_blocks=self.back,
            residual_diff_threshold=self.threshold,
            max_warmup_steps=self.warmup,
            enable_separate_cfg=False,  # the sampling loop batches the conditional and null halves in one call
            num_inference_steps=num_steps,
        )
        cache_dit.enable_cache(model, cache_config=config)
        return lambda: cache_dit.disable_cache(model)


PEERS: dict[str, type[Peer]] = {cls.__name__.lower(): cls for cls in (FBCache, TaylorSeer, DBCache)}
