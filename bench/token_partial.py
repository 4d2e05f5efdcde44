"""Token-partial execution speed: one branch recomputing a share of its tokens against the same branch in full.

    python bench/token_partial.py --json out/bench/token_partial.json

A one-block DiT-XL/2-shaped transformer (hidden 1152, 16 heads, 256 tokens, batch 2) runs two steps under the cache
runtime: step 0 computes every branch, step 1 runs the measured branch PARTIAL at `token_ratio` (the others reuse).
The branch call is timed from outside the runtime's hook (plain torch forward hooks around the module), so gather,
token selection and scatter are inside the measured time. Full and partial calls alternate within every repeat;
the ratio is of medians. `attn1` is measured in both `partial_keys` modes (see l2c/runtime.py); `attn2`
(cross-attention, 120 text tokens) on a one-block PixArt-α-shaped transformer with the same block shape.
FLOPs per call are counted with FlopCounterMode on one extra pass (attention products included on CPU too).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

if not __package__:  # run as a file: this checkout's packages first (see bench/_checkout.py)
    import _checkout  # noqa: F401

import torch
from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

from l2c.adapters import ModelSpec
from l2c.metrics import CPU_ATTENTION_FLOPS
from l2c.plan import Action, Plan
from l2c.policies import CachePolicy
from l2c.results import Column, format_table, write_results
from l2c.timing import Interleaved

TIMESTEPS = [999.0, 499.0]
TABLE = (
    Column("branch"),
    Column("partial_keys", value=lambda row: row["partial_keys"] or "-"),
    Column("token_ratio", ".2f"),
    Column("wall_ratio"),
    Column("flops_ratio"),
    Column("full ms", ".2f", key="full_ms"),
    Column("partial ms", ".2f", key="partial_ms"),
)


@dataclass
class OneBranchPartial(CachePolicy):
    """Step 0 computes everything; step 1 runs `branch` of every block PARTIAL at `ratio`, the rest reuse."""

    kind = "bench-one-branch"
    branch: str = "ff"
    ratio: float = 0.25
    partial_keys: str = "fresh"

    def build_plan(self, spec: ModelSpec, num_steps: int) -> Plan:
        plan = Plan.full(num_steps, spec.num_blocks, len(spec.branches))
        plan.actions[1:] = Action.REUSE
        column = spec.branches.index(self.branch)
        plan.actions[1:, :, column] = Action.PARTIAL
        plan.token_ratio[1:, :, column] = self.ratio
        return plan


class BranchClock:
    """A clock for `l2c.timing.Interleaved` that times the one call of `module` inside each timed call (around
    whatever hooks the module carries, so gather, token selection and scatter are in), and on request its FLOPs."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.flops: list[int] = []
        self.count_flops = False
        self._counter: FlopCounterMode | None = None
        self._seconds: float | None = None
        self.handles = [module.register_forward_pre_hook(self._start), module.register_forward_hook(self._stop)]

    def __call__(self, call: Callable[[], object]) -> tuple[object, float]:
        self._seconds = None
        result = call()
        if self._seconds is None:
            raise RuntimeError("token_partial: the timed call did not run the measured branch")
        return result, self._seconds

    def _start(self, module, args) -> None:
        if self.count_flops:
            self._counter = FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS)
            self._counter.__enter__()
        self._began = time.perf_counter()

    def _stop(self, module, args, output) -> None:
        self._seconds = time.perf_counter() - self._began
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self.flops.append(self._counter.get_total_flops())
            self._counter = None

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def one_block_models(hidden: int, heads: int, tokens: int, text_tokens: int):
    """(DiT, PixArt) with one block each, `tokens` image tokens; the PixArt call's text conditioning."""
    side = math.isqrt(tokens)
    if side * side != tokens or hidden % heads:
        raise SystemExit(f"--tokens must be a square ({tokens}) and --hidden divisible by --heads ({hidden}, {heads})")
    common = dict(num_attention_heads=heads, attention_head_dim=hidden // heads, in_channels=4, num_layers=1)
    torch.manual_seed(0)
    dit = DiTTransformer2DModel(**common, sample_size=2 * side, patch_size=2, num_embeds_ada_norm=1000).eval()
    pixart = PixArtTransformer2DModel(
        **common, sample_size=2 * side, patch_size=2, cross_attention_dim=hidden, caption_channels=hidden
    ).eval()
    return dit, pixart


def measure(model, call, branch: str, ratio: float, partial_keys: str, repeats: int) -> dict:
    clock = BranchClock(getattr(model.transformer_blocks[0], branch))
    timer = Interleaved("fixed", warmup=2, clock=clock)  # step 0 (full) before step 1 (partial), every round
    policy = OneBranchPartial(branch=branch, ratio=ratio, partial_keys=partial_keys)
    with policy.apply(model, timesteps=TIMESTEPS), torch.no_grad():
        for _ in range(2 + repeats):
            timer.round({"full": partial(call, 0), "partial": partial(call, 1)})
        clock.count_flops = True
        call(0), call(1)
    clock.remove()
    full_ms, partial_ms = timer.median("full") * 1e3, timer.median("partial") * 1e3
    return {
        "branch": branch,
        "partial_keys": partial_keys if branch == "attn1" else None,
        "token_ratio": ratio,
        "wall_ratio": partial_ms / full_ms,
        "flops_ratio": clock.flops[1] / clock.flops[0],
        "full_ms": full_ms,
        "partial_ms": partial_ms,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--hidden", type=int, default=1152)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--text-tokens", type=int, default=120)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)

    dit, pixart = one_block_models(args.hidden, args.heads, args.tokens, args.text_tokens)
    generator = torch.Generator().manual_seed(0)
    size = 2 * math.isqrt(args.tokens)
    latents = torch.randn(args.batch, 4, size, size, generator=generator)
    labels = torch.arange(args.batch) % 1000
    text = torch.randn(args.batch, args.text_tokens, args.hidden, generator=generator)
    sizes = {"resolution": None, "aspect_ratio": None}

    def dit_call(step: int):
        return dit(latents, timestep=torch.full((args.batch,), TIMESTEPS[step]), class_labels=labels)

    def pixart_call(step: int):
        t = torch.full((args.batch,), TIMESTEPS[step])
        return pixart(latents, encoder_hidden_states=text, timestep=t, added_cond_kwargs=sizes)

    cases = [("attn1", "cached", dit, dit_call), ("attn1", "fresh", dit, dit_call), ("ff", "fresh", dit, dit_call)]
    cases.append(("attn2", "fresh", pixart, pixart_call))
    rows = []
    work = [(case, ratio) for case in cases for ratio in args.ratios]
    for (branch, keys, model, call), ratio in tqdm(work, desc="branches", unit="case"):
        rows.append(measure(model, call, branch, ratio, keys, args.repeats))
    setup = {k: getattr(args, k) for k in ("hidden", "heads", "tokens", "text_tokens", "batch", "repeats")}
    setup.update(threads=torch.get_num_threads(), device="cpu")
    write_results(args.json, setup, rows)
    print(format_table(rows, TABLE))
    return 0


if __name__ == "__main__":
    sys.exit(main())
