"""Learning-to-Cache: train a `LayerRouter` against a frozen DiT and export an `l2c` policy.

For each segment of the refresh pattern (a full step i, then reuse steps i+1 … i+N−1), the
runtime stores every branch output of the teacher's full step i; at each following step the
student's branches return s·f(x) + (1−s)·cached with s = sigmoid(router logit), and the loss is
the MSE between the student's and the teacher's model output at that step plus λ·Σ c·s, where c
is the branch's share of the work (measured FLOPs, mean 1), so budgets and penalty count the same.
With `soft_refresh` (default) the blend also becomes the cache for the segment's later steps, as a
branch computed at a reuse step refreshes its cache at inference; without it, every reuse step of a
segment blends against the full step's cache (the published code, which only alternates, never differs).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from l2c.adapters import model_spec
from l2c.metrics import branch_flops
from l2c.plots import router_figure
from l2c.policies import FullPolicy, LayerRouterPolicy
from l2c.policies.learned import check_budget, full_step_mask

from .frozen_teacher import FrozenTeacherModule, Trajectory, TrajectoryCache, step_generator
from .layer_router import LayerRouter


class LayerRouterTrainer(FrozenTeacherModule):
    def __init__(
        self,
        teacher: str = "embedded:digits",
        steps: int = 20,
        scheduler: str = "ddim",
        guidance_scale: float = 1.5,
        refresh_interval: int = 2,
        l1: float = 5e-6,
        lr: float = 1e-3,
        init_logit: float = 2.0,
        export_dir: str | None = None,
        export_threshold: float = 0.5,
        export_budget: float | None = None,
        seed: int = 0,
        soft_refresh: bool = True,
        shard_teacher: bool = False,
    ) -> None:
        for name, value, low in (("steps", steps, 2), ("refresh_interval", refresh_interval, 2)):
            if value < low:
                raise ValueError(f"l2c trainer: field '{name}' must be ≥ {low}, got {value}")
        if export_budget is not None and not 0.0 <= export_budget <= 1.0:
            raise ValueError(f"l2c trainer: field 'export_budget' must be in [0, 1], got {export_budget}")
        if export_budget is not None:
            check_budget(export_budget, steps, refresh_interval)
        super().__init__(teacher, steps, scheduler, guidance_scale, shard_teacher=shard_teacher)
        self.save_hyperparameters()
        self.spec = model_spec(self.teacher)
        self.router = LayerRouter(steps, self.spec.num_blocks, len(self.spec.branches), init_logit)
        full = full_step_mask(steps, refresh_interval)
        self.segment_starts = [i for i in range(steps - 1) if full[i]]
        self.register_buffer("reuse_steps", ~full, persistent=False)
        # FLOPs per branch kind, measured on the first batch (the cross-attention's cost depends on the prompts).
        self.register_buffer("branch_costs", torch.zeros(len(self.spec.branches)), persistent=False)
        self.runtime = None
        self.trajectories = TrajectoryCache()

    # -- the cache runtime lives on the teacher only while fitting -------------------------------
    def on_fit_start(self) -> None:
        super().on_fit_start()
        self.runtime = FullPolicy().apply(self.teacher, timesteps=self.timesteps)
        self.runtime.blend_refresh = self.hparams.soft_refresh

    def on_fit_end(self) -> None:
        self.runtime.remove()
        self.runtime = None
        if self.hparams.export_dir and self.trainer.is_global_zero:
            policy = self.export(self.hparams.export_dir)
            print(f"exported l2c policy to {self.hparams.export_dir}: {policy.reuse_summary(len(self.timesteps))}")

    # -- training ----------------------------------------------------------------------------------
    def _trajectory(self, batch: tuple[torch.Tensor, torch.Tensor], start: int):
        first, second = batch
        if isinstance(first, torch.Tensor) and first.is_floating_point():  # real images noised to step `start`
            images, labels = self.to_model_space(first), second
            t = self.timesteps[start].to(images.device)
            x = self.sampler.add_noise(images, torch.randn_like(images), t.expand(len(images)))
            end = min(start + self.hparams.refresh_interval - 1, len(self.timesteps) - 1)
            return self.teacher_trajectory(x, labels, start=start, until=end)
        return self.trajectories.get(self, first, second)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        # The segment is a pure function of (seed, step), so a resumed run draws what the uninterrupted one did.
        generator = step_generator(self.hparams.seed, self.global_step)
        start = self.segment_starts[int(torch.randint(len(self.segment_starts), (), generator=generator))]
        trajectory = self._trajectory(batch, start)
        self.runtime.reset()  # each training step is a trajectory of its own, whatever its batch size
        if not bool(self.branch_costs.any()):
            self._measure_branch_costs(trajectory, start)
        weights = self.branch_costs / self.branch_costs.mean()
        scores = self.router()
        self.runtime.blend = None
        with torch.no_grad():  # the full step: every branch computes and stores its output
            self._call(trajectory, start)
        mse_terms, l1_terms = [], []
        for step in range(start + 1, min(start + self.hparams.refresh_interval, len(self.timesteps))):
            self.runtime.blend = scores[step]
            out = self._call(trajectory, step)
            mse_terms.append(F.mse_loss(out, trajectory.model_output(step)))
            l1_terms.append((scores[step] * weights).sum())
        self.runtime.blend = None
        mse, l1 = torch.stack(mse_terms).mean(), torch.stack(l1_terms).mean()
        loss = mse + self.hparams.l1 * l1
        self.check_finite({"train/mse": mse, "train/l1": self.hparams.l1 * l1, "train/loss": loss})
        reuse_scores = scores.detach()[self.reuse_steps]
        self.log_dict(
            {
                "train/loss": loss,
                "train/mse": mse,
                "train/l1": self.hparams.l1 * l1,
                "router/mean_score": reuse_scores.mean(),
                "router/computed_fraction": (reuse_scores > self.hparams.export_threshold).float().mean(),
            },
            prog_bar=True,
        )
        return loss

    def _measure_branch_costs(self, trajectory, step: int) -> None:
        first = Trajectory(trajectory.start, trajectory.inputs[:, :1], trajectory.outputs, trajectory.labels[:1])
        with self.runtime.pause(), torch.no_grad():
            flops = branch_flops(self.teacher, lambda: self._call(first, step))
        self.branch_costs.copy_(torch.tensor([flops[name] for name in self.spec.branches]))

    def _call(self, trajectory, step: int) -> torch.Tensor:
        x = trajectory.inputs[step - trajectory.start]
        return self.guidance.raw(x, self.timesteps[step].to(self.device), trajectory.labels)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        self.router.clamp_()

    def on_train_epoch_end(self) -> None:
        experiment = getattr(self.logger, "experiment", None)
        if experiment is not None and hasattr(experiment, "add_figure"):
            figure = router_figure(
                self.router().detach(), self.spec.branches, f"router scores, epoch {self.current_epoch}"
            )
            experiment.add_figure("router/scores", figure, self.global_step)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.router.parameters(), lr=self.hparams.lr, weight_decay=0.0)

    # -- export ------------------------------------------------------------------------------------
    def export(self, directory: str | Path) -> LayerRouterPolicy:
        hp = self.hparams
        policy = LayerRouterPolicy(
            refresh_interval=hp.refresh_interval,
            threshold=None if hp.export_budget is not None else hp.export_threshold,
            budget=hp.export_budget,
            branch_costs=tuple(self.branch_costs.tolist()) if bool(self.branch_costs.all()) else None,
            logits=self.router.logits.detach().float().cpu(),
        )
        policy = policy.bind(self.teacher, self.timesteps, type(self.sampler).__name__)
        policy.provenance = {
            "trainer": "l2c",
            "teacher": hp.teacher,
            "l1": hp.l1,
            "lr": hp.lr,
            "guidance_scale": hp.guidance_scale,
            "refresh_interval": hp.refresh_interval,
            "global_steps": int(self.global_step),
            "export_threshold": hp.export_threshold,
            "export_budget": hp.export_budget,
            "soft_refresh": hp.soft_refresh,
        }
        policy.save_pretrained(directory)
        return policy
