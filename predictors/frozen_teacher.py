"""Scaffolding shared by every trainer of a caching predictor: a frozen teacher and its trajectories.

The teacher is kept outside the module tree on purpose: it is never in `parameters()`, so it
never reaches the optimizer, DDP's gradient buckets or a Lightning checkpoint, and it stays in
eval mode with `requires_grad_(False)` whatever Lightning does to the trainable module.

`shard_teacher=True` (under Lightning's DDP with more than one process) shards that frozen teacher with FSDP2
over every rank, for teachers too large for one GPU: DDP still replicates and all-reduces only the predictor.
A sharded teacher's every call is a collective (each FSDP unit is all-gathered), so every rank must call it
the same number of times in the same order: `teacher_needed_elsewhere` is how a rank learns it must join.
"""

from __future__ import annotations

import copy
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal, get_args, get_origin, get_type_hints

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from l2c.adapters import find_blocks, model_spec, read_outside_their_block
from l2c.models import ModelBundle, make_scheduler, resolve_scheduler
from l2c.policies import CachePolicy, FullPolicy
from l2c.runtime import CacheRuntime, GateSource
from l2c.sampling import Condition, denoise, noise_from_seeds

from .families import FamilyBundle, load_teacher, teacher_denoiser


@dataclass
class Trajectory:
    """A stretch of the teacher's own sampling run: what the transformer saw and said at each step."""

    start: int  # step index of the first entry
    inputs: torch.Tensor  # [steps, B, C, H, W]: x_s after `scale_model_input`
    outputs: torch.Tensor  # [steps, G, B, C', H, W]: raw output; G = 2 (cond, null) under guidance, else 1
    labels: Condition  # class labels [B] or a `TextCondition` of B prompts
    final: torch.Tensor | None = None  # [B, C, H, W]: the sample x_0, when the stretch ran to the end

    def model_output(self, step: int) -> torch.Tensor:
        """The output at `step` in the transformer's batch order (cond rows, then null rows)."""
        return self.outputs[step - self.start].flatten(0, 1)


class TrajectoryCache:
    """Full teacher trajectories from noise, computed once per (label, seed) and kept on the CPU.

    The first epoch pays one uncached sampling run per condition; afterwards a training step
    costs only the cached-step and student passes, whatever step it trains.
    """

    def __init__(self) -> None:
        self.items: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self.items)

    def get(self, module: FrozenTeacherModule, labels: torch.Tensor, seeds: torch.Tensor) -> Trajectory:
        keys = list(zip(labels.tolist(), seeds.tolist()))
        missing = [i for i, key in enumerate(keys) if key not in self.items]
        if module.teacher_needed_elsewhere(bool(missing)):
            missing = list(range(len(keys)))  # recomputes this batch (the same values) to join the collectives
        if missing:
            index = torch.tensor(missing)
            fresh = module.teacher_trajectory(module.noise_for(seeds[index]), labels[index].to(module.device))
            for j, i in enumerate(missing):
                self.items[keys[i]] = (fresh.inputs[:, j].cpu(), fresh.outputs[:, :, j].cpu(), fresh.final[j].cpu())
        inputs = torch.stack([self.items[key][0] for key in keys], dim=1).to(module.device)
        outputs = torch.stack([self.items[key][1] for key in keys], dim=2).to(module.device)
        final = torch.stack([self.items[key][2] for key in keys]).to(module.device)
        return Trajectory(0, inputs, outputs, labels.to(module.device), final)


FAMILY_RESOLUTION = ("height", "width", "num_frames")  # settings only a model family's pipeline teacher reads


class FrozenTeacherModule(L.LightningModule):
    """A trainer of a caching predictor against a frozen teacher: the template every such trainer fills in.

    It owns the teacher and its outputs, the cache runtime on the teacher while fitting (applied at fit start,
    removed at fit end), the blend gates of the student's calls, and the export: the predictor's policy bound to the
    teacher, its provenance the saved hyperparameters. A subclass provides what differs: `kind` (the provenance's
    "trainer"), `trained_policy()` (the unbound policy of its predictor), and if it needs them `refresh_cache`,
    `before_blocks`, `extra_provenance` and `policy_summary`. Its settings are its `__init__`'s: `Literal` choices and
    the `Args:` docstring are what LightningCLI checks and `train.py fit --help` prints.
    """

    kind: ClassVar[str]  # the provenance's "trainer" and the prefix of its error messages
    refresh_cache: bool = False  # blended outputs become the cache, as a branch computed at a reuse step refreshes it

    def __init__(
        self,
        teacher: str = "embedded:digits",
        steps: int = 20,
        scheduler: Literal["auto", "ddim", "ddpm", "dpm", "euler", "flow-euler"] = "auto",
        guidance_scale: float = 1.5,
        true_cfg_scale: float = 1.0,
        export_dir: str | None = None,
        shard_teacher: bool = False,
        height: int = 1024,
        width: int = 1024,
        num_frames: int = 81,
    ) -> None:
        """
        Args:
            teacher: The frozen model: an embedded name (`embedded:digits`), a local diffusers directory or a hub id.
            steps: Sampling steps of the schedule the predictor is trained for (at least 2).
            scheduler: The sampler (dpm: DPM-Solver++), built from the teacher's scheduler config; auto: flow-euler
                (FlowMatchEulerDiscreteScheduler) for a flow-matching teacher, which ddim and euler also mean there,
                ddim for others. The provenance records the one that ran.
            guidance_scale: Classifier-free guidance scale of the teacher's trajectories (1: no guidance); a Flux
                teacher's embedded guidance.
            true_cfg_scale: Flux.1's true CFG (FluxPipeline's `true_cfg_scale`, with the null prompt as the negative):
                above 1, two teacher calls per step in `cache_context("cond")` / `("uncond")`, combined
                null + true_cfg_scale·(cond − null), each with the embedded guidance `guidance_scale`; 1: off.
            export_dir: Where global rank 0 writes the policy at the end of fit (none: no export).
            shard_teacher: Under DDP with several processes, shard the frozen teacher with FSDP2 over the ranks
                (for a teacher too large for one GPU); the predictor stays replicated.
            height: Image height in pixels the policy is trained for (a model family's pipeline teacher: Flux, SD3,
                Wan, Qwen-Image; `predictors.families`); ignored by the embedded and DiT/PixArt teachers.
            width: Image width in pixels (as `height`).
            num_frames: Video frames (Wan).
        """
        super().__init__()
        self.save_hyperparameters()  # the whole signature of the concrete class: Lightning reads every __init__ frame
        self.check_fields()  # before the teacher loads
        bundle = load_teacher(teacher, height, width, num_frames)
        object.__setattr__(self, "_bundle", bundle)  # not a submodule: see the module docstring
        self.teacher.requires_grad_(False).eval()
        # conditioned as the model is (labels, prompts, class table), guided as its pipeline does
        self.guidance = teacher_denoiser(bundle, guidance_scale, true_cfg_scale)
        field = f"{self.kind} trainer: field 'scheduler'"
        self.scheduler_name = resolve_scheduler(scheduler, bundle.scheduler_config, field)  # the one that runs
        self.sampler = make_scheduler(self.scheduler_name, bundle.scheduler_config, field)
        self.guidance.set_timesteps(self.sampler, steps)
        self.spec = model_spec(self.teacher)
        self.trajectories = TrajectoryCache()
        self.runtime: CacheRuntime | None = None  # the cache runtime on the teacher, while fitting

    def check_fields(self) -> None:
        """Refuse bad settings (read from `self.hparams`) before the teacher loads: values outside their `Literal`
        choices (as LightningCLI does, also for modules built in Python), then what a subclass adds."""
        hints: dict[str, object] = {}
        for cls in reversed(type(self).__mro__):
            if issubclass(cls, FrozenTeacherModule):
                hints.update(get_type_hints(cls.__init__))
        for name, value in self.hparams.items():
            if get_origin(hints.get(name)) is Literal and value not in get_args(hints[name]):
                raise ValueError(
                    f"{self.kind} trainer: field '{name}' must be one of {get_args(hints[name])}, got {value!r}"
                )
        if self.hparams.steps < 2:
            raise ValueError(f"{self.kind} trainer: field 'steps' must be ≥ 2, got {self.hparams.steps}")

    @property
    def bundle(self) -> ModelBundle:
        return self._bundle

    @property
    def teacher(self) -> nn.Module:
        return self._bundle.transformer

    @property
    def timesteps(self) -> torch.Tensor:
        return self.sampler.timesteps

    @property
    def teacher_sharded(self) -> bool:
        from torch.distributed.fsdp import FSDPModule

        return isinstance(self.teacher, FSDPModule)

    def setup(self, stage: str) -> None:
        check_strategy(self.trainer.strategy)
        if not self.hparams.shard_teacher or self.teacher_sharded:
            return
        if self.trainer.world_size == 1:
            rank_zero_info("shard_teacher: one process, nothing to shard over; the teacher stays whole")
            return
        shard_frozen(self.teacher, self.trainer.strategy.root_device)

    def teacher_needed_elsewhere(self, needed_here: bool) -> bool:
        """Whether this rank must call the teacher only because another rank does (one boolean all-reduce).

        Always False for an unsharded teacher, whose calls are local. A sharded teacher's calls are collectives:
        a rank that skipped one would leave the others waiting in its all-gather.
        """
        if not self.teacher_sharded:
            return False
        needed_anywhere = self.trainer.strategy.reduce_boolean_decision(needed_here, all=False)  # on every rank
        return needed_anywhere and not needed_here

    # -- the cache runtime lives on the teacher only while fitting; these are the only places that touch it ----------
    def on_fit_start(self) -> None:
        if not self.teacher_sharded:  # a sharded teacher was placed on the device when sharded, in `setup`
            self.teacher.to(self.device)
        if self.bundle.vae is not None:
            self.bundle.vae.to(self.device)
        if self.bundle.class_table is not None:  # Flux's per-class conditions, read on every teacher call
            self.bundle.class_table.to(self.device).requires_grad_(False)
        self.runtime = FullPolicy().apply(self.teacher, timesteps=self.timesteps)

    def on_fit_end(self) -> None:
        self.runtime.remove()
        self.runtime = None
        directory = self.hparams.export_dir
        # Building the policy may call the teacher (TokenCache calibrates): when it is sharded, every rank builds it
        # (its calls are collectives).
        if directory and (self.trainer.is_global_zero or self.teacher_sharded):
            policy = self.exported_policy()
            if self.trainer.is_global_zero:
                policy.save_pretrained(directory)
                print(self.export_message(policy, directory))

    def blending(self, gates: GateSource | None) -> AbstractContextManager:
        """Inside, every branch of the teacher with a cached output returns gates·fresh + (1 − gates)·cached, gates
        [blocks, branches(, batch(, tokens))] or a callable of the call's first-block input (`BlockInput`) returning
        them (TokenCache scores the tokens there); `None`: branches compute and store as usual. With
        `refresh_cache` the blend becomes the cache."""
        return self.runtime.blending(gates, refresh=self.refresh_cache)

    def uncached(self) -> AbstractContextManager:
        """The plain teacher inside (the runtime paused, its cache kept), e.g. for the teacher's own trajectories."""
        return self.runtime.pause() if self.runtime is not None else nullcontext()

    def start_cache(self, trajectory: Trajectory, step: int) -> None:
        """A fresh cache from the teacher's own `step` (no grad): every branch computes and stores its output."""
        self.runtime.reset()  # each training step is a trajectory of its own, whatever its batch size
        with torch.no_grad():
            self.teacher_output(trajectory, step)

    # -- the teacher's outputs ---------------------------------------------------------------------------------------
    def teacher_output(self, trajectory: Trajectory, step: int) -> torch.Tensor:
        """The transformer's raw output ([cond; null] rows) at `step`, called on the input the trajectory saw there."""
        x = trajectory.inputs[step - trajectory.start]
        return self.guidance.raw(x, self.timesteps[step].to(self.device), trajectory.labels)

    @torch.no_grad()
    def to_model_space(self, images: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] → what the transformer denoises (VAE latents when the teacher has a VAE)."""
        vae = self.bundle.vae
        if vae is None or images.shape[1] == self.teacher.config.in_channels:
            return images
        return vae.encode(images.to(vae.dtype)).latent_dist.sample() * vae.config.scaling_factor

    @torch.no_grad()
    def teacher_trajectory(
        self, x: torch.Tensor, labels: Condition, start: int = 0, until: int | None = None
    ) -> Trajectory:
        """Sample with the uncached teacher from state `x` at step `start` up to step `until` inclusive
        (to the end, keeping the sample x_0 as `final`, when `until` is None)."""
        inputs, outputs = [], []

        def keep(step: int, model_input: torch.Tensor, halves: torch.Tensor) -> None:
            inputs.append(model_input)
            outputs.append(halves)

        stop = None if until is None else until + 1
        with self.uncached():
            x = denoise(self.guidance, make_scheduler_like(self.sampler), x, labels, len(self.timesteps),
                        start=start, stop=stop, on_output=keep)  # fmt: skip
        return Trajectory(start, torch.stack(inputs), torch.stack(outputs), labels, x if until is None else None)

    def noise_for(self, seeds: torch.Tensor) -> torch.Tensor:
        return noise_from_seeds(seeds, self.bundle.sample_shape).to(self.device)

    def check_finite(self, terms: dict[str, torch.Tensor]) -> None:
        """Stop at the first NaN/Inf loss, naming the step and the terms: one bad step poisons every later checkpoint.

        All ranks agree before raising (one scalar all-reduce), so a NaN on one rank stops every rank instead of
        leaving the others waiting in the next gradient all-reduce.
        """
        bad = {name: float(value.detach().float().sum()) for name, value in terms.items() if not value.isfinite().all()}
        trainer = self._trainer
        agreed = trainer.strategy.reduce_boolean_decision(not bad, all=True) if trainer is not None else not bad
        if agreed:
            return
        found = ", ".join(f"'{name}' = {value}" for name, value in bad.items()) or "finite here, not on another rank"
        raise FloatingPointError(
            f"{type(self).__name__}: non-finite loss at global step {self.global_step} "
            f"(rank {self.global_rank}): {found}; training stopped, the last checkpoint is the last finite state"
        )

    # -- export --------------------------------------------------------------------------------------------------------
    def trained_policy(self) -> CachePolicy:
        """The policy of the predictor as trained, not yet bound to the teacher."""
        raise NotImplementedError

    def extra_provenance(self) -> dict:
        """What the provenance records besides the saved hyperparameters and the optimizer steps."""
        return {}

    def policy_summary(self, policy: CachePolicy) -> str:
        """One line on the exported policy, printed after the export."""
        return ""

    def export_message(self, policy: CachePolicy, directory: str | Path) -> str:
        return f"exported {self.kind} policy to {directory}: {self.policy_summary(policy)}"

    def exported_policy(self, steps_trained: int | None = None) -> CachePolicy:
        """The trained policy bound to the teacher; its provenance: the saved hyperparameters, the optimizer steps
        (`steps_trained` for a module restored from a checkpoint, which has no trainer) and the subclass's extras."""
        tokens = getattr(self.bundle, "image_tokens", None)  # the families whose scheduler shift depends on it
        policy = self.trained_policy().bind(self.teacher, self.timesteps, type(self.sampler).__name__, tokens)
        settings = {name: list(value) if isinstance(value, tuple) else value for name, value in self.hparams.items()}
        settings["scheduler"] = self.scheduler_name  # not `auto`, nor `ddim` for a flow model's Euler
        if not isinstance(self.bundle, FamilyBundle):  # the resolution a pipeline teacher samples at: not this one's
            for name in FAMILY_RESOLUTION:
                settings.pop(name, None)
        steps = self.global_step if steps_trained is None else steps_trained
        policy.provenance = {"trainer": self.kind, **settings, "global_steps": int(steps), **self.extra_provenance()}
        return policy

    def export(self, directory: str | Path, steps_trained: int | None = None) -> CachePolicy:
        """Save the trained policy to `directory` (see `exported_policy`) and return it."""
        policy = self.exported_policy(steps_trained)
        policy.save_pretrained(directory)
        return policy


def step_generator(seed: int, step: int) -> torch.Generator:
    """A CPU generator that is a pure function of (seed, optimizer step): a resumed run draws what the
    uninterrupted one drew, which the global RNG (not in Lightning checkpoints) cannot promise."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def check_strategy(strategy: object) -> None:
    """Refuse Lightning's FSDP strategy: the teacher is outside the module tree on purpose, so that strategy would
    shard only the predictor. Sharding the teacher is `shard_teacher=True` under DDP."""
    from lightning.pytorch.strategies import FSDPStrategy

    if isinstance(strategy, FSDPStrategy):
        raise ValueError(
            "trainer.strategy: FSDP (Lightning's strategy) is not supported by the frozen-teacher trainers: the "
            "teacher is kept outside the LightningModule (never in the optimizer, DDP or checkpoints), so it would "
            "shard only the few KB of predictor and still load the whole teacher on every GPU. Use strategy 'ddp' "
            "and, for a teacher too large for one GPU, --model.shard_teacher true (the frozen teacher sharded with "
            "FSDP2 over the ranks, the predictor replicated by DDP); see docs/cluster.md."
        )


def shard_frozen(model: nn.Module, device: torch.device) -> nn.Module:
    """Shard a frozen transformer over every process with FSDP2: one unit per transformer block, one for the rest.

    Each rank keeps 1/world of every parameter; a call all-gathers one unit at a time and frees it after its
    forward (`reshard_after_forward`, also for the root), so a rank holds its shard plus a block or two. The model
    may still be on the CPU: each unit is moved to `device` as it is sharded, so no device ever holds it whole. The
    weights must already be equal on every rank (FSDP2 shards what each rank holds, it does not broadcast).
    Module names stay and FSDP2's classes subclass the originals, so the cache runtime's hooks find every branch.
    """
    from torch.distributed import get_world_size
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (get_world_size(),))
    for unit in [*read_outside_their_block(model), *find_blocks(model), model]:  # inner units first
        fully_shard(unit, mesh=mesh, reshard_after_forward=True)
    return model


def make_scheduler_like(scheduler):
    """A fresh copy with the same config and timestep table (schedulers carry per-run state such as step counters;
    a family's table may depend on the image size, so it is copied, not rebuilt)."""
    return copy.deepcopy(scheduler)  # the trainer's own `sampler` only holds the table: it never steps
