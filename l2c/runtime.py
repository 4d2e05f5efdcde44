"""The cache runtime: diffusers hooks that execute a policy's plan on every branch of every block.

One `CacheRuntime` per application of a policy to one model. Its state lives on its hooks (one
`TrajectoryState` per diffusers cache context), never on a class or in a global, so two models in
one process never share anything. Outputs are stored before the block's adaLN gate because the
hooks sit on the branch modules (`attn1`, `attn2`, `ff`) that the block then gates.
"""

from __future__ import annotations

import inspect
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager
from torch import nn

from .adapters import Branch, ModelSpec, find_branches, model_spec, resolve_denoiser, token_partial_supported
from .plan import Action, Plan

if TYPE_CHECKING:
    from .policies.base import CachePolicy

STEP_HOOK = "l2c_step"
BRANCH_HOOK = "l2c_branch"
DEFAULT_CONTEXT = "default"
# What the queries of a partial self-attention attend to (a policy's optional `partial_keys` attribute): "fresh" =
# keys/values of every token recomputed from this step's input; "cached" = fresh keys/values for the selected
# tokens, the stored ones (from each token's last computation) for the rest, so only selected tokens are projected.
PARTIAL_KEYS = ("fresh", "cached")


@dataclass
class BranchStore:
    """A branch's cached output for one trajectory, and each token's age in steps since computed."""

    output: torch.Tensor | None = None  # [batch, tokens, channels]
    age: torch.Tensor | None = None  # [batch, tokens], int64
    # Self-attention under `partial_keys="cached"`: each token's key and value projections ("to_k", "to_v",
    # [batch, tokens, inner]) as of the step the token was last computed.
    keys_values: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class TrajectoryState(BaseState):
    """Per-trajectory (and per diffusers cache context) cache: reset whenever a new sampling run starts."""

    step: int = -1
    batch_size: int | None = None
    stores: dict[tuple[int, str], BranchStore] = field(default_factory=dict)
    # Signals a dynamic policy measured on this trajectory (scores, changes, per-sample countdowns), keyed by it.
    signals: dict[Any, Any] = field(default_factory=dict)

    def reset(self, *args, **kwargs) -> None:
        self.step = -1
        self.batch_size = None
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


@dataclass(frozen=True)
class BranchCall:
    """One branch execution, as a policy's optional `observe(call)` sees it (see `CacheRuntime.observe`)."""

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
    """The denoiser's output at one step, as a policy's optional `observe_output(out)` sees it."""

    step: int
    state: TrajectoryState
    model: nn.Module
    sample: torch.Tensor  # the model's prediction, e.g. [batch, channels, height, width]


TokenSelector = Callable[[SelectionRequest], torch.Tensor]  # -> indices [batch, num_selected]


def stalest_tokens(request: SelectionRequest) -> torch.Tensor:
    """Recompute the tokens computed longest ago (ties: lowest index first); needs no extra work."""
    order = torch.argsort(request.store.age, dim=1, descending=True, stable=True)
    return order[:, : request.num_selected]


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


class StepTrackerHook(ModelHook):
    """On the denoiser: maps the called timestep to a step index and opens the matching trajectory state."""

    _is_stateful = True

    def __init__(self, runtime: CacheRuntime) -> None:
        super().__init__()
        self.runtime = runtime
        self.states = StateManager(TrajectoryState)
        self.read_timestep = _timestep_argument(runtime.model)

    def pre_forward(self, module: nn.Module, *args, **kwargs) -> tuple[tuple[Any], dict[str, Any]]:
        if self.runtime.paused:
            self.runtime.current = None
            return args, kwargs
        timestep = self.read_timestep(args, kwargs)
        step = self.runtime.step_of(timestep)
        if self.states._context is None:
            self.states.set_context(_default_context())
        state = self.states.get_state()
        batch_size = _batch_size(args, kwargs)
        if step <= state.step:
            state.reset()
        if state.batch_size is not None and state.batch_size != batch_size:
            raise ValueError(
                f"batch size changed from {state.batch_size} to {batch_size} inside one sampling run "
                f"(step {step}); the cache holds one row per sample"
            )
        state.step, state.batch_size = step, batch_size
        self.runtime.current = state
        return args, kwargs

    def post_forward(self, module: nn.Module, output: Any) -> Any:
        state, self.runtime.current = self.runtime.current, None
        if state is not None:
            self.runtime.observe_output(state, module, output)
        return output

    def reset_state(self, module: nn.Module) -> nn.Module:
        self.states.reset()
        return module


def _default_context():
    from diffusers.hooks.hooks import CacheContext

    return CacheContext(DEFAULT_CONTEXT)


def _batch_size(args: tuple, kwargs: dict) -> int:
    hidden = args[0] if args else kwargs.get("hidden_states", kwargs.get("sample"))  # UNets call it `sample`
    return int(hidden.shape[0])


class BranchHook(ModelHook):
    """On one branch module: executes the current step's action for this (block, branch)."""

    def __init__(self, runtime: CacheRuntime, branch: Branch, branch_index: int) -> None:
        super().__init__()
        self.runtime = runtime
        self.branch = branch
        self.branch_index = branch_index
        self.partial_ok = token_partial_supported(branch)

    def new_forward(self, module: nn.Module, *args, **kwargs) -> torch.Tensor:
        original = self.fn_ref.original_forward
        state = self.runtime.current
        if state is None:  # branch called outside the denoiser's forward: leave it alone
            return original(*args, **kwargs)
        key = (self.branch.block, self.branch.name)
        store = state.stores.setdefault(key, BranchStore())
        if self.runtime.blend is not None and store.output is not None:
            return self._blend(original, store, args, kwargs)
        action, ratio = self.runtime.decision(state.step, self.branch.block, self.branch_index, state)
        rows = None
        if isinstance(action, torch.Tensor):  # a per-sample decision: one action code per batch row
            action, rows = _split_rows(action, state.step, self.branch)
        if (action != Action.COMPUTE or rows is not None) and store.output is None:
            verb = "reuse rows of" if rows is not None else action.name.lower()
            raise RuntimeError(
                f"plan asks to {verb} block {self.branch.block} {self.branch.name} at step "
                f"{state.step}, but no step of this run computed it yet"
            )
        self.runtime.executed[action] += 1
        branch, plan = self.branch, self.runtime.plan
        call = BranchCall(state.step, branch.block, branch.name, action, rows, module, store, state, plan, args, kwargs)
        with self.runtime.observe(call):
            if action == Action.REUSE:
                store.age += 1
                return store.output
            if action == Action.PARTIAL:
                return self._partial(original, store, state, ratio, args, kwargs)
            if rows is not None:
                return self._rows(original, store, rows, args, kwargs)
            pruning = self.runtime.pruning(call)
            if pruning is not None:
                return self._pruned(original, store, pruning, args, kwargs)
            with self._keys_values(module, store):
                output = original(*args, **kwargs)
            store.output = output
            store.age = torch.zeros(output.shape[:2], dtype=torch.long, device=output.device)
            return output

    def _rows(self, original, store: BranchStore, rows: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        """Compute only the batch rows in `rows` (every batch-sized tensor argument is sliced); the rest reuse."""
        batch = store.output.shape[0]

        def take(value):
            if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == batch:
                return value.index_select(0, rows.to(value.device))
            return value

        index = rows.to(store.output.device)
        with self._keys_values(self.branch.module, store, rows=index):
            fresh = original(*[take(a) for a in args], **{k: take(v) for k, v in kwargs.items()})
        store.output = store.output.index_copy(0, index, fresh.to(store.output.dtype))
        store.age = (store.age + 1).index_fill(0, index, 0)
        return store.output

    def _pruned(self, original, store: BranchStore, pruning: TokenPruning, args: tuple, kwargs: dict) -> torch.Tensor:
        """Run the branch on the kept tokens only (for self-attention they are all its queries, keys and values)."""
        if not self.partial_ok:
            raise RuntimeError(f"block {self.branch.block} {self.branch.name} cannot run on a subset of its tokens")
        args = list(args)
        hidden = args.pop(0) if args else kwargs.pop("hidden_states")
        if self.branch.name == "attn1" and kwargs.get("attention_mask") is not None:
            raise RuntimeError("pruned self-attention with an attention mask is not supported")
        kept = hidden.gather(1, pruning.kept.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        fresh = original(kept, *args, **kwargs)
        output = fresh.gather(1, pruning.source.unsqueeze(-1).expand(-1, -1, fresh.shape[-1]))
        store.output = output
        store.age = torch.zeros(output.shape[:2], dtype=torch.long, device=output.device)
        return output

    @contextmanager
    def _keys_values(
        self, attn: nn.Module, store: BranchStore, rows: torch.Tensor | None = None, index: torch.Tensor | None = None
    ) -> Iterator[None]:
        """Self-attention under `partial_keys="cached"`: keep each token's key/value projections in the store.

        Plain forward hooks on `attn.to_k` / `attn.to_v` for the one call (the processor itself is untouched):
        a full computation stores them; `rows` updates those batch rows; `index` [batch, selected] (a partial step,
        where only the selected tokens are projected) scatters the fresh projections into the stored ones and hands
        the processor the completed [batch, tokens, inner] keys and values.
        """
        if self.branch.name != "attn1" or self.runtime.partial_keys != "cached":
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
                    output = stored.scatter(1, index.unsqueeze(-1).expand(-1, -1, output.shape[-1]), output)
                    store.keys_values[name] = output.detach()
                    return output
                if rows is None:
                    store.keys_values[name] = output.detach()
                elif stored is not None:
                    store.keys_values[name] = stored.index_copy(0, rows, output.detach())
                return None

            return hook

        handles = [getattr(attn, name).register_forward_hook(complete(name)) for name in ("to_k", "to_v")]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
        if fired != {"to_k", "to_v"}:
            raise RuntimeError(
                f"block {self.branch.block} attn1: partial_keys='cached' needs the attention processor to call "
                f"attn.to_k and attn.to_v ({type(attn.processor).__name__} called {sorted(fired)})"
            )

    def _blend(self, original, store: BranchStore, args: tuple, kwargs: dict) -> torch.Tensor:
        """Training: g·f(x) + (1−g)·cached, differentiable in the gate g.

        The cache is left as it was, unless `runtime.blend_refresh`: then the blend becomes the cache, as a
        computed branch refreshes it at inference, and gradients flow through it into later steps' gates.
        """
        gate = self.runtime.blend[self.branch.block, self.branch_index]
        if gate.ndim == 2:  # per (sample, token)
            gate = gate.unsqueeze(-1)
        elif gate.ndim == 1:  # per sample
            gate = gate.view(-1, 1, 1)
        fresh = original(*args, **kwargs)
        mixed = gate * fresh + (1 - gate) * store.output
        if self.runtime.blend_refresh:
            store.output = mixed
        return mixed

    def _partial(self, original, store: BranchStore, state: TrajectoryState, ratio: float, args: tuple, kwargs: dict):
        if not self.partial_ok:
            raise RuntimeError(f"block {self.branch.block} {self.branch.name} cannot be recomputed token by token")
        args = list(args)
        hidden = args.pop(0) if args else kwargs.pop("hidden_states")
        num_tokens = hidden.shape[1]
        count = max(1, min(num_tokens, round(ratio * num_tokens)))
        request = SelectionRequest(state.step, self.branch.block, self.branch.name, hidden, store, count, state)
        index = self.runtime.selector(request)
        selected = hidden.gather(1, index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        cached_keys = self.branch.name == "attn1" and self.runtime.partial_keys == "cached"
        if self.branch.name == "attn1":
            if kwargs.get("attention_mask") is not None:
                raise RuntimeError("partial self-attention with an attention mask is not supported")
            if not cached_keys:  # "fresh": keys and values come from every token of this step
                kwargs["encoder_hidden_states"] = hidden
        # Selected tokens are the queries; under "cached" keys, `_keys_values` completes their keys and values.
        with self._keys_values(self.branch.module, store, index=index) if cached_keys else nullcontext():
            fresh = original(selected, *args, **kwargs)
        output = store.output.scatter(1, index.unsqueeze(-1).expand(-1, -1, fresh.shape[-1]), fresh)
        store.output = output
        store.age = (store.age + 1).scatter(1, index, 0)
        return output


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

    Dynamic policies may define optional methods (looked up on the policy, so static policies need none):
    `decide(step, block, branch_index, state) -> (action, ratio) | None` overrides the plan's entry at run time
    (`action` may be a tensor of per-row codes, COMPUTE or REUSE, for per-sample decisions: only the computing
    rows run); `observe(call: BranchCall) -> context manager | None` is entered around each branch execution, to
    measure signals into `state.signals`; `observe_output(out: StepOutput)` sees the denoiser's output of every
    step; `token_pruning(call: BranchCall) -> TokenPruning | None` makes a branch that computes (every row) run on
    some of its tokens and fill the others from kept ones. All see only the trajectory's own state.
    """

    def __init__(
        self,
        target: nn.Module | object,
        policy: CachePolicy,
        timesteps: torch.Tensor | list | None = None,
    ) -> None:
        self.model = resolve_denoiser(target)
        self.pipeline = None if isinstance(target, nn.Module) else target
        self.policy = policy
        self.spec: ModelSpec = model_spec(self.model)
        policy.check_model(self.spec, self.pipeline)
        self.branches = find_branches(self.model)
        self.branch_names = self.spec.branches
        self.selector: TokenSelector = policy.token_selector()
        self._decide = getattr(policy, "decide", None)
        self.partial_keys: str = getattr(policy, "partial_keys", "fresh")
        if self.partial_keys not in PARTIAL_KEYS:
            raise ValueError(
                f"policy {policy.describe()!r}: field 'partial_keys' is {self.partial_keys!r}, expected one of "
                f"{list(PARTIAL_KEYS)}"
            )
        self._observe = getattr(policy, "observe", None)
        self._prune = getattr(policy, "token_pruning", None)
        self._observe_output = getattr(policy, "observe_output", None)
        self.current: TrajectoryState | None = None
        # Training only: gates [blocks, branches(, batch(, tokens))] that blend fresh and cached outputs.
        self.blend: torch.Tensor | None = None
        self.blend_refresh = False  # training only: the blended output becomes the cache (see `BranchHook._blend`)
        self.paused = False
        self.executed: Counter[Action] = Counter()
        self._timesteps: torch.Tensor | None = None
        self._plan: Plan | None = None
        self._explicit_timesteps = timesteps is not None
        if timesteps is not None:
            policy.check_timesteps(torch.as_tensor(timesteps))
            self._bind(torch.as_tensor(timesteps))
        elif policy.timesteps is not None:
            self._bind(torch.as_tensor(policy.timesteps))
        self._attach()

    # -- steps and plan ---------------------------------------------------------------------------
    def _bind(self, timesteps: torch.Tensor) -> None:
        self._timesteps = timesteps.detach().to("cpu", torch.float64).flatten()
        self._plan = self.policy.plan_for(self.spec, self._timesteps)
        self._actions = self._plan.actions.tolist()
        self._ratios = self._plan.token_ratio.tolist()

    @property
    def plan(self) -> Plan | None:
        return self._plan

    def step_of(self, timestep: torch.Tensor) -> int:
        values = timestep.detach().flatten().to("cpu", torch.float64)
        if values.numel() == 0:
            raise ValueError("empty timestep tensor")
        if not bool((values == values[0]).all()):
            raise ValueError(f"samples in one batch are at different timesteps {values.unique().tolist()}")
        value = float(values[0])
        self._follow_pipeline()
        index = self._lookup(value)
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

    def _lookup(self, value: float) -> int | None:
        if self._timesteps is None:
            return None
        hits = torch.nonzero(torch.isclose(self._timesteps, torch.tensor(value, dtype=torch.float64), atol=1e-4))
        return int(hits[0, 0]) if len(hits) else None

    def decision(
        self, step: int, block: int, branch_index: int, state: TrajectoryState | None = None
    ) -> tuple[Action | torch.Tensor, float]:
        if self._decide is not None and state is not None:
            dynamic = self._decide(step, block, branch_index, state)
            if dynamic is not None:
                return dynamic
        return Action(self._actions[step][block][branch_index]), self._ratios[step][block][branch_index]

    def pruning(self, call: BranchCall) -> TokenPruning | None:
        return self._prune(call) if self._prune is not None else None

    def observe_output(self, state: TrajectoryState, model: nn.Module, output: Any) -> None:
        if self._observe_output is not None:
            sample = output if isinstance(output, torch.Tensor) else output[0]  # a tensor, tuple or BaseOutput
            self._observe_output(StepOutput(state.step, state, model, sample))

    def observe(self, call: BranchCall) -> AbstractContextManager:
        probe = self._observe(call) if self._observe is not None else None
        return probe if probe is not None else nullcontext()

    # -- hooks ------------------------------------------------------------------------------------
    def _attach(self) -> None:
        modules = [self.model] + [b.module for b in self.branches]
        for module in modules:
            registry = getattr(module, "_diffusers_hook", None)
            if registry is not None and (registry.get_hook(STEP_HOOK) or registry.get_hook(BRANCH_HOOK)):
                raise RuntimeError("this model already has an l2c policy applied; call remove() first")
        self._saved = [(m, "forward" in m.__dict__, "_diffusers_hook" in m.__dict__) for m in modules]
        HookRegistry.check_if_exists_or_initialize(self.model).register_hook(StepTrackerHook(self), STEP_HOOK)
        index = {name: i for i, name in enumerate(self.branch_names)}
        for branch in self.branches:
            registry = HookRegistry.check_if_exists_or_initialize(branch.module)
            registry.register_hook(BranchHook(self, branch, index[branch.name]), BRANCH_HOOK)
        HookRegistry.check_if_exists_or_initialize(self.model).invalidate_child_registries_cache()

    def remove(self) -> None:
        """Detach every hook and put each module back exactly as it was before `apply`."""
        for module, had_forward, had_registry in self._saved:
            registry = module._diffusers_hook
            for name in (STEP_HOOK, BRANCH_HOOK):
                registry.remove_hook(name, recurse=False)
            if not had_forward and not registry.hooks:
                module.__dict__.pop("forward", None)
            if not had_registry and not registry.hooks:
                del module._diffusers_hook
        self._saved = []
        self.current = None

    def reset(self) -> None:
        """Forget every cached output (all cache contexts); the next call starts a new trajectory."""
        HookRegistry.check_if_exists_or_initialize(self.model).get_hook(STEP_HOOK).reset_state(self.model)

    @contextmanager
    def pause(self) -> Iterator[None]:
        """Run the model as if unhooked (trainers use it for teacher passes); cache state is kept."""
        self.paused = True
        try:
            yield
        finally:
            self.paused = False

    def __enter__(self) -> CacheRuntime:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
