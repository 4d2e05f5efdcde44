"""`full`: compute every branch at every step; the reference every other policy is measured against."""

from __future__ import annotations

from dataclasses import dataclass

from ..adapters import ModelSpec
from ..plan import Plan
from .base import CachePolicy


@dataclass
class FullPolicy(CachePolicy):
    kind = "full"

    def build_plan(self, spec: ModelSpec, num_steps: int) -> Plan:
        return Plan.full(num_steps, spec.num_blocks, len(spec.branches))
