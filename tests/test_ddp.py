"""`LayerRouterTrainer` under a real Lightning DDP run: 2 CPU processes, gloo backend, a tiny saved teacher.

Lightning's DDP launcher starts the other ranks by re-running the command line, so the training runs in
a subprocess: this file doubles as the worker script (`python tests/test_ddp.py worker ...`). Each rank
writes the router logits after every optimizer step to `rank{r}.pt` (a plain tensor) and what it saw of
the DDP-wrapped model to `rank{r}.json`.

Checked: (a) the ranks hold identical logits after every step (gradients are all-reduced); (b) 2 processes ×
batch B follow the same trajectory as 1 process × batch 2B (unshuffled conditions, same seed, same global
batches); (c) DDP wraps nothing but the router: the only parameter it sees — hence the only one it broadcasts
and all-reduces — is `router.logits`, and the teacher is not a submodule of the wrapped model.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TEACHER = dict(
    num_attention_heads=2, attention_head_dim=8, in_channels=1, num_layers=2, sample_size=8, patch_size=2,
    num_embeds_ada_norm=10,
)  # fmt: skip
TRAINER_KWARGS = dict(steps=4, guidance_scale=2.0, refresh_interval=2, lr=0.05, l1=1e-3)
PER_RANK_BATCH = 2
SAMPLES_PER_EPOCH = 8  # 2 global batches of 4 per epoch
MAX_STEPS = 4  # 2 epochs: the second one reuses the trajectory cache
# 1 vs 2 processes differ only by float summation order (teacher trajectories computed on batches of 4 vs 2, the
# loss mean over 4 samples vs the all-reduced average of two means over 2). Measured on this machine: exactly 0 in
# this configuration; 1.2e-7 (one float32 ulp at |logit| ≈ 2) with 5 per rank, 12 optimizer steps, 6 sampling steps
# and guidance 1.5. The bound leaves room for other BLAS builds. Without the all-reduce (DDP's comm hook replaced by
# torch's `noop_hook`) the ranks and the 1-process run differ by 0.18 and tests (a) and (b) fail.
TOLERANCE = 1e-6


# ------------------------------------------------------------------------------------------------------------------
# The worker (runs in subprocesses; Lightning re-runs this file for rank 1)
# ------------------------------------------------------------------------------------------------------------------


class Recorder(L.Callback):
    """Records the router logits after each step, and what the strategy wrapped, then writes them per rank."""

    def __init__(self, out: Path) -> None:
        self.out, self.logits, self.info = out, [], {}

    def on_train_start(self, trainer, pl_module) -> None:
        wrapped = trainer.strategy.model
        self.info = {
            "world_size": trainer.world_size,
            "global_rank": trainer.global_rank,
            "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
            "wrapper": type(wrapped).__name__,
            "trainable": [name for name, p in pl_module.named_parameters() if p.requires_grad],
            "wrapped_parameters": [name for name, _ in wrapped.named_parameters()],
            "wrapped_trainable": [name for name, p in wrapped.named_parameters() if p.requires_grad],
            "wrapped_numel": sum(p.numel() for p in wrapped.parameters()),
            "teacher_numel": sum(p.numel() for p in pl_module.teacher.parameters()),
            "teacher_is_submodule": any(m is pl_module.teacher for m in wrapped.modules()),
            "teacher_requires_grad": any(p.requires_grad for p in pl_module.teacher.parameters()),
        }
        if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel):
            # What DDP actually broadcasts at start and all-reduces after backward.
            self.info["ddp_module_parameters"] = len(wrapped._module_parameters)
            self.info["ddp_reduced_is_router"] = [p is pl_module.router.logits for p in wrapped._module_parameters]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.logits.append(pl_module.router.logits.detach().clone())
        self.info.setdefault("labels", []).append(batch[0].tolist())

    def on_train_end(self, trainer, pl_module) -> None:
        self.info["teacher_grads_none"] = all(p.grad is None for p in pl_module.teacher.parameters())
        self.info["global_step"] = trainer.global_step
        rank = trainer.global_rank
        torch.save(torch.stack(self.logits), self.out / f"rank{rank}.pt")
        (self.out / f"rank{rank}.json").write_text(json.dumps(self.info, indent=1))


def worker(argv: list[str]) -> None:
    from lightning.pytorch.strategies import DDPStrategy

    from data.conditions import ClassConditionDataModule
    from predictors.l2c_trainer import LayerRouterTrainer

    parser = argparse.ArgumentParser()
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--devices", type=int, required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    module = LayerRouterTrainer(teacher=args.teacher, **TRAINER_KWARGS)
    data = ClassConditionDataModule(
        num_classes=10, samples_per_epoch=SAMPLES_PER_EPOCH, batch_size=args.batch_size, shuffle=False
    )
    strategy = DDPStrategy(process_group_backend="gloo") if args.devices > 1 else "auto"
    trainer = L.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=strategy,
        max_steps=MAX_STEPS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=args.out,
        callbacks=[Recorder(args.out)],
    )
    L.seed_everything(0, verbose=False)
    trainer.fit(module, data)


# ------------------------------------------------------------------------------------------------------------------
# The tests
# ------------------------------------------------------------------------------------------------------------------


def launch(teacher: Path, out: Path, devices: int, batch_size: int) -> float:
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    env.pop("LOCAL_RANK", None), env.pop("MASTER_PORT", None)  # a fresh launch, whatever pytest runs under
    command = [sys.executable, str(Path(__file__).resolve()), "worker", "--teacher", str(teacher), "--out", str(out),
               "--devices", str(devices), "--batch-size", str(batch_size)]  # fmt: skip
    start = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return time.perf_counter() - start


def load_rank(out: Path, rank: int) -> tuple[torch.Tensor, dict]:
    return torch.load(out / f"rank{rank}.pt", weights_only=True), json.loads((out / f"rank{rank}.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from diffusers import DDPMScheduler, DiTTransformer2DModel

    root = tmp_path_factory.mktemp("ddp")
    teacher = root / "teacher"
    torch.manual_seed(0)
    DiTTransformer2DModel(**TEACHER).save_pretrained(teacher / "transformer")
    DDPMScheduler(beta_schedule="squaredcos_cap_v2").save_pretrained(teacher / "scheduler")
    seconds = {
        "ddp": launch(teacher, root / "ddp", devices=2, batch_size=PER_RANK_BATCH),
        "single": launch(teacher, root / "single", devices=1, batch_size=2 * PER_RANK_BATCH),
    }
    ranks = [load_rank(root / "ddp", r) for r in range(2)]
    return {"ranks": ranks, "single": load_rank(root / "single", 0), "seconds": seconds}


def test_ddp_ran_two_gloo_processes_on_different_data(runs):
    (_, info0), (_, info1) = runs["ranks"]
    assert (info0["world_size"], info0["global_rank"], info1["global_rank"]) == (2, 0, 1)
    assert info0["backend"] == info1["backend"] == "gloo"
    assert info0["wrapper"] == "DistributedDataParallel"
    assert info0["global_step"] == info1["global_step"] == MAX_STEPS
    # Each rank trains its own shard: (a) below is only meaningful because the gradients differ before all-reduce.
    assert info0["labels"] != info1["labels"]
    single = runs["single"][1]["labels"]
    for step in range(MAX_STEPS):
        assert sorted(info0["labels"][step] + info1["labels"][step]) == sorted(single[step]), "same global batch"


def test_ranks_hold_identical_router_logits_after_every_step(runs):
    (logits0, _), (logits1, _) = runs["ranks"]
    assert logits0.shape == (MAX_STEPS, 4, 2, 2)
    assert torch.equal(logits0, logits1)
    assert not torch.equal(logits0[-1], torch.full_like(logits0[-1], 2.0)), "the router trained"


def test_two_processes_match_one_process_with_the_same_global_batch(runs):
    (logits, _), (single, _) = runs["ranks"][0], runs["single"]
    difference = (logits - single).abs().max().item()
    print(f"max |logits(2 procs × B) − logits(1 proc × 2B)| = {difference:.3g}; seconds: {runs['seconds']}")
    assert difference <= TOLERANCE
    moved = (single[-1] - 2.0).abs().max().item()
    assert moved > 1000 * TOLERANCE, "the comparison is not vacuous"


def test_ddp_reduces_the_router_only(runs):
    for _, info in runs["ranks"]:
        assert info["trainable"] == ["router.logits"]
        assert len(info["wrapped_trainable"]) == 1 and info["wrapped_trainable"][0].endswith("router.logits")
        assert info["wrapped_parameters"] == info["wrapped_trainable"], "the wrapped model holds no frozen parameter"
        assert info["wrapped_numel"] == 4 * 2 * 2 < info["teacher_numel"]
        assert info["ddp_module_parameters"] == 1 and info["ddp_reduced_is_router"] == [True]
        assert not info["teacher_is_submodule"] and not info["teacher_requires_grad"]
        assert info["teacher_grads_none"]


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "worker":
    worker(sys.argv[2:])
