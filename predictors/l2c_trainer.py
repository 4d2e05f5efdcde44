"""Learning-to-Cache: train a `LayerRouter` against a frozen DiT and export an `l2c` policy.

For each segment of the refresh pattern (a full step i, then reuse steps i+1 … i+N−1), the
runtime stores every branch output of the teacher's full step i; at each following step the
student's branches return s·f(x) + (1−s)·cached with s = sigmoid(router logit), and the loss is
the MSE between the student's and the teacher's model output at that step plus λ·Σ c·s, where c
is the branch's share of the work (measured FLOPs, mean 1), so budgets and penalty count the same.
With `soft_refresh` (default) the blend also becomes the cache for the segment's later steps, as a
branch computed at a reuse step refreshes its cache at inference; without it, every reuse step of a
segment blends against the full step's cache (the published code, which only alternates, never differs).

`objective="rollout"` trains the plan that will be exported instead: the student samples whole trajectories
from noise with gates that spend exactly the export budget (`soft_select_by_budget`: sigmoid((logit − θ)/T)
with the cut θ set by the budget), and the loss is the MSE between its sample and the teacher's. No λ is needed
(the budget fixes the compute); the temperature T decays so that the gates end at the exported 0/1 plan, and
with validation conditions the best validated router is exported.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from l2c.adapters import model_spec
from l2c.metrics import branch_flops
from l2c.plots import router_figure
from l2c.policies import FullPolicy, LayerRouterPolicy
from l2c.policies.learned import check_budget, full_step_mask, select_by_budget, soft_select_by_budget
from l2c.sampling import denoise

from .frozen_teacher import FrozenTeacherModule, Trajectory, TrajectoryCache, make_scheduler_like, step_generator
from .layer_router import LayerRouter

OBJECTIVES = ("segment", "rollout")
INITS = ("constant", "even")


@dataclass
class BestPlan:
    """The router with the lowest validation error so far (rollout objective): what export writes."""

    mse: float = math.inf
    psnr_db: float = -math.inf
    global_step: int = -1
    logits: torch.Tensor | None = None


def even_steps(num_steps: int, budget: float) -> torch.Tensor:
    """`round(budget·steps)` steps spread evenly from step 0: the warm start of `init="even"`."""
    count = max(1, min(num_steps, round(budget * num_steps)))
    mask = torch.zeros(num_steps, dtype=torch.bool)
    mask[(torch.arange(count) * num_steps) // count] = True
    return mask


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
        objective: str = "segment",
        init: str = "constant",
        temperature: tuple[float, float] = (1.0, 0.05),
        shard_teacher: bool = False,
    ) -> None:
        for name, value, low in (("steps", steps, 2), ("refresh_interval", refresh_interval, 2)):
            if value < low:
                raise ValueError(f"l2c trainer: field '{name}' must be ≥ {low}, got {value}")
        if export_budget is not None and not 0.0 <= export_budget <= 1.0:
            raise ValueError(f"l2c trainer: field 'export_budget' must be in [0, 1], got {export_budget}")
        if export_budget is not None:
            check_budget(export_budget, steps, refresh_interval)
        if objective not in OBJECTIVES:
            raise ValueError(f"l2c trainer: field 'objective' must be one of {OBJECTIVES}, got {objective!r}")
        if objective == "rollout" and export_budget is None:
            raise ValueError("l2c trainer: objective 'rollout' trains the plan of a budget: set 'export_budget'")
        if objective == "rollout" and not soft_refresh:
            raise ValueError("l2c trainer: objective 'rollout' needs 'soft_refresh' (computed slots refresh the cache)")
        if len(temperature) != 2 or not 0 < temperature[1] <= temperature[0]:
            raise ValueError(
                f"l2c trainer: field 'temperature' must be [start, end] with start ≥ end > 0, got {temperature}"
            )
        if init not in INITS or (init == "even" and export_budget is None):
            raise ValueError(f"l2c trainer: field 'init' must be 'constant' or, with a budget, 'even'; got {init!r}")
        super().__init__(teacher, steps, scheduler, guidance_scale, shard_teacher=shard_teacher)
        self.save_hyperparameters()
        self.spec = model_spec(self.teacher)
        self.router = LayerRouter(steps, self.spec.num_blocks, len(self.spec.branches), init_logit)
        full = full_step_mask(steps, refresh_interval)
        if init == "even":
            self.router.logits.data -= 2 * init_logit * ~even_steps(steps, export_budget).view(-1, 1, 1)
        self.segment_starts = [i for i in range(steps - 1) if full[i]]
        self.register_buffer("full_steps", full, persistent=False)
        # FLOPs per branch kind, measured on the first batch (the cross-attention's cost depends on the prompts).
        self.register_buffer("branch_costs", torch.zeros(len(self.spec.branches)), persistent=False)
        self.runtime = None
        self.trajectories = TrajectoryCache()
        self.best = BestPlan()

    # -- the cache runtime lives on the teacher only while fitting -------------------------------
    def on_fit_start(self) -> None:
        super().on_fit_start()
        self.runtime = FullPolicy().apply(self.teacher, timesteps=self.timesteps)

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
        if self.hparams.objective == "rollout":
            return self._rollout_step(batch)
        # The segment is a pure function of (seed, step), so a resumed run draws what the uninterrupted one did.
        generator = step_generator(self.hparams.seed, self.global_step)
        start = self.segment_starts[int(torch.randint(len(self.segment_starts), (), generator=generator))]
        trajectory = self._trajectory(batch, start)
        self.runtime.reset()  # each training step is a trajectory of its own, whatever its batch size
        if not bool(self.branch_costs.any()):
            self._measure_branch_costs(trajectory, start)
        weights = self.branch_costs / self.branch_costs.mean()
        scores = self.router()
        with torch.no_grad():  # the full step: every branch computes and stores its output
            self._call(trajectory, start)
        mse_terms, l1_terms = [], []
        for step in range(start + 1, min(start + self.hparams.refresh_interval, len(self.timesteps))):
            with self.runtime.blending(scores[step], refresh=self.hparams.soft_refresh):
                out = self._call(trajectory, step)
            mse_terms.append(F.mse_loss(out, trajectory.model_output(step)))
            l1_terms.append((scores[step] * weights).sum())
        mse, l1 = torch.stack(mse_terms).mean(), torch.stack(l1_terms).mean()
        loss = mse + self.hparams.l1 * l1
        self.check_finite({"train/mse": mse, "train/l1": self.hparams.l1 * l1, "train/loss": loss})
        reuse_scores = scores.detach()[~self.full_steps]
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

    def _rollout_step(self, batch) -> torch.Tensor:
        """Sample with soft gates spending exactly the budget; MSE to the teacher's x_0."""
        labels, seeds = batch
        trajectory = self._full_trajectory(labels, seeds)
        temperature = self.temperature()
        gates = soft_select_by_budget(
            self.router.logits, self.full_steps, self.hparams.export_budget, self.branch_costs, temperature
        )
        x0 = self.rollout(trajectory.labels, seeds, gates)
        loss = F.mse_loss(x0, trajectory.final)
        self.check_finite({"train/loss": loss})
        reuse = ~self.full_steps
        self.log_dict(
            {
                "train/loss": loss,
                "train/psnr_db": -10 * torch.log10(loss.detach() / 4),  # samples in [-1, 1]: peak-to-peak 2
                "router/temperature": temperature,
                "router/undecided": ((gates.detach()[reuse] > 0.1) & (gates.detach()[reuse] < 0.9)).float().mean(),
            },
            prog_bar=True,
        )
        return loss

    def _full_trajectory(self, labels: torch.Tensor, seeds: torch.Tensor) -> Trajectory:
        """The teacher's whole run for these conditions (its x_0 is the rollout's target); branch costs measured."""
        trajectory = self.trajectories.get(self, labels, seeds)
        if not bool(self.branch_costs.any()):
            self._measure_branch_costs(trajectory, 1)
        return trajectory

    def temperature(self) -> float:
        """Gate temperature: `temperature[0]` at the first step, geometric decay to `temperature[1]` at the last."""
        start, end = self.hparams.temperature
        return start * (end / start) ** min(1.0, self.global_step / self._total_steps())

    def hard_gates(self) -> torch.Tensor:
        """The exported plan's gates: 1 on the budget's computed slots (full steps included), 0 elsewhere."""
        costs = self.branch_costs.cpu()
        logits = self.router.logits.detach().cpu()
        return select_by_budget(logits, self.full_steps.cpu(), self.hparams.export_budget, costs).to(self.device)

    def rollout(self, labels, seeds: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """x_0 sampled from the seeds' noise with every branch blended by `gates` [steps, blocks, branches]."""
        self.runtime.reset()
        scheduler = make_scheduler_like(self.sampler)
        # Step 0 computes every branch and fills the cache (a blend needs a cached output); step s blends gates[s].
        with self.runtime.blending(lambda point: gates[point.step], refresh=self.hparams.soft_refresh):
            return denoise(self.guidance, scheduler, self.noise_for(seeds), labels, len(gates))

    # -- validation: the exported plan's sampling error on held-out conditions; the best one is exported --------
    def on_validation_epoch_start(self) -> None:
        self._val_error = torch.zeros(2, dtype=torch.float64, device=self.device)  # sum of squared errors, count

    def validation_step(self, batch, batch_idx: int) -> None:
        if self.hparams.objective != "rollout":
            return
        labels, seeds = batch
        trajectory = self._full_trajectory(labels, seeds)
        x0 = self.rollout(trajectory.labels, seeds, self.hard_gates().float())
        self._val_error += torch.stack([(x0 - trajectory.final).double().pow(2).sum(), torch.tensor(x0.numel())])

    def on_validation_epoch_end(self) -> None:
        if self.hparams.objective != "rollout":
            return
        total = self.trainer.strategy.reduce(self._val_error, reduce_op="sum")
        mse = float(total[0] / total[1].clamp_min(1))
        psnr = -10 * math.log10(max(mse, 1e-20) / 4)
        self.log("val/psnr_db", psnr, prog_bar=True, rank_zero_only=True)
        if mse < self.best.mse:  # the same decision on every rank: `total` is all-reduced
            self.best = BestPlan(mse, psnr, int(self.global_step), self.router.logits.detach().cpu().clone())

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.best.logits is not None:
            checkpoint["l2c_best_plan"] = dataclasses.asdict(self.best)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "l2c_best_plan" in checkpoint:
            self.best = BestPlan(**checkpoint["l2c_best_plan"])

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

    def on_before_optimizer_step(self, optimizer) -> None:
        if self.hparams.objective == "rollout":  # gradients are all-reduced by now: every rank scales the same
            grad = self.router.logits.grad
            grad.div_(self.branch_costs / self.branch_costs.mean())  # benefit per unit of work, as the budget counts
            grad.div_(grad.pow(2).mean().sqrt().clamp_min(1e-20))

    def _total_steps(self) -> int:
        """Optimizer steps of the whole fit (the gate temperature decays over it); 1 outside a Trainer."""
        return max(1, int(self._trainer.estimated_stepping_batches)) if self._trainer is not None else 1

    def configure_optimizers(self):
        if self.hparams.objective == "segment":
            return torch.optim.AdamW(self.router.parameters(), lr=self.hparams.lr, weight_decay=0.0)
        # Only the logits' order matters to the budget's cut, and it must follow the gradients' sizes: Adam's
        # per-logit normalisation would move every logit by about lr (their gradients mostly share a sign), so plain
        # SGD on the gradient scaled to unit RMS.
        return torch.optim.SGD(self.router.parameters(), lr=self.hparams.lr)

    # -- export ------------------------------------------------------------------------------------
    def exported_logits(self) -> torch.Tensor:
        """The router, or with validation the best validated router (validation at step 0 scores the start)."""
        logits = self.best.logits if self.best.logits is not None else self.router.logits.detach()
        return logits.float().cpu()

    def export(self, directory: str | Path) -> LayerRouterPolicy:
        hp = self.hparams
        policy = LayerRouterPolicy(
            refresh_interval=hp.refresh_interval,
            threshold=None if hp.export_budget is not None else hp.export_threshold,
            budget=hp.export_budget,
            branch_costs=tuple(self.branch_costs.tolist()) if bool(self.branch_costs.all()) else None,
            logits=self.exported_logits(),
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
            "objective": hp.objective,
            "init": hp.init,
            "temperature": list(hp.temperature),
        }
        if self.best.logits is not None:
            policy.provenance["selected"] = {"global_step": self.best.global_step, "val_psnr_db": self.best.psnr_db}
        policy.save_pretrained(directory)
        return policy
