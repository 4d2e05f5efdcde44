"""`dato`: dynamics-aware token pruning (DaTo, Zhang et al. 2025) on a static caching schedule.

The schedule is `static`'s (or a searched one, below): a full step every `interval` steps, every branch reused in
between. Whenever a pruned branch (self-attention by default) computes, DaTo drops `prune` of the block's tokens from
it and restores them:

1. dynamics: after every step, |ε_t − ε_{t−1}| averaged over the ε channels (learned-σ channels are left out)
   is kept per latent pixel; a block averages it over each of its tokens (its token grid, see `token_grid`).
   Step t uses the dynamics of steps t−1 and t−2, so steps 0 and 1 run unpruned.
2. base tokens: in every `cell`×`cell` cell of the block's token grid, the token with the highest dynamics.
3. pruned tokens: the `prune`·N other tokens most similar (cosine of the branch inputs) to their base, each token's
   base being the base token it is most similar to. They are neither queries nor keys/values of the
   self-attention: the branch runs on the kept tokens only.
4. restore: each pruned token's output is the output of its most similar kept token.

Prune 0 is exactly the schedule alone. The two similarity products (candidates × bases, pruned × kept) are matrix
products, so `flops_ratio` counts them with the pruned branches.

Searched schedule (`schedule`, found by `l2c.policies.search`, as the paper searches its per-step ratios): one
entry per step, a prune ratio (the step computes, pruned by it) or `-` (the step reuses every branch); it replaces
`interval`/`first_full`/`last_full` and `prune`.

Cached keys/values: a policy that also runs cached-key partial self-attention (`partial_keys="cached"`) reads each
token's stored key/value at partial steps; a pruned step stores, for every kept token, its fresh projections and, for
every pruned token, those of the kept token it restores from (as its output), so the store matches the output.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters import ModelSpec
from ..extension import BranchCall, StepOutput, TokenPruning
from ..plan import Action, Plan
from .knobs import Range, at_least
from .scores import cell_best, top_tokens
from .static import StaticPolicy

PREVIOUS = "dato.previous"  # state.signals[PREVIOUS] -> ε of the last step [batch, channels, height, width]
DYNAMICS = "dato.dynamics"  # state.signals[DYNAMICS] -> |ε_t − ε_{t−1}| over channels [batch, height, width]
PRUNING = "dato.pruning"  # state.signals[(PRUNING, block)] -> (step, TokenPruning | None)
PRUNABLE = ("attn1", "attn2", "ff")
REUSED = "-"  # a `schedule` entry: the step reuses every branch
# Why DaTo's pruned call does not fit each MMDiT / video family (it keeps to BasicTransformerBlock models).
_ROTARY = (
    "applies the rotary embedding of every position to the queries and keys, so a call on fewer image tokens breaks"
)
UNSUPPORTED_FAMILIES = {
    "flux": f"Flux.1's joint attention (image and text tokens in one call) {_ROTARY}",
    "flux2": f"Flux.2's joint attention (image and text tokens in one call) {_ROTARY}",
    "sd3": "SD3's attention is joint: one call on [image; text] returns both streams, which DaTo's prune-and-restore "
    "of a single-stream self-attention does not split",
    "wan": f"Wan predicts 5-D video latents [batch, channels, frames, height, width] and its self-attention {_ROTARY}",
    "qwenimage": f"Qwen-Image's joint attention (image and text tokens in one call) {_ROTARY}",
}
SCHEDULE_DEFAULTS = {"interval": 2, "first_full": 0, "last_full": 0, "prune": 0.4}  # what a `schedule` replaces


def epsilon(model: nn.Module, sample: torch.Tensor) -> torch.Tensor:
    """The ε channels of a denoiser's output: the first `in_channels` when the model also predicts σ."""
    channels = getattr(getattr(model, "config", None), "in_channels", None)
    if isinstance(channels, int) and sample.shape[1] == 2 * channels:
        return sample[:, :channels]
    return sample


def dynamics_map(now: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
    """|now − before| averaged over channels: [B, C, H, W] × 2 → [B, H, W] (float32)."""
    return (now.float() - before.float()).abs().mean(dim=1)


def token_grid(num_tokens: int, height: int, width: int) -> tuple[int, int]:
    """The token grid of a block whose N tokens tile the height×width latent.

    Rule: the smallest integer downsampling factor f with ceil(H/f)·ceil(W/f) = N gives the grid
    (ceil(H/f), ceil(W/f)) in row-major order; a DiT with patch p has f = p, a UNet level below k stride-2
    downsamplings has f = 2^k (padded convolutions round up, hence the ceil).
    """
    for factor in range(1, max(height, width) + 1):
        rows, cols = -(-height // factor), -(-width // factor)
        if rows * cols == num_tokens:
            return rows, cols
        if rows * cols < num_tokens:
            break
    raise ValueError(
        f"dato policy: a block has {num_tokens} tokens, which is no integer downsampling of the {height}×{width} "
        "latent (expected ceil(H/f)·ceil(W/f) tokens for some integer f); DaTo needs each block's token grid"
    )


def token_dynamics(dynamics: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """A [B, H, W] dynamics map averaged over each token of a rows×cols grid: [B, rows·cols], row-major."""
    return F.adaptive_avg_pool2d(dynamics.unsqueeze(1), (rows, cols)).flatten(1)


def base_tokens(per_token: torch.Tensor, rows: int, cols: int, cell: int) -> torch.Tensor:
    """Per cell×cell cell of the token grid, the token of highest dynamics (ties: lowest index): [B, cells]."""
    return cell_best(per_token, rows, cols, cell)[0]


def _take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def prune_tokens(features: torch.Tensor, bases: torch.Tensor, count: int) -> TokenPruning:
    """Prune the `count` non-base tokens most similar to their base; each restores from its most similar kept token.

    `features` [B, N, C] (cosine similarity is taken between these rows), `bases` [B, D] token indices. A token's
    similarity to its base is its largest cosine to any base token. Ties: the lowest token index is pruned first
    and is the restore source first. Needs count ≤ N − D.
    """
    batch, num_tokens, _ = features.shape
    unit = F.normalize(features.float(), dim=-1)
    is_base = torch.zeros(batch, num_tokens, dtype=torch.int8, device=features.device).scatter(1, bases, 1)
    candidates = torch.argsort(is_base, dim=1, stable=True)[:, : num_tokens - bases.shape[1]]  # increasing
    similarity = torch.bmm(_take(unit, candidates), _take(unit, bases).transpose(1, 2)).amax(dim=-1)
    pruned = candidates.gather(1, top_tokens(similarity, count))
    dropped = torch.zeros_like(is_base).scatter(1, pruned, 1)
    kept = torch.argsort(dropped, dim=1, stable=True)[:, : num_tokens - count]  # increasing
    restore = torch.bmm(_take(unit, pruned), _take(unit, kept).transpose(1, 2)).argmax(dim=-1)  # first best
    position = (1 - dropped).long().cumsum(dim=1) - 1  # each kept token's position in `kept`
    return TokenPruning(kept=kept, source=position.scatter(1, pruned, restore))


def parse_schedule(text: str) -> tuple[float | None, ...]:
    """A `schedule` string (`0+-+0.4+-`) → per-step prune ratios, None where the step reuses (`-`)."""
    entries: list[float | None] = []
    for index, entry in enumerate(filter(None, str(text).split("+"))):
        if entry == REUSED:
            entries.append(None)
            continue
        try:
            ratio = float(entry)
        except ValueError:
            ratio = math.nan
        if not 0 <= ratio < 1:
            raise ValueError(
                f"dato policy: field 'schedule' entry {index} is {entry!r}, expected a prune ratio in [0, 1) or "
                f"{REUSED!r} (the step reuses)"
            )
        entries.append(ratio)
    if entries and entries[0] is None:
        raise ValueError(f"dato policy: field 'schedule' starts with {REUSED!r}; step 0 must compute (nothing cached)")
    return tuple(entries)


def format_schedule(entries: tuple[float | None, ...]) -> str:
    """Per-step prune ratios (None: reuse) → the `schedule` string `parse_schedule` reads."""
    return "+".join(REUSED if r is None else f"{r:g}" for r in entries)


@contextmanager
def pruned_keys_values(call: BranchCall, pruning: TokenPruning) -> Iterator[None]:
    """Around a pruned self-attention under cached keys: store every token's key/value as its output is restored.

    The kept tokens' projections are caught on `attn.to_k` / `attn.to_v`; each pruned token takes its source's.
    """
    caught: dict[str, torch.Tensor] = {}
    handles = [
        getattr(call.module, name).register_forward_hook(lambda m, a, out, name=name: caught.__setitem__(name, out))
        for name in ("to_k", "to_v")
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
    if set(caught) != {"to_k", "to_v"}:
        raise RuntimeError(
            f"dato policy: block {call.block} attn1 with partial_keys='cached' needs the attention processor to call "
            f"attn.to_k and attn.to_v ({type(call.module.processor).__name__} called {sorted(caught)})"
        )
    for name, kept in caught.items():
        call.store.keys_values[name] = _take(kept.detach(), pruning.source)


@dataclass
class DaToPolicy(StaticPolicy):
    kind = "dato"
    knob_ranges: ClassVar[dict[str, Range]] = {
        **StaticPolicy.knob_ranges,
        "prune": Range(0, 1, high_open=True),  # 0: the schedule alone; 1 would prune every token
        "cell": at_least(2),
    }
    prune: float = 0.4  # share of a block's tokens pruned whenever a pruned branch computes
    cell: int = 2  # one base token per cell×cell cell of the token grid
    branches: str = "attn1"  # '+'-separated branches that run pruned (attn1, attn2, ff)
    # '+'-separated, one entry per step: a prune ratio or '-' (reuse); '' : `interval`'s steps pruned by `prune`
    schedule: str = ""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.step_ratios = parse_schedule(self.schedule)
        overridden = [n for n, value in SCHEDULE_DEFAULTS.items() if self.step_ratios and getattr(self, n) != value]
        if overridden:
            raise ValueError(
                f"dato policy: field 'schedule' sets every step, so fields {overridden} must keep their defaults "
                f"({ {n: SCHEDULE_DEFAULTS[n] for n in overridden} })"
            )
        names = self.pruned_branches
        if not names or any(name not in PRUNABLE for name in names):
            raise ValueError(
                f"dato policy: field 'branches' must be '+'-separated names among {list(PRUNABLE)}, got "
                f"{self.branches!r}"
            )

    @property
    def pruned_branches(self) -> tuple[str, ...]:
        return tuple(filter(None, str(self.branches).split("+")))

    def with_schedule(self, entries: tuple[float | None, ...]) -> DaToPolicy:
        """This policy (its cell and branches) on the per-step `schedule` `entries` (None: the step reuses)."""
        return dataclasses.replace(self, **SCHEDULE_DEFAULTS, schedule=format_schedule(entries))

    def step_ratio(self, step: int) -> float:
        """The prune ratio of a computed step."""
        return self.step_ratios[step] if self.step_ratios else self.prune

    def build_plan(self, spec: ModelSpec, num_steps: int) -> Plan:
        if not self.step_ratios:
            return super().build_plan(spec, num_steps)
        if len(self.step_ratios) != num_steps:
            raise ValueError(
                f"dato policy: field 'schedule' has {len(self.step_ratios)} entries, but the run has {num_steps} steps "
                "(one entry per step)"
            )
        plan = Plan.full(num_steps, spec.num_blocks, len(spec.branches))
        plan.actions[[s for s, ratio in enumerate(self.step_ratios) if ratio is None]] = Action.REUSE
        return plan

    def observe(self, call: BranchCall):
        """Under cached keys, keep the stored keys/values of a pruned self-attention in step with its output."""
        whole = call.action == Action.COMPUTE and call.rows is None
        if self.partial_keys != "cached" or call.branch != "attn1" or not whole:
            return None
        pruning = self.token_pruning(call)
        return None if pruning is None else pruned_keys_values(call, pruning)

    def check_model(self, spec: ModelSpec, pipeline: object | None = None) -> None:
        if spec.family in UNSUPPORTED_FAMILIES:
            raise ValueError(
                f"dato policy: the {spec.family} family is not supported: DaTo prunes the image tokens of a "
                "BasicTransformerBlock self-attention (DiT, PixArt, SD UNets) on a 2-D token grid read from a "
                f"[batch, channels, height, width] prediction, and {UNSUPPORTED_FAMILIES[spec.family]}; on this "
                "family use static, toca or duca (token-partial on image tokens), taylorseer, adacache or blockcache"
            )
        missing = [name for name in self.pruned_branches if name not in spec.branches]
        if missing:
            raise ValueError(
                f"dato policy: field 'branches' names {missing}, which this model ({spec.family}, branches "
                f"{list(spec.branches)}) does not have"
            )
        super().check_model(spec, pipeline)

    def observe_output(self, out: StepOutput) -> None:
        """Keep ε of this step and its change from the last step (the dynamics the next step prunes by)."""
        eps = epsilon(out.model, out.sample).detach()
        if eps.ndim != 4:
            raise ValueError(
                f"dato policy: the denoiser returned shape {tuple(out.sample.shape)}, expected "
                "[batch, channels, height, width]: DaTo reads the dynamics of an image prediction"
            )
        signals = out.state.signals
        before = signals.get(PREVIOUS)
        if before is not None and before.shape == eps.shape:
            signals[DYNAMICS] = dynamics_map(eps, before)
        signals[PREVIOUS] = eps

    def token_pruning(self, call: BranchCall) -> TokenPruning | None:
        """The block's pruning for this step, chosen once (at its first pruned branch) and shared by the others."""
        dynamics = call.state.signals.get(DYNAMICS)
        ratio = self.step_ratio(call.step)
        if not ratio or call.branch not in self.pruned_branches or dynamics is None:
            return None
        memo = call.state.signals.get((PRUNING, call.block))
        if memo is not None and memo[0] == call.step:
            return memo[1]
        hidden = call.args[0] if call.args else call.kwargs["hidden_states"]
        num_tokens = hidden.shape[1]
        rows, cols = token_grid(num_tokens, *dynamics.shape[-2:])
        bases = base_tokens(token_dynamics(dynamics.to(hidden.device), rows, cols), rows, cols, self.cell)
        count = min(math.floor(ratio * num_tokens + 1e-9), num_tokens - bases.shape[1])
        pruning = prune_tokens(hidden, bases, count) if count > 0 else None
        call.state.signals[(PRUNING, call.block)] = (call.step, pruning)
        return pruning
