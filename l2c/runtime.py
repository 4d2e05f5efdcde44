"""The cache runtime: diffusers hooks that execute a policy's plan on every branch of every block.

One `CacheRuntime` per application of a policy to one model. Its state lives on its hooks (one
`TrajectoryState` per diffusers cache context), never on a class or in a global, so two models in
one process never share anything. Outputs are stored before the block's adaLN gate because the
hooks sit on the branch modules (`attn1`, `attn2`, `ff`) that the block then gates.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import CacheContext, StateManager
from torch import nn

from .adapters import (
    Branch,
    ModelSpec,
    find_blocks,
    find_branches,
    model_family,
    model_spec,
    resolve_denoiser,
    token_partial_supported,
)
from .extension import (
    BlockInput,
    BranchCall,
    BranchOutput,
    BranchStore,
    Computed,
    Forecaster,
    ForecastRequest,
    SelectionRequest,
    StepOutput,
    TokenPruning,
    TokenSelector,
    TrajectoryState,
    first_stream,
    map_streams,
)
from .forecast import kept_history, or_default, soft_history, soft_push, soft_value, weighted_sum
from .hooks import forward_hooks
from .plan import Action, Plan

if TYPE_CHECKING:
    from .policies.base import CachePolicy

STEP_HOOK = "l2c_step"
BRANCH_HOOK = "l2c_branch"
BLOCKS_HOOK = "l2c_blocks"  # on the first transformer block: the "before the blocks" point
HOOK_NAMES = (STEP_HOOK, BLOCKS_HOOK, BRANCH_HOOK)
DEFAULT_CONTEXT = "default"
# `timesteps=RECORD_TIMESTEPS`: no table up front; the first run's timesteps become it (Block Caching's calibration).
RECORD_TIMESTEPS = "record"
# [blocks, branches(, batch(, tokens))], or a mapping (block, branch index) -> that slot's gate, for gates whose token
# counts differ by slot (TokenCache on Flux: per image token on the token-wise branches, a scalar on the others).
Gates = torch.Tensor | Mapping[tuple[int, int], torch.Tensor]


@dataclass(frozen=True)
class SlotGates:
    """Training, one slot of a three-action blend: g_c·f(x) + g_f·forecast + (1 − g_c − g_f)·cached."""

    compute: torch.Tensor  # scalar g_c
    forecast: torch.Tensor  # scalar g_f
    weights: torch.Tensor  # [K]: the forecast's weights on the K newest (soft) computations


@dataclass(frozen=True)
class ActionGates:
    """Training: one step's gates over compute / reuse / forecast, per (block, branch), and the forecast weights.

    Indexed by (block, branch) like a gate tensor, giving that slot's `SlotGates`; a blend with them keeps each
    branch's soft history (`l2c.forecast.SoftComputed`), from which the forecast and the cache are read.
    """

    compute: torch.Tensor  # [blocks, branches]
    forecast: torch.Tensor  # [blocks, branches]; compute + forecast ≤ 1, the rest reuses
    weights: torch.Tensor  # [blocks, branches, K]

    def __getitem__(self, slot: tuple[int, int]) -> SlotGates:
        return SlotGates(self.compute[slot], self.forecast[slot], self.weights[slot])


GateSource = Gates | ActionGates | Callable[[BlockInput], Gates | ActionGates | None]


@dataclass
class Blend:
    """Training: the gates of `CacheRuntime.blending`, resolved (when a callable) at each call's before-blocks point."""

    source: GateSource | None
    refresh: bool  # the blended output becomes the cache (see `BranchHook._blend`)
    gates: Gates | None = None

    def resolve(self, point: BlockInput) -> None:
        self.gates = self.source(point) if callable(self.source) else self.source


@dataclass(frozen=True)
class Execution:
    """How one branch runs at one call: the action, its token ratio, the computing rows, the blend gate.

    Everything Python decides about a call is here (or in its `BranchCall`) before the runner starts, so that
    under `torch.compile` a runner is tensor work only: its graph depends on shapes, never on the step.
    """

    action: Action
    ratio: float = 1.0
    rows: torch.Tensor | None = None  # per-sample decision: indices of the rows computed (None: every row)
    gate: torch.Tensor | SlotGates | None = None  # training: COMPUTE, then g·f(x) + (1−g)·cached (or 3 actions)
    refresh: bool = False  # with a gate: the blend becomes the cache
    tokens: torch.Tensor | None = None  # PARTIAL: the tokens recomputed [batch, selected], chosen at the call
    pruning: TokenPruning | None = None  # COMPUTE on the tokens a policy's pruning keeps
    weights: torch.Tensor | None = None  # FORECAST (or a partial step forecasting the rest): w_k(t), [≤ K]
    changes: torch.Tensor | None = None  # … once partial steps recomputed tokens: w(t) − w(s_i), [batch, tokens, K]


def _timestep_argument(model: nn.Module) -> Callable[[tuple, dict], torch.Tensor]:
    signature = inspect.signature(model.forward)
    if "timestep" not in signature.parameters:
        raise TypeError(f"{type(model).__name__}.forward takes no `timestep`; l2c cannot tell which step runs")

    def read(args: tuple, kwargs: dict) -> torch.Tensor:
        bound = signature.bind_partial(*args, **kwargs)
        value = bound.arguments.get("timestep")
        if value is None:
            raise ValueError(f"{type(model).__name__} was called without `timestep`; l2c needs it to pick the step")
        return torch.as_tensor(value)

    return read


def running_state(states: StateManager) -> TrajectoryState | None:
    """The trajectory whose hooked denoiser call is in progress in the current cache context (None: no such call)."""
    try:
        state = states.get_state()
    except ValueError:  # no cache context set: no denoiser call has opened one
        return None
    return state if state.running else None


def _open_state(states: StateManager) -> TrajectoryState:
    """The current context's state; an unmodified pipeline (or a bare model call) sets no context: use ours."""
    try:
        return states.get_state()
    except ValueError:
        states.set_context(CacheContext(DEFAULT_CONTEXT))
        return states.get_state()


class StepTrackerHook(ModelHook):
    """On the denoiser: maps the called timestep to a step index and opens the matching trajectory state."""

    _is_stateful = True

    def __init__(self, runtime: CacheRuntime) -> None:
        super().__init__()
        self.runtime = runtime
        self.states = StateManager(TrajectoryState)
        self.read_timestep = _timestep_argument(runtime.model)

    @torch.compiler.disable
    def pre_forward(self, module: nn.Module, *args, **kwargs) -> tuple[tuple[Any], dict[str, Any]]:
        if self.runtime.paused:
            state = running_state(self.states)
            if state is not None:
                state.running = False
            self.runtime.running = None
            return args, kwargs
        timestep = self.read_timestep(args, kwargs)
        step = self.runtime.step_of(timestep)
        state = _open_state(self.states)
        batch_size = _batch_size(args, kwargs)
        state.image_tokens = self.runtime.image_tokens(args, kwargs)
        if step <= state.step:
            state.reset()
        if state.batch_size is not None and state.batch_size != batch_size:
            raise ValueError(
                f"batch size changed from {state.batch_size} to {batch_size} inside one sampling run "
                f"(step {step}); the cache holds one row per sample"
            )
        state.step, state.batch_size, state.running = step, batch_size, True
        self.runtime.running = state
        return args, kwargs

    @torch.compiler.disable
    def post_forward(self, module: nn.Module, output: Any) -> Any:
        state = running_state(self.states)
        self.runtime.running = None
        if state is not None:
            state.running = False
            self.runtime.observe_output(state, module, output)
        return output

    def reset_state(self, module: nn.Module) -> nn.Module:
        self.states.reset()
        return module


class BlocksHook(ModelHook):
    """On the first transformer block: the "before the blocks" point, once per denoiser call, with its input."""

    def __init__(self, runtime: CacheRuntime, states: StateManager) -> None:
        super().__init__()
        self.runtime = runtime
        self.states = states

    @torch.compiler.disable
    def pre_forward(self, module: nn.Module, *args, **kwargs) -> tuple[tuple[Any], dict[str, Any]]:
        state = running_state(self.states)
        if state is not None:
            self.runtime.before_blocks(
                BlockInput(state.step, state, self.runtime.model, self.runtime.plan, args, kwargs)
            )
        return args, kwargs


def _hidden_argument(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs.get("hidden_states", kwargs.get("sample"))  # UNets call it `sample`


def _batch_size(args: tuple, kwargs: dict) -> int:
    return int(_hidden_argument(args, kwargs).shape[0])


# Whether a compiled caller is running: dynamo's frame callback is set (on a torch without the query: assume so).
# Outside one, the per-call decision runs as plain Python: `torch.compiler.disable`'s wrapper, which sets and
# restores the frame callback, would cost more than the decision itself on every branch call.
_eval_frame_callback = getattr(torch._C._dynamo.eval_frame, "get_eval_frame_callback", None)


@torch.compiler.disable
def _eager(function: Callable, *args) -> Any:
    """Call `function` with nothing under it compiled (for code whose forward hooks must fire)."""
    return function(*args)


Runner = Callable[["BranchHook", Callable, BranchCall, Execution], torch.Tensor]


class BranchHook(ModelHook):
    """On one branch module: executes the current step's action for this (block, branch).

    Each action runs through its own method, found in `RUNNERS` (a new action is one method and one entry).
    """

    def __init__(self, runtime: CacheRuntime, branch: Branch, branch_index: int, states: StateManager) -> None:
        super().__init__()
        self.runtime = runtime
        self.branch = branch
        self.branch_index = branch_index
        self.states = states
        self.partial_ok = token_partial_supported(branch)
        # `partial_keys="cached"` (and "forecast") reads attn1's key/value projections through temporary forward hooks.
        self.hooks_projections = branch.name == "attn1" and runtime.partial_keys in ("cached", "forecast")
        # "forecast": its whole computations keep their keys/values, forecast on partial steps for unselected tokens.
        self.forecasts_keys = self.hooks_projections and runtime.partial_keys == "forecast"
        self.key = (branch.block, branch.name)  # of its store in `TrajectoryState.stores`

    @torch.compiler.disable(recursive=False)
    def new_forward(self, module: nn.Module, *args, **kwargs) -> torch.Tensor:
        """The branch's action at this call; under `torch.compile` this frame is skipped, not traced.

        The decision (step, plan entry, policy, token choice, bookkeeping) is Python the compiler must not specialise
        on (it would recompile at every step), so `recursive=False` keeps it out of the graph and it runs in hidden
        frames (`_uncompiled_*`), while the runner it then calls (tensor work and the branch's own forward) is compiled:
        one graph per branch action and shape, shared by every block. A branch whose execution a probe or temporary
        forward hooks observe (`observe`, cached keys/values) runs eagerly: compiled code does not fire forward hooks
        added after it was compiled.
        """
        original = self.fn_ref.original_forward
        eager = _eval_frame_callback is not None and _eval_frame_callback() is None  # no compiled caller
        prepared = self._prepare(module, args, kwargs) if eager else _uncompiled_prepare(self, module, args, kwargs)
        if prepared is None:  # branch called outside the denoiser's forward (or while paused): leave it alone
            return original(*args, **kwargs)
        call, run, probe = prepared
        if probe is None and not self.hooks_projections:
            if eager:
                return self._execute(original, call, run)
            # `_execute`'s steps, written here because this frame is never traced: a method called from it would
            # be, and would specialise on the block it reads; the Python parts run uncompiled, the runner compiled.
            if run.action == Action.PARTIAL or self.runtime.prunes:
                run = _uncompiled_tokens(self, call, run)
            output = self.RUNNERS[run.action](self, original, call, run)  # compiled
            if run.action == Action.COMPUTE and self.runtime.keeps[self.branch.block][self.branch_index]:
                _uncompiled_remember(self, call, run, output)
            return output
        with probe if probe is not None else nullcontext():
            return _eager(self._execute, original, call, run)

    def _execute(self, original, call: BranchCall, run: Execution) -> torch.Tensor:
        """Eagerly: the tokens this call computes, the action's runner, the history."""
        if run.action == Action.PARTIAL or self.runtime.prunes:
            run = self._tokens(call, run)
        output = self.RUNNERS[run.action](self, original, call, run)
        if run.action == Action.COMPUTE and self.runtime.keeps[self.branch.block][self.branch_index]:
            self._remember(call, run, output)
        return output

    def _prepare(
        self, module: nn.Module, args: tuple, kwargs: dict
    ) -> tuple[BranchCall, Execution, AbstractContextManager | None] | None:
        """This call's execution, what the extension points see of it, and the policy's probe (None: unhooked).

        Under a compiled caller it runs as `_uncompiled_prepare`, one eager frame, so the compiler is left once per
        branch call; no host-device sync unless the policy decides per sample (`_split_rows` reads its codes).
        """
        runtime, state = self.runtime, self.runtime.running
        if state is None or not state.running:  # a probe may mark it not running to call the branch unhooked
            return None
        branch = self.branch
        store = state.stores.get(self.key)
        if store is None:
            store = state.stores[self.key] = BranchStore()
        run = runtime.execution(state, branch, self.branch_index, store)
        if (run.action != Action.COMPUTE or run.rows is not None) and store.output is None:
            verb = "reuse rows of" if run.rows is not None else run.action.name.lower()
            raise RuntimeError(
                f"plan asks to {verb} block {branch.block} {branch.name} at step "
                f"{state.step}, but no step of this run computed it yet"
            )
        runtime.executed[run.action] += 1
        plan = runtime._plan
        call = BranchCall(
            state.step, branch.block, branch.name, run.action, run.rows, module, store, state, plan, args, kwargs
        )
        if run.action == Action.FORECAST or (run.action == Action.PARTIAL and runtime.fills_partial and store.history):
            run = self._forecast_weights(call, run)
        return call, run, runtime.policy.observe(call) if runtime._observes else None

    def _tokens(self, call: BranchCall, run: Execution) -> Execution:
        """Which tokens the call computes: a partial step's selection, or a computing branch's pruning (decided after
        the probe is entered: an observer may measure what the selector reads, e.g. the oracle's true outputs)."""
        if run.action == Action.PARTIAL:
            if not self.partial_ok:
                raise RuntimeError(f"block {self.branch.block} {self.branch.name} cannot be recomputed token by token")
            hidden = call.args[0] if call.args else call.kwargs["hidden_states"]
            if self.branch.joint:
                index = self._joint_selection(hidden, call.store, call.state, run.ratio)
            else:
                count = max(1, min(hidden.shape[1], round(run.ratio * hidden.shape[1])))
                filled = None if run.weights is None else functools.partial(self._predict, call, run)
                request = SelectionRequest(
                    call.step, call.block, call.branch, hidden, call.store, count, call.state, filled
                )  # fmt: skip
                index = self.runtime.selector(request)
            return dataclasses.replace(run, tokens=index)
        if run.action == Action.COMPUTE and run.gate is None and run.rows is None and self.runtime.prunes:
            pruning = self.runtime.policy.token_pruning(call)
            return run if pruning is None else dataclasses.replace(run, pruning=pruning)
        return run

    # -- one method per action ------------------------------------------------------------------------------------
    def _compute(self, original, call: BranchCall, run: Execution) -> torch.Tensor:
        """Run the branch (blended, on some rows, or on the tokens a pruning keeps) and store its output."""
        store, args, kwargs = call.store, call.args, call.kwargs
        if run.gate is not None:
            return self._blend(original, store, run, args, kwargs)
        if run.rows is not None:
            return self._rows(original, store, run.rows, args, kwargs)
        if run.pruning is not None:
            return self._pruned(original, store, run.pruning, args, kwargs)
        if self.hooks_projections:
            with self._keys_values(call.module, store):
                output = original(*args, **kwargs)
        else:
            output = original(*args, **kwargs)
        store.output = output
        if self.runtime.tracks_ages:
            image = first_stream(output)
            store.age = torch.zeros(image.shape[:2], dtype=torch.long, device=image.device)
        return output

    def _reuse(self, original, call: BranchCall, run: Execution) -> torch.Tensor:
        if self.runtime.tracks_ages:
            call.store.age += 1
        return call.store.output

    def _partial(self, original, call: BranchCall, run: Execution) -> torch.Tensor:
        """Recompute the selected share of the tokens, scatter them into the stored output.

        The store keeps each token's last computed value (its age says when). With the forecaster's `fill_partial`
        the tokens not recomputed are returned forecast (`_predict`), not as stored; the history is left as it is
        (it holds whole computations only).
        """
        store, index = call.store, run.tokens
        base = None if run.weights is None else self._predict(call, run)
        args, kwargs = list(call.args), dict(call.kwargs)
        hidden = args.pop(0) if args else kwargs.pop("hidden_states")
        selected = hidden.gather(1, index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        if self.branch.name == "attn1":
            if kwargs.get("attention_mask") is not None:
                raise RuntimeError("partial self-attention with an attention mask is not supported")
            if not self.hooks_projections:  # "fresh": keys and values come from every token of this step
                kwargs["encoder_hidden_states"] = hidden
        # Selected tokens are the queries; under "cached" keys, `_keys_values` completes their keys and values (under
        # "forecast" keys, from the other tokens' forecast keys and values).
        forecast_kv = self._forecast_keys_values(call, run) if self.forecasts_keys and base is not None else None
        with self._keys_values(self.branch.module, store, index=index, base=forecast_kv):
            fresh = original(selected, *args, **kwargs)
        scatter = index.unsqueeze(-1).expand(-1, -1, fresh.shape[-1])
        store.output = store.output.scatter(1, scatter, fresh)  # a mix of steps: never a history entry
        store.age = (store.age + 1).scatter(1, index, 0)
        return store.output if base is None else base.scatter(1, scatter, fresh)

    def _joint_selection(
        self, hidden: torch.Tensor, store: BranchStore, state: TrajectoryState, ratio: float
    ) -> torch.Tensor:
        """A joint branch's tokens are [text; image] (Flux single blocks): `ratio` of the image tokens are selected
        (the selector sees the image part: inputs and ages), and every text token is recomputed too, first."""
        text = hidden.shape[1] - state.image_tokens
        count = max(1, min(state.image_tokens, round(ratio * state.image_tokens)))
        view = BranchStore(first_stream(store.output)[:, text:], store.age[:, text:])
        request = SelectionRequest(
            state.step, self.branch.block, self.branch.name, hidden[:, text:], view, count, state
        )
        index = self.runtime.selector(request)
        always = torch.arange(text, device=index.device).expand(index.shape[0], -1)
        return torch.cat([always, index + text], dim=1)

    def _forecast(self, original, call: BranchCall, run: Execution) -> torch.Tensor:
        """Predict the output from the branch's history (the stored output and history are left as they are)."""
        output = self._predict(call, run)  # first: it reads the tokens' ages as they were before this step
        if self.runtime.tracks_ages:
            call.store.age += 1
        return output

    RUNNERS: dict[Action, Runner] = {
        Action.COMPUTE: _compute,
        Action.REUSE: _reuse,
        Action.PARTIAL: _partial,
        Action.FORECAST: _forecast,
    }

    # -- the history forecasts read -----------------------------------------------------------------------------------
    def _remember(self, call: BranchCall, run: Execution, output: torch.Tensor) -> None:
        """Keep a whole-batch computation in the history, on branches whose plan forecasts (K from the forecaster).

        Per-row computations (their rows mix steps, see `_rows`) and training blends are not history entries."""
        if run.gate is not None or run.rows is not None:
            return
        keep = self.runtime.keeps[self.branch.block][self.branch_index]
        if keep:
            timestep = float(self.runtime.timesteps[call.step])
            keys_values = dict(call.store.keys_values) if self.forecasts_keys else None
            call.store.remember(Computed(call.step, timestep, output, keys_values), keep)

    def _forecast_request(self, call: BranchCall, step: int) -> ForecastRequest:
        history = call.store.history
        steps, timesteps = tuple(c.step for c in history), tuple(c.timestep for c in history)
        return ForecastRequest(
            step, float(self.runtime.timesteps[step]), call.block, call.branch, self.branch_index, steps, timesteps
        )

    def _forecast_weights(self, call: BranchCall, run: Execution) -> Execution:
        """The forecast's weights at this step (and, once partial steps recomputed tokens, their changes per token)."""
        store = call.store
        if not store.history:
            raise RuntimeError(
                f"plan asks to forecast block {call.block} {call.branch} at step {call.step}, but it keeps no "
                "history: its plan never forecasts this branch (a `decide` may forecast only where the plan does)"
            )
        forecaster = or_default(self.runtime.policy.forecaster)
        weights = forecaster.weights(self._forecast_request(call, call.step))
        changes = None
        if forecaster.fill_partial and store.output is not store.history[0].output:
            if isinstance(store.output, tuple):
                raise RuntimeError(f"block {call.block} {call.branch}: forecasting a partially recomputed joint output")
            changes = self._changes(call, forecaster, weights).to(store.output)
        return dataclasses.replace(run, weights=weights, changes=changes)

    def _predict(self, call: BranchCall, run: Execution) -> torch.Tensor:
        """The forecast F_t = Σ_k w_k(t)·h_k of the branch's output at this step from its history h.

        Under a `fill_partial` forecaster, once a partial step has recomputed some tokens since the newest whole
        computation, each token i is forecast from its own last computed value v_i (at step s_i) instead:
        v_i + F_t − F_{s_i}, the rule's change since then added to it (`run.changes`); a token last computed by the
        whole computation gets F_t itself.
        """
        return forecast_value(call.store.output, [c.output for c in call.store.history], run)

    def _forecast_keys_values(self, call: BranchCall, run: Execution) -> dict[str, torch.Tensor]:
        """Under `partial_keys="forecast"`: every token's key and value projections forecast as `_predict` forecasts
        its output, from the keys/values of the whole computations in the history (`Computed.keys_values`)."""
        store = call.store
        return {
            name: forecast_value(store.keys_values[name], [c.keys_values[name] for c in store.history], run)
            for name in ("to_k", "to_v")
        }

    def _changes(self, call: BranchCall, forecaster: Forecaster, weights: torch.Tensor) -> torch.Tensor:
        """w(t) − w(s_i) per token [batch, tokens, K], s_i = t − 1 − age_i ∈ [s_0, t) (w(s_0) = e_0: v_i = h_0)."""
        history = call.store.history
        kept, newest = len(history), history[0].step

        def padded(w: torch.Tensor) -> torch.Tensor:
            return torch.cat([w.to(torch.float64), w.new_zeros(kept - len(w), dtype=torch.float64)])

        then = [torch.eye(kept, dtype=torch.float64)[0]]  # s_0: the computation itself
        then += [padded(forecaster.weights(self._forecast_request(call, s))) for s in range(newest + 1, call.step)]
        table = (padded(weights) - torch.stack(then)).to(call.store.age.device)  # row j: s_i = s_0 + j
        since = (call.step - 1 - newest - call.store.age).clamp(0, len(then) - 1)
        return table[since]

    # -- variants of COMPUTE ----------------------------------------------------------------------------------------
    def _rows(self, original, store: BranchStore, rows: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        """Compute only the batch rows in `rows` (every batch-sized tensor argument is sliced); the rest reuse.

        Not a history entry: the rows would then hold computations of different steps under one step index, so a
        forecast reads only whole-batch computations (per-sample decisions themselves only compute or reuse).
        """
        batch = first_stream(store.output).shape[0]

        def take(value):
            if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == batch:
                return value.index_select(0, rows.to(value.device))
            return value

        index = rows.to(store.age.device)
        with self._keys_values(self.branch.module, store, rows=index):
            fresh = original(*[take(a) for a in args], **{k: take(v) for k, v in kwargs.items()})
        store.output = map_streams(lambda kept, new: kept.index_copy(0, index, new.to(kept.dtype)), store.output, fresh)
        store.age = (store.age + 1).index_fill(0, index, 0)
        return store.output

    def _pruned(self, original, store: BranchStore, pruning: TokenPruning, args: tuple, kwargs: dict) -> torch.Tensor:
        """Run the branch on the kept tokens only (for self-attention they are all its queries, keys and values)."""
        if not self.partial_ok:
            raise RuntimeError(f"block {self.branch.block} {self.branch.name} cannot run on a subset of its tokens")
        args, kwargs = list(args), dict(kwargs)
        hidden = args.pop(0) if args else kwargs.pop("hidden_states")
        if self.branch.name == "attn1" and kwargs.get("attention_mask") is not None:
            raise RuntimeError("pruned self-attention with an attention mask is not supported")
        kept = hidden.gather(1, pruning.kept.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        fresh = original(kept, *args, **kwargs)
        output = fresh.gather(1, pruning.source.unsqueeze(-1).expand(-1, -1, fresh.shape[-1]))
        store.output = output
        store.age = torch.zeros(output.shape[:2], dtype=torch.long, device=output.device)
        return output

    def _blend(self, original, store: BranchStore, run: Execution, args: tuple, kwargs: dict) -> torch.Tensor:
        """Training: g·f(x) + (1−g)·cached, differentiable in the gate g.

        The cache is left as it was, unless the blending's `refresh`: then the blend becomes the cache, as a
        computed branch refreshes it at inference, and gradients flow through it into later steps' gates.
        """
        gate = run.gate
        if isinstance(gate, SlotGates):
            return self._blend_actions(original, store, run, args, kwargs)
        fresh = original(*args, **kwargs)
        if gate.ndim == 2 and self.branch.joint:  # gates of the image tokens: the text tokens recompute, as on a
            text = first_stream(fresh).shape[1] - gate.shape[1]  # partial step (`_joint_selection`)
            gate = torch.cat([gate.new_ones(gate.shape[0], text), gate], dim=1)
        if gate.ndim == 2:  # per (sample, token)
            gate = gate.unsqueeze(-1)
        elif gate.ndim == 1:  # per sample
            gate = gate.view(-1, 1, 1)
        mixed = map_streams(lambda new, kept: gate * new + (1 - gate) * kept, fresh, store.output)
        if run.refresh:
            store.output = mixed
        return mixed

    def _blend_actions(self, original, store: BranchStore, run: Execution, args: tuple, kwargs: dict) -> torch.Tensor:
        """Training, three actions: g_c·f(x) + g_f·Σ_k w_k·h_k + (1 − g_c − g_f)·h_0 over the soft history h.

        With `refresh` the computation is remembered as at inference (a soft push with weight g_c: the history and
        the cache `h_0` become what they would be after computing with probability g_c); at 0/1 gates every output
        equals the inference's for the same plan and weights exactly. Once the history is soft, the cache `h_0` is
        read from it and `store.output` stays the last hard output: keeping the blended `h_0` as well would hold a
        second tensor per slot and step for the backward pass, read by nothing.
        """
        gates: SlotGates = run.gate
        history = soft_history(store.history, store.output, len(gates.weights))
        newest = torch.zeros_like(gates.weights)
        newest[0] = 1
        fresh = original(*args, **kwargs)
        compute, forecast = gates.compute, gates.forecast
        # The forecast and the cache are both linear in the history: one pass over it, with their weights combined.
        rest = soft_value(history, forecast * gates.weights + (1 - compute - forecast) * newest)
        mixed = map_streams(lambda new, other: torch.addcmul(other, compute, new), fresh, rest)
        if run.refresh:
            step = self.runtime.running.step
            computed = Computed(step, float(self.runtime.timesteps[step]), fresh)
            store.history = soft_push(history, computed, compute)
        else:
            store.history = history
        return mixed

    @contextmanager
    def _keys_values(
        self,
        attn: nn.Module,
        store: BranchStore,
        rows: torch.Tensor | None = None,
        index: torch.Tensor | None = None,
        base: Mapping[str, torch.Tensor] | None = None,
    ) -> Iterator[None]:
        """Self-attention under `partial_keys="cached"`: keep each token's key/value projections in the store.

        Forward hooks on `attn.to_k` / `attn.to_v` for the one call (the processor itself is untouched): a full
        computation stores them; `rows` updates those batch rows; `index` [batch, selected] (a partial step, where
        only the selected tokens are projected) scatters the fresh projections into the stored ones and hands the
        processor the completed [batch, tokens, inner] keys and values: the stored ones, or `base` (the forecast
        keys/values of `partial_keys="forecast"`) with the fresh ones scattered in.
        """
        if not self.hooks_projections:
            yield
            return
        if index is not None and set(store.keys_values) != {"to_k", "to_v"}:
            raise RuntimeError(
                f"block {self.branch.block} attn1: partial step with cached keys/values, but none are stored"
            )
        fired: set[str] = set()

        def complete(name: str):
            def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
                fired.add(name)
                stored = store.keys_values.get(name)
                if index is not None:
                    at = index.unsqueeze(-1).expand(-1, -1, output.shape[-1])
                    completed = stored.scatter(1, at, output)
                    store.keys_values[name] = completed.detach()
                    return completed if base is None else base[name].scatter(1, at, output)
                if rows is None:
                    store.keys_values[name] = output.detach()
                elif stored is not None:
                    store.keys_values[name] = stored.index_copy(0, rows, output.detach())
                return None

            return hook

        with forward_hooks({getattr(attn, name): complete(name) for name in ("to_k", "to_v")}):
            yield
        if fired != {"to_k", "to_v"}:
            raise RuntimeError(
                f"block {self.branch.block} attn1: partial_keys='cached' needs the attention processor to call "
                f"attn.to_k and attn.to_v ({type(attn.processor).__name__} called {sorted(fired)})"
            )


def forecast_value(last: BranchOutput, history: list[BranchOutput], run: Execution) -> BranchOutput:
    """The rule's forecast of a value its history holds (a branch's output, or its key/value projections):
    Σ_k w_k(t)·h_k; or, once partial steps have recomputed tokens since the newest whole computation (`run.changes`
    [batch, tokens, K], the weight differences per token of `BranchHook._changes`), each token's last computed value
    v_i (`last`) plus the rule's change since: v_i + Σ_k (w_k(t) − w_k(s_i))·h_k."""
    if run.changes is None:
        return map_streams(lambda *values: weighted_sum(values, run.weights), *history)
    for k, value in enumerate(history):
        last = last + run.changes[..., k : k + 1] * value
    return last


# The Python parts of a branch call, as a compiled caller runs them: in eager frames (see `BranchHook.new_forward`).
_uncompiled_prepare = torch.compiler.disable(BranchHook._prepare)


@torch.compiler.disable
def _uncompiled_tokens(hook: BranchHook, call: BranchCall, run: Execution) -> Execution:
    run = hook._tokens(call, run)
    if run.tokens is not None:  # the count follows the step's ratio: one graph for every count, not one per count
        torch._dynamo.decorators.mark_unbacked(run.tokens, 1)
    return run


_uncompiled_remember = torch.compiler.disable(BranchHook._remember)


def _split_rows(codes: torch.Tensor, step: int, branch: Branch) -> tuple[Action, torch.Tensor | None]:
    """Per-row action codes → (COMPUTE, row indices) when mixed, else the one action every row takes."""
    codes = codes.flatten()
    compute = codes == Action.COMPUTE
    if bool((~compute & (codes != Action.REUSE)).any()):
        raise ValueError(
            f"per-sample decision for block {branch.block} {branch.name} at step {step} holds codes "
            f"{sorted(set(codes.tolist()))}; per-sample decisions may only compute or reuse"
        )
    if bool(compute.all()):
        return Action.COMPUTE, None
    if not bool(compute.any()):
        return Action.REUSE, None
    return Action.COMPUTE, compute.nonzero().flatten()


class CacheRuntime:
    """A policy applied to one model: owns the hooks, the step table and the resolved plan.

    The policy extends it through the extension points `CachePolicy` declares (checked here, at apply): `decide`
    overrides the plan's entry at run time, `observe` is entered around each branch execution, `token_pruning`
    makes a computing branch run on some of its tokens, `before_blocks` sees the first block's input once per
    denoiser call, `observe_output` the denoiser's output. All see only the trajectory's own state, which lives in
    the step hook's `StateManager` (one `TrajectoryState` per diffusers cache context).
    """

    def __init__(
        self,
        target: nn.Module | object,
        policy: CachePolicy,
        timesteps: torch.Tensor | list | Literal["record"] | None = None,
    ) -> None:
        self.model = resolve_denoiser(target)
        self.pipeline = None if isinstance(target, nn.Module) else target
        self.policy = policy
        policy.check_extensions()
        policy.prepare(self.model)  # first: before the plan is built and any hook is attached
        self.spec: ModelSpec = model_spec(self.model)
        policy.check_model(self.spec, self.pipeline)
        self.family = model_family(self.model)
        # Flux-style pipelines call the model at `timestep / 1000`: the step table is in the scheduler's units.
        self.timestep_scale = 1.0 if self.family is None else self.family.timestep_scale
        self.branches = find_branches(self.model)
        self.branch_names = self.spec.branches
        self.selector: TokenSelector = policy.token_selector()
        self.partial_keys = policy.partial_keys
        self.executed: Counter[Action] = Counter()
        # Per branch call, only the extension points the policy overrides are called (the base ones are no-ops).
        self._decides, self._observes = (_overrides(policy, name) for name in ("decide", "observe"))
        self.prunes = _overrides(policy, "token_pruning")
        self.fills_partial = or_default(policy.forecaster).fill_partial
        self.running: TrajectoryState | None = None  # the trajectory whose denoiser call is in progress
        self.tracks_ages = True  # each token's age in steps since computed; see `_bind`
        self._paused = False
        self._blend: Blend | None = None
        self._timesteps: torch.Tensor | None = None
        self._plan: Plan | None = None
        self._explicit_timesteps = timesteps is not None
        self._recording = isinstance(timesteps, str) and timesteps == RECORD_TIMESTEPS
        if timesteps is not None and not self._recording:
            policy.check_timesteps(torch.as_tensor(timesteps))
            self._bind(torch.as_tensor(timesteps))
        elif policy.timesteps is not None:
            self._bind(torch.as_tensor(policy.timesteps))
        self._attach()

    # -- steps and plan ---------------------------------------------------------------------------
    def _bind(self, timesteps: torch.Tensor) -> None:
        self._timesteps = timesteps.detach().to("cpu", torch.float64).flatten()
        self._plan = self.policy.plan_for(self.spec, self._timesteps)
        self._actions = [[[Action(a) for a in branches] for branches in step] for step in self._plan.actions.tolist()]
        self._ratios = self._plan.token_ratio.tolist()
        self._timestep_values = self._timesteps.tolist()
        # Per (block, branch): how many computations its history keeps (`kept_history`; 0: it keeps only its output).
        forecaster = or_default(self.policy.forecaster)
        blocks, branches = self._plan.actions.shape[1:]
        self.keeps = [[kept_history(self._plan, forecaster, b, i) for i in range(branches)] for b in range(blocks)]
        self._executions = [  # a plan entry's execution is the same at every call: made once, not per call
            [[Execution(a, r) for a, r in zip(*slots, strict=True)] for slots in zip(*step, strict=True)]
            for step in zip(self._actions, self._ratios, strict=True)
        ]
        # Only token-wise work reads the ages (selectors, partial and per-row steps, pruning); a plan that never
        # recomputes part of a branch, under a policy with no run-time extension, need not keep them.
        self.tracks_ages = (
            self._decides or self._observes or self.prunes or bool((self._plan.actions == Action.PARTIAL).any())
        )

    @property
    def plan(self) -> Plan | None:
        return self._plan

    @property
    def timesteps(self) -> torch.Tensor | None:
        """The step table (float64): the index of a called timestep in it is the step."""
        return self._timesteps

    @property
    def paused(self) -> bool:
        return self._paused

    def step_of(self, timestep: torch.Tensor) -> int:
        values = timestep.detach().flatten()
        if values.numel() == 0:
            raise ValueError("empty timestep tensor")
        if values.numel() > 1 and not bool((values == values[0]).all()):
            raise ValueError(f"samples in one batch are at different timesteps {values.unique().tolist()}")
        value = float(values[0]) * self.timestep_scale  # the one host read per denoiser call
        self._follow_pipeline()
        index = self._record(value) if self._recording else self._lookup(value)
        if index is None:
            known = None if self._timesteps is None else [round(t, 4) for t in self._timesteps.tolist()]
            raise ValueError(
                f"field 'timesteps': the model was called at timestep {value:g}, which is not in the policy's "
                f"timestep table {known}; pass the sampling timesteps to apply(..., timesteps=...) or sample "
                "with the scheduler and step count the policy was made for"
            )
        return index

    def _follow_pipeline(self) -> None:
        """On a pipeline, the table is the scheduler's current timesteps: every call may set new ones."""
        steps = getattr(getattr(self.pipeline, "scheduler", None), "timesteps", None)
        if steps is None or self._explicit_timesteps:
            return
        steps = torch.as_tensor(steps).detach().to("cpu", torch.float64).flatten()
        if self._timesteps is not None and steps.shape == self._timesteps.shape and torch.equal(steps, self._timesteps):
            return
        self.policy.check_timesteps(steps)
        self._bind(steps)

    def _record(self, value: float) -> int:
        """Recording: a new timestep extends the table until a call returns to the first one (a second run)."""
        index = self._lookup(value)
        if index is None:
            known = [] if self._timesteps is None else self._timesteps.tolist()
            self._bind(torch.tensor([*known, value], dtype=torch.float64))
            return len(known)
        if index == 0 and len(self._timesteps) > 1:
            self._recording = False
        return index

    def _lookup(self, value: float) -> int | None:
        if self._timesteps is None:
            return None
        tolerance = 1e-4 * self.timestep_scale  # the pipeline's float32 `timestep / 1000`, scaled back
        for index, known in enumerate(self._timestep_values):  # `torch.isclose`'s rule, without building tensors
            if abs(known - value) <= tolerance + 1e-5 * abs(value):
                return index
        return None

    def image_tokens(self, args: tuple, kwargs: dict) -> int | None:
        """The image token count of a denoiser call (None: the model family does not say); checked against the
        count the policy was made for, which sets Flux-style schedulers' shift (`CachePolicy.check_tokens`)."""
        if self.family is None:
            return None
        tokens = self.family.image_tokens(self.model, _hidden_argument(args, kwargs))
        self.policy.check_tokens(tokens, self.family.dynamic_shift)
        return tokens

    # -- the extension points, as the hooks reach them ---------------------------------------------------------------
    def decision(
        self, step: int, block: int, branch_index: int, state: TrajectoryState | None = None
    ) -> tuple[Action | torch.Tensor, float]:
        """The policy's `decide` where it answers, else the plan's entry."""
        if state is not None and self._decides:
            dynamic = self.policy.decide(step, block, branch_index, state)
            if dynamic is not None:
                return dynamic
        return self._actions[step][block][branch_index], self._ratios[step][block][branch_index]

    def execution(self, state: TrajectoryState, branch: Branch, branch_index: int, store: BranchStore) -> Execution:
        """How a branch runs now: a training blend (once the branch has a cached output), else the decision."""
        blend = self._blend
        if blend is not None and blend.gates is not None and store.output is not None:
            return Execution(Action.COMPUTE, gate=blend.gates[branch.block, branch_index], refresh=blend.refresh)
        if not self._decides:
            return self._executions[state.step][branch.block][branch_index]
        action, ratio = self.decision(state.step, branch.block, branch_index, state)
        if isinstance(action, torch.Tensor):  # a per-sample decision: one action code per batch row
            action, rows = _split_rows(action, state.step, branch)
            return Execution(action, ratio, rows)
        return Execution(action, ratio)

    def before_blocks(self, point: BlockInput) -> None:
        self.policy.before_blocks(point)
        if self._blend is not None:
            self._blend.resolve(point)

    def observe_output(self, state: TrajectoryState, model: nn.Module, output: Any) -> None:
        sample = output if isinstance(output, torch.Tensor) else output[0]  # a tensor, tuple or BaseOutput
        self.policy.observe_output(StepOutput(state.step, state, model, sample))

    # -- hooks ------------------------------------------------------------------------------------
    def _attach(self) -> None:
        first_block = find_blocks(self.model)[0]
        modules = [self.model, first_block] + [b.module for b in self.branches]
        for module in modules:
            registry = getattr(module, "_diffusers_hook", None)
            if registry is not None and any(registry.get_hook(name) for name in HOOK_NAMES):
                raise RuntimeError("this model already has an l2c policy applied; call remove() first")
        self._saved = [_Restore(m) for m in modules]
        try:
            step_hook = StepTrackerHook(self)
            HookRegistry.check_if_exists_or_initialize(self.model).register_hook(step_hook, STEP_HOOK)
            blocks_hook = BlocksHook(self, step_hook.states)
            HookRegistry.check_if_exists_or_initialize(first_block).register_hook(blocks_hook, BLOCKS_HOOK)
            index = {name: i for i, name in enumerate(self.branch_names)}
            for branch in self.branches:
                registry = HookRegistry.check_if_exists_or_initialize(branch.module)
                registry.register_hook(BranchHook(self, branch, index[branch.name], step_hook.states), BRANCH_HOOK)
        except BaseException:  # atomic: a failed apply leaves every module exactly as it found it
            self.remove()
            raise
        HookRegistry.check_if_exists_or_initialize(self.model).invalidate_child_registries_cache()

    def remove(self) -> None:
        """Detach every hook and put each module back exactly as it was before `apply`."""
        for saved in self._saved:
            saved.restore()
        self._saved = []
        registry = getattr(self.model, "_diffusers_hook", None)
        if registry is not None:  # foreign hooks stay: their cached list of child registries must forget ours
            registry.invalidate_child_registries_cache()

    def reset(self) -> None:
        """Forget every cached output (all cache contexts); the next call starts a new trajectory."""
        HookRegistry.check_if_exists_or_initialize(self.model).get_hook(STEP_HOOK).reset_state(self.model)

    @contextmanager
    def pause(self) -> Iterator[None]:
        """Run the model as if unhooked (trainers use it for teacher passes); cache state is kept."""
        self._paused = True
        try:
            yield
        finally:
            self._paused = False

    @contextmanager
    def blending(self, gates: GateSource | None, refresh: bool = False) -> Iterator[None]:
        """Training: inside, every branch with a cached output computes and returns g·f(x) + (1−g)·cached.

        `gates` [blocks, branches(, batch(, tokens))], or a callable evaluated at each call's before-blocks point
        (e.g. a predictor reading the first block's input) returning them; None blends nothing (the plan runs).
        With `refresh`, the blend becomes the cache, as a computed branch refreshes it at inference.
        """
        if self._blend is not None:
            raise RuntimeError("runtime.blending(...) is already active; blends do not nest")
        self._blend = Blend(gates, refresh, None if callable(gates) else gates)
        try:
            yield
        finally:
            self._blend = None

    def __enter__(self) -> CacheRuntime:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _overrides(policy: CachePolicy, name: str) -> bool:
    from .policies.base import CachePolicy  # the runtime is imported by the policies' base

    return getattr(type(policy), name) is not getattr(CachePolicy, name)


class _Restore:
    """What `remove()` needs to put one module back exactly as `apply` found it."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.had_forward = "forward" in module.__dict__
        self.had_registry = "_diffusers_hook" in module.__dict__

    def restore(self) -> None:
        if not hasattr(self.module, "_diffusers_hook"):  # a failed apply stopped before reaching this module
            return
        registry = self.module._diffusers_hook
        for name in HOOK_NAMES:
            registry.remove_hook(name, recurse=False)
        if not registry.hooks:
            _drop_empty_registry(self.module, self.had_forward, self.had_registry)


def _drop_empty_registry(module: nn.Module, had_forward: bool, had_registry: bool) -> None:
    """Undo what diffusers leaves behind once its last hook is removed (the one place l2c touches its internals).

    `HookRegistry.remove_hook` restores `forward` by assigning the bound method it had wrapped, which stays as an
    instance attribute, and keeps the emptied registry in `module._diffusers_hook`; diffusers has no call that undoes
    either, so a module l2c found without them gets both deleted, and its class's `forward` is used again.
    """
    if not had_forward:
        module.__dict__.pop("forward", None)
    if not had_registry:
        del module._diffusers_hook
