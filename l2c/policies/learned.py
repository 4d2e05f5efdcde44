"""`l2c`: Learning-to-Cache layer routers; one logit per (step, block, branch), score = sigmoid(logit).

Full steps follow the refresh pattern (every `refresh_interval` steps, step 0 first); on the
steps between, a branch is computed when its score passes the threshold, or, with a budget,
when it is among the highest-scoring slots that fit the budget. The rest reuse their cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..adapters import ModelSpec
from ..forecast import WeightTable
from ..plan import Action, Plan
from .base import CachePolicy, PolicyTarget


def full_step_mask(num_steps: int, refresh_interval: int) -> torch.Tensor:
    """True on the steps that compute every branch: 0, N, 2N, …"""
    return torch.arange(num_steps) % refresh_interval == 0


def check_budget(budget: float, num_steps: int, refresh_interval: int) -> None:
    """A budget must at least cover the full steps, which compute every branch."""
    share = float(full_step_mask(num_steps, refresh_interval).float().mean())
    if budget < share:
        raise ValueError(
            f"field 'budget' is {budget}: below the {share:.3f} of branch slots that the full steps already "
            f"compute ({num_steps} steps, refresh interval {refresh_interval})"
        )


def budget_slots(
    shape: torch.Size,
    full_steps: torch.Tensor,
    budget: float,
    costs: torch.Tensor | None,
    present: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Each slot's work (float64, mean 1 over the executed slots, 0 where no module runs: `present` [blocks,
    branches]), the slots a budget chooses among (executed slots of reuse steps), and the work the budget leaves
    them once the full steps are paid. `costs`: per branch kind [branches] or per slot [blocks, branches]."""
    slots = torch.ones(shape[1:], dtype=torch.bool) if present is None else present.cpu().bool()
    weights = torch.ones(shape[-1]) if costs is None else torch.as_tensor(costs, dtype=torch.float64).cpu()
    per_slot = weights.to(torch.float64).expand(shape[1:]) * slots
    work = (per_slot / per_slot[slots].mean()).expand(shape)
    reuse = ~full_steps.cpu().view(-1, 1, 1).expand(shape) & slots
    return work, reuse, float(budget * work.sum() - work[~reuse].sum())


def select_by_budget(
    scores: torch.Tensor,
    full_steps: torch.Tensor,
    budget: float,
    costs: torch.Tensor | None = None,
    present: torch.Tensor | None = None,
) -> torch.Tensor:
    """Computed-slot mask: full steps, plus the best-scoring reuse-step slots until `budget` of all work runs.

    `costs` ([branches] or [blocks, branches]) weighs each slot by its work (equal weights: a share of slots); slots
    outside `present` (no module runs them) are neither work nor candidates (they stay True: nothing to skip). A slot
    is taken while at least half of its cost still fits, so equal weights round the slot count to the nearest integer.
    """
    work, reuse, room = budget_slots(scores.shape, full_steps, budget, costs, present)
    work, reuse = work.flatten(), reuse.flatten()
    order = torch.argsort(scores.flatten().masked_fill(~reuse, float("-inf")), descending=True, stable=True)
    order = order[: int(reuse.sum())]
    taken = torch.cumsum(work[order], 0) - work[order] / 2 <= room + 1e-9
    keep = ~reuse
    keep[order[taken]] = True
    return keep.view(scores.shape)


def soft_select_by_budget(
    logits: torch.Tensor,
    full_steps: torch.Tensor,
    budget: float,
    costs: torch.Tensor,
    temperature: float,
    present: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gates in (0, 1) that spend exactly `budget` of all work: sigmoid((logit − θ)/T) on reuse-step slots, 1 on
    full steps, with the cut θ found by bisection. As T → 0 they become `select_by_budget`'s choice; at T > 0 a
    gate is a share of fresh output, so the sampling error is differentiable in every logit. θ is held fixed
    in the backward pass (the gradient of a shift of all logits is what the cut absorbs). Slots outside `present`
    cost nothing and spend nothing."""
    work, reuse, room = budget_slots(logits.shape, full_steps, budget, costs, present)
    work, reuse = work.to(logits), reuse.to(logits.device)
    fixed = logits.detach()
    low, high = fixed.min() - 30 * temperature, fixed.max() + 30 * temperature
    for _ in range(60):
        cut = (low + high) / 2
        spent = (work * torch.sigmoid((fixed - cut) / temperature))[reuse].sum()
        low, high = (cut, high) if spent > room else (low, cut)
    gates = torch.sigmoid((logits - (low + high) / 2) / temperature)
    return torch.where(reuse, gates, torch.ones_like(gates))


@dataclass
class LayerRouterPolicy(CachePolicy):
    kind = "l2c"
    refresh_interval: int = 2
    threshold: float | None = 0.5
    budget: float | None = None  # fraction of all branch work (full steps included) to compute
    # Relative work of each branch kind [branches] or of each slot [blocks][branches] (0 where no module runs); None:
    # equal.
    branch_costs: tuple[float, ...] | tuple[tuple[float, ...], ...] | None = None
    logits: torch.Tensor | None = field(default=None, repr=False, kw_only=True)  # [steps, blocks, branches]
    # The forecast action: a slot left uncomputed forecasts where its logit is > 0 (else reuses), with the weights
    # [steps, blocks, branches, K] on its K newest computations. Both or neither.
    forecast_logits: torch.Tensor | None = field(default=None, repr=False, kw_only=True)
    forecast_weights: torch.Tensor | None = field(default=None, repr=False, kw_only=True)

    def __post_init__(self) -> None:
        if isinstance(self.refresh_interval, bool) or not isinstance(self.refresh_interval, int):
            raise ValueError(f"l2c policy: field 'refresh_interval' must be an integer, got {self.refresh_interval!r}")
        if self.refresh_interval < 1:
            raise ValueError(f"l2c policy: field 'refresh_interval' must be ≥ 1, got {self.refresh_interval}")
        if (self.threshold is None) == (self.budget is None):
            raise ValueError("l2c policy: set exactly one of 'threshold' and 'budget'")
        if self.budget is not None and not 0.0 <= self.budget <= 1.0:
            raise ValueError(f"l2c policy: field 'budget' must be in [0, 1], got {self.budget}")
        if self.branch_costs is not None:
            self.branch_costs = _checked_costs(self.branch_costs)
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"l2c policy: field 'threshold' must be in [0, 1], got {self.threshold}")
        if (self.forecast_logits is None) != (self.forecast_weights is None):
            raise ValueError("l2c policy: set both or neither of 'router.forecast_logits' and 'forecast.weights'")
        if self.forecast_weights is not None:
            self.forecaster = WeightTable(self.forecast_weights.float())

    def scores(self) -> torch.Tensor:
        if self.logits is None:
            raise ValueError("l2c policy has no router logits (load it from a policy directory)")
        return torch.sigmoid(self.logits.float())

    def computed_mask(self, num_steps: int, present: torch.Tensor | None = None) -> torch.Tensor:
        """Computed slots [steps, blocks, branches]; `present`: the slots a module executes (the budget's)."""
        scores = self.scores()
        if scores.shape[0] != num_steps:
            raise ValueError(f"l2c policy: router has {scores.shape[0]} steps, the run has {num_steps}")
        full = full_step_mask(num_steps, self.refresh_interval)
        if self.budget is not None:
            check_budget(self.budget, num_steps, self.refresh_interval)
            costs = None if self.branch_costs is None else torch.tensor(self.branch_costs, dtype=torch.float64)
            if costs is not None and costs.ndim == 1 and len(costs) != scores.shape[-1]:
                raise ValueError(
                    f"l2c policy: field 'branch_costs' has {len(costs)} entries, the router {scores.shape[-1]} branches"
                )
            if costs is not None and costs.ndim == 2 and tuple(costs.shape) != tuple(scores.shape[1:]):
                raise ValueError(
                    f"l2c policy: field 'branch_costs' has shape {tuple(costs.shape)}, the router needs "
                    f"(blocks, branches) = {tuple(scores.shape[1:])}"
                )
            return select_by_budget(scores, full, self.budget, costs, present)
        return (scores > self.threshold) | full.view(-1, 1, 1)

    def reuse_summary(self, num_steps: int) -> str:
        """`computed <n> of <m> branch slots in reuse steps`, as `import-l2c` and the trainer print it."""
        present = None if self.target is None else self.target.model.present()
        reuse = ~full_step_mask(num_steps, self.refresh_interval)
        computed = self.computed_mask(num_steps, present)[reuse]
        if present is not None:
            computed = computed[:, present]  # the slots a module executes
        return f"computed {int(computed.sum())} of {computed.numel()} branch slots in reuse steps"

    def build_plan(self, spec: ModelSpec, num_steps: int) -> Plan:
        expected = (num_steps, spec.num_blocks, len(spec.branches))
        if self.logits is not None and tuple(self.logits.shape) != expected:
            raise ValueError(
                f"l2c policy: field 'router.logits' has shape {tuple(self.logits.shape)}, the model and run need "
                f"(steps, blocks, branches) = {expected}"
            )
        plan = Plan.full(*expected)
        skipped = ~self.computed_mask(num_steps, spec.present())
        plan.actions[skipped] = Action.REUSE
        if self.forecast_logits is not None:
            if tuple(self.forecast_logits.shape) != expected:
                raise ValueError(
                    f"l2c policy: field 'router.forecast_logits' has shape {tuple(self.forecast_logits.shape)}, "
                    f"expected (steps, blocks, branches) = {expected}"
                )
            plan.actions[skipped & (self.forecast_logits > 0)] = Action.FORECAST
            self.forecaster.validate(plan, "l2c policy: field 'forecast.weights'")
        return plan

    def tensors(self) -> dict[str, torch.Tensor]:
        tensors = {"router.logits": self.logits.detach().float().cpu()}
        if self.forecast_logits is not None:
            tensors["router.forecast_logits"] = self.forecast_logits.detach().float().cpu()
            tensors["forecast.weights"] = self.forecast_weights.detach().float().cpu()
        return tensors

    @classmethod
    def from_artifact(cls, params: dict, tensors: dict[str, torch.Tensor], target: PolicyTarget) -> CachePolicy:
        if "router.logits" not in tensors:
            raise ValueError("missing tensor 'router.logits' in policy.safetensors")
        forecast = {
            name: tensors[key].float() if key in tensors else None
            for name, key in (("forecast_logits", "router.forecast_logits"), ("forecast_weights", "forecast.weights"))
        }
        return cls(**params, logits=tensors["router.logits"].float(), **forecast, target=target)


def _checked_costs(costs) -> tuple:
    """`branch_costs` as floats: positive per branch kind, or per slot [blocks][branches] ≥ 0 with some work."""

    def number(c) -> bool:
        return isinstance(c, (int, float)) and not isinstance(c, bool) and math.isfinite(c)

    rows = tuple(costs)
    if rows and all(isinstance(row, (list, tuple)) for row in rows):
        table = tuple(tuple(row) for row in rows)
        if all(number(c) and c >= 0 for row in table for c in row) and any(c > 0 for row in table for c in row):
            return tuple(tuple(float(c) for c in row) for row in table)
    elif rows and all(number(c) and c > 0 for c in rows):
        return tuple(float(c) for c in rows)
    raise ValueError(
        f"l2c policy: field 'branch_costs' must be positive numbers per branch, or numbers ≥ 0 per (block, branch) "
        f"with some positive, got {costs}"
    )
