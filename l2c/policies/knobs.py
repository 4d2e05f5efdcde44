"""What a policy's numeric knobs accept: each policy class declares a `knob_ranges` table, checked in one place.

`CachePolicy.__post_init__` checks every entry (`check_knobs`), so `toca:ratio=2` is refused with the field, the
value and the range, the same way for every policy, instead of saturating silently.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .base import CachePolicy


@dataclass(frozen=True)
class Range:
    """A finite number (an integer if `integer`) from `low` to `high`; an end left None is unbounded."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False

    def accepts(self, value: object) -> bool:
        if isinstance(value, bool) or not isinstance(value, int if self.integer else (int, float)):
            return False
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a finite number"
        if self.low is not None and self.high is not None:
            kind = "an integer" if self.integer else "a number"
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"{kind} in {left}{self.low:g}, {self.high:g}{right}"
        if self.low is not None:
            return f"{kind} {'>' if self.low_open else '≥'} {self.low:g}"
        if self.high is not None:
            return f"{kind} {'<' if self.high_open else '≤'} {self.high:g}"
        return kind


FRACTION = Range(0, 1, low_open=True)  # a share of tokens or steps: (0, 1]
NON_NEGATIVE = Range(0)
FINITE = Range()


def at_least(low: int) -> Range:
    """An integer ≥ `low` (an interval, a step count, a cell size)."""
    return Range(low, integer=True)


def check_knobs(policy: CachePolicy) -> None:
    """Raise ValueError naming the policy, the field, its range and the value, for the first knob out of range.

    A field whose default is None may stay None (it is filled later, e.g. from the model family's settings).
    """
    defaults = {f.name: f.default for f in dataclasses.fields(policy)}
    for name, allowed in type(policy).knob_ranges.items():
        value = getattr(policy, name)
        if value is None and defaults[name] is None:
            continue
        if not allowed.accepts(value):
            raise ValueError(f"{policy.kind} policy: field '{name}' must be {allowed.describe()}, got {value!r}")
