"""`static` (FORA-like): a full step every `interval` steps; every branch reuses its cache in between."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..adapters import ModelSpec
from ..plan import Action, Plan
from .base import CachePolicy
from .knobs import Range, at_least


@dataclass
class StaticPolicy(CachePolicy):
    kind = "static"
    knob_ranges: ClassVar[dict[str, Range]] = {
        "interval": at_least(1),
        "first_full": at_least(0),
        "last_full": at_least(0),
    }
    interval: int = 2
    first_full: int = 0  # the first k steps are always full
    last_full: int = 0  # the last k steps are always full

    def full_steps(self, num_steps: int) -> list[int]:
        return [
            s
            for s in range(num_steps)
            if s % self.interval == 0 or s < self.first_full or s >= num_steps - self.last_full
        ]

    def build_plan(self, spec: ModelSpec, num_steps: int) -> Plan:
        plan = Plan.full(num_steps, spec.num_blocks, len(spec.branches))
        reuse = sorted(set(range(num_steps)) - set(self.full_steps(num_steps)))
        plan.actions[reuse] = Action.REUSE
        return plan
