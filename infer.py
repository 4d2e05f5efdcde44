"""Sample with a caching policy and report what it costs and what it changes.

    python infer.py sample --model embedded:digits --policy static:interval=2 --steps 20 \
        --scheduler ddim --num-samples 64 --seed 0 --out out/static2
    python infer.py fid --model embedded:digits --policy static:interval=2 --num-samples 50000 --devices 8 --out out/fid
    python infer.py compare --quick --json out/compare.json   # every policy and peer side by side (BENCHMARKS.md)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from l2c.adapters import branch_names
from l2c.compare import add_arguments as add_compare_arguments
from l2c.compare import run_from_args as cmd_compare
from l2c.evaluate import SamplingSetup, SideBySide, quality_for, report
from l2c.models import SCHEDULERS, load_model
from l2c.plots import save_comparison, save_grid, save_plan
from l2c.policy_io import load_policy
from l2c.results import Column, format_table

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer ≥ 1, got {text}")
    return value


def device_count(text: str) -> int | str:
    if text == "auto":
        return text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected an integer ≥ 1 or 'auto', got {text!r}")
    return int(text)


def add_sampling_arguments(parser: argparse.ArgumentParser, num_samples: int, batch_help: str | None) -> None:
    """What `sample` and `fid` both take: the model, the policy and how to sample."""
    parser.add_argument("--model", default="embedded:digits", help="embedded:digits, a diffusers directory or a hub id")
    parser.add_argument("--policy", default="full", help="full | static:interval=2 | a policy directory | a hub id")
    parser.add_argument("--steps", type=positive_int, default=20)
    parser.add_argument("--scheduler", choices=sorted(SCHEDULERS), default="ddim")
    parser.add_argument("--num-samples", type=positive_int, default=num_samples)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--guidance-scale", type=float, default=1.5)
    parser.add_argument("--batch-size", type=positive_int, default=64, help=batch_help)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("sample", help="sample with a policy beside the uncached model and write a report")
    add_sampling_arguments(run, num_samples=64, batch_help=None)
    run.add_argument("--out", type=Path, required=True, help="directory for report.json and the PNGs")
    run.add_argument("--flops-samples", type=int, default=0, help="count FLOPs over the first N samples (0: all)")
    run.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    run.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    run.add_argument("--no-progress", action="store_true")
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
    fid.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    fid.add_argument("--no-progress", action="store_true")
    add_compare_arguments(commands.add_parser("compare", help="every policy and peer side by side (bench/compare.py)"))
    return parser


def cmd_import_l2c(args: argparse.Namespace) -> int:
    from l2c.adapters import model_spec
    from l2c.import_l2c import DIT_XL_2_256, import_official_router

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


def sampling_setup(args: argparse.Namespace) -> SamplingSetup:
    """What `sample` and `fid` sample, from their shared options."""
    return SamplingSetup(
        model=args.model,
        steps=args.steps,
        scheduler=args.scheduler,
        num_samples=args.num_samples,
        seed=args.seed,
        guidance_scale=args.guidance_scale,
        batch_size=args.batch_size,
        flops_samples=getattr(args, "flops_samples", 0),
    )


def cmd_sample(args: argparse.Namespace) -> int:
    bundle = load_model(args.model, device=args.device, dtype=DTYPES[args.dtype])
    policy = load_policy(args.policy)
    setup = sampling_setup(args)
    quality = quality_for(bundle)
    run = SideBySide(bundle, setup, progress=not args.no_progress).run(policy, label=args.policy)
    result = report(run, setup, quality)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.json").write_text(json.dumps(result, indent=2) + "\n")
    save_grid(run.images, args.out / "samples.png")
    save_comparison(run.reference, run.images, args.out / "comparison.png", args.policy)
    if run.plan is not None:
        save_plan(run.plan, branch_names(bundle.transformer), args.out / "plan.png", args.policy)
    print(format_table([result], REPORT_COLUMNS + (DIGITS_COLUMNS if quality is not None else ()), transpose=True))
    print(f"  wrote {args.out / 'report.json'}, samples.png, comparison.png, plan.png")
    return 0


def cmd_fid(args: argparse.Namespace) -> int:
    from l2c.distributed_eval import FIDUnavailable, fid_metric, quality_report, sample_sharded, sharded_trainer

    setup = sampling_setup(args)
    bundle = load_model(args.model, dtype=DTYPES[args.dtype])
    policy = load_policy(args.policy)
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    commands = {"sample": cmd_sample, "import-l2c": cmd_import_l2c, "fid": cmd_fid, "compare": cmd_compare}
    try:
        return commands[args.command](args)
    except (ValueError, FileNotFoundError, TypeError, argparse.ArgumentTypeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
