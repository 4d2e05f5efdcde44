"""Faults: an interrupted fit resumes to the uninterrupted result, checkpoints hold no teacher, a NaN loss stops
training naming the step and the term, and an interrupted export never leaves a policy directory that loads.

By default the interruption is an exception raised inside an optimizer step (in-process, fast); the slow variant
is a real kill: `train.py fit` runs in a subprocess and a callback (this file doubles as its module) sends SIGKILL
to its own process in the middle of an optimizer step, after Lightning has written `last.ckpt`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from diffusers import DDPMScheduler, DiTTransformer2DModel
from l2c_testing import ddim_timesteps, tiny_dit
from lightning.pytorch.callbacks import ModelCheckpoint

import l2c
import l2c.policy_io
from data.conditions import ClassConditionDataModule
from predictors.frozen_teacher import check_strategy
from predictors.l2c_trainer import SegmentRouterTrainer

ROOT = Path(__file__).resolve().parents[1]
TEACHER = dict(
    num_attention_heads=2, attention_head_dim=8, in_channels=1, num_layers=2, sample_size=8, patch_size=2,
    num_embeds_ada_norm=10,
)  # fmt: skip
TRAINER_KWARGS = dict(steps=4, guidance_scale=2.0, refresh_interval=2, lr=0.05, l1=1e-3)
MAX_STEPS, KILL_AT = 10, 6  # 4 batches per epoch: the kill lands in the middle of the second epoch


class SigkillAt(L.Callback):
    """SIGKILL this very process inside optimizer step `step` (after its loss, before its update)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class Crash(Exception):
    """The in-process stand-in for a crash."""


class CrashAt(SigkillAt):
    """Raise `Crash` inside optimizer step `step`: the process survives, the fit does not."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step == self.step:
            raise Crash(f"crash inside step {self.step}")


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("faults-teacher") / "teacher"
    torch.manual_seed(0)
    DiTTransformer2DModel(**TEACHER).save_pretrained(root / "transformer")
    DDPMScheduler(beta_schedule="squaredcos_cap_v2").save_pretrained(root / "scheduler")
    return root


def data() -> ClassConditionDataModule:
    return ClassConditionDataModule(num_classes=10, samples_per_epoch=16, batch_size=4)


def quiet_trainer(root: Path, **overrides) -> L.Trainer:
    kwargs = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False)
    return L.Trainer(**{**kwargs, "default_root_dir": root, **overrides})


# ------------------------------------------------------------------------------------------------------------------
# Kill and resume
# ------------------------------------------------------------------------------------------------------------------


def overlay(path: Path, root: Path, teacher: Path, kill_at: int | None) -> Path:
    """A config layered over the quickstart's: tiny teacher, a checkpoint after every step, maybe the killer."""
    callbacks = [
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"dirpath": str(root / "checkpoints"), "every_n_train_steps": 1, "save_last": True},
        }
    ]
    if kill_at is not None:
        callbacks.append({"class_path": "test_faults.SigkillAt", "init_args": {"step": kill_at}})
    config = {
        "seed_everything": 0,
        "trainer": {"max_steps": MAX_STEPS, "logger": False, "enable_progress_bar": False, "callbacks": callbacks,
                    "default_root_dir": str(root)},
        "model": {"init_args": {"teacher": str(teacher), **TRAINER_KWARGS, "export_dir": str(root / "policy")}},
        "data": {"init_args": {"samples_per_epoch": 16, "batch_size": 4}},
    }  # fmt: skip
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def train_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), *filter(None, [env.get("PYTHONPATH")])])
    command = [sys.executable, "train.py", "fit", "--config", "configs/l2c/digits-ddim20.yaml", *args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def killed_and_resumed(teacher_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("killed")
    config = overlay(root / "kill.yaml", root, teacher_dir, kill_at=KILL_AT)
    killed = train_cli("--config", str(config))
    checkpoint = root / "checkpoints" / "last.ckpt"
    state = torch.load(checkpoint, map_location="cpu", weights_only=False) if checkpoint.is_file() else {}
    size = checkpoint.stat().st_size if checkpoint.is_file() else None
    resumed = train_cli("--config", str(overlay(root / "resume.yaml", root, teacher_dir, None)), "--ckpt_path",
                        str(checkpoint))  # fmt: skip
    return {"killed": killed, "resumed": resumed, "root": root, "state": state, "size": size}


@pytest.fixture(scope="module")
def uninterrupted(teacher_dir, tmp_path_factory):
    """The same run in one go, in-process (the same module, data and seed as the CLI's)."""
    root = tmp_path_factory.mktemp("uninterrupted")
    module = SegmentRouterTrainer(teacher=str(teacher_dir), **TRAINER_KWARGS, export_dir=str(root / "policy"))
    L.seed_everything(0, verbose=False)
    quiet_trainer(root, max_steps=MAX_STEPS, enable_checkpointing=False).fit(module, data())
    return l2c.load_policy(root / "policy")


@pytest.fixture(scope="module")
def crashed_and_resumed(teacher_dir, tmp_path_factory):
    """Fit with a checkpoint after every step, crash inside step KILL_AT, resume from `last.ckpt` in a new Trainer."""
    root = tmp_path_factory.mktemp("crashed")

    def fit(ckpt_path: Path | None = None, crash: bool = False) -> SegmentRouterTrainer:
        module = SegmentRouterTrainer(teacher=str(teacher_dir), **TRAINER_KWARGS, export_dir=str(root / "policy"))
        checkpoints = ModelCheckpoint(dirpath=root / "checkpoints", every_n_train_steps=1, save_last=True)
        callbacks = [checkpoints, CrashAt(KILL_AT)] if crash else [checkpoints]
        L.seed_everything(0, verbose=False)
        quiet_trainer(root, max_steps=MAX_STEPS, callbacks=callbacks).fit(module, data(), ckpt_path=ckpt_path)
        return module

    with pytest.raises(Crash):
        fit(crash=True)
    checkpoint = root / "checkpoints" / "last.ckpt"
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    size = checkpoint.stat().st_size
    fit(ckpt_path=checkpoint)
    return {"root": root, "state": state, "size": size}


def test_an_interrupted_fit_resumes_to_the_uninterrupted_result(crashed_and_resumed, uninterrupted):
    assert crashed_and_resumed["state"]["global_step"] == KILL_AT, "last.ckpt is the step before the crash"
    policy = l2c.load_policy(crashed_and_resumed["root"] / "policy")
    assert policy.provenance["global_steps"] == MAX_STEPS
    difference = (policy.logits - uninterrupted.logits).abs().max().item()
    assert difference <= 1e-6, difference
    assert (uninterrupted.logits - 2.0).abs().max().item() > 0.1, "the comparison is not vacuous: the router trained"


@pytest.mark.slow
def test_a_killed_fit_resumes_to_the_uninterrupted_result(killed_and_resumed, uninterrupted):
    killed, resumed, root = killed_and_resumed["killed"], killed_and_resumed["resumed"], killed_and_resumed["root"]
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert killed_and_resumed["state"]["global_step"] == KILL_AT, "last.ckpt is the step before the kill"
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "exported l2c policy to" in resumed.stdout
    policy = l2c.load_policy(root / "policy")
    assert policy.provenance["global_steps"] == MAX_STEPS
    difference = (policy.logits - uninterrupted.logits).abs().max().item()
    print(f"max |resumed − uninterrupted| router logit = {difference:.3g}")
    assert difference <= 1e-6, difference
    moved = (uninterrupted.logits - 2.0).abs().max().item()
    assert moved > 0.1, "the comparison is not vacuous: the router trained"


def test_the_resume_checkpoint_holds_the_router_and_its_optimizer_only(crashed_and_resumed, teacher_dir):
    state = crashed_and_resumed["state"]
    assert list(state["state_dict"]) == ["router.logits"]
    (optimizer,) = state["optimizer_states"]
    (moments,) = optimizer["state"].values()  # AdamW state of the one parameter
    assert moments["exp_avg"].shape == moments["exp_avg_sq"].shape == (4, 2, 2)
    assert int(moments["step"]) == KILL_AT
    assert state["ClassConditionDataModule"] == {"epoch": 1, "batches": KILL_AT - 4}, "mid-epoch position"
    flat = json.dumps({k: v for k, v in state.items() if k not in ("state_dict", "optimizer_states")}, default=str)
    assert "transformer_blocks" not in flat and "teacher" not in json.dumps(list(state["state_dict"]))
    teacher_bytes = sum(f.stat().st_size for f in (teacher_dir / "transformer").glob("*.safetensors"))
    assert crashed_and_resumed["size"] * 5 < teacher_bytes, (crashed_and_resumed["size"], teacher_bytes)


def test_the_embedded_teachers_checkpoint_is_tiny_beside_the_teacher(tmp_path):
    module = SegmentRouterTrainer(teacher="embedded:digits", steps=4, guidance_scale=1.5)
    trainer = quiet_trainer(tmp_path, max_steps=1, enable_checkpointing=False)
    L.seed_everything(0, verbose=False)
    trainer.fit(module, ClassConditionDataModule(num_classes=10, samples_per_epoch=2, batch_size=2))
    trainer.save_checkpoint(tmp_path / "router.ckpt")
    state = torch.load(tmp_path / "router.ckpt", map_location="cpu", weights_only=False)
    assert list(state["state_dict"]) == ["router.logits"] and len(state["optimizer_states"]) == 1
    teacher = l2c.models.EMBEDDED["embedded:digits"] / "transformer" / "diffusion_pytorch_model.safetensors"
    size, teacher_size = (tmp_path / "router.ckpt").stat().st_size, teacher.stat().st_size
    print(f"checkpoint {size} bytes, embedded teacher {teacher_size} bytes")
    assert size * 100 < teacher_size, (size, teacher_size)  # ~20 KB against 8.5 MB


def test_resuming_mid_epoch_replays_the_remaining_batches(tmp_path):
    """The data order is a pure function of (seed, epoch); the checkpointed position skips what was trained."""
    module = data()
    module.setup("fit")
    first = [batch[0].tolist() for batch in module.train_dataloader()]
    module.load_state_dict({"epoch": 0, "batches": 3})
    loader = module.train_dataloader()
    assert [batch[0].tolist() for batch in loader] == first[3:]
    assert [batch[0].tolist() for batch in loader] == first, "only the interrupted epoch is shortened"
    loader.sampler.set_epoch(1)
    assert [batch[0].tolist() for batch in loader] != first, "each epoch has its own order"


# ------------------------------------------------------------------------------------------------------------------
# NaN / Inf losses
# ------------------------------------------------------------------------------------------------------------------


def test_a_nan_loss_stops_training_naming_the_step_and_the_term(teacher_dir, tmp_path):
    """A real NaN: the teacher's first MLP returns NaN from optimizer step 2 on (its trajectories are cached)."""
    module = SegmentRouterTrainer(teacher=str(teacher_dir), **TRAINER_KWARGS, export_dir=str(tmp_path / "policy"))
    trainer = quiet_trainer(tmp_path, max_steps=5, enable_checkpointing=False)

    def poison(_module, _args, output):
        return torch.full_like(output, float("nan")) if trainer.global_step >= 2 and torch.is_grad_enabled() else None

    module.teacher.transformer_blocks[0].ff.register_forward_hook(poison)
    L.seed_everything(0, verbose=False)
    with pytest.raises(FloatingPointError) as error:
        trainer.fit(module, ClassConditionDataModule(num_classes=10, samples_per_epoch=4, batch_size=4))
    message = str(error.value)
    assert "global step 2" in message and "'train/mse' = nan" in message and "'train/loss' = nan" in message, message
    assert "train/l1" not in message, "only the non-finite terms are named"
    assert trainer.global_step == 2 and not (tmp_path / "policy").exists()


def test_an_inf_term_is_named_too(teacher_dir):
    module = SegmentRouterTrainer(teacher=str(teacher_dir), **TRAINER_KWARGS)
    module.check_finite({"train/mse": torch.tensor(0.5), "train/l1": torch.tensor(0.1)})  # finite: no error
    with pytest.raises(FloatingPointError, match=r"global step 0 .*'train/l1' = inf"):
        module.check_finite({"train/mse": torch.tensor(0.5), "train/l1": torch.tensor(float("inf"))})


def test_lightning_fsdp_is_refused_with_the_reason_and_the_way_to_shard_the_teacher():
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    check_strategy(DDPStrategy())
    with pytest.raises(ValueError, match=r"trainer.strategy: FSDP .*teacher .*'ddp' .*--model.shard_teacher true"):
        check_strategy(FSDPStrategy())


# ------------------------------------------------------------------------------------------------------------------
# Atomic export
# ------------------------------------------------------------------------------------------------------------------


def bound(interval: int) -> l2c.CachePolicy:
    return l2c.load_policy(f"static:interval={interval}").bind(tiny_dit(), ddim_timesteps(4), "DDIMScheduler")


def half_writer(then):
    """A `save_file` that writes half of the real file, then calls `then()` (raise, or die)."""
    real = l2c.policy_io.save_file

    def write(tensors, filename, *args, **kwargs):
        real(tensors, filename, *args, **kwargs)
        data = Path(filename).read_bytes()
        Path(filename).write_bytes(data[: len(data) // 2])
        then()

    return write


@pytest.mark.parametrize("existing", [False, True], ids=["fresh", "overwrite"])
def test_an_export_failing_mid_write_leaves_no_policy_or_the_old_one(tmp_path, monkeypatch, existing):
    target = tmp_path / "policy"
    if existing:
        bound(2).save_pretrained(target)

    def fail():
        raise OSError("disk full")

    monkeypatch.setattr(l2c.policy_io, "save_file", half_writer(fail))
    with pytest.raises(OSError, match="disk full"):
        bound(3).save_pretrained(target)
    assert os.listdir(tmp_path) == (["policy"] if existing else []), "no staging directory is left behind"
    if existing:
        assert l2c.load_policy(target).params()["interval"] == 2, "the old policy is untouched"


KILLED_SAVE = """
import os, signal, sys
sys.path[:0] = {paths!r}
import l2c.policy_io
from l2c_testing import ddim_timesteps, tiny_dit
real = l2c.policy_io.save_file

def half_then_die(tensors, filename):
    real(tensors, filename)
    data = open(filename, "rb").read()
    open(filename, "wb").write(data[: len(data) // 2])
    os.kill(os.getpid(), signal.SIGKILL)

l2c.policy_io.save_file = half_then_die
policy = l2c.load_policy("static:interval=3").bind(tiny_dit(), ddim_timesteps(4), "DDIMScheduler")
policy.save_pretrained({target!r})
"""


def test_an_export_killed_mid_write_never_leaves_a_directory_that_loads(tmp_path):
    target = tmp_path / "policy"
    bound(2).save_pretrained(target)
    script = KILLED_SAVE.format(paths=[str(ROOT), str(ROOT / "tests")], target=str(target))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, timeout=300)
    assert result.returncode == -signal.SIGKILL, result.stderr.decode()[-2000:]
    leftovers = [p for p in tmp_path.iterdir() if p.name != "policy"]
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".policy."), leftovers  # the hidden staging dir
    with pytest.raises(l2c.PolicyFormatError, match="policy.safetensors"):
        l2c.load_policy(leftovers[0])  # the half-written files are refused, not loaded
    assert l2c.load_policy(target).params()["interval"] == 2, "the old policy is untouched and still loads"


def nan_worker(teacher: str, root: str) -> None:
    """Rank 1's teacher MLP returns NaN from step 2 on; rank 0's stays finite (runs under Lightning's DDP launcher)."""
    from lightning.pytorch.strategies import DDPStrategy

    torch.set_num_threads(1)
    module = SegmentRouterTrainer(teacher=teacher, **TRAINER_KWARGS)
    trainer = quiet_trainer(Path(root), devices=2, strategy=DDPStrategy(process_group_backend="gloo"), max_steps=5,
                            enable_checkpointing=False)  # fmt: skip

    def poison(_module, _args, output):
        if trainer.global_rank == 1 and trainer.global_step >= 2 and torch.is_grad_enabled():
            return torch.full_like(output, float("nan"))
        return None

    module.teacher.transformer_blocks[0].ff.register_forward_hook(poison)
    L.seed_everything(0, verbose=False)
    trainer.fit(module, ClassConditionDataModule(num_classes=10, samples_per_epoch=8, batch_size=4, shuffle=False))


@pytest.mark.slow
def test_a_nan_on_one_rank_stops_every_rank(teacher_dir, tmp_path):
    """Under DDP (2 gloo processes) a NaN on rank 1 only stops both ranks at the same step; nothing hangs."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("LOCAL_RANK", None), env.pop("MASTER_PORT", None)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), *filter(None, [env.get("PYTHONPATH")])])
    command = [sys.executable, str(Path(__file__).resolve()), "nan-worker", str(teacher_dir), str(tmp_path)]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    assert "non-finite loss at global step 2 (rank 1): 'train/mse' = nan" in result.stderr, result.stderr[-3000:]
    assert "non-finite loss at global step 2 (rank 0): finite here, not on another rank" in result.stderr


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "nan-worker":
    nan_worker(*sys.argv[2:4])
