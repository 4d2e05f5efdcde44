"""Learning-to-Cache: train a `LayerRouter` against a frozen DiT and export an `l2c` policy (two objectives).

`SegmentRouterTrainer` (the paper's objective): for each segment of the refresh pattern (a full step i, then reuse
steps i+1 … i+N−1), the runtime stores every branch output of the teacher's full step i; at each following step the
student's branches return s·f(x) + (1−s)·cached with s = sigmoid(router logit), and the loss is
the MSE between the student's and the teacher's model output at that step plus λ·Σ c·s, where c
is the branch's share of the work (measured FLOPs, mean 1), so budgets and penalty count the same.
With `soft_refresh` (default) the blend also becomes the cache for the segment's later steps, as a
branch computed at a reuse step refreshes its cache at inference; without it, every reuse step of a
segment blends against the full step's cache (the published code, which only alternates, never differs).

`RolloutRouterTrainer` trains the plan that will be exported instead: the student samples whole trajectories
from noise with gates that spend exactly the export budget (`soft_select_by_budget`: sigmoid((logit − θ)/T)
with the cut θ set by the budget), and the loss is the MSE between its sample and the teacher's. No λ is needed
(the budget fixes the compute); the temperature T decays so that the gates end at the exported 0/1 plan, and
with validation conditions the best validated router is exported.

`ForecastRouterTrainer` extends the rollout to three actions per slot: the compute gates spend the budget as
above, the rest of each slot is split between forecasting (`Σ_k w_k·h_k` over the branch's last K computations,
with weights learned per (step, block, branch), initialised to TaylorSeer's rule) and reusing, by a second logit
per slot, sigmoid(logit_f / T). The export computes the budget's slots, forecasts the others whose forecast logit
is positive, and saves the weights beside the plan.

In YAML the objective is the class: `class_path: predictors.l2c_trainer.SegmentRouterTrainer` or
`...RolloutRouterTrainer`; configs written for the one class before the split (`LayerRouterTrainer` with an
`objective`) still work through `LayerRouterTrainer`, which builds the class the objective names.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from diffusers.hooks import HookRegistry
from torch.utils.checkpoint import checkpoint

from l2c.extension import BranchStore, TrajectoryState
from l2c.forecast import PolynomialForecaster, rule_table
from l2c.metrics import slot_flops
from l2c.plan import Action, Plan
from l2c.plots import router_figure
from l2c.policies import LayerRouterPolicy
from l2c.policies.learned import check_budget, full_step_mask, select_by_budget, soft_select_by_budget
from l2c.runtime import STEP_HOOK, ActionGates, CacheRuntime
from l2c.sampling import GuidedDenoiser, denoise

from .frozen_teacher import FrozenTeacherModule, Trajectory, make_scheduler_like, step_generator
from .layer_router import LayerRouter


@dataclass
class BestPlan:
    """The router with the lowest validation error so far (rollout objective): what export writes."""

    mse: float = math.inf
    psnr_db: float = -math.inf
    global_step: int = -1
    logits: torch.Tensor | None = None
    forecast_logits: torch.Tensor | None = None  # the forecast action's (`ForecastRouterTrainer`)
    forecast_weights: torch.Tensor | None = None


@dataclass
class RolloutGates:
    """A rollout's gates per step: compute [steps, blocks, branches], and with the forecast action its share and
    weights [steps, blocks, branches, K]; `gates[step]` is what `runtime.blending` takes at that step."""

    compute: torch.Tensor
    forecast: torch.Tensor
    weights: torch.Tensor

    def __len__(self) -> int:
        return len(self.compute)

    def __getitem__(self, step: int) -> ActionGates:
        return ActionGates(self.compute[step], self.forecast[step], self.weights[step])


def even_steps(num_steps: int, budget: float) -> torch.Tensor:
    """`round(budget·steps)` steps spread evenly from step 0: the warm start of `init="even"`."""
    count = max(1, min(num_steps, round(budget * num_steps)))
    mask = torch.zeros(num_steps, dtype=torch.bool)
    mask[(torch.arange(count) * num_steps) // count] = True
    return mask


class RouterTrainer(FrozenTeacherModule):
    """What both Learning-to-Cache objectives share.

    The router (one gate logit per step, block and branch), the refresh pattern's full steps, the branches' measured
    costs, and the export of an `l2c` policy.
    """

    kind = "l2c"
    objective: ClassVar[str]  # recorded in the provenance

    def __init__(
        self,
        refresh_interval: int = 2,
        lr: float = 1e-3,
        init_logit: float = 2.0,
        export_budget: float | None = None,
        init: Literal["constant", "even"] = "constant",
        **kwargs,
    ) -> None:
        """
        Args:
            refresh_interval: A full step (every branch computes) every N steps, from step 0 (at least 2).
            lr: Learning rate of the router's optimizer.
            init_logit: The router's starting logit, the same for every slot (training alone orders them).
            export_budget: Export the plan computing this share of all branch work (full steps included), in [0, 1];
                none (segment objective only): export the slots scoring above `export_threshold`.
            init: Warm start: `constant` (every logit `init_logit`) or, with a budget, `even` (the budget's steps
                spread evenly from step 0 start above the others).
            **kwargs: The frozen teacher's settings (`FrozenTeacherModule`).
        """
        super().__init__(**kwargs)
        steps = self.hparams.steps
        self.router = LayerRouter(steps, self.spec.num_blocks, len(self.spec.branches), init_logit)
        if init == "even":
            self.router.logits.data -= 2 * init_logit * ~even_steps(steps, export_budget).view(-1, 1, 1)
        self.register_buffer("full_steps", full_step_mask(steps, refresh_interval), persistent=False)
        # FLOPs per (block, branch) slot, measured on the first batch (the cross-attention's cost depends on the
        # prompts); 0 on the slots no module runs (`present`: a Flux single block has no `ff_context`).
        slots = (self.spec.num_blocks, len(self.spec.branches))
        self.register_buffer("branch_costs", torch.zeros(slots), persistent=False)
        self.register_buffer("present", self.spec.present(), persistent=False)

    def check_fields(self) -> None:
        super().check_fields()
        hp = self.hparams
        if hp.refresh_interval < 2:
            raise ValueError(f"l2c trainer: field 'refresh_interval' must be ≥ 2, got {hp.refresh_interval}")
        if hp.export_budget is not None and not 0.0 <= hp.export_budget <= 1.0:
            raise ValueError(f"l2c trainer: field 'export_budget' must be in [0, 1], got {hp.export_budget}")
        if hp.export_budget is not None:
            check_budget(hp.export_budget, hp.steps, hp.refresh_interval)
        if hp.init == "even" and hp.export_budget is None:
            raise ValueError("l2c trainer: field 'init' must be 'constant' or, with a budget, 'even'; got 'even'")

    def measure_branch_costs(self, trajectory: Trajectory, step: int) -> None:
        """The slots' FLOPs on one sample's guided call at `step`, once (budget and penalty weigh by them)."""
        if bool(self.branch_costs.any()):
            return
        first = Trajectory(trajectory.start, trajectory.inputs[:, :1], trajectory.outputs, trajectory.labels[:1])
        with self.uncached(), torch.no_grad():
            flops = slot_flops(self.teacher, lambda: self.teacher_output(first, step))
        self.branch_costs.copy_(flops)

    def cost_weights(self) -> torch.Tensor:
        """Each slot's measured work, mean 1 over the executed slots (0 elsewhere)."""
        return self.branch_costs / self.branch_costs[self.present].mean()

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        self.router.clamp_()

    def on_train_epoch_end(self) -> None:
        experiment = getattr(self.logger, "experiment", None)
        if experiment is not None and hasattr(experiment, "add_figure"):
            figure = router_figure(
                self.router().detach(), self.spec.branches, f"router scores, epoch {self.current_epoch}"
            )
            experiment.add_figure("router/scores", figure, self.global_step)

    # -- export ------------------------------------------------------------------------------------
    def exported_logits(self) -> torch.Tensor:
        """The logits the export writes: the router's."""
        return self.router.logits.detach().float().cpu()

    def trained_policy(self) -> LayerRouterPolicy:
        hp = self.hparams
        return LayerRouterPolicy(
            refresh_interval=hp.refresh_interval,
            threshold=None if hp.export_budget is not None else hp.export_threshold,  # the rollout always has a budget
            budget=hp.export_budget,
            branch_costs=self.exported_costs(),
            logits=self.exported_logits(),
        )

    def exported_costs(self) -> tuple[tuple[float, ...], ...] | None:
        """The measured costs the exported budget weighs by: per branch kind where every block costs the same (DiT),
        else per slot [blocks][branches]; None (equal weights) until every executed slot has measured work."""
        costs = self.branch_costs
        if not bool(costs[self.present].all()):
            return None
        if bool((costs == costs[:1]).all()):
            return tuple(costs[0].tolist())
        return tuple(tuple(row) for row in costs.tolist())

    def extra_provenance(self) -> dict:
        return {"objective": self.objective}

    def policy_summary(self, policy: LayerRouterPolicy) -> str:
        return policy.reuse_summary(len(self.timesteps))


class SegmentRouterTrainer(RouterTrainer):
    """Learning-to-Cache with the paper's segment objective (AdamW).

    A segment's full step is cached; at its reuse steps the router's soft gates blend fresh and cached branch outputs,
    and the loss is the MSE to the teacher's output there plus λ times the gated work.
    """

    objective = "segment"

    def __init__(
        self,
        l1: float = 5e-6,
        export_threshold: float = 0.5,
        seed: int = 0,
        soft_refresh: bool = True,
        **kwargs,
    ) -> None:
        """
        Args:
            l1: λ, the weight of the gated work Σ c·s in the loss (c: the branch's FLOPs share, mean 1).
            export_threshold: Without `export_budget`, the exported plan computes the slots scoring above this.
            seed: Seed of the segment each optimizer step trains (a pure function of seed and step: resumable).
            soft_refresh: The blended output becomes the cache for the segment's later steps (as a branch computed
                at a reuse step refreshes its cache at inference); false: every reuse step blends against the full
                step's cache, as the published code.
            **kwargs: The router's settings (`RouterTrainer`) and the frozen teacher's (`FrozenTeacherModule`).
        """
        super().__init__(**kwargs)
        self.refresh_cache = soft_refresh
        self.segment_starts = [i for i in range(self.hparams.steps - 1) if self.full_steps[i]]

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        hp = self.hparams
        # The segment is a pure function of (seed, step), so a resumed run draws what the uninterrupted one did.
        generator = step_generator(hp.seed, self.global_step)
        start = self.segment_starts[int(torch.randint(len(self.segment_starts), (), generator=generator))]
        trajectory = self._trajectory(batch, start)
        self.measure_branch_costs(trajectory, start)
        weights = self.cost_weights()
        scores = self.router()
        self.start_cache(trajectory, start)  # the full step
        mse_terms, l1_terms = [], []
        for step in range(start + 1, min(start + hp.refresh_interval, len(self.timesteps))):
            with self.blending(scores[step]):
                out = self.teacher_output(trajectory, step)
            mse_terms.append(F.mse_loss(out, trajectory.model_output(step)))
            l1_terms.append((scores[step] * weights).sum())
        mse, l1 = torch.stack(mse_terms).mean(), torch.stack(l1_terms).mean()
        loss = mse + hp.l1 * l1
        self.check_finite({"train/mse": mse, "train/l1": hp.l1 * l1, "train/loss": loss})
        reuse_scores = scores.detach()[~self.full_steps][:, self.present]  # the slots a module executes
        self.log_dict(
            {
                "train/loss": loss,
                "train/mse": mse,
                "train/l1": hp.l1 * l1,
                "router/mean_score": reuse_scores.mean(),
                "router/computed_fraction": (reuse_scores > hp.export_threshold).float().mean(),
            },
            prog_bar=True,
        )
        return loss

    def _trajectory(self, batch: tuple[torch.Tensor, torch.Tensor], start: int) -> Trajectory:
        """The teacher's segment from step `start`: real images noised to it, or cached trajectories of conditions."""
        first, second = batch
        if isinstance(first, torch.Tensor) and first.is_floating_point():  # real images noised to step `start`
            images, labels = self.to_model_space(first), second
            t = self.timesteps[start].to(images.device)
            x = self.sampler.add_noise(images, torch.randn_like(images), t.expand(len(images)))
            end = min(start + self.hparams.refresh_interval - 1, len(self.timesteps) - 1)
            return self.teacher_trajectory(x, labels, start=start, until=end)
        return self.trajectories.get(self, first, second)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.router.parameters(), lr=self.hparams.lr, weight_decay=0.0)


class RolloutRouterTrainer(RouterTrainer):
    """Learning-to-Cache with the rollout objective (SGD on unit-RMS gradients).

    Whole sampling runs with soft gates spending exactly `export_budget`; the loss is the MSE of the sample to the
    teacher's. With validation conditions the best validated router is exported.
    """

    objective = "rollout"
    refresh_cache = True  # computed slots refresh the cache, as at inference

    def __init__(
        self, temperature: tuple[float, float] = (1.0, 0.05), checkpoint_steps: bool = False, **kwargs
    ) -> None:
        """
        Args:
            temperature: [start, end] of the gates' temperature T (start ≥ end > 0), decaying geometrically over the
                fit so that the gates end at the exported 0/1 plan.
            checkpoint_steps: Activation checkpointing per sampling step: each step's activations are recomputed in
                the backward pass (one more forward per step), so only the cache between steps is kept.
            **kwargs: The router's settings (`RouterTrainer`; `export_budget` is required) and the frozen teacher's
                (`FrozenTeacherModule`).
        """
        super().__init__(**kwargs)
        self.best = BestPlan()

    def check_fields(self) -> None:
        super().check_fields()
        hp = self.hparams
        if hp.export_budget is None:
            raise ValueError("l2c trainer: the rollout objective trains the plan of a budget: set 'export_budget'")
        if len(hp.temperature) != 2 or not 0 < hp.temperature[1] <= hp.temperature[0]:
            raise ValueError(
                f"l2c trainer: field 'temperature' must be [start, end] with start ≥ end > 0, got {hp.temperature}"
            )

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        """Sample with soft gates spending exactly the budget; MSE to the teacher's x_0."""
        labels, seeds = batch
        trajectory = self._full_trajectory(labels, seeds)
        temperature = self.temperature()
        gates = self.soft_gates(temperature)
        x0 = self.rollout(trajectory.labels, seeds, gates)
        loss = F.mse_loss(x0, trajectory.final)
        self.check_finite({"train/loss": loss})
        reuse = ~self.full_steps.view(-1, 1, 1) & self.present
        compute = (gates.compute if isinstance(gates, RolloutGates) else gates).detach()
        self.log_dict(
            {
                "train/loss": loss,
                "train/psnr_db": -10 * torch.log10(loss.detach() / 4),  # samples in [-1, 1]: peak-to-peak 2
                "router/temperature": temperature,
                "router/undecided": ((compute[reuse] > 0.1) & (compute[reuse] < 0.9)).float().mean(),
            },
            prog_bar=True,
        )
        return loss

    def _full_trajectory(self, labels: torch.Tensor, seeds: torch.Tensor) -> Trajectory:
        """The teacher's whole run for these conditions (its x_0 is the rollout's target); branch costs measured."""
        trajectory = self.trajectories.get(self, labels, seeds)
        self.measure_branch_costs(trajectory, 1)
        return trajectory

    def temperature(self) -> float:
        """Gate temperature: `temperature[0]` at the first step, geometric decay to `temperature[1]` at the last."""
        start, end = self.hparams.temperature
        return start * (end / start) ** min(1.0, self.global_step / self._total_steps())

    def soft_gates(self, temperature: float) -> torch.Tensor | RolloutGates:
        """The training step's gates: sigmoid((logit − θ)/T) spending exactly the budget."""
        budget, costs = self.hparams.export_budget, self.branch_costs
        return soft_select_by_budget(self.router.logits, self.full_steps, budget, costs, temperature, self.present)

    def plan_gates(self) -> torch.Tensor | RolloutGates:
        """The exported plan's gates (validation samples with them)."""
        return self.hard_gates().float()

    def hard_gates(self) -> torch.Tensor:
        """The exported plan's gates: 1 on the budget's computed slots (full steps included), 0 elsewhere."""
        costs = self.branch_costs.cpu()
        logits = self.router.logits.detach().cpu()
        computed = select_by_budget(logits, self.full_steps.cpu(), self.hparams.export_budget, costs, self.present)
        return computed.to(self.device)

    def rollout(self, labels, seeds: torch.Tensor, gates: torch.Tensor | RolloutGates) -> torch.Tensor:
        """x_0 sampled from the seeds' noise with every branch blended by `gates` [steps, blocks, branches]; step 0
        computes every branch and fills the cache."""
        self.runtime.reset()
        scheduler = make_scheduler_like(self.sampler)
        if self.hparams.checkpoint_steps and torch.is_grad_enabled():
            denoiser = CheckpointedSteps(self.guidance, self, gates)
            return denoise(denoiser, scheduler, self.noise_for(seeds), labels, len(gates))
        return denoise(self.guidance, scheduler, self.noise_for(seeds), labels, len(gates),
                       step_context=lambda step: self.blending(gates[step] if step > 0 else None))  # fmt: skip

    # -- validation: the exported plan's sampling error on held-out conditions; the best one is exported --------
    def on_validation_epoch_start(self) -> None:
        self._val_error = torch.zeros(2, dtype=torch.float64, device=self.device)  # sum of squared errors, count

    def validation_step(self, batch, batch_idx: int) -> None:
        labels, seeds = batch
        trajectory = self._full_trajectory(labels, seeds)
        x0 = self.rollout(trajectory.labels, seeds, self.plan_gates())
        self._val_error += torch.stack([(x0 - trajectory.final).double().pow(2).sum(), torch.tensor(x0.numel())])

    def on_validation_epoch_end(self) -> None:
        total = self.trainer.strategy.reduce(self._val_error, reduce_op="sum")
        mse = float(total[0] / total[1].clamp_min(1))
        psnr = -10 * math.log10(max(mse, 1e-20) / 4)
        self.log("val/psnr_db", psnr, prog_bar=True, rank_zero_only=True)
        if mse < self.best.mse:  # the same decision on every rank: `total` is all-reduced
            self.best = BestPlan(mse, psnr, int(self.global_step), *self.trained_tensors())

    def trained_tensors(self) -> tuple[torch.Tensor, ...]:
        """What `BestPlan` keeps of the current router (on the CPU)."""
        return (self.router.logits.detach().cpu().clone(),)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.best.logits is not None:
            checkpoint["l2c_best_plan"] = dataclasses.asdict(self.best)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "l2c_best_plan" in checkpoint:
            self.best = BestPlan(**checkpoint["l2c_best_plan"])

    def on_before_optimizer_step(self, optimizer) -> None:
        # Gradients are all-reduced by now: every rank scales the same.
        grad = self.router.logits.grad
        # Benefit per unit of work, as the budget counts (slots no module runs have no gradient and no work).
        grad.div_(torch.where(self.present, self.cost_weights(), torch.ones_like(self.branch_costs)))
        for parameter in self.parameters():
            if parameter.grad is not None:
                parameter.grad.div_(parameter.grad.pow(2).mean().sqrt().clamp_min(1e-20))

    def _total_steps(self) -> int:
        """Optimizer steps of the whole fit (the gate temperature decays over it); 1 outside a Trainer."""
        return max(1, int(self._trainer.estimated_stepping_batches)) if self._trainer is not None else 1

    def configure_optimizers(self):
        # Only the logits' order matters to the budget's cut, and it must follow the gradients' sizes: Adam's
        # per-logit normalisation would move every logit by about lr (their gradients mostly share a sign), so plain
        # SGD on the gradient scaled to unit RMS.
        return torch.optim.SGD(self.router.parameters(), lr=self.hparams.lr)

    # -- export: with validation, the best validated router (validation at step 0 scores the start) -------------
    def exported_logits(self) -> torch.Tensor:
        return self.best.logits.float().cpu() if self.best.logits is not None else super().exported_logits()

    def extra_provenance(self) -> dict:
        selected = {"global_step": self.best.global_step, "val_psnr_db": self.best.psnr_db}
        return {**super().extra_provenance(), **({"selected": selected} if self.best.logits is not None else {})}


def trajectory_states(runtime: CacheRuntime) -> dict[str, TrajectoryState]:
    """The cache states of the runtime's current trajectory, one per cache context (after its first denoiser call)."""
    return dict(HookRegistry.check_if_exists_or_initialize(runtime.model).get_hook(STEP_HOOK).states._state_cache)


class CheckpointedSteps:
    """The rollout's denoiser (any: `GuidedDenoiser`, a family's `FamilyDenoiser`) with activation checkpointing per
    sampling step (`torch.utils.checkpoint`).

    Step i's model call runs under its gates in a checkpointed region; the cache it starts from (every branch's
    output and history) is snapshotted before and restored when the backward pass recomputes the region, so the
    recomputation sees what the forward saw. Step 0 (no gates, nothing to train) runs plainly.
    """

    def __init__(self, guidance: GuidedDenoiser, module: RolloutRouterTrainer, gates) -> None:
        self.inner, self.transformer = guidance, guidance.transformer
        self.module, self.gates, self.calls = module, gates, 0

    def set_timesteps(self, scheduler, num_steps: int) -> None:
        self.inner.set_timesteps(scheduler, num_steps)

    def guide(self, halves: torch.Tensor, channels: int) -> torch.Tensor:
        return self.inner.guide(halves, channels)

    def raw(self, x: torch.Tensor, t: torch.Tensor, condition) -> torch.Tensor:
        step, self.calls = self.calls, self.calls + 1
        if step == 0:
            return self.inner.raw(x, t, condition)
        states = trajectory_states(self.module.runtime)  # one per cache context (cond / uncond calls)
        saved = {name: (state.step, state.batch_size, {k: (s.output, s.age, list(s.history))
                        for k, s in state.stores.items()}) for name, state in states.items()}  # fmt: skip

        def region(x: torch.Tensor) -> torch.Tensor:
            for name, state in states.items():
                state.step, state.batch_size, stores = saved[name]
                state.stores.clear()
                state.stores.update({k: BranchStore(o, a, {}, list(h)) for k, (o, a, h) in stores.items()})
            with self.module.blending(self.gates[step]):
                return self.inner.raw(x, t, condition)

        return checkpoint(region, x, use_reentrant=False)


class ForecastRouterTrainer(RolloutRouterTrainer):
    """The rollout objective over three actions per slot: compute (spending exactly the budget), forecast, reuse.

    Each slot after step 0 is `g_c·f(x) + g_f·Σ_k w_k·h_k + (1 − g_c − g_f)·h_0` over the branch's soft history
    (`l2c.forecast.SoftComputed`): g_c the budget's soft gates, g_f = (1 − g_c)·sigmoid(logit_f / T), w learned per
    (step, block, branch), starting at TaylorSeer's rule of order K − 1 for the starting plan's computations.
    """

    objective = "rollout-forecast"

    def __init__(
        self,
        history: int = 3,
        forecast_logit: float = 1.0,
        learn_weights: bool = True,
        weights_lr: float = 0.002,
        **kwargs,
    ) -> None:
        """
        Args:
            history: K, the computations each forecast combines (TaylorSeer's order K − 1 is the start), at least 1.
            forecast_logit: The starting forecast-vs-reuse logit of every slot (> 0: forecast).
            learn_weights: Train the forecast weights (false: they stay at the Taylor rule, the ablation).
            weights_lr: Learning rate of the forecast weights (SGD on the gradient scaled to unit RMS).
            **kwargs: The rollout's settings (`RolloutRouterTrainer`) and the frozen teacher's.
        """
        super().__init__(**kwargs)
        self.router.add_forecast(forecast_logit)
        weights = self.taylor_weights()
        if learn_weights:
            self.forecast_weights = torch.nn.Parameter(weights)
        else:
            self.register_buffer("forecast_weights", weights)

    def check_fields(self) -> None:
        super().check_fields()
        if self.hparams.history < 1:
            raise ValueError(f"l2c trainer: field 'history' must be ≥ 1, got {self.hparams.history}")

    def taylor_weights(self) -> torch.Tensor:
        """TaylorSeer's weights (order K − 1) at every slot, for the history the starting plan's computations leave."""
        budget = self.hparams.export_budget
        computed = select_by_budget(self.router.logits.detach(), self.full_steps, budget, present=self.present)
        actions = torch.where(computed, Action.COMPUTE, Action.FORECAST).to(torch.int8)
        plan = Plan(actions, torch.ones(actions.shape))
        K = self.hparams.history
        return rule_table(PolynomialForecaster("taylor", K - 1), plan, self.timesteps.tolist(), self.spec.branches, K)

    def soft_gates(self, temperature: float) -> RolloutGates:
        compute = super().soft_gates(temperature)
        forecast = (1 - compute) * torch.sigmoid(self.router.forecast_logits / temperature)
        return RolloutGates(compute, forecast, self.forecast_weights)

    def plan_gates(self) -> RolloutGates:
        compute = self.hard_gates().float()
        forecast = (1 - compute) * (self.router.forecast_logits.detach() > 0).float()
        return RolloutGates(compute, forecast, self.forecast_weights.detach())

    def trained_tensors(self) -> tuple[torch.Tensor, ...]:
        forecast = (self.router.forecast_logits, self.forecast_weights)
        return (*super().trained_tensors(), *(t.detach().cpu().clone() for t in forecast))

    def trained_policy(self) -> LayerRouterPolicy:
        policy = super().trained_policy()
        best = self.best if self.best.logits is not None else BestPlan(math.inf, -math.inf, -1, *self.trained_tensors())
        policy.forecast_logits, policy.forecast_weights = best.forecast_logits.float(), best.forecast_weights.float()
        policy.__post_init__()  # the forecaster of the weights
        return policy

    def configure_optimizers(self):
        hp = self.hparams
        groups = [{"params": [self.router.logits, self.router.forecast_logits], "lr": hp.lr}]
        if hp.learn_weights:
            groups.append({"params": [self.forecast_weights], "lr": hp.weights_lr})
        return torch.optim.SGD(groups)


def LayerRouterTrainer(objective: Literal["segment", "rollout"] = "segment", **kwargs) -> RouterTrainer:
    """The one class before the objectives were split, kept so that configs and code naming it keep working: builds
    `SegmentRouterTrainer` or `RolloutRouterTrainer` (write those in new configs, without `objective`).

    Args:
        objective: `segment` (the paper's) or `rollout` (whole sampling runs at the export budget).
        **kwargs: The settings of the class the objective names.
    """
    if objective == "segment":
        return SegmentRouterTrainer(**kwargs)
    if objective == "rollout":
        return RolloutRouterTrainer(**kwargs)
    raise ValueError(
        f"l2c trainer: field 'objective' must be 'segment' (class SegmentRouterTrainer) or 'rollout' "
        f"(class RolloutRouterTrainer), got {objective!r}"
    )
