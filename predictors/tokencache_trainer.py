"""TokenCache: train a `TokenImportancePredictor` against a frozen DiT and export a `tokencache` policy.

One training step draws a step s ≥ 1 and a gap g (1 … `max_gap`); the cache runtime stores every branch output of
the teacher's own step s−g (no grad), then the student runs step s with every branch of every block returning,
token by token, w⊙f(z_s) + (1−w)⊙cached with w = the predictor's score for that (block, token) on step s's input.
Loss: MSE between the student's and the teacher's model output at step s, plus the budget term
(`budget_loss="ratio"`: (mean w − target_ratio)², or `"l1"`: mean w), times `budget_weight`. The teacher is frozen as
in the Learning-to-Cache trainer (outside the module tree, trajectories cached from noise); only the predictor trains.

Export (on fit end): the predictor runs over `calibration_samples` teacher trajectories (seeds apart from the
training and evaluation seeds) and the measured statistics (`TokenCacheCalibration`) are saved with its weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import LabelEmbedding
from torch import nn
from tqdm.auto import tqdm

from l2c.adapters import find_blocks, model_spec
from l2c.extension import BlockInput
from l2c.hooks import on_first_block, record_outputs
from l2c.policies import FullPolicy
from l2c.policies.tokencache import TPRR_SIGNALS, TokenCacheCalibration, TokenCachePolicy
from l2c.token_importance import TokenImportancePredictor

from .frozen_teacher import FrozenTeacherModule, TrajectoryCache, step_generator

BUDGET_LOSSES = ("ratio", "l1")
CALIBRATION_SEED = 2_000_000  # calibration noise: apart from training (data seed) and evaluation (0 …) seeds
HISTOGRAM_BINS = 1000


class TokenCacheTrainer(FrozenTeacherModule):
    def __init__(
        self,
        teacher: str = "embedded:digits",
        steps: int = 20,
        scheduler: str = "ddim",
        guidance_scale: float = 1.5,
        max_gap: int = 2,
        ff_inner_dim: int | None = 128,
        init_score: float = 0.9,
        budget_loss: str = "ratio",
        budget_weight: float = 1.0,
        target_ratio: float = 0.3,
        lr: float = 1e-3,
        export_dir: str | None = None,
        export_token_budget: float = 0.3,
        export_floor: float = 0.05,
        export_full_steps: int = 6,
        export_tprr_signal: str = "error",
        calibration_samples: int = 32,
        seed: int = 0,
        shard_teacher: bool = False,
    ) -> None:
        if steps < 2 or max_gap < 1:
            raise ValueError(f"tokencache trainer: need steps ≥ 2 and max_gap ≥ 1, got {steps} and {max_gap}")
        if budget_loss not in BUDGET_LOSSES:
            raise ValueError(
                f"tokencache trainer: field 'budget_loss' must be one of {BUDGET_LOSSES}, got {budget_loss!r}"
            )
        if export_tprr_signal not in TPRR_SIGNALS:
            raise ValueError(
                f"tokencache trainer: field 'export_tprr_signal' must be one of {TPRR_SIGNALS}, "
                f"got {export_tprr_signal!r}"
            )
        if not 0.0 <= target_ratio <= 1.0:
            raise ValueError(f"tokencache trainer: field 'target_ratio' must be in [0, 1], got {target_ratio}")
        super().__init__(teacher, steps, scheduler, guidance_scale, shard_teacher=shard_teacher)
        self.save_hyperparameters()
        self.spec = model_spec(self.teacher)
        self.predictor = without_label_dropout(
            TokenImportancePredictor.from_teacher(self.teacher, ff_inner_dim, init_score)
        )
        self.trajectories = TrajectoryCache()
        self.runtime = None
        self._scores: torch.Tensor | None = None  # the student step's predictor scores, kept for the budget term

    # -- the cache runtime lives on the teacher only while fitting -----------------
    def on_fit_start(self) -> None:
        super().on_fit_start()
        self.runtime = FullPolicy().apply(self.teacher, timesteps=self.timesteps)

    def on_fit_end(self) -> None:
        self.runtime.remove()
        self.runtime = None
        directory = self.hparams.export_dir
        # Calibration calls the teacher: when it is sharded, every rank calibrates (its calls are collectives).
        if directory and (self.trainer.is_global_zero or self.teacher_sharded):
            policy = self.calibrated_policy()
            if self.trainer.is_global_zero:
                policy.save_pretrained(directory)
                print(summary(policy, directory))

    def _gates(self, point: BlockInput) -> torch.Tensor:
        """The student step's blend gates: the predictor's scores of the first block's input, for every branch."""
        scores = self.predictor(point.args, point.kwargs)  # [batch, blocks, tokens]
        self._scores = scores
        branches = len(self.spec.branches)
        return scores.transpose(0, 1).unsqueeze(1).expand(-1, branches, -1, -1)

    # -- training ----------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        hp = self.hparams
        generator = step_generator(hp.seed, self.global_step)  # a pure function of (seed, step): resumable
        step = int(torch.randint(1, len(self.timesteps), (), generator=generator))
        gap = int(torch.randint(1, min(hp.max_gap, step) + 1, (), generator=generator))
        trajectory = self.trajectories.get(self, *batch)
        self.runtime.reset()
        with torch.no_grad():  # the cached step: every branch computes and stores its output
            self._call(trajectory, step - gap)
        with self.runtime.blending(self._gates):
            out = self._call(trajectory, step)
        scores, self._scores = self._scores, None
        mse = F.mse_loss(out, trajectory.model_output(step))
        # The budget is on the global batch's mean score: its value all-reduced over ranks, its gradient this rank's,
        # so DDP's gradient average is the 1-process gradient of (mean − target)² (a square of a mean is not linear).
        mean = scores.mean()
        mean = mean + (self.trainer.strategy.reduce(mean.detach().clone(), reduce_op="mean") - mean).detach()
        budget = (mean - hp.target_ratio) ** 2 if hp.budget_loss == "ratio" else mean
        loss = mse + hp.budget_weight * budget
        self.check_finite({"train/mse": mse, "train/budget": budget, "train/loss": loss})
        self.log_dict(
            {
                "train/loss": loss,
                "train/mse": mse,
                "train/budget": hp.budget_weight * budget,
                "scores/mean": mean.detach(),
                "scores/above_half": (scores.detach() > 0.5).float().mean(),
            },
            prog_bar=True,
        )
        return loss

    def _call(self, trajectory, step: int) -> torch.Tensor:
        x = trajectory.inputs[step - trajectory.start]
        return self.guidance.raw(x, self.timesteps[step].to(self.device), trajectory.labels)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.predictor.parameters(), lr=self.hparams.lr, weight_decay=0.0)

    # -- calibration and export ----------------------------------------------------------------------
    @torch.no_grad()
    def calibrate(self, num_samples: int) -> TokenCacheCalibration:
        """Run the predictor over teacher trajectories: score histograms per block, per-step importance and change."""
        labels = torch.arange(num_samples) % self.bundle.num_classes
        seeds = CALIBRATION_SEED + torch.arange(num_samples)
        trajectory = self.trajectories.get(self, labels, seeds)
        steps, blocks = len(self.timesteps), self.spec.num_blocks
        histogram = torch.zeros(blocks, HISTOGRAM_BINS, dtype=torch.float64)
        importance = torch.zeros(steps, dtype=torch.float64)
        error = torch.zeros(steps, dtype=torch.float64)
        seen: dict[str, torch.Tensor] = {}
        scoring = on_first_block(self.teacher, lambda a, k: seen.__setitem__("scores", self.predictor(a, k)))
        block_outputs = record_outputs(dict(enumerate(find_blocks(self.teacher))), keep=lambda o: o.detach().float())
        previous: dict[int, torch.Tensor] = {}
        was_training = self.predictor.training
        self.predictor.eval()
        try:
            with block_outputs as outputs:
                for step in tqdm(
                    range(steps), desc="calibrating tokencache", unit="step", disable=self.global_rank > 0
                ):
                    self._call(trajectory, step)
                    if step > 0:
                        scores = seen["scores"].double().cpu()
                        for block in range(blocks):
                            histogram[block] += torch.histc(scores[:, block], HISTOGRAM_BINS, 0.0, 1.0)
                        importance[step] = scores.mean()
                        error[step] = torch.stack(
                            [(outputs[b] - previous[b]).norm() / previous[b].norm() for b in range(blocks)]
                        ).mean()
                    previous = dict(outputs)
        finally:
            scoring.remove()
            self.predictor.train(was_training)
        return TokenCacheCalibration(histogram, importance.float(), error.float())

    def export(self, directory: str | Path, steps_trained: int | None = None) -> TokenCachePolicy:
        """Calibrate and save the policy; `steps_trained` for a module restored from a checkpoint (no trainer)."""
        policy = self.calibrated_policy(steps_trained)
        policy.save_pretrained(directory)
        return policy

    def calibrated_policy(self, steps_trained: int | None = None) -> TokenCachePolicy:
        """The policy of the current predictor, calibrated on teacher trajectories and bound to the teacher."""
        hp = self.hparams
        policy = TokenCachePolicy(
            token_budget=hp.export_token_budget,
            floor=hp.export_floor,
            full_steps=hp.export_full_steps,
            tprr_signal=hp.export_tprr_signal,
            ff_inner_dim=hp.ff_inner_dim,
            predictor_state={k: v.detach().float().cpu().clone() for k, v in self.predictor.state_dict().items()},
            calibration=self.calibrate(hp.calibration_samples),
        )
        policy = policy.bind(self.teacher, self.timesteps, type(self.sampler).__name__)
        policy.provenance = {
            "trainer": "tokencache",
            "teacher": hp.teacher,
            "guidance_scale": hp.guidance_scale,
            "max_gap": hp.max_gap,
            "budget_loss": hp.budget_loss,
            "budget_weight": hp.budget_weight,
            "target_ratio": hp.target_ratio,
            "lr": hp.lr,
            "global_steps": int(self.global_step if steps_trained is None else steps_trained),
            "calibration_samples": hp.calibration_samples,
            "calibration_seed": CALIBRATION_SEED,
        }
        return policy


def without_label_dropout(predictor: nn.Module) -> nn.Module:
    """Turn off the class-label dropout a DiT block's adaLN embedding applies in train mode (10% of labels → null).

    The predictor must score the step's actual input (the guided batch already holds the null rows), and the drop is
    drawn from the global RNG: a different draw per DDP rank and batch split, and not restored by a checkpoint.
    The null label's embedding row stays, so nothing in the state dict changes.
    """
    for module in predictor.modules():
        if isinstance(module, LabelEmbedding):
            module.dropout_prob = 0.0
    return predictor


def summary(policy: TokenCachePolicy, directory: str | Path) -> str:
    ratios = ", ".join(f"{r:.2f}" for r in policy.block_ratios().tolist())
    full = policy.step_types(len(policy.timesteps)).nonzero().flatten().tolist()
    return f"exported tokencache policy to {directory}: block ratios [{ratios}], full steps {full}"


def main(argv: list[str] | None = None) -> int:
    """Export a policy from a training checkpoint (e.g. of a run stopped early): calibrates, then saves."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--ckpt", type=Path, required=True, help="a Lightning checkpoint of TokenCacheTrainer")
    parser.add_argument("--out", type=Path, required=True, help="policy directory to write")
    args = parser.parse_args(argv)
    from predictors.tokencache_trainer import TokenCacheTrainer as trainer  # the class the checkpoint names

    module = trainer.load_from_checkpoint(args.ckpt, map_location="cpu")
    steps = torch.load(args.ckpt, map_location="cpu", weights_only=False)["global_step"]  # Lightning's own format
    print(summary(module.export(args.out, steps_trained=steps), args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
