"""The runtime's extension surface: what a policy sees at each extension point, and the check made at apply.

A policy extends the runtime by overriding the no-op methods `CachePolicy` declares (`decide`, `observe`,
`observe_output`, `token_pruning`, `before_blocks`, `prepare`, `token_selector`) and the `partial_keys` and
`forecaster` settings (a `Forecaster`: how FORECAST slots predict a branch from its history).
`check_extensions` runs when a policy is applied, so a misspelt or mis-signed override fails loudly instead of
silently turning its behaviour off. Everything a point receives is a frozen record of the trajectory's own state.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, Protocol, get_args

import torch
from diffusers.hooks.hooks import BaseState
from torch import nn

from .plan import Action, Plan

# What the queries of a partial self-attention attend to: "fresh" = keys/values of every token recomputed from this
# step's input; "cached" = fresh keys/values for the selected tokens, the stored ones (from each token's last
# computation) for the rest, so only selected tokens are projected; "forecast" = as "cached", but the other tokens'
# keys/values are forecast from the branch's whole computations by the rule that forecasts their outputs (needs a
# forecaster that fills partial steps), so a token's key and output come from the same step.
PartialKeys = Literal["fresh", "cached", "forecast"]
PARTIAL_KEYS: tuple[str, ...] = get_args(PartialKeys)


# What a branch returns: one [batch, tokens, channels] tensor, or one per token stream for joint attention (Flux
# double blocks, SD3, Qwen-Image: (image, text)). Store, reuse, per-sample rows and forecasts work stream by stream.
BranchOutput = torch.Tensor | tuple[torch.Tensor, ...]


def map_streams(function: Callable[..., torch.Tensor], *outputs: BranchOutput) -> BranchOutput:
    """`function` applied to each stream of the given branch outputs (zipped), keeping their structure."""
    if isinstance(outputs[0], tuple):
        return tuple(function(*parts) for parts in zip(*outputs, strict=True))
    return function(*outputs)


def first_stream(output: BranchOutput) -> torch.Tensor:
    """The image stream: the tensor itself, or the first of a joint attention's (image, text) outputs."""
    return output[0] if isinstance(output, tuple) else output


def streams(output: BranchOutput) -> tuple[torch.Tensor, ...]:
    """Every stream of a branch output: (the tensor,), or a joint attention's (image, text)."""
    return output if isinstance(output, tuple) else (output,)


@dataclass(frozen=True)
class Computed:
    """One computed output of a branch, with the step index and timestep at which it was computed."""

    step: int
    timestep: float
    output: BranchOutput  # [batch, tokens, channels] (per stream)
    # Self-attention under `partial_keys="forecast"`: its key/value projections of this computation ("to_k", "to_v").
    keys_values: Mapping[str, torch.Tensor] | None = None


@dataclass
class BranchStore:
    """A branch's cached output for one trajectory, and each token's age in steps since computed."""

    output: BranchOutput | None = None  # [batch, tokens, channels] (per stream)
    age: torch.Tensor | None = None  # [batch, tokens] of the first (image) stream, int64
    # Self-attention under `partial_keys="cached"`: each token's key and value projections ("to_k", "to_v",
    # [batch, tokens, inner]) as of the step the token was last computed.
    keys_values: dict[str, torch.Tensor] = field(default_factory=dict)
    # Branches whose plan forecasts: the last K full-batch computations, newest first (empty on the others, which
    # keep only `output`). `history[0].output` is `output` itself until a partial step replaces `output`. Training
    # with three actions makes the history soft (`l2c.forecast.SoftComputed`): the cache is then its h_0.
    history: list[Computed] = field(default_factory=list)

    def remember(self, computed: Computed, keep: int) -> None:
        """Put a computation at the front of the history and drop what is older than the last `keep`."""
        if keep > 0:
            self.history = [computed, *self.history[: keep - 1]]


@dataclass
class TrajectoryState(BaseState):
    """Per-trajectory (and per diffusers cache context) cache: reset whenever a new sampling run starts."""

    step: int = -1
    batch_size: int | None = None
    running: bool = False  # a hooked denoiser call of this trajectory is in progress
    image_tokens: int | None = None  # of the running call, where the model family says (`ModelFamily.image_tokens`)
    stores: dict[tuple[int, str], BranchStore] = field(default_factory=dict)
    # Signals a dynamic policy measured on this trajectory (scores, changes, per-sample countdowns), keyed by it.
    signals: dict[Any, Any] = field(default_factory=dict)

    def reset(self, *args, **kwargs) -> None:
        self.step = -1
        self.batch_size = None
        self.running = False
        self.image_tokens = None
        self.stores.clear()
        self.signals.clear()


@dataclass(frozen=True)
class SelectionRequest:
    """What a token selector sees for one partial branch execution."""

    step: int
    block: int
    branch: str
    inputs: torch.Tensor  # the branch input [batch, tokens, channels]
    store: BranchStore
    num_selected: int
    state: TrajectoryState | None = None  # the trajectory, for selectors that read `state.signals`
    # What the tokens left unselected are returned as, when it is not `store.output`: under a forecaster that fills
    # partial steps, a callable computing that forecast [batch, tokens, channels] (on demand: most selectors never
    # read it). None: the stored output.
    unselected: Callable[[], torch.Tensor] | None = None

    def unselected_output(self) -> torch.Tensor:
        """What a token this call does not select gets: the stored output, or the forecast filling the step."""
        return self.store.output if self.unselected is None else self.unselected()


class BranchCall(NamedTuple):
    """One branch execution, as `CachePolicy.observe` and `CachePolicy.token_pruning` see it.

    Immutable like the other records, but a tuple: one is made per branch call, and a frozen dataclass's
    field-by-field `__init__` costs several times a tuple's (`bench/overhead.py`, the runtime's cost per call).
    """

    step: int
    block: int
    branch: str
    action: Action  # what runs: COMPUTE (of every row, or of `rows`), REUSE or PARTIAL
    rows: torch.Tensor | None  # per-sample decision: indices of the rows computed (None: every row)
    module: nn.Module
    store: BranchStore  # `store.output` is the previous output on entry, the new one on exit
    state: TrajectoryState
    plan: Plan | None
    args: tuple
    kwargs: dict


@dataclass(frozen=True)
class TokenPruning:
    """Run a branch on the `kept` tokens only; token i's output is then the kept output at position `source[:, i]`."""

    kept: torch.Tensor  # [batch, kept] token indices, increasing
    source: torch.Tensor  # [batch, tokens] position in `kept` whose output each token takes


@dataclass(frozen=True)
class StepOutput:
    """The denoiser's output at one step, as `CachePolicy.observe_output` sees it."""

    step: int
    state: TrajectoryState
    model: nn.Module
    sample: torch.Tensor  # the model's prediction, e.g. [batch, channels, height, width]


@dataclass(frozen=True)
class BlockInput:
    """The first block's input at one denoiser call, after the step is resolved (`CachePolicy.before_blocks`)."""

    step: int
    state: TrajectoryState
    model: nn.Module  # the denoiser
    plan: Plan | None
    args: tuple  # exactly what the first transformer block is called with
    kwargs: dict


@dataclass(frozen=True)
class ForecastRequest:
    """What a forecaster sees for one FORECAST (or forecast-filled PARTIAL) execution: where, when, and the history.

    `steps` / `timesteps` are those of the branch's kept computations, newest first (`BranchStore.history`).
    """

    step: int
    timestep: float
    block: int
    branch: str
    branch_index: int
    steps: tuple[int, ...]
    timesteps: tuple[float, ...]


class Forecaster(Protocol):
    """How FORECAST predicts a branch output: `Σ_k w_k · history[k].output`, with `weights(request)` = w.

    Reuse is w = (1, 0, …); TaylorSeer's finite differences and exact polynomial extrapolation are rules of the
    history's step gaps (`l2c.forecast`); a learned policy looks w up per (step, block, branch) (`WeightTable`).
    """

    history: int  # K: the computed outputs kept on each branch whose plan forecasts
    fill_partial: bool  # a PARTIAL step fills the tokens it does not recompute from the forecast (not the cache)

    def weights(self, request: ForecastRequest) -> torch.Tensor:
        """w: weights on the newest len(w) ≤ len(request.steps) kept computations; may carry gradients (a table)."""
        ...


TokenSelector = Callable[[SelectionRequest], torch.Tensor]  # -> indices [batch, num_selected]
# `decide`'s answer: (action, token ratio); the action may be a tensor of per-row codes (COMPUTE or REUSE).
Decision = tuple[Action | torch.Tensor, float]


def stalest_tokens(request: SelectionRequest) -> torch.Tensor:
    """Recompute the tokens computed longest ago (ties: lowest index first); needs no extra work."""
    order = torch.argsort(request.store.age, dim=1, descending=True, stable=True)
    return order[:, : request.num_selected]


# -- the check made at apply -----------------------------------------------------------------------------------------
# Each extension point and the arguments the runtime calls it with (after `self`); None: a value, not a method.
EXTENSION_POINTS: dict[str, tuple[str, ...] | None] = {
    "decide": ("step", "block", "branch_index", "state"),
    "observe": ("call",),
    "observe_output": ("out",),
    "token_pruning": ("call",),
    "before_blocks": ("point",),
    "prepare": ("model",),
    "token_selector": (),
    "partial_keys": None,
    "forecaster": None,
}


def check_extensions(policy: object, base: type) -> None:
    """Refuse, when a policy is applied, what would silently turn an extension off.

    TypeError for an override the runtime cannot call with its extension point's arguments, and for a public name
    close to one (a misspelling such as `observe_ouput`); ValueError for a `partial_keys` outside `PartialKeys` and
    for a `forecaster` that is not a `Forecaster` keeping at least one computation.
    `base` is the class declaring the points (`CachePolicy`); only names the policy's own classes define are checked.
    """
    cls = type(policy)
    known = ", ".join(EXTENSION_POINTS)
    own = {name for klass in cls.__mro__[: cls.__mro__.index(base)] for name in vars(klass) if not name.startswith("_")}
    for name in sorted(own):
        if name in EXTENSION_POINTS:
            _check_signature(policy, cls, name, known)
            continue
        close = difflib.get_close_matches(name, EXTENSION_POINTS, n=1, cutoff=0.8)
        if close and not hasattr(base, name):
            raise TypeError(
                f"{cls.__name__}.{name} is not an extension point (did you mean {close[0]!r}?); a policy extends "
                f"the runtime through {known}"
            )
    if policy.partial_keys not in PARTIAL_KEYS:
        raise ValueError(
            f"policy {policy.describe()!r}: field 'partial_keys' is {policy.partial_keys!r}, expected one of "
            f"{list(PARTIAL_KEYS)}"
        )
    forecaster = policy.forecaster
    if policy.partial_keys == "forecast" and not getattr(forecaster, "fill_partial", False):
        raise ValueError(
            f"policy {policy.describe()!r}: partial_keys='forecast' forecasts the keys/values of the tokens a partial "
            f"step does not recompute, so it needs a forecaster that fills partial steps (fill_partial=True; e.g. "
            f"taylor_order ≥ 1), got forecaster {forecaster!r}"
        )
    if forecaster is not None:
        keep = getattr(forecaster, "history", None)
        counted = isinstance(keep, int) and not isinstance(keep, bool) and keep >= 1
        if not counted or not callable(getattr(forecaster, "weights", None)):
            raise ValueError(
                f"policy {policy.describe()!r}: field 'forecaster' is {forecaster!r}, expected a Forecaster "
                "(an integer `history` ≥ 1 and a `weights(request)` method) or None"
            )


def _check_signature(policy: object, cls: type, name: str, known: str) -> None:
    expected = EXTENSION_POINTS[name]
    if expected is None:
        return  # a value (`partial_keys`, `forecaster`), checked after the methods
    member = getattr(policy, name)
    try:
        inspect.signature(member).bind(*expected)
    except TypeError as error:  # not callable, or not with these arguments
        raise TypeError(
            f"{cls.__name__}.{name} cannot be called as the extension point {name}({', '.join(expected)}) "
            f"({error}); a policy extends the runtime through {known}"
        ) from None
    except ValueError:  # no signature to read (a builtin): let the call itself fail
        return
