"""Router training time per step against one teacher forward pass at the same batch.

    python bench/l2c_step_time.py --json out/bench/l2c_step_time.json

The trajectory cache is warmed first (its one-off cost is reported separately), then a training
step (cached full step + student step(s) + backward into the router + AdamW) and a plain no-grad
teacher forward are timed alternately; medians are compared. Target: ≤ 3.5× for alternation.
`--rollout-budget B` adds a row for the rollout objective (a whole sampling run with hard gates at
budget B and its backward per training step), with the ratio also per sampling step.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if not __package__:  # run as a file: this checkout's packages first (see bench/_checkout.py)
    import _checkout  # noqa: F401

import torch

from l2c.results import Column, format_table, write_results
from l2c.timing import Interleaved, wall_clock
from predictors.l2c_trainer import RolloutRouterTrainer, SegmentRouterTrainer

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="embedded:digits")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--refresh-interval", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--rollout-budget", type=float, default=None, help="add a rollout-objective row")
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args(argv)

    rows = [measure(args.teacher, i, args.batch_size, args.repeats) for i in args.refresh_interval]
    if args.rollout_budget is not None:
        steps = len(SegmentRouterTrainer(teacher=args.teacher).timesteps)
        rows.append(measure(args.teacher, steps, args.batch_size, args.repeats, args.rollout_budget))
    write_results(args.json, {k: v for k, v in vars(args).items() if k != "json"}, rows)
    print(format_table(rows, TABLE))
    return 0


if __name__ == "__main__":
    sys.exit(main())
