"""Every policy and diffusers peer on a DiT-XL/2-shaped model on a GPU: eager and compiled, 20 and 50 steps.

    python bench/gpu.py --json out/bench/gpu.json            # CUDA: bf16, batch 8 with guidance (16 rows a call)
    python bench/gpu.py --quick --json /tmp/gpu.json         # no GPU: a tiny DiT on the CPU, fp32 (a smoke run)

Random weights (the work is the same as a trained DiT-XL/2's; the quality of the samples is not measured here).
For each step count, rows: no hooks; `full` (the runtime's own overhead); static every-2 and every-3; ToCa and
DuCa at their published settings; native TaylorSeer and diffusers' TaylorSeer with the same knobs (about half the
steps computed); diffusers' First Block Cache (fixed threshold, not tuned: random weights); the router released
with Learning-to-Cache (DDIM-20 at 28 blocks only). Each row is timed eagerly and under `torch.compile` (the policy
applied to the model the compiled wrapper calls; the first run, which compiles, is untimed); runs are
interleaved (ABBA) and the median is kept. Columns: `speedup` = no-hooks eager wall time ÷ the row's,
`efficiency` = speedup × flops_ratio (1.0: the wall time falls as much as the FLOPs), peak memory
(`torch.cuda.max_memory_allocated` over one run), and `syncs_per_step`: host-device synchronisations counted
with `torch.cuda.set_sync_debug_mode("warn")` over one run, per sampling step (plan-based policies: 0 expected;
ToCa/DuCa decide per token and say what that costs here). dynamo's recompile limit is raised so that the
policies, which share one compiled model, never fall back to eager (each policy's graphs are bounded:
tests/test_compile.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

if not __package__:  # run as a file: this checkout's packages first (see bench/_checkout.py)
    import _checkout  # noqa: F401

import torch
from tqdm.auto import tqdm

from bench.overhead import SCHEDULER_CONFIG, OverheadSetup, build_model
from l2c.adapters import model_spec
from l2c.compare import taylorseer_at
from l2c.evaluate import CacheMethod
from l2c.import_l2c import import_official_router
from l2c.metrics import count_flops
from l2c.peers import FBCache
from l2c.policies import FullPolicy, StaticPolicy
from l2c.policy_io import parse_preset
from l2c.results import Column, format_table, write_results
from l2c.sampling import GuidedDenoiser, initial_noise, sample
from l2c.timing import Interleaved

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TABLE = (
    "steps",
    "method",
    "compiled",
    Column("wall_s", ".3f"),
    Column("flops_ratio", ".3f"),
    Column("speedup", ".2f"),
    Column("efficiency", ".2f"),
    Column("peak MB", ".0f", value=lambda r: float("nan") if r["peak_bytes"] is None else r["peak_bytes"] / 2**20),
    Column("syncs/step", ".1f", value=lambda r: float("nan") if r["syncs_per_step"] is None else r["syncs_per_step"]),
)


@dataclass
class GpuSetup(OverheadSetup):
    """DiT-XL/2 at 256×256 (as `bench/overhead.py`), batch 8 with classifier-free guidance, bf16, on `device`."""

    model: str = "DiT-XL/2 shape, random weights"
    num_samples: int = 8
    batch_size: int = 8
    guidance_scale: float = 4.0
    step_counts: tuple[int, ...] = (20, 50)
    dtype: str = "bf16"
    device: str = "cuda"
    compile_backend: str | None = "inductor"
    fbcache_threshold: float = 0.05
    skipped: list[str] = field(default_factory=list)

    @classmethod
    def quick(cls, **overrides) -> GpuSetup:
        """A tiny DiT on the CPU in fp32, compiled with dynamo's `eager` backend: every code path, in seconds."""
        knobs = dict(
            layers=2, heads=2, head_dim=8, latent_size=8, batch_size=2, num_samples=2, step_counts=(6, 8),
            dtype="fp32", device="cpu", compile_backend="eager", repeats=1,
        )  # fmt: skip
        return cls(**{**knobs, **overrides})


def methods(model: torch.nn.Module, setup: GpuSetup, steps: int) -> dict[str, CacheMethod | None]:
    """The rows of one step count; what cannot run here is left out with a note in `setup.skipped`."""
    seer = taylorseer_at(0.5, steps)
    rows: dict[str, CacheMethod | None] = {
        "no hooks": None,
        "full": FullPolicy(),
        "static every-2": StaticPolicy(interval=2),
        "static every-3": StaticPolicy(interval=3),
        "ToCa": parse_preset("toca"),
        "DuCa": parse_preset("duca"),
        f"TaylorSeer (l2c) {seer.describe()}": parse_preset(
            f"taylorseer:interval={seer.interval},order={seer.order},warmup={seer.warmup}"
        ),
        f"TaylorSeer (diffusers) {seer.describe()}": seer,
        f"FBCache (diffusers) threshold {setup.fbcache_threshold}": FBCache(threshold=setup.fbcache_threshold),
    }
    try:
        router = import_official_router(setup.router, setup.threshold, model_spec(model))
        router.check_timesteps(setup.new_scheduler(SCHEDULER_CONFIG).timesteps)
        rows[f"L2C router (official DDIM-20, threshold {setup.threshold})"] = router
    except (FileNotFoundError, ValueError) as error:
        setup.skipped.append(f"{steps} steps: no official router row ({error})")
    return rows


def device_clock(device: torch.device) -> Callable:
    """Wall time of a call with the device's queue drained before and after (CUDA runs asynchronously)."""

    def clock(call: Callable):
        _synchronize(device)
        start = time.perf_counter()
        result = call()
        _synchronize(device)
        return result, time.perf_counter() - start

    return clock


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class GpuBench:
    """One model on the device, one batch of noise and labels; `run(method, compiled)` is one whole sampling run."""

    def __init__(self, model: torch.nn.Module, setup: GpuSetup) -> None:
        self.model, self.setup = model, setup
        self.device = next(model.parameters()).device
        size = setup.latent_size
        noise = initial_noise(setup.batch_size, (4, size, size), setup.seed)
        self.noise = noise.to(self.device, DTYPES[setup.dtype])
        self.labels = (torch.arange(setup.batch_size) % 1000).to(self.device)
        self.denoisers = {False: GuidedDenoiser(model, setup.guidance_scale)}
        if setup.compile_backend is not None:
            compiled = torch.compile(model, backend=setup.compile_backend)  # calls `model`, which the policy hooks
            self.denoisers[True] = GuidedDenoiser(compiled, setup.guidance_scale)

    def run(self, method: CacheMethod | None, compiled: bool = False) -> torch.Tensor:
        scheduler = self.setup.new_scheduler(SCHEDULER_CONFIG)
        denoiser = self.denoisers[compiled]
        steps = self.setup.steps
        with torch.no_grad():
            if method is None:
                return sample(denoiser, scheduler, self.noise, self.labels, steps)
            timesteps = self.setup.new_scheduler(SCHEDULER_CONFIG).timesteps
            with method.apply(self.model, timesteps=timesteps):
                return sample(denoiser, scheduler, self.noise, self.labels, steps)

    def peak_bytes(self, run: Callable[[], object]) -> int | None:
        if self.device.type != "cuda":
            return None
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        run()
        torch.cuda.synchronize(self.device)
        return int(torch.cuda.max_memory_allocated(self.device))

    def syncs(self, run: Callable[[], object]) -> int | None:
        """Host-device synchronisations during one run, as `torch.cuda.set_sync_debug_mode("warn")` reports them."""
        if self.device.type != "cuda":
            return None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                run()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)


def measure(setup: GpuSetup, progress: bool = True) -> list[dict]:
    model = build_model(setup).to(setup.device, DTYPES[setup.dtype])
    bench = GpuBench(model, setup)
    results = []
    for steps in setup.step_counts:
        bench.setup = per_steps = dataclasses.replace(setup, steps=steps)
        rows = methods(model, per_steps, steps)
        flops = {name: count_flops(partial(bench.run, method))[1] for name, method in rows.items()}
        runs = {(name, False): partial(bench.run, method) for name, method in rows.items()}
        if setup.compile_backend is not None:
            runs |= {(name, True): partial(bench.run, method, compiled=True) for name, method in rows.items()}
        timer = Interleaved("abba", warmup=1, clock=device_clock(bench.device))  # the first round compiles
        named = {f"{name}|{compiled}": call for (name, compiled), call in runs.items()}
        rounds = setup.repeats + timer.warmup
        with tqdm(total=rounds * len(named), desc=f"{steps} steps", unit="run", disable=not progress) as bar:
            for _ in range(rounds):
                timer.round(named, after=lambda _: bar.update())
        base = timer.median("no hooks|False")
        for (name, compiled), call in runs.items():
            wall = timer.median(f"{name}|{compiled}")
            ratio = flops[name] / flops["no hooks"]
            syncs = bench.syncs(call)
            results.append(
                {
                    "steps": steps,
                    "method": name,
                    "compiled": compiled,
                    "wall_s": wall,
                    "wall_s_runs": timer.seconds[f"{name}|{compiled}"],
                    "flops_ratio": ratio,
                    "speedup": base / wall,
                    "efficiency": base / wall * ratio,
                    "peak_bytes": bench.peak_bytes(call),
                    "syncs_per_step": None if syncs is None else syncs / steps,
                }
            )
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--quick", action="store_true", help="a tiny DiT on the CPU in fp32 (no GPU needed)")
    parser.add_argument("--steps", type=int, nargs="+", default=None, help="step counts (default 20 50)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per row, interleaved (default 3)")
    parser.add_argument("--compile", dest="compile_backend", default=None, help="torch.compile backend (inductor)")
    parser.add_argument("--no-compile", action="store_true", help="eager rows only")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    overrides = {
        key: value
        for key, value in (("repeats", args.repeats), ("compile_backend", args.compile_backend))
        if value is not None
    }
    if args.steps is not None:
        overrides["step_counts"] = tuple(args.steps)
    if args.no_compile:
        overrides["compile_backend"] = None
    try:
        setup = GpuSetup.quick(**overrides) if args.quick else GpuSetup(**overrides)
    except ValueError as error:
        parser.error(str(error))
    if setup.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here: run with --quick for the CPU smoke run")
    torch._dynamo.config.recompile_limit = 256  # every policy shares the compiled model (see the docstring)
    torch._dynamo.config.accumulated_recompile_limit = 4096
    results = measure(setup, progress=not args.no_progress)
    device = torch.cuda.get_device_name() if setup.device == "cuda" else "cpu"
    write_results(args.json, {**dataclasses.asdict(setup), "device_name": device}, results)
    print(format_table(results, TABLE))
    for note in setup.skipped:
        print(f"note: {note}")
    print(f"device: {device}; torch {torch.__version__}; wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
