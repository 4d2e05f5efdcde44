"""Temporary torch hooks: the one way l2c reads (or rewrites) a submodule's output for the length of a call.

Plain `register_forward_hook`s, registered on entry and removed on exit (even on error), so the hooked module runs
through whatever code path it has (fused attention processors included) and is left exactly as it was.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .adapters import find_blocks

K = TypeVar("K")
# (module, args, output) -> None to keep the output, or the output to return instead
ForwardHook = Callable[[nn.Module, tuple, Any], Any]
BlockCall = Callable[[tuple, dict], None]  # (args, kwargs) of the first block's call


@contextmanager
def forward_hooks(hooks: Mapping[nn.Module, ForwardHook]) -> Iterator[None]:
    """While inside, each module's forward hook runs after its forward; all are removed on exit."""
    handles = [module.register_forward_hook(hook) for module, hook in hooks.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def record_outputs(
    modules: Mapping[K, nn.Module], keep: Callable[[torch.Tensor], torch.Tensor] = torch.Tensor.detach
) -> Iterator[dict[K, torch.Tensor]]:
    """While inside, `recorded[key]` is `keep(latest output)` of `modules[key]` (detached by default)."""
    recorded: dict[K, torch.Tensor] = {}

    def recorder(key: K) -> ForwardHook:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            recorded[key] = keep(output)

        return hook

    with forward_hooks({module: recorder(key) for key, module in modules.items()}):
        yield recorded


def submodules(parent: nn.Module, names: tuple[str, ...], what: str) -> dict[str, nn.Module]:
    """`{name: parent.<name>}`; TypeError naming the missing one (`what` says what it was needed for)."""
    found = {}
    for name in names:
        module = getattr(parent, name, None)
        if not isinstance(module, nn.Module):
            raise TypeError(f"{type(parent).__name__} has no `{name}` {what}")
        found[name] = module
    return found


def on_first_block(model: nn.Module, callback: BlockCall) -> RemovableHandle:
    """Run `callback(args, kwargs)` just before the model's first transformer block, with that block's inputs.

    For code outside a cache runtime (under one, `CachePolicy.before_blocks` sees the same input with the step).
    """

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        callback(args, kwargs)

    return find_blocks(model)[0].register_forward_pre_hook(hook, with_kwargs=True)
