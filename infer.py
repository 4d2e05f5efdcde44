"""Sample with a caching policy and report what it costs and what it changes.

    python infer.py sample --model embedded:digits --policy static:interval=2 --steps 20 \
        --num-samples 64 --seed 0 --out out/static2
    python infer.py fid --model embedded:digits --policy static:interval=2 --num-samples 50000 --devices 8 --out out/fid
    python infer.py compare --quick --json out/compare.json   # every policy and peer side by side (BENCHMARKS.md)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

# Only light modules here: `--help` and a bad flag answer without torch; each command imports what it runs.
from l2c.options import (
    AUTO_SCHEDULER,
    DTYPE_NAMES,
    SCHEDULER_CHOICES,
    SCHEDULER_HELP,
    SCHEDULERS,
    check_policy_source,
    class_spec,
    device_count,
    non_negative_int,
    positive_int,
)
from l2c.results import Column, format_table

if TYPE_CHECKING:
    import torch

    from l2c.evaluate import SamplingSetup, SideBySide
    from l2c.metrics import DigitsQuality
    from l2c.models import ModelBundle
    from l2c.policies import CachePolicy


def torch_dtype(name: str) -> torch.dtype:
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def add_sampling_arguments(parser: argparse.ArgumentParser, num_samples: int, batch_help: str | None) -> None:
    """What `sample` and `fid` both take: the model, the policy and how to sample."""
    parser.add_argument("--model", default="embedded:digits", help="embedded:digits, a diffusers directory or a hub id")
    parser.add_argument("--policy", default="full", help="full | static:interval=2 | a policy directory | a hub id")
    parser.add_argument("--steps", type=positive_int, default=20)
    parser.add_argument("--scheduler", choices=SCHEDULER_CHOICES, default=AUTO_SCHEDULER, help=SCHEDULER_HELP)
    parser.add_argument("--num-samples", type=positive_int, default=num_samples)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--guidance-scale", type=float, default=1.5)
    parser.add_argument("--batch-size", type=positive_int, default=64, help=batch_help)
    parser.add_argument(
        "--classes", type=class_spec, default=None, help="class labels to sample, e.g. 0-9 or 1,3,5 (default: all)"
    )
    parser.add_argument(
        "--calibration-samples",
        type=non_negative_int,
        default=0,
        help="calibrate a policy that needs it (blockcache) on N uncached samples of another noise seed",
    )
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default="fp32")
    parser.add_argument("--no-progress", action="store_true")


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """infer.py's parser; `compare`'s options (from `l2c.compare`, which imports torch) only when `argv` names
    `compare` or is None."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("sample", help="sample with a policy beside the uncached model and write a report")
    add_sampling_arguments(run, num_samples=64, batch_help=None)
    run.add_argument("--out", type=Path, required=True, help="directory for report.json and the PNGs")
    run.add_argument("--flops-samples", type=int, default=0, help="count FLOPs over the first N samples (0: all)")
    run.add_argument("--device", default="auto", help="cpu, cuda, … (auto: cuda when available)")
    run.add_argument(
        "--save-policy", type=Path, default=None, help="save the policy as run (calibrated) with the measured numbers"
    )
    run.add_argument(
        "--no-beside",
        action="store_true",
        help="skip static every-N and native TaylorSeer at the policy's compute from the same noise (each samples "
        "once more beside the uncached model: about twice the command's time)",
    )
    imp = commands.add_parser("import-l2c", help="convert the routers released with Learning-to-Cache to a policy")
    imp.add_argument("checkpoint", type=Path, help="the released router .pt (read with weights_only=True)")
    imp.add_argument("--threshold", type=float, default=0.1, help="compute a branch when sigmoid(logit) > this")
    imp.add_argument("--out", type=Path, required=True, help="policy directory to write")
    imp.add_argument("--model", default=None, help="a DiT to fit the policy to (default: DiT-XL/2 at 256×256)")
    imp.add_argument("--timestep-spacing", default="linspace", help="DDIM spacing the timesteps table uses")
    fid = commands.add_parser("fid", help="sample N images with a policy on every rank/GPU, gather, score on rank 0")
    add_sampling_arguments(fid, num_samples=50_000, batch_help="per rank")
    fid.add_argument("--reference", type=Path, default=None, help="folder of real images for FID (any model)")
    fid.add_argument("--out", type=Path, required=True, help="directory for report.json and the sample shards")
    fid.add_argument("--accelerator", default="auto", help="cpu | gpu | auto (Lightning's names)")
    fid.add_argument("--devices", type=device_count, default=1, help="processes per node: an integer, or auto")
    fid.add_argument("--num-nodes", type=positive_int, default=1)
    compare = commands.add_parser("compare", help="every policy and peer side by side (bench/compare.py)")
    if argv is None or "compare" in argv:
        from l2c.compare import add_arguments

        add_arguments(compare)
    return parser


def cmd_import_l2c(args: argparse.Namespace) -> int:
    from l2c.adapters import model_spec
    from l2c.import_l2c import DIT_XL_2_256, import_official_router
    from l2c.models import load_model

    check_out_dir(args.out)

    spec = DIT_XL_2_256 if args.model is None else model_spec(load_model(args.model).transformer)
    policy = import_official_router(args.checkpoint, args.threshold, spec, args.timestep_spacing)
    policy.save_pretrained(args.out)
    print(policy.reuse_summary(len(policy.timesteps)))
    print(f"wrote {args.out}")
    return 0


def beside_uncached(key: str, spec: str) -> Column:
    """`key`'s value, then the uncached run's (`<key>_uncached`) in parentheses."""
    return Column(key, value=lambda r: f"{r[key]:{spec}}  (uncached {r[key + '_uncached']:{spec}})")


REPORT_COLUMNS = (
    Column("policy"),
    Column("steps / scheduler", value=lambda r: f"{r['steps']} / {r['scheduler']}"),
    Column("samples", key="num_samples"),
    Column("flops_ratio"),
    Column(
        "speedup_wall", value=lambda r: f"{r['speedup_wall']:.2f}x  ({r['wall_s_uncached']:.1f}s → {r['wall_s']:.1f}s)"
    ),
    Column("psnr_db", ".2f"),
    Column("ssim", ".4f"),
)
DIGITS_COLUMNS = (beside_uncached("digit_accuracy", ".3f"), beside_uncached("fd_digits", ".2f"))


def check_out_dir(out: Path) -> None:
    """`--out` names a directory to write into: refuse an existing file before any work."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: is an existing file, expected a directory (new or existing)")


def sampling_setup(args: argparse.Namespace, bundle: ModelBundle) -> SamplingSetup:
    """What `sample` and `fid` sample from `bundle`, from their shared options (`--scheduler` resolved: the one that
    runs)."""
    from l2c.evaluate import SamplingSetup

    return SamplingSetup(
        model=args.model,
        steps=args.steps,
        scheduler=args.scheduler,
        num_samples=args.num_samples,
        seed=args.seed,
        guidance_scale=args.guidance_scale,
        batch_size=args.batch_size,
        flops_samples=getattr(args, "flops_samples", 0),
        classes=args.classes,
    ).for_model(bundle)


def ready_policy(
    args: argparse.Namespace, policy: CachePolicy, bundle: ModelBundle, setup: SamplingSetup
) -> tuple[CachePolicy, dict]:
    """`policy` calibrated first if it needs it, on `--calibration-samples` samples; the errors that need no sampling
    are raised here, before any work (`SideBySide.check` for the rest). Returns the policy and what calibration cost
    (the report's `calibration` key)."""
    from l2c.evaluate import calibrate, needs_calibration

    setup.labels(bundle.num_classes)  # a --classes the model does not have stops here
    if not needs_calibration(policy):
        if args.calibration_samples:
            raise ValueError(f"--calibration-samples {args.calibration_samples}: --policy {args.policy} needs none")
    elif not args.calibration_samples:
        raise ValueError(
            f"--policy {args.policy}: not calibrated; pass --calibration-samples N (e.g. 8: uncached sampling runs "
            "on N noises apart from the evaluation's) or a calibrated policy directory"
        )
    else:
        policy, cost = calibrate(policy, bundle, setup, args.calibration_samples)
        print(f"  {args.policy}: {cost.describe()}")
        return policy, {"calibration": {"samples": cost.samples, "seed": cost.seed, "wall_s": cost.wall_s}}
    return policy, {}


def cmd_sample(args: argparse.Namespace) -> int:
    check_out_dir(args.out)
    if args.save_policy is not None:
        check_out_dir(args.save_policy)
    from l2c.policy_io import load_policy

    policy = load_policy(args.policy)  # a bad --policy stops here, before any model loads
    import torch

    from l2c.adapters import branch_names
    from l2c.evaluate import SideBySide, quality_for, report
    from l2c.models import load_model
    from l2c.plots import save_comparison, save_grid, save_plan

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    bundle = load_model(args.model, device=device, dtype=torch_dtype(args.dtype))
    setup = sampling_setup(args, bundle)
    policy, calibration = ready_policy(args, policy, bundle, setup)
    quality = quality_for(bundle)
    bench = SideBySide(bundle, setup, progress=not args.no_progress)
    run = bench.run(policy, label=args.policy)
    result = {**report(run, setup, quality), **calibration}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.json").write_text(json.dumps(result, indent=2) + "\n")
    save_grid(run.images, args.out / "samples.png")
    save_comparison(run.reference, run.images, args.out / "comparison.png", args.policy)
    if run.plan is not None:
        save_plan(run.plan, branch_names(bundle.transformer), args.out / "plan.png", args.policy)
    columns = REPORT_COLUMNS + (DIGITS_COLUMNS if quality is not None else ())
    if args.no_beside or policy.kind == "full":
        print(format_table([result], columns, transpose=True))
    else:
        start = time.perf_counter()
        result["beside"] = beside_reports(bench, result["flops_ratio"], quality)
        (args.out / "report.json").write_text(json.dumps(result, indent=2) + "\n")
        print(format_table([result, *result["beside"]], columns, transpose=True))
        took = time.perf_counter() - start
        print(f"  beside it, from the same noise: {result['beside'][0]['rule']} ({took:.1f}s more; --no-beside skips)")
    print(f"  wrote {args.out / 'report.json'}, samples.png, comparison.png, plan.png")
    if args.save_policy is not None:
        bound = policy.bind(bundle.transformer, bench.timesteps, SCHEDULERS[setup.scheduler])  # the one that ran
        print(f"  wrote {bound.save_pretrained(args.save_policy, metrics=measured(result))} (with its model card)")
    return 0


def beside_reports(bench: SideBySide, flops_ratio: float, quality: DigitsQuality | None) -> list[dict]:
    """Static every-N and native TaylorSeer at the measured policy's compute (`l2c.compare.beside_presets`), each
    sampled from `bench`'s noise beside the uncached model: what the learned policy buys. Their `report` dicts,
    with `method` and `rule` (how the setting was chosen)."""
    from l2c.compare import BESIDE_RULE, beside_presets
    from l2c.evaluate import report
    from l2c.policy_io import parse_preset

    reports = []
    for method, preset in beside_presets(flops_ratio, bench.setup.steps):
        run = bench.run(parse_preset(preset), label=preset)
        reports.append({"method": method, "rule": BESIDE_RULE, **report(run, bench.setup, quality)})
    return reports


def measured(result: dict) -> dict:
    """What a saved policy's card shows: the numbers measured against the uncached model, and on what run."""
    keys = ("flops_ratio", "psnr_db", "ssim", "speedup_wall", "digit_accuracy", "digit_accuracy_uncached")
    run = ("model", "steps", "scheduler", "num_samples", "seed", "guidance_scale", "classes")
    return {key: result[key] for key in keys + run if key in result}


def cmd_fid(args: argparse.Namespace) -> int:
    check_out_dir(args.out)
    from l2c.policy_io import load_policy

    policy = load_policy(args.policy)  # a bad --policy stops here, before any model loads or Lightning imports
    from l2c.evaluate import SideBySide
    from l2c.models import load_model

    bundle = load_model(args.model, dtype=torch_dtype(args.dtype))
    setup = sampling_setup(args, bundle)
    policy, _ = ready_policy(args, policy, bundle, setup)
    SideBySide(bundle, setup, progress=False).check(policy)
    from l2c.distributed_eval import FIDUnavailable, fid_metric, quality_report, sample_sharded, sharded_trainer

    if args.reference is not None or not bundle.is_digits:
        if args.reference is None:
            raise ValueError(f"--model {args.model}: --reference (a folder of real images) is required for FID")
        try:
            fid_metric()  # fail before sampling, not after, when FID cannot run here
        except FIDUnavailable as error:
            raise ValueError(str(error)) from error
    trainer = sharded_trainer(args.out, args.accelerator, args.devices, args.num_nodes, not args.no_progress)
    if not sample_sharded(bundle, policy, setup, trainer):
        return 0  # ranks other than 0: their shards are written
    result = quality_report(bundle, setup, args.policy, args.out, trainer.world_size, args.reference)
    (args.out / "report.json").write_text(json.dumps(result, indent=2) + "\n")
    metrics = [Column(key, ".4f") for key in ("digit_accuracy", "fd_digits", "fid") if key in result]
    print(format_table([result], metrics, transpose=True))
    print(f"  wrote {args.out / 'report.json'} ({args.num_samples} samples from {trainer.world_size} process(es))")
    return 0


def command(name: str) -> Callable[[argparse.Namespace], int]:
    """The function that runs subcommand `name`; `compare`'s is `l2c.compare.run_from_args`, imported only here."""
    if name == "compare":
        from l2c.compare import run_from_args

        return run_from_args
    return {"sample": cmd_sample, "import-l2c": cmd_import_l2c, "fid": cmd_fid}[name]


def __getattr__(name: str) -> object:
    if name == "cmd_compare":  # `infer.cmd_compare`, without importing l2c.compare with infer
        return command("compare")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    try:
        if getattr(args, "policy", None) is not None:
            check_policy_source(args.policy)  # a misspelt preset is refused before anything heavy imports
        return command(args.command)(args)
    except (ValueError, FileNotFoundError, TypeError, argparse.ArgumentTypeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
