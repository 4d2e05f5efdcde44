"""Frozen-teacher trainers under a real Lightning DDP run: 2 CPU processes, gloo backend, a tiny saved teacher.

Each case is one trainer (`CASES`): the Learning-to-Cache `LayerRouterTrainer` (its predictor: `router`) and the
`TokenCacheTrainer` (its predictor: `predictor`, a token-importance block). Lightning's DDP launcher starts the other
ranks by re-running the command line, so the training runs in a subprocess: this file doubles as the worker script
(`python tests/test_ddp.py worker --case <name> ...`). Each rank writes its predictor's parameters, flattened, before
training and after every optimizer step to `rank{r}.pt` (a plain tensor) and what it saw of the DDP-wrapped model to
`rank{r}.json`.

Checked per case: (a) the ranks hold identical predictor parameters after every step (gradients are all-reduced);
(b) 2 processes × batch B follow the same trajectory as 1 process × batch 2B (unshuffled conditions, same seed, same
global batches) within the case's tolerance; (c) DDP wraps nothing but the predictor: the parameters it sees — hence
the only ones it broadcasts and all-reduces — are the predictor's, and the teacher is not a submodule of the wrapped
model.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

from predictors.frozen_teacher import FrozenTeacherModule
from predictors.l2c_trainer import LayerRouterTrainer
from predictors.token_importance import on_first_block
from predictors.tokencache_trainer import TokenCacheTrainer

ROOT = Path(__file__).resolve().parents[1]
TEACHER = dict(
    num_attention_heads=2, attention_head_dim=8, in_channels=1, num_layers=2, sample_size=8, patch_size=2,
    num_embeds_ada_norm=10,
)  # fmt: skip
PER_RANK_BATCH = 2
SAMPLES_PER_EPOCH = 8  # 2 global batches of 4 per epoch
MAX_STEPS = 4  # 2 epochs: the second one reuses the trajectory cache


@dataclass(frozen=True)
class Case:
    """One trainer under DDP: its class, its knobs for the tiny teacher, where its predictor lives, how close
    2 processes × B must come to 1 process × 2B."""

    trainer: type[FrozenTeacherModule]
    kwargs: dict
    predictor: str  # attribute of the LightningModule holding every trainable parameter
    tolerance: float
    # Parameters whose exact gradient is 0: their float gradient is rounding noise that Adam normalizes into lr-sized
    # steps, so they are held to (a) (identical on every rank) but left out of (b).
    gradient_free: tuple[str, ...] = ()


CASES = {
    # 1 vs 2 processes differ only by float summation order (teacher trajectories computed on batches of 4 vs 2, the
    # loss mean over 4 samples vs the all-reduced average of two means over 2). Measured on this machine: 1.2e-7 (one
    # float32 ulp at |logit| ≈ 2) in this configuration and with 5 per rank, 12 optimizer steps, 6 sampling steps and
    # guidance 1.5. The bound leaves room for other BLAS builds. Without the all-reduce (DDP's comm hook
    # replaced by torch's `noop_hook`) the ranks and the 1-process run differ by 0.18 and tests (a) and (b) fail.
    "l2c": Case(
        LayerRouterTrainer, dict(steps=4, guidance_scale=2.0, refresh_interval=2, lr=0.05, l1=1e-3), "router", 1e-6
    ),
    # Measured on this machine: 1.6e-7 over every parameter but the key bias below (float summation order, as for
    # l2c). Before the trainer's two DDP fixes it was 0.045: the predictor's copy of the DiT block dropped 10% of class
    # labels with the global RNG (a different draw per rank and batch split), and the ratio budget squared each rank's
    # own mean score instead of the global batch's (with the label dropout off, this alone left 3.8e-4).
    # `attn1.to_k.bias` adds the same q·b to every logit of a query, which softmax cancels: its float gradient is
    # noise (~1e-10) that Adam turns into steps up to lr; it moved 6e-6 here (the others 2.5e-2) and 1 vs 2 processes
    # differ by 1.8e-5 on it.
    "tokencache": Case(
        TokenCacheTrainer,
        dict(steps=4, guidance_scale=2.0, max_gap=2, ff_inner_dim=16, lr=0.01, budget_loss="ratio"),
        "predictor",
        1e-6,
        gradient_free=("predictor.block.attn1.to_k.bias",),
    ),
}


def flat(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.parameters()])


# ------------------------------------------------------------------------------------------------------------------
# The worker (runs in subprocesses; Lightning re-runs this file for rank 1)
# ------------------------------------------------------------------------------------------------------------------


class Recorder(L.Callback):
    """Records the predictor's parameters before training and after each step, and what the strategy wrapped."""

    def __init__(self, out: Path, predictor: str) -> None:
        self.out, self.predictor, self.states, self.info = out, predictor, [], {}

    def on_train_start(self, trainer, pl_module) -> None:
        wrapped, predictor = trainer.strategy.model, getattr(pl_module, self.predictor)
        self.states.append(flat(predictor))
        self.info = {
            "world_size": trainer.world_size,
            "global_rank": trainer.global_rank,
            "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
            "wrapper": type(wrapped).__name__,
            "trainable": [name for name, p in pl_module.named_parameters() if p.requires_grad],
            "predictor_parameters": [f"{self.predictor}.{name}" for name, _ in predictor.named_parameters()],
            "predictor_numels": [p.numel() for p in predictor.parameters()],
            "predictor_numel": sum(p.numel() for p in predictor.parameters()),
            "wrapped_parameters": [name for name, _ in wrapped.named_parameters()],
            "wrapped_trainable": [name for name, p in wrapped.named_parameters() if p.requires_grad],
            "wrapped_numel": sum(p.numel() for p in wrapped.parameters()),
            "teacher_numel": sum(p.numel() for p in pl_module.teacher.parameters()),
            "teacher_is_submodule": any(m is pl_module.teacher for m in wrapped.modules()),
            "teacher_requires_grad": any(p.requires_grad for p in pl_module.teacher.parameters()),
        }
        if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel):
            # What DDP actually broadcasts at start and all-reduces after backward.
            reduced = [id(p) for p in wrapped._module_parameters]
            self.info["ddp_reduces_the_predictor"] = reduced == [id(p) for p in predictor.parameters()]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.states.append(flat(getattr(pl_module, self.predictor)))
        self.info.setdefault("labels", []).append(batch[0].tolist())

    def on_train_end(self, trainer, pl_module) -> None:
        self.info["teacher_grads_none"] = all(p.grad is None for p in pl_module.teacher.parameters())
        self.info["global_step"] = trainer.global_step
        rank = trainer.global_rank
        torch.save(torch.stack(self.states), self.out / f"rank{rank}.pt")
        (self.out / f"rank{rank}.json").write_text(json.dumps(self.info, indent=1))


def worker(argv: list[str]) -> None:
    from lightning.pytorch.strategies import DDPStrategy

    from data.conditions import ClassConditionDataModule

    parser = argparse.ArgumentParser()
    parser.add_argument("--case", choices=CASES, required=True)
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--devices", type=int, required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    case = CASES[args.case]
    module = case.trainer(teacher=args.teacher, **case.kwargs)
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
        callbacks=[Recorder(args.out, case.predictor)],
    )
    L.seed_everything(0, verbose=False)
    trainer.fit(module, data)


# ------------------------------------------------------------------------------------------------------------------
# The tests
# ------------------------------------------------------------------------------------------------------------------


def launch(case: str, teacher: Path, out: Path, devices: int, batch_size: int) -> subprocess.Popen:
    """Start a worker; its output goes to `out/log.txt` (no pipe to fill while another run is awaited)."""
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    env.pop("LOCAL_RANK", None), env.pop("MASTER_PORT", None)  # a fresh launch, whatever pytest runs under
    command = [sys.executable, str(Path(__file__).resolve()), "worker", "--case", case, "--teacher", str(teacher),
               "--out", str(out), "--devices", str(devices), "--batch-size", str(batch_size)]  # fmt: skip
    with open(out / "log.txt", "w") as log:
        return subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)


def finish(process: subprocess.Popen, out: Path) -> None:
    try:
        process.wait(timeout=600)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, (out / "log.txt").read_text()[-6000:]


def load_rank(out: Path, rank: int) -> tuple[torch.Tensor, dict]:
    return torch.load(out / f"rank{rank}.pt", weights_only=True), json.loads((out / f"rank{rank}.json").read_text())


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    from diffusers import DDPMScheduler, DiTTransformer2DModel

    root = tmp_path_factory.mktemp("ddp-teacher")
    torch.manual_seed(0)
    DiTTransformer2DModel(**TEACHER).save_pretrained(root / "transformer")
    DDPMScheduler(beta_schedule="squaredcos_cap_v2").save_pretrained(root / "scheduler")
    return root


@pytest.fixture(scope="module", params=list(CASES))
def runs(request, teacher, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"ddp-{request.param}")
    start = time.perf_counter()
    processes = {  # side by side: most of a run is importing torch, diffusers and Lightning
        "ddp": launch(request.param, teacher, root / "ddp", devices=2, batch_size=PER_RANK_BATCH),
        "single": launch(request.param, teacher, root / "single", devices=1, batch_size=2 * PER_RANK_BATCH),
    }
    for name, process in processes.items():
        finish(process, root / name)
    seconds = time.perf_counter() - start
    ranks = [load_rank(root / "ddp", r) for r in range(2)]
    return {"case": CASES[request.param], "ranks": ranks, "single": load_rank(root / "single", 0), "seconds": seconds}


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


def test_ranks_hold_identical_predictors_after_every_step(runs):
    (states0, info), (states1, _) = runs["ranks"]
    assert states0.shape == (MAX_STEPS + 1, info["predictor_numel"])
    assert torch.equal(states0, states1)
    assert not torch.equal(states0[-1], states0[0]), "the predictor trained"


def compared(info: dict, gradient_free: tuple[str, ...]) -> torch.Tensor:
    """Mask over the flattened predictor: True where a parameter carries a real gradient."""
    names, numels = info["predictor_parameters"], info["predictor_numels"]
    assert set(gradient_free) <= set(names), f"unknown parameters {set(gradient_free) - set(names)}"
    return torch.cat([torch.full((n,), name not in gradient_free) for name, n in zip(names, numels)])


def test_two_processes_match_one_process_with_the_same_global_batch(runs):
    (states, info), (single, _) = runs["ranks"][0], runs["single"]
    case = runs["case"]
    tolerance, mask = case.tolerance, compared(info, case.gradient_free)
    states, single = states[:, mask], single[:, mask]
    difference = (states - single).abs().max().item()
    print(f"max |params(2 procs × B) − params(1 proc × 2B)| = {difference:.3g}; both runs: {runs['seconds']:.1f} s")
    assert difference <= tolerance
    moved = (single[-1] - single[0]).abs().max().item()
    assert moved > 1000 * tolerance, "the comparison is not vacuous"


def test_ddp_reduces_the_predictor_only(runs):
    for _, info in runs["ranks"]:
        assert info["trainable"] == info["predictor_parameters"]
        wrapped = info["wrapped_trainable"]
        assert len(wrapped) == len(info["trainable"])
        assert all(w.endswith(f".{name}") for w, name in zip(wrapped, info["trainable"]))
        assert info["wrapped_parameters"] == info["wrapped_trainable"], "the wrapped model holds no frozen parameter"
        assert info["wrapped_numel"] == info["predictor_numel"] < info["teacher_numel"]
        assert info["ddp_reduces_the_predictor"]
        assert not info["teacher_is_submodule"] and not info["teacher_requires_grad"]
        assert info["teacher_grads_none"]


def test_tokencache_predictor_draws_nothing_from_the_global_rng_while_training(teacher):
    """What (b) needs of the TokenCache predictor: a train-mode forward is a pure function of its input (a DiT block's
    label embedding would otherwise drop labels with `torch.rand`, a draw no two batch splits share)."""
    module = TokenCacheTrainer(teacher=str(teacher), **CASES["tokencache"].kwargs)
    seen = {}
    handle = on_first_block(module.teacher, lambda args, kwargs: seen.update(args=args, kwargs=kwargs))
    labels = torch.arange(10).repeat(4)  # 40 labels: P(no drop at 10%) = 1.5%
    with torch.no_grad():
        module.teacher(torch.randn(40, 1, 8, 8), timestep=torch.full((40,), 500), class_labels=labels)
    handle.remove()
    module.predictor.train()
    with torch.no_grad():  # scores that depend on the input (the head starts at zero: every score = init_score)
        module.predictor.head.weight.normal_(generator=torch.Generator().manual_seed(0))
    state = torch.get_rng_state()
    first = module.predictor(seen["args"], seen["kwargs"])
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(module.predictor(seen["args"], seen["kwargs"]), first)


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "worker":
    worker(sys.argv[2:])
