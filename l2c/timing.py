"""Wall time of runs being compared, taken in turns so that drift in machine load falls on all of them alike."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from typing import Literal, TypeVar

T = TypeVar("T")
Order = Literal["abba", "fixed"]
Clock = Callable[[Callable[[], T]], tuple[T, float]]
"""Runs a call and returns its result and the seconds it took (by whatever the clock measures)."""


def wall_clock(call: Callable[[], T]) -> tuple[T, float]:
    """The whole call's wall time."""
    start = time.perf_counter()
    result = call()
    return result, time.perf_counter() - start


class Interleaved:
    """Rounds of named calls, every call timed; each name keeps the seconds of its calls.

    `abba` runs every other round in reverse (A B, B A, A B, …), so neither side always runs first; `fixed` keeps the
    given order, for calls that must run in sequence (step 0 before step 1). The first `warmup` rounds run untimed.
    """

    def __init__(self, order: Order = "abba", warmup: int = 0, clock: Clock = wall_clock) -> None:
        if order not in ("abba", "fixed"):
            raise ValueError(f"timing: order must be 'abba' or 'fixed', got {order!r}")
        self.order, self.warmup, self.clock = order, warmup, clock
        self.seconds: dict[str, list[float]] = {}
        self.rounds = 0

    def round(self, calls: Mapping[str, Callable[[], T]], after: Callable[[str], None] | None = None) -> dict[str, T]:
        """Run each call once (in this round's order); returns their results by name. `after(name)` follows each."""
        names = list(calls)
        if self.order == "abba" and self.rounds % 2 == 1:
            names.reverse()
        results = {}
        for name in names:
            results[name], seconds = self.clock(calls[name])
            if self.rounds >= self.warmup:
                self.seconds.setdefault(name, []).append(seconds)
            if after is not None:
                after(name)
        self.rounds += 1
        return results

    def total(self, name: str) -> float:
        return sum(self.seconds[name])

    def median(self, name: str) -> float:
        return statistics.median(self.seconds[name])
