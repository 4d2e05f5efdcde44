"""A trained router run at another compute budget: `BUDGET=DIR` on the command line, one re-budgeting rule.

A router is trained (and exported) with a threshold or a budget; its logits rank every branch slot either way, so
the same router can be exported anew at any budget that covers its full steps, without retraining.
"""

from __future__ import annotations

import dataclasses

from .policies import LayerRouterPolicy
from .policies.learned import check_budget
from .policy_io import load_policy


def parse_budget_dir(text: str) -> tuple[float | None, str]:
    """`BUDGET=DIR` → (budget, DIR); a plain `DIR` (nothing before an `=` that reads as a number) → (None, DIR)."""
    budget, sep, directory = text.partition("=")
    if sep:
        try:
            return float(budget), directory
        except ValueError:
            pass
    return None, text


def with_budget(router: LayerRouterPolicy, budget: float, num_steps: int) -> LayerRouterPolicy:
    """The router selecting the highest-scoring slots that fit `budget` (fraction of branch work) instead of its
    threshold; refused when the budget does not cover the full steps of a `num_steps` run."""
    check_budget(budget, num_steps, router.refresh_interval)
    return dataclasses.replace(router, threshold=None, budget=budget)


def load_router(
    directory: str, budget: float | None = None, num_steps: int | None = None, flag: str = "router"
) -> LayerRouterPolicy:
    """The l2c router saved in `directory`, re-budgeted to `budget` if one is given (checked against a run of
    `num_steps`, by default the router's own step count); `flag` names the option in errors."""
    router = load_policy(directory)
    if not isinstance(router, LayerRouterPolicy):
        raise ValueError(f"{flag}: {directory} holds a {router.kind!r} policy, expected an l2c router")
    if budget is None:
        return router
    return with_budget(router, budget, num_steps if num_steps is not None else len(router.timesteps))
