"""Router training time per step against one teacher forward pass at the same batch.

    python bench/l2c_step_time.py --json out/bench/l2c_step_time.json

The trajectory cache is warmed first (its one-off cost is reported separately), then a training
step (cached full step + student step(s) + backward into the router + AdamW) and a plain no-grad
teacher forward are timed alternately; medians are compared. Target: ≤ 3.5× for alternation.
`--rollout-budget B` adds a row for the rollout objective (a whole sampling run with hard gates at
budget B and its backward per training step), with the ratio also per sampling step.

    python bench/l2c_step_time.py --xl --json out/bench/l2c_step_time_xl.json

`--xl`: rollout training at real size instead (issue 13): the forecast trainer (three actions, learned weights,
activation checkpointing per sampling step) on a DiT-XL/2-shaped teacher (28 blocks, hidden 1152, 256 tokens,
random weights), batch 2 without guidance, 20 DDIM steps, CPU fp32. One training step (a whole 20-step rollout and
its backward) against one teacher forward, and peak memory: the resident-set high-water mark above the loaded model
during one training step, against the same during one sampling step's forward + backward through the teacher, each
measured in a fresh process (memory freed by one measurement is not reused by the next). Targets: ≤ 4 teacher
forwards of time per trained sampling step; peak memory ≤ 3× one sampling step's forward + backward.

The probes run with glibc's mmap threshold fixed (`MALLOC_MMAP_THRESHOLD_`, 128 KiB) so that a freed tensor goes
back to the system and the resident set follows the live tensors, as a GPU's allocated bytes do. With glibc's
default (a threshold that rises to the largest freed block) the freed activations of each recomputed step stay in
the heap and the resident set reads several times the live memory (`--glibc-default` measures that way).
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import queue as queue_module
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

if not __package__:  # run as a file: this checkout's packages first (see bench/_checkout.py)
    import _checkout  # noqa: F401

import torch

from l2c.results import Column, format_table, write_results
from l2c.timing import Interleaved, wall_clock
from predictors.l2c_trainer import ForecastRouterTrainer, RolloutRouterTrainer, SegmentRouterTrainer

TABLE = (
    Column("objective"),
    Column("refresh", key="refresh_interval"),
    Column("batch (model batch)", value=lambda row: f"{row['batch_size']} ({row['model_batch']})"),
    Column("step ms", ".1f", key="step_ms"),
    Column("teacher forward ms", ".1f", key="teacher_forward_ms"),
    Column("ratio", ".2f"),
    Column("per sampling step", ".2f", key="ratio_per_sampling_step"),
    Column("cache warm-up s/sample", ".3f", key="trajectory_cache_s_per_sample"),
)


def measure(teacher: str, interval: int, batch_size: int, repeats: int, budget: float | None = None) -> dict:
    """Median training-step and teacher-forward times for one refresh interval (or the rollout at `budget`)."""
    if budget is None:
        module = SegmentRouterTrainer(teacher=teacher, refresh_interval=interval)
    else:
        module = RolloutRouterTrainer(teacher=teacher, refresh_interval=interval, export_budget=budget, init="even")
    module.log_dict = lambda *a, **k: None  # no Trainer attached: logging is not what is timed
    module.on_fit_start()  # the trainer's cache runtime on the teacher
    labels = torch.arange(batch_size) % module.bundle.num_classes
    seeds = torch.arange(batch_size)
    _, warm = wall_clock(lambda: module.trajectories.get(module, labels, seeds))
    optimizer = module.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    x, model_labels = module.guidance.model_inputs(module.noise_for(seeds), labels)
    t = module.timesteps[0].expand(len(x))

    def train_step() -> None:
        loss = module.training_step((labels, seeds), 0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def forward() -> None:
        with torch.no_grad():
            module.teacher(x, timestep=t, class_labels=model_labels)

    timer = Interleaved("fixed", warmup=1)  # alternating, the first round untimed
    for _ in range(repeats + 1):
        timer.round({"step": train_step, "forward": forward})
    step_s, forward_s = timer.median("step"), timer.median("forward")
    module.on_fit_end()
    sampling_steps = len(module.timesteps) if budget is not None else 1
    return {
        "objective": module.objective,
        "refresh_interval": interval,
        "batch_size": batch_size,
        "model_batch": len(x),
        "step_ms": 1000 * step_s,
        "teacher_forward_ms": 1000 * forward_s,
        "ratio": step_s / forward_s,
        "ratio_per_sampling_step": step_s / forward_s / sampling_steps,
        "trajectory_cache_s_per_sample": warm / batch_size,
    }


# -- rollout training at DiT-XL/2 size ---------------------------------------------------------------------------
XL_TABLE = (
    Column("shape"),
    Column("steps"),
    Column("batch", key="batch_size"),
    Column("train step s", ".1f", key="step_s"),
    Column("teacher forward s", ".2f", key="teacher_forward_s"),
    Column("forwards per sampling step", ".2f", key="forwards_per_sampling_step"),
    Column("peak MB (train step)", ".0f", value=lambda row: row["peak_train_bytes"] / 2**20),
    Column("peak MB (one step fwd+bwd)", ".0f", value=lambda row: row["peak_one_step_bytes"] / 2**20),
    Column("memory ratio", ".2f", key="memory_ratio"),
)


MMAP_THRESHOLD = 128 * 1024  # bytes: larger allocations are mapped, and unmapped when freed


def resident_bytes() -> int:
    """This process's resident set now (Linux /proc)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_above_now(call, interval_s: float = 0.002) -> int:
    """The resident-set high-water mark during `call` above the resident set just before it (sampled)."""
    start, peak, done = resident_bytes(), [0], threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], resident_bytes())
            time.sleep(interval_s)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        call()
    finally:
        done.set()
        watcher.join()
    return max(peak[0], resident_bytes()) - start


def xl_trainer(teacher: str, steps: int, budget: float) -> ForecastRouterTrainer:
    module = ForecastRouterTrainer(
        teacher=teacher,
        steps=steps,
        guidance_scale=1.0,
        refresh_interval=steps,
        export_budget=budget,
        init="even",
        checkpoint_steps=True,
    )
    module.log_dict = lambda *a, **k: None  # no Trainer attached: logging is not what is timed
    module.on_fit_start()
    return module


def xl_probe(kind: str, teacher: str, steps: int, budget: float, batch_size: int, queue) -> None:
    """In a fresh process: the peak memory (and time) of one training step or of one sampling step's forward +
    backward through the teacher (its input requiring grad, as the gated branches' outputs do)."""
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    module = xl_trainer(teacher, steps, budget)
    labels, seeds = torch.arange(batch_size) % module.bundle.num_classes, torch.arange(batch_size)
    x, model_labels = module.guidance.model_inputs(module.noise_for(seeds), labels)
    t = module.timesteps[0].expand(len(x))
    if kind == "train":
        module.trajectories.get(module, labels, seeds)  # the teacher's run (the target), cached before measuring
        optimizer = module.configure_optimizers()
        optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer

        def call() -> None:
            loss = module.training_step((labels, seeds), 0)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    elif kind == "one_step":

        def call() -> None:
            output = module.teacher(x.clone().requires_grad_(True), timestep=t, class_labels=model_labels).sample
            output.sum().backward()
    else:

        def call() -> None:
            with torch.no_grad():
                module.teacher(x, timestep=t, class_labels=model_labels)

        call()  # warm
    start = time.perf_counter()
    peak = peak_above_now(call)
    queue.put((peak, time.perf_counter() - start))


def in_fresh_process(kind: str, *args) -> tuple[int, float]:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=xl_probe, args=(kind, *args, queue))
    process.start()
    while True:  # a child killed (e.g. out of memory) puts nothing: say so instead of waiting forever
        try:
            result = queue.get(timeout=5)
            break
        except queue_module.Empty:
            if not process.is_alive():
                code = process.exitcode
                message = f"the {kind!r} probe died (exit code {code}; -9: killed, e.g. out of memory)"
                raise RuntimeError(message) from None
    process.join()
    return result


@contextlib.contextmanager
def probe_environment(name: str, value: str | None) -> Iterator[None]:
    """`name=value` in the environment the probes' fresh processes start with (None: as it is), then restored."""
    before = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def measure_xl(args: argparse.Namespace) -> dict:
    """The forecast trainer at DiT-XL/2 shape (or the shape given): time and peak memory, each in its own process."""
    from bench.overhead import OverheadSetup, build_model

    shape = OverheadSetup(layers=args.layers, heads=args.heads, head_dim=args.head_dim, latent_size=args.latent_size)
    threshold = None if args.glibc_default else str(MMAP_THRESHOLD)
    with tempfile.TemporaryDirectory() as directory, probe_environment("MALLOC_MMAP_THRESHOLD_", threshold):
        build_model(shape).save_pretrained(directory)
        probe = (directory, args.steps, args.xl_budget, args.xl_batch_size)
        forward_s = min(in_fresh_process("forward", *probe)[1] for _ in range(args.repeats))
        one_step, _ = in_fresh_process("one_step", *probe)
        train, step_s = in_fresh_process("train", *probe)
    tokens = (args.latent_size // 2) ** 2
    return {
        "shape": f"{args.layers} blocks, hidden {args.heads * args.head_dim}, {tokens} tokens",
        "malloc_mmap_threshold": threshold or "glibc default",
        "steps": args.steps,
        "batch_size": args.xl_batch_size,
        "budget": args.xl_budget,
        "step_s": step_s,
        "teacher_forward_s": forward_s,
        "forwards_per_sampling_step": step_s / forward_s / args.steps,
        "peak_train_bytes": train,
        "peak_one_step_bytes": one_step,
        "memory_ratio": train / one_step,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="embedded:digits")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--refresh-interval", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--rollout-budget", type=float, default=None, help="add a rollout-objective row")
    parser.add_argument("--json", type=Path, required=True)
    xl = parser.add_argument_group("--xl: the forecast trainer at DiT-XL/2 size (defaults: its shape)")
    xl.add_argument("--xl", action="store_true", help="measure rollout training at real size instead")
    xl.add_argument("--layers", type=int, default=28)
    xl.add_argument("--heads", type=int, default=16)
    xl.add_argument("--head-dim", type=int, default=72)
    xl.add_argument("--latent-size", type=int, default=32)
    xl.add_argument("--steps", type=int, default=20)
    xl.add_argument("--xl-batch-size", type=int, default=2)
    xl.add_argument("--xl-budget", type=float, default=0.5)
    xl.add_argument("--glibc-default", action="store_true", help="measure with glibc's default mmap threshold")
    args = parser.parse_args(argv)
    if args.xl:
        row = measure_xl(args)
        write_results(args.json, {k: v for k, v in vars(args).items() if k != "json"}, [row])
        print(format_table([row], XL_TABLE))
        return 0

    rows = [measure(args.teacher, i, args.batch_size, args.repeats) for i in args.refresh_interval]
    if args.rollout_budget is not None:
        steps = len(SegmentRouterTrainer(teacher=args.teacher).timesteps)
        rows.append(measure(args.teacher, steps, args.batch_size, args.repeats, args.rollout_budget))
    write_results(args.json, {k: v for k, v in vars(args).items() if k != "json"}, rows)
    print(format_table(rows, TABLE))
    return 0


if __name__ == "__main__":
    sys.exit(main())
