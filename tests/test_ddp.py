"""Frozen-teacher trainers under a real Lightning DDP run: 2 CPU processes, gloo backend, a tiny saved teacher.

Each case is one trainer (`CASES`): the Learning-to-Cache `SegmentRouterTrainer` (its predictor: `router`) and the
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

A third run per case, `sharded`, is the 2-process DDP run with `shard_teacher=True`: the frozen teacher sharded by
FSDP2 (a unit per block, one for block 0's adaLN embedding, one for the root), the predictor still replicated by
DDP. Checked besides (a)–(c): each rank holds its half of the teacher's parameter elements; the cache runtime hooked
the same branches and executed the same actions as unsharded; every rank called the teacher as often as the
1-process run did, although rank 0 starts with every trajectory of the epoch cached (so it must join rank 1's
trajectory computation: the teacher's calls are collectives); the run matches the unsharded DDP run exactly; its
checkpoint holds the predictor only; its export (after the TokenCache calibration, which calls the teacher on every
rank) fits the unsharded teacher.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

import l2c
from l2c.hooks import on_first_block
from l2c.runtime import BRANCH_HOOK
from predictors.frozen_teacher import FrozenTeacherModule
from predictors.l2c_trainer import SegmentRouterTrainer
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
        SegmentRouterTrainer, dict(steps=4, guidance_scale=2.0, refresh_interval=2, lr=0.05, l1=1e-3), "router", 1e-6
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
        dict(steps=4, guidance_scale=2.0, max_gap=2, ff_inner_dim=16, lr=0.01, objective="blend", budget_loss="ratio"),
        "predictor",
        1e-6,
        gradient_free=("predictor.block.attn1.to_k.bias",),
    ),
}


def flat(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.parameters()])


def local_numel(module: nn.Module) -> int:
    """Parameter elements this process holds: a sharded (DTensor) parameter counts its local shard only."""
    return sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in module.parameters())


def hooked_branches(model: nn.Module) -> list[str]:
    """Names of the modules carrying the cache runtime's branch hook."""
    registries = ((name, getattr(m, "_diffusers_hook", None)) for name, m in model.named_modules())
    return [name for name, registry in registries if registry is not None and registry.get_hook(BRANCH_HOOK)]


# ------------------------------------------------------------------------------------------------------------------
# The worker (runs in subprocesses; Lightning re-runs this file for rank 1)
# ------------------------------------------------------------------------------------------------------------------


class Recorder(L.Callback):
    """Records the predictor's parameters before training and after each step, and what the strategy wrapped."""

    def __init__(self, out: Path, predictor: str) -> None:
        self.out, self.predictor, self.states, self.info = out, predictor, [], {}
        self.teacher_calls = 0  # every call of the teacher's forward from the start of fit, export included

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
            "teacher_sharded": pl_module.teacher_sharded,
            "teacher_local_numel": local_numel(pl_module.teacher),
            "teacher_tensors": len(list(pl_module.teacher.parameters())),
            "teacher_dtensors": sum(isinstance(p, DTensor) for p in pl_module.teacher.parameters()),
            "fsdp_units": sum(isinstance(m, FSDPModule) for m in pl_module.teacher.modules()),
            "hooked_branches": hooked_branches(pl_module.teacher),
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
        self.info["executed"] = {action.name: count for action, count in pl_module.runtime.executed.items()}
        self.info["checkpoint_keys"] = sorted(pl_module.state_dict())
        trainer.save_checkpoint(self.out / "final.ckpt")  # every rank calls it, rank 0 writes

    def write(self, rank: int) -> None:
        """After `fit` (the export in `on_fit_end` included)."""
        self.info["teacher_calls"] = self.teacher_calls
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
    parser.add_argument("--shard-teacher", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    case = CASES[args.case]
    module = case.trainer(
        teacher=args.teacher, export_dir=str(args.out / "policy"), shard_teacher=args.shard_teacher, **case.kwargs
    )
    data = ClassConditionDataModule(
        num_classes=10, samples_per_epoch=SAMPLES_PER_EPOCH, batch_size=args.batch_size, shuffle=False
    )
    if args.shard_teacher and int(os.environ.get("LOCAL_RANK", 0)) == 0:
        # Rank 0 starts with every trajectory of the epoch cached (by the still unsharded teacher): in epoch 1 only
        # rank 1 misses any, and rank 0 must join its teacher calls. Were it not to, rank 1 would wait in an
        # all-gather (the timeout below ends that) or pair with rank 0's next call (the call counts catch that).
        data.setup("fit")
        conditions = [data.train_set[i] for i in range(len(data.train_set))]
        labels, seeds = (torch.stack(column) for column in zip(*conditions))
        module.trajectories.get(module, labels, seeds)
    recorder = Recorder(args.out, case.predictor)
    module.teacher.register_forward_pre_hook(lambda *_: setattr(recorder, "teacher_calls", recorder.teacher_calls + 1))
    timeout = timedelta(seconds=120)  # a rank left alone in a collective fails the test in minutes, not half an hour
    strategy = DDPStrategy(process_group_backend="gloo", timeout=timeout) if args.devices > 1 else "auto"
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
        callbacks=[recorder],
    )
    L.seed_everything(0, verbose=False)
    trainer.fit(module, data)
    recorder.write(trainer.global_rank)


# ------------------------------------------------------------------------------------------------------------------
# The tests
# ------------------------------------------------------------------------------------------------------------------


def launch(case: str, teacher: Path, out: Path, devices: int, batch_size: int, shard: bool = False) -> subprocess.Popen:
    """Start a worker; its output goes to `out/log.txt` (no pipe to fill while another run is awaited)."""
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    env.pop("LOCAL_RANK", None), env.pop("MASTER_PORT", None)  # a fresh launch, whatever pytest runs under
    command = [sys.executable, str(Path(__file__).resolve()), "worker", "--case", case, "--teacher", str(teacher),
               "--out", str(out), "--devices", str(devices), "--batch-size", str(batch_size)]  # fmt: skip
    command += ["--shard-teacher"] if shard else []
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
        "sharded": launch(request.param, teacher, root / "sharded", devices=2, batch_size=PER_RANK_BATCH, shard=True),
    }
    for name, process in processes.items():
        finish(process, root / name)
    seconds = time.perf_counter() - start
    ranks = [load_rank(root / "ddp", r) for r in range(2)]
    sharded = [load_rank(root / "sharded", r) for r in range(2)]
    return {
        "case": CASES[request.param],
        "ranks": ranks,
        "sharded": sharded,
        "single": load_rank(root / "single", 0),
        "root": root,
        "seconds": seconds,
    }


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


@pytest.mark.parametrize("run", ["ranks", "sharded"])
def test_ranks_hold_identical_predictors_after_every_step(runs, run):
    (states0, info), (states1, _) = runs[run]
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
    print(f"max |params(2 procs × B) − params(1 proc × 2B)| = {difference:.3g}; all runs: {runs['seconds']:.1f} s")
    assert difference <= tolerance
    moved = (single[-1] - single[0]).abs().max().item()
    assert moved > 1000 * tolerance, "the comparison is not vacuous"


@pytest.mark.parametrize("run", ["ranks", "sharded"])
def test_ddp_reduces_the_predictor_only(runs, run):
    for _, info in runs[run]:
        assert info["trainable"] == info["predictor_parameters"]
        wrapped = info["wrapped_trainable"]
        assert len(wrapped) == len(info["trainable"])
        assert all(w.endswith(f".{name}") for w, name in zip(wrapped, info["trainable"]))
        assert info["wrapped_parameters"] == info["wrapped_trainable"], "the wrapped model holds no frozen parameter"
        assert info["wrapped_numel"] == info["predictor_numel"] < info["teacher_numel"]
        assert info["ddp_reduces_the_predictor"]
        assert not info["teacher_is_submodule"] and not info["teacher_requires_grad"]
        assert info["teacher_grads_none"]


# ------------------------------------------------------------------------------------------------------------------
# The sharded teacher (`shard_teacher=True`)
# ------------------------------------------------------------------------------------------------------------------


def test_sharded_teacher_is_split_between_the_ranks(runs):
    (_, info0), (_, info1) = runs["sharded"]
    single = runs["single"][1]
    total = single["teacher_numel"]
    assert info0["teacher_sharded"] and info1["teacher_sharded"] and not single["teacher_sharded"]
    # A unit per block, the root, and block 0's adaLN embedding (DiT's output head calls it outside the block).
    assert info0["fsdp_units"] == info1["fsdp_units"] == TEACHER["num_layers"] + 2
    assert info0["teacher_dtensors"] == info1["teacher_dtensors"] == single["teacher_tensors"]
    assert info0["teacher_numel"] == info1["teacher_numel"] == total == single["teacher_local_numel"]
    local = [info0["teacher_local_numel"], info1["teacher_local_numel"]]
    print(f"teacher parameter elements held per rank: {local} of {total}")
    assert sum(local) == total
    # FSDP2 splits every parameter along dim 0, rank 0 taking the larger half of an odd row count.
    assert all(abs(n - total / 2) <= 0.02 * total for n in local)


def test_sharded_teacher_keeps_every_branch_hooked_and_every_call_in_step(runs):
    """Same hooked branches and executed actions as unsharded; every rank calls the teacher as often as one process
    (rank 0, its trajectories cached beforehand, joined rank 1's; both calibrated the TokenCache export)."""
    single = runs["single"][1]
    expected = [f"transformer_blocks.{i}.{name}" for i in range(TEACHER["num_layers"]) for name in ("attn1", "ff")]
    assert single["hooked_branches"] == expected
    for _, info in runs["sharded"]:
        assert info["hooked_branches"] == expected
        assert info["executed"] == single["executed"] and sum(single["executed"].values()) > 0
        assert info["teacher_calls"] == single["teacher_calls"]


def test_sharded_teacher_trains_as_the_unsharded_runs(runs):
    (sharded, info), (ddp, _), (single, _) = runs["sharded"][0], runs["ranks"][0], runs["single"]
    case = runs["case"]
    difference = (sharded - ddp).abs().max().item()
    mask = compared(info, case.gradient_free)
    to_single = (sharded[:, mask] - single[:, mask]).abs().max().item()
    print(f"sharded vs unsharded DDP: max |Δ| = {difference:.3g}; vs 1 process × 2B: {to_single:.3g}")
    assert difference == 0.0, "all-gathered weights are the weights: the same float operations as unsharded DDP"
    assert to_single <= case.tolerance


def test_sharded_checkpoint_holds_the_predictor_only(runs):
    (_, info), case = runs["sharded"][0], runs["case"]
    checkpoint = torch.load(runs["root"] / "sharded" / "final.ckpt", map_location="cpu", weights_only=False)
    keys = sorted(checkpoint["state_dict"])
    assert keys == info["checkpoint_keys"] and all(key.startswith(f"{case.predictor}.") for key in keys)

    def tensors(value):
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, dict | list | tuple):
            for item in value.values() if isinstance(value, dict) else value:
                yield from tensors(item)

    assert not any(isinstance(t, DTensor) for t in tensors(checkpoint)), "no teacher shard anywhere"


def test_sharded_export_fits_the_unsharded_teacher(runs, teacher):
    from diffusers import DiTTransformer2DModel

    exported, reference = runs["root"] / "sharded" / "policy", runs["root"] / "single" / "policy"
    config, expected = (json.loads((d / "config.json").read_text()) for d in (exported, reference))
    assert config["model"] == expected["model"] and config["model"]["family"] == "dit"
    l2c.load_policy(exported).apply(DiTTransformer2DModel.from_pretrained(teacher / "transformer")).remove()


def test_shard_teacher_with_one_process_leaves_the_teacher_whole(teacher, tmp_path):
    from data.conditions import ClassConditionDataModule

    module = SegmentRouterTrainer(teacher=str(teacher), shard_teacher=True, **CASES["l2c"].kwargs)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(module, ClassConditionDataModule(num_classes=10, samples_per_epoch=2, batch_size=2))
    assert trainer.global_step == 1 and not module.teacher_sharded
    assert local_numel(module.teacher) == sum(p.numel() for p in module.teacher.parameters())


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
