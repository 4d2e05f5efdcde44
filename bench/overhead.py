"""What the cache runtime costs at real size: a DiT-XL/2-shaped model, batch 2, DDIM 20, CPU, fp32.

    python bench/overhead.py --json out/bench/overhead.json                       # the full run (minutes)
    python bench/overhead.py --layers 4 --steps 4 --repeats 2 --json /tmp/o.json  # a quick look
    python bench/overhead.py --compile inductor --json out/bench/overhead-compiled.json  # with compiled rows
    python bench/overhead.py --family flux --steps 4 --repeats 2 --json out/bench/overhead-flux.json  # Flux.1 shape

Rows: no hooks; hooks with the `full` policy (pure runtime overhead); the router released with Learning-to-Cache
for DiT-XL/2 DDIM-20, imported from `../shared/fixtures/` (threshold 0.1); static every-2. Weights are random
(the work is the same). Each row is a whole sampling run; repetitions are interleaved, forward then backward
order (ABBA), so drift in machine load falls on every row alike, and the median is kept. For each row:
`flops_ratio` (FlopCounterMode, whole run), `ideal_speedup` = 1 / flops_ratio, `speedup` = wall time without
hooks ÷ with, `efficiency` = speedup / ideal_speedup. Memory: bytes the cache holds per sample at the end of a
run (every stored branch output, token ages where a policy needs them, and any signals it keeps), beside the model's own
activation memory per sample (the bytes of every leaf module's output in one forward pass).

With `--compile BACKEND`, every row is repeated on `torch.compile(model, backend=BACKEND)` (the policy applied to
the compiled model's own modules; its first run, which compiles, is untimed): `speedup` is still against the eager
model without hooks, `compiled_gain` = the same row's eager wall time ÷ its compiled one (FLOPs are the eager row's).
The runtime's own cost per branch call (`runtime_cost` in the JSON setup) is measured on a model whose compute is
negligible (one token of width 8, the same blocks and steps): wall time with `full` minus without hooks, divided by
the branch calls, the best of `repeats` interleaved runs (the least disturbed by other load), and the same in thread
CPU time; the policy is applied once before the timed runs (apply and remove are a cost per run, not per call).

With `--family flux` the model is Flux.1-shaped instead: 19 double-stream and 38 single-stream blocks, hidden
24 heads × 128 = 3072, text 4096 / pooled 768 wide, 64 image tokens (16×16 latents of 16 channels, packed 2×2) and
32 text tokens by default, batch 1, flow-matching Euler (shift 3), no guidance; rows no hooks, `full`, static
every-2. Its 12 B parameters do not fit this machine's memory, so every double block shares the first one's weight
tensors and every single block the first single one's (the work per block, and every hook, is the real model's).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal

if not __package__:  # run as a file: this checkout's packages first (see bench/_checkout.py)
    import _checkout  # noqa: F401

import torch
from diffusers import DiTTransformer2DModel, FluxTransformer2DModel
from tqdm.auto import tqdm

from l2c.adapters import model_spec
from l2c.evaluate import SamplingSetup
from l2c.flux_digits import PACK, ClassTable
from l2c.import_l2c import import_official_router
from l2c.metrics import count_flops
from l2c.policies import CachePolicy, FullPolicy, StaticPolicy
from l2c.results import Column, format_table, write_results
from l2c.runtime import STEP_HOOK, CacheRuntime
from l2c.sampling import GuidedDenoiser, initial_noise, sample
from l2c.timing import Interleaved

ROUTER = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "l2c_official" / "DiT-XL-2_DDIM20_router.pt"
COLUMNS = ("method", "wall_s", "flops_ratio", "ideal_speedup", "speedup", "efficiency")
TABLE = (
    *COLUMNS,
    Column("cache MB/sample", ".1f", value=lambda row: row["cache_bytes_per_sample"] / 2**20),
    Column("activations MB/sample", ".1f", value=lambda row: row["activation_bytes_per_sample"] / 2**20),
)
# DDIM with `linspace` spacing: the timesteps the released router was trained on (999, 946, …, 0).
SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "timestep_spacing": "linspace"}
FLUX_SCHEDULER_CONFIG = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
FLUX_LATENT_CHANNELS = 16  # Flux.1's VAE latents; packed 2×2 they are its 64 input channels
Family = Literal["dit", "flux"]


@dataclass
class OverheadSetup(SamplingSetup):
    """DiT-XL/2 at 256×256: 28 blocks, hidden 16 heads × 72 = 1152, patch 2 over 32×32×4 latents (256 tokens).

    Random weights (the work is the same), no guidance; one sampling run is one batch of `batch_size` samples
    (`num_samples` is the same number). Each row's run is repeated `repeats` times.
    """

    model: str = "DiT-XL/2 shape, random weights"
    num_samples: int = 2
    batch_size: int = 2
    guidance_scale: float = 1.0
    scheduler: str = "ddim"
    layers: int = 28
    heads: int = 16
    head_dim: int = 72
    latent_size: int = 32
    repeats: int = 3
    router: Path = ROUTER
    threshold: float = 0.1
    compile_backend: str | None = None  # also time every row compiled with this torch.compile backend
    family: Family = "dit"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.repeats < 1:
            raise ValueError(f"overhead: field 'repeats' must be ≥ 1, got {self.repeats}")
        if self.num_samples != self.batch_size:
            raise ValueError(f"overhead: a run is one batch: num_samples {self.num_samples}, batch {self.batch_size}")

    @property
    def scheduler_config(self) -> dict:
        return SCHEDULER_CONFIG

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return (4, self.latent_size, self.latent_size)

    @property
    def num_blocks(self) -> int:
        return self.layers


@dataclass
class FluxOverheadSetup(OverheadSetup):
    """Flux.1 at a reduced token count: 19 double + 38 single blocks, 24 heads × 128; `layers` = double blocks.

    `latent_size` is the latent side (16: 64 image tokens once packed 2×2); `text_tokens` of the prompt.
    """

    model: str = "Flux.1 shape (shared block weights), random weights"
    num_samples: int = 1
    batch_size: int = 1
    layers: int = 19
    single_layers: int = 38
    heads: int = 24
    head_dim: int = 128
    latent_size: int = 16
    text_tokens: int = 32
    text_dim: int = 4096  # joint_attention_dim
    pooled_dim: int = 768  # pooled_projection_dim
    scheduler: str = "flow-euler"
    family: Family = "flux"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.latent_size % PACK or self.head_dim % 8:
            raise ValueError(
                f"overhead: Flux needs an even latent side and a head width divisible by 8 (its rotary axes), "
                f"got latent_size {self.latent_size}, head_dim {self.head_dim}"
            )

    @property
    def scheduler_config(self) -> dict:
        return FLUX_SCHEDULER_CONFIG

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return (FLUX_LATENT_CHANNELS, self.latent_size, self.latent_size)

    @property
    def num_blocks(self) -> int:
        return self.layers + self.single_layers

    @property
    def image_tokens(self) -> int:
        return (self.latent_size // PACK) ** 2


SETUPS: dict[Family, type[OverheadSetup]] = {"dit": OverheadSetup, "flux": FluxOverheadSetup}


def build_model(setup: OverheadSetup) -> torch.nn.Module:
    torch.manual_seed(setup.seed)
    if isinstance(setup, FluxOverheadSetup):
        return build_flux(setup)
    model = DiTTransformer2DModel(
        num_attention_heads=setup.heads,
        attention_head_dim=setup.head_dim,
        in_channels=4,
        out_channels=8,
        num_layers=setup.layers,
        sample_size=setup.latent_size,
        patch_size=2,
        num_embeds_ada_norm=1000,
    )
    return model.eval().requires_grad_(False)


def rope_axes(head_dim: int) -> tuple[int, int, int]:
    """Flux's rotary split of a head (16, 56, 56 of 128), scaled to `head_dim`; every axis even."""
    first = max(2, head_dim // 16 * 2)
    second = (head_dim - first) // 4 * 2
    return first, second, head_dim - first - second


def build_flux(setup: FluxOverheadSetup) -> FluxTransformer2DModel:
    """Random weights for one double and one single block, which every other block of its kind shares."""
    model = FluxTransformer2DModel(
        patch_size=1,
        in_channels=FLUX_LATENT_CHANNELS * PACK * PACK,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=setup.head_dim,
        num_attention_heads=setup.heads,
        joint_attention_dim=setup.text_dim,
        pooled_projection_dim=setup.pooled_dim,
        guidance_embeds=False,
        axes_dims_rope=rope_axes(setup.head_dim),
    )
    for name, count in (("transformer_blocks", setup.layers), ("single_transformer_blocks", setup.single_layers)):
        first = getattr(model, name)[0]
        blocks = [first]
        for _ in range(count - 1):
            with torch.device("meta"):
                block = type(first)(model.inner_dim, setup.heads, setup.head_dim)
            block.load_state_dict(first.state_dict(), assign=True)  # the same tensors: no new memory
            blocks.append(block)
        setattr(model, name, torch.nn.ModuleList(blocks))
    model.register_to_config(num_layers=setup.layers, num_single_layers=setup.single_layers)
    return model.eval().requires_grad_(False)


def policies(model: torch.nn.Module, setup: OverheadSetup, notes: list[str]) -> dict[str, CachePolicy | None]:
    rows: dict[str, CachePolicy | None] = {"no hooks": None, "full": FullPolicy()}
    spec = model_spec(model)
    if setup.family != "dit":
        rows["static every-2"] = StaticPolicy(interval=2)
        return rows
    try:
        router = import_official_router(setup.router, setup.threshold, spec)
        router.check_timesteps(setup.new_scheduler(SCHEDULER_CONFIG).timesteps)
        rows[f"l2c router (official DDIM-20, threshold {setup.threshold})"] = router
    except (FileNotFoundError, ValueError) as error:
        notes.append(f"skipped the official router: {error}")
    rows["static every-2"] = StaticPolicy(interval=2)
    return rows


def tensor_bytes(value: object, seen: set[int] | None = None) -> int:
    """Bytes of every tensor reachable through dataclasses, slotted records, dicts, lists and tuples, each tensor
    counted once (a forecasting branch's newest history entry is the very tensor of its stored output)."""
    seen = set() if seen is None else seen
    if isinstance(value, torch.Tensor):
        if id(value) in seen:
            return 0
        seen.add(id(value))
        return value.numel() * value.element_size()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return sum(tensor_bytes(getattr(value, f.name), seen) for f in dataclasses.fields(value))
    if hasattr(type(value), "__slots__"):  # a `BranchStore`: its lazy ages count only once built
        return sum(tensor_bytes(getattr(value, name, None), seen) for name in type(value).__slots__)
    if isinstance(value, dict):
        return sum(tensor_bytes(v, seen) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v, seen) for v in value)
    return 0


def cache_bytes(runtime: CacheRuntime) -> int:
    """What the runtime holds now: the trajectory states of every cache context (stores and signals)."""
    hook = runtime.model._diffusers_hook.get_hook(STEP_HOOK)
    seen: set[int] = set()
    return sum(tensor_bytes(state, seen) for state in hook.states._state_cache.values())


def activation_bytes(denoiser: GuidedDenoiser, latents: torch.Tensor, labels: torch.Tensor, t: torch.Tensor) -> int:
    """Bytes of every leaf module's output in one forward pass (what the model itself produces as it runs)."""
    model = denoiser.transformer
    total = 0

    def count(_module, _args, output) -> None:
        nonlocal total
        total += tensor_bytes(output)

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(count) for m in leaves]
    try:
        with torch.no_grad():
            denoiser.raw(latents, t, labels)
    finally:
        for handle in handles:
            handle.remove()
    return total


class Bench:
    """One model, one batch of noise and labels; `run(policy)` is one whole sampling run."""

    def __init__(self, model: torch.nn.Module, setup: OverheadSetup) -> None:
        self.model, self.setup = model, setup
        self.noise = initial_noise(setup.batch_size, setup.latent_shape, setup.seed)
        self.labels = torch.arange(setup.batch_size) % 1000
        table = None
        if isinstance(setup, FluxOverheadSetup):  # a random "prompt": text tokens and a pooled vector per label
            config = model.config
            table = ClassTable(1, setup.text_tokens, config.joint_attention_dim, config.pooled_projection_dim, 0)
            self.labels = torch.zeros(setup.batch_size, dtype=torch.long)
        self.denoisers = {False: GuidedDenoiser(model, setup.guidance_scale, table)}
        if setup.compile_backend is not None:  # the policy hooks `model`, which the compiled wrapper calls
            compiled = torch.compile(model, backend=setup.compile_backend)
            self.denoisers[True] = GuidedDenoiser(compiled, setup.guidance_scale, table)
        self.timesteps = setup.new_scheduler(setup.scheduler_config).timesteps.clone()
        self.cache_bytes: dict[str, int] = {}
        self.branch_calls: dict[str, int] = {}

    def run(self, name: str, policy: CachePolicy | None, compiled: bool = False) -> torch.Tensor:
        scheduler = self.setup.new_scheduler(self.setup.scheduler_config)
        denoiser = self.denoisers[compiled]
        if policy is None:
            return sample(denoiser, scheduler, self.noise, self.labels, self.setup.steps)
        with policy.apply(self.model, timesteps=self.timesteps) as runtime:
            out = sample(denoiser, scheduler, self.noise, self.labels, self.setup.steps)
            self.cache_bytes[name] = cache_bytes(runtime)
            self.branch_calls[name] = sum(runtime.executed.values())
        return out


def compiled_name(name: str, backend: str) -> str:
    return f"{name}, compiled ({backend})"


@dataclass(frozen=True)
class RuntimeCost:
    """The runtime's own time per branch call, on a model whose compute is negligible: wall and thread CPU time."""

    us_per_branch_call: float  # wall, best runs
    branch_calls_per_run: int
    no_hooks_s: float
    full_s: float
    cpu_us_per_branch_call: float  # thread CPU time, best runs (less disturbed by other load than wall time)
    us_per_branch_call_median: float  # wall, median runs
    cpu_us_per_branch_call_median: float


def runtime_cost(setup: OverheadSetup) -> RuntimeCost:
    """`full` minus no hooks, per branch call: the setup's model family, blocks and steps, one token of width 8.

    The policy is applied once, before the timed runs, to one of two identical models (apply and remove are a cost
    per run, not per branch call); each timed run is one sampling run of either model.
    """
    tiny = dataclasses.replace(setup, heads=1, head_dim=8, latent_size=2, batch_size=1, num_samples=1)
    if isinstance(tiny, FluxOverheadSetup):  # one image token (2×2 latents packed) and one text token
        tiny = dataclasses.replace(tiny, text_tokens=1, text_dim=8, pooled_dim=8)
    tiny = dataclasses.replace(tiny, compile_backend=None)
    plain, hooked = Bench(build_model(tiny), tiny), Bench(build_model(tiny), tiny)
    cpu: dict[str, list[float]] = {"no hooks": [], "full": []}

    def timed(name: str, bench: Bench) -> None:
        start = time.thread_time()
        bench.run(name, None)
        cpu[name].append(time.thread_time() - start)

    warmup, rounds = 2, 2 + max(5, setup.repeats)
    timer = Interleaved("abba", warmup=warmup)
    with FullPolicy().apply(hooked.model, timesteps=hooked.timesteps) as runtime:
        runs = {"no hooks": partial(timed, "no hooks", plain), "full": partial(timed, "full", hooked)}
        for _ in range(rounds):
            timer.round(runs)
        calls = sum(runtime.executed.values()) // rounds
    thread = {run: cpu[run][warmup:] for run in runs}  # the timer's rounds: its warm-up is untimed

    def per_call(pick: Callable[[list[float]], float], seconds: dict[str, list[float]]) -> float:
        return 1e6 * (pick(seconds["full"]) - pick(seconds["no hooks"])) / calls

    wall, median = timer.seconds, statistics.median
    return RuntimeCost(
        per_call(min, wall), calls, min(wall["no hooks"]), min(wall["full"]),
        per_call(min, thread), per_call(median, wall), per_call(median, thread),
    )  # fmt: skip


def measure(model: DiTTransformer2DModel, setup: OverheadSetup, progress: bool = True) -> tuple[list[dict], list[str]]:
    notes: list[str] = []
    rows = policies(model, setup, notes)
    bench = Bench(model, setup)
    flops = {name: count_flops(lambda p=policy, n=name: bench.run(n, p))[1] for name, policy in rows.items()}
    runs = {name: partial(bench.run, name, policy) for name, policy in rows.items()}
    backend = setup.compile_backend
    if backend is not None:
        eager_names = list(rows)
        for name in eager_names:
            compiled = compiled_name(name, backend)
            runs[compiled] = partial(bench.run, compiled, rows[name], compiled=True)
            flops[compiled] = flops[name]
    timer = Interleaved("abba", warmup=0 if backend is None else 1)  # whole runs; a compiled row compiles first
    rounds = setup.repeats + timer.warmup
    with tqdm(total=rounds * len(runs), desc="sampling runs", unit="run", disable=not progress) as bar:
        for _ in range(rounds):
            timer.round(runs, after=lambda _: bar.update())
    latents = torch.randn(setup.batch_size, *setup.latent_shape, generator=torch.Generator().manual_seed(setup.seed))
    activations = activation_bytes(bench.denoisers[False], latents, bench.labels, bench.timesteps[0]) / setup.batch_size
    base_wall = timer.median("no hooks")
    results = []
    for name in runs:
        wall = timer.median(name)
        ratio = flops[name] / flops["no hooks"]
        speedup = base_wall / wall
        results.append(
            {
                "method": name,
                "wall_s": wall,
                "flops_ratio": ratio,
                "ideal_speedup": 1 / ratio,
                "speedup": speedup,
                "efficiency": speedup * ratio,
                "wall_s_runs": timer.seconds[name],
                "cache_bytes_per_sample": bench.cache_bytes.get(name, 0) / setup.batch_size,
                "activation_bytes_per_sample": activations,
            }
        )
    if backend is not None:
        for row, eager in zip(results[len(rows) :], results[: len(rows)], strict=True):
            row["compiled_gain"] = eager["wall_s"] / row["wall_s"]
    return results, notes


def main(argv: list[str] | None = None) -> int:
    family = argparse.ArgumentParser(add_help=False)
    family.add_argument("--family", choices=sorted(SETUPS), default="dit")
    known, _ = family.parse_known_args(argv)
    setup_class = SETUPS[known.family]
    defaults = setup_class()  # the family's shape is the default of every knob
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, parents=[family]
    )
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=defaults.steps, help="the router row needs 20")
    parser.add_argument("--repeats", type=int, default=defaults.repeats, help="timed runs per row, interleaved")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--layers", type=int, default=defaults.layers, help="DiT: blocks (the router needs 28); "
                        "Flux: double-stream blocks")  # fmt: skip
    parser.add_argument("--heads", type=int, default=defaults.heads)
    parser.add_argument("--head-dim", type=int, default=defaults.head_dim)
    parser.add_argument("--latent-size", type=int, default=defaults.latent_size, help="latent side")
    parser.add_argument("--router", type=Path, default=defaults.router)
    parser.add_argument("--threshold", type=float, default=defaults.threshold)
    parser.add_argument("--compile", dest="compile_backend", metavar="BACKEND", help="also compiled rows (inductor)")
    knobs = ["layers", "heads", "head_dim", "latent_size", "batch_size", "steps", "repeats", "router", "threshold"]
    knobs.append("compile_backend")
    if isinstance(defaults, FluxOverheadSetup):
        parser.add_argument("--single-layers", type=int, default=defaults.single_layers, help="single-stream blocks")
        parser.add_argument("--text-tokens", type=int, default=defaults.text_tokens)
        parser.add_argument("--text-dim", type=int, default=defaults.text_dim, help="joint_attention_dim")
        parser.add_argument("--pooled-dim", type=int, default=defaults.pooled_dim, help="pooled_projection_dim")
        knobs += ["single_layers", "text_tokens", "text_dim", "pooled_dim"]
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:  # one run is one batch
        setup = setup_class(num_samples=args.batch_size, **{name: getattr(args, name) for name in knobs})
    except ValueError as error:
        parser.error(str(error))
    model = build_model(setup)
    results, notes = measure(model, setup, progress=not args.no_progress)
    cost = runtime_cost(setup)
    write_results(args.json, {**dataclasses.asdict(setup), "runtime_cost": dataclasses.asdict(cost)}, results)
    columns = TABLE if setup.compile_backend is None else (*TABLE, Column("compiled_gain", ".2f"))
    print(format_table(results, columns))
    print(
        f"runtime cost: {cost.us_per_branch_call:.1f} µs wall, {cost.cpu_us_per_branch_call:.1f} µs thread CPU per "
        f"branch call (best runs; medians {cost.us_per_branch_call_median:.1f} / "
        f"{cost.cpu_us_per_branch_call_median:.1f} µs; "
        f"{cost.branch_calls_per_run} branch calls "
        f"per run on one token of width 8: {cost.no_hooks_s:.3f} s without hooks, {cost.full_s:.3f} s with full)"
    )
    for note in notes:
        print(f"note: {note}")
    print(f"torch threads: {torch.get_num_threads()}; wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
