"""TokenCache: train a `TokenImportancePredictor` against a frozen DiT and export a `tokencache` policy.

With `objective="blend"` (the paper's), one training step draws a step s ≥ 1 and a gap g (1 … `max_gap`); the cache
runtime stores every branch output of the teacher's own step s−g (no grad), then the student runs step s with every
branch of every block returning, token by token, w⊙f(z_s) + (1−w)⊙cached with w = the predictor's score for that
(block, token) on step s's input. Loss: MSE between the student's and the teacher's model output at step s, plus the
budget term (`budget_loss="ratio"`: (mean w − target_ratio)², or `"l1"`: mean w), times `budget_weight`. The teacher
is frozen as in the Learning-to-Cache trainer (outside the module tree, trajectories cached from noise); only the
predictor trains.

`objective="rate"` (the default; not the paper's) trains the scores as rates instead, for the policy's
`staleness="age"` ranking (score × steps since computed): the teacher runs steps s−g and s unhooked (no grad) and the
predictor's score for (block b, token i) on step s's input regresses, in log space, the token's measured change per
step Σ_branches ‖f(z_s)ᵢ − f(z_{s−g})ᵢ‖ / g of block b, divided by the mean over the sample's blocks and tokens of
Σ_branches ‖f(z_s)ᵢ‖ (so scores are comparable across blocks, as the pooled calibration cut needs, and mostly in
(0, 1), the sigmoid's range). No budget term: which share of tokens a cache step recomputes is the export's
`token_budget`, not the scores' mean.

Export (on fit end): the predictor runs over `calibration_samples` teacher trajectories (seeds apart from the
training and evaluation seeds; class labels 0, 1, …, or a text-conditioned teacher's first prompts of the fit's data)
and the measured statistics (`TokenCacheCalibration`) are saved with its weights. With `export_flops`, the export then
sets its tables to that FLOPs target as `bench/compare.py`'s "TokenCache, tuned" rows do (`tune_tables`).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import LabelEmbedding
from torch import nn
from tqdm.auto import tqdm

from data.prompts import PromptConditions
from l2c.adapters import find_blocks, find_branches
from l2c.compare import (
    PLAN_FLOPS_SAMPLES,
    SEER_TOLERANCE,
    TOKENCACHE_GRID,
    CalibrationSet,
    TokenCacheSetting,
    tokencache_grid,
    tune_on_calibration,
)
from l2c.evaluate import SamplingSetup
from l2c.extension import BlockInput, first_stream
from l2c.hooks import on_first_block, record_outputs
from l2c.policies.selectors import spearman
from l2c.policies.tokencache import TokenCacheCalibration, TokenCachePolicy, token_partial_slots
from l2c.sampling import Condition, sample_seeds
from l2c.token_importance import TokenImportancePredictor, block_image_tokens

from .frozen_teacher import FrozenTeacherModule, step_generator

CALIBRATION_SEED = 2_000_000  # calibration noise: apart from training (data seed) and evaluation (0 …) seeds
# The `export_flops` tuning run's seed (`SamplingSetup.seed`; noise seeds 3 000 009 …): apart from the training
# (100 000 …), calibration (2 000 000 …) and evaluation seeds, bench/compare.py's too (runs 0, 1: 0 …, 1 000 003 …).
TUNING_RUN_SEED = 3
HISTOGRAM_BINS = 1000
RATE_FLOOR = 1e-4  # added to both sides of the rate objective's log: a token that does not move is not −∞
BUDGET_TERMS = {  # the budget term of the loss, from the global batch's mean score and the target ratio
    "ratio": lambda mean, target: (mean - target) ** 2,
    "l1": lambda mean, target: mean,
}


class TokenCacheTrainer(FrozenTeacherModule):
    """TokenCache: a token-importance predictor trained against the frozen teacher; exports a calibrated policy.

    One step s and gap g per optimizer step: the teacher's step s−g cached, the student's step s blended token by token
    by the predictor's scores; the loss is the MSE to the teacher's output plus the budget term.
    """

    kind = "tokencache"

    def __init__(
        self,
        objective: Literal["blend", "rate"] = "rate",
        max_gap: int = 2,
        ff_inner_dim: int | None = 128,
        init_score: float = 0.9,
        budget_loss: Literal["ratio", "l1"] = "ratio",
        budget_weight: float = 1.0,
        target_ratio: float = 0.3,
        lr: float = 1e-3,
        export_token_budget: float = 0.3,
        export_floor: float = 0.05,
        export_full_steps: int = 6,
        export_tprr_signal: Literal["error", "importance"] = "error",
        export_staleness: Literal["none", "age"] = "age",
        export_rescore: Literal["step", "interval"] = "interval",
        export_flops: float | None = None,
        export_tune_samples: int = 8,
        calibration_samples: int = 32,
        seed: int = 0,
        **kwargs,
    ) -> None:
        """
        Args:
            objective: What the scores learn: `rate` (the default), each token's measured output change per step
                (log-space regression, no budget term; ranked by `export_staleness: age`), or `blend`, the paper's
                blend gates (output MSE plus the budget term; the budget settings apply to it only).
            max_gap: The cached step is 1 … max_gap steps before the trained one (the intervals met at inference).
            ff_inner_dim: The predictor's MLP width (the teacher's first units of its first block's MLP); none: the
                whole MLP.
            init_score: Every token's starting score, in (0, 1) (the student starts near the teacher).
            budget_loss: The budget term: `ratio`, (mean score − target_ratio)², or `l1`, the mean score.
            budget_weight: The budget term's weight in the loss.
            target_ratio: The mean score the `ratio` budget pulls towards, in [0, 1].
            lr: Learning rate of the predictor's AdamW.
            export_token_budget: The exported policy's share of tokens recomputed on a cache step.
            export_floor: Blocks whose calibrated ratio falls below this are cached whole.
            export_full_steps: Full steps of the exported schedule (TPRR).
            export_tprr_signal: What places the full steps: the calibrated step-to-step `error` or the `importance`.
            export_staleness: How the exported policy ranks tokens on a cache step: `none`, by the score alone (the
                paper's rule), or `age`, by score × steps since the token was last computed (TokenCachePolicy).
            export_rescore: When the exported policy's predictor runs: on the first cache step after each full step
                only (`interval`, the default; TokenCachePolicy) or on every cache step (`step`, the paper).
            export_flops: A FLOPs ratio in (0, 1] the export sets its tables to, in place of `export_token_budget`,
                `export_full_steps` and TPRR: the step table and token budget of best calibration PSNR at that
                FLOPs (`tune_tables`); none: the tables as set. Class-conditioned teachers only (refused for a
                text-conditioned one, whose prompts bench/compare.py's tuning does not sample).
            export_tune_samples: Noises (seed `TUNING_RUN_SEED`) the `export_flops` tuning compares PSNR on.
            calibration_samples: Teacher trajectories the predictor is calibrated on at export.
            seed: Seed of the (step, gap) each optimizer step trains (a pure function of seed and step: resumable).
            **kwargs: The frozen teacher's settings (`FrozenTeacherModule`).
        """
        super().__init__(**kwargs)
        if export_flops is not None and self.bundle.text_conditioned:
            raise ValueError(
                f"tokencache trainer: field 'export_flops' tunes the exported tables on class-conditioned samples, as "
                f"bench/compare.py does, and teacher {self.hparams.teacher!r} is text-conditioned: leave export_flops "
                "unset and set export_token_budget and export_full_steps"
            )
        self.predictor = without_label_dropout(
            TokenImportancePredictor.from_teacher(self.teacher, ff_inner_dim, init_score)
        )
        self._scores: list[torch.Tensor] = []  # of the student's calls this step (Wan, Qwen-Image: cond, uncond)
        self.token_wise: list[list[bool]] = token_partial_slots(self.teacher).tolist()  # [blocks][branches]
        # The blocks with a token-wise branch: the only ones a cache step recomputes tokens of (not Flux.2's single
        # blocks), so the only ones whose scores are trained, budgeted and calibrated.
        self.scored_blocks = [block for block, row in enumerate(self.token_wise) if any(row)]

    def check_fields(self) -> None:
        super().check_fields()
        hp = self.hparams
        if hp.max_gap < 1:
            raise ValueError(f"tokencache trainer: field 'max_gap' must be ≥ 1, got {hp.max_gap}")
        if not 0.0 <= hp.target_ratio <= 1.0:
            raise ValueError(f"tokencache trainer: field 'target_ratio' must be in [0, 1], got {hp.target_ratio}")
        if hp.export_flops is not None and not 0.0 < hp.export_flops <= 1.0:
            raise ValueError(f"tokencache trainer: field 'export_flops' must be in (0, 1], got {hp.export_flops}")
        if hp.export_tune_samples < 1:
            raise ValueError(
                f"tokencache trainer: field 'export_tune_samples' must be ≥ 1, got {hp.export_tune_samples}"
            )

    def _gates(self, point: BlockInput) -> dict[tuple[int, int], torch.Tensor]:
        """The student call's blend gates: the predictor's scores of the very input its first block sees, per image
        token on the token-wise branches (the runtime recomputes a joint branch's text tokens); the other branches
        (the joint attentions, the text MLPs, Flux.2's single blocks) reuse their cache, as on an inference cache
        step."""
        scores = self.predictor(point.args, point.kwargs)  # [batch, blocks, tokens]
        self._scores.append(scores)
        reuse = scores.new_zeros(())
        return {
            (block, index): scores[:, block] if wise else reuse
            for block, row in enumerate(self.token_wise)
            for index, wise in enumerate(row)
        }

    # -- training ----------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        hp = self.hparams
        generator = step_generator(hp.seed, self.global_step)  # a pure function of (seed, step): resumable
        step = int(torch.randint(1, len(self.timesteps), (), generator=generator))
        gap = int(torch.randint(1, min(hp.max_gap, step) + 1, (), generator=generator))
        trajectory = self.trajectories.get(self, *batch)
        if hp.objective == "rate":
            return self._rate_step(trajectory, step, gap)
        self.start_cache(trajectory, step - gap)
        self._scores = []
        with self.blending(self._gates):
            out = self.teacher_output(trajectory, step)
        scores = torch.cat(self._scores)
        mse = F.mse_loss(out, trajectory.model_output(step))
        # The budget is on the global batch's mean score: its value all-reduced over ranks, its gradient this rank's,
        # so DDP's gradient average is the 1-process gradient of (mean − target)² (a square of a mean is not linear).
        mean = scores[:, self.scored_blocks].mean()
        mean = mean + (self.trainer.strategy.reduce(mean.detach().clone(), reduce_op="mean") - mean).detach()
        budget = BUDGET_TERMS[hp.budget_loss](mean, hp.target_ratio)
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

    def _rate_step(self, trajectory, step: int, gap: int) -> torch.Tensor:
        """Log-space regression of the scores on step s's input to each (block, token)'s measured change per step."""
        seen: dict[str, tuple] = {}
        scoring = on_first_block(self.teacher, lambda a, k: seen.setdefault("input", (a, k)))
        try:
            with torch.no_grad(), self.uncached():
                earlier = branch_outputs(self.teacher, lambda: self.teacher_output(trajectory, step - gap))
                seen.clear()  # keep step s's first-block input, not step s − g's
                later = branch_outputs(self.teacher, lambda: self.teacher_output(trajectory, step))
        finally:
            scoring.remove()
        scores = self.predictor(*seen["input"])[:, self.scored_blocks]
        target = change_rate(earlier, later, gap, image_tokens=scores.shape[-1])  # [batch, scored blocks, tokens]
        loss = F.mse_loss(torch.log(scores + RATE_FLOOR), torch.log(target + RATE_FLOOR))
        self.check_finite({"train/loss": loss})
        with torch.no_grad():
            rho = spearman(scores.flatten(0, 1), target.flatten(0, 1)).mean()
        self.log_dict(
            {"train/loss": loss, "scores/mean": scores.detach().mean(), "target/mean": target.mean(),
             "scores/spearman": rho},
            prog_bar=True,
        )  # fmt: skip
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.predictor.parameters(), lr=self.hparams.lr, weight_decay=0.0)

    # -- calibration and export ----------------------------------------------------------------------
    @torch.no_grad()
    def calibrate(self, num_samples: int) -> TokenCacheCalibration:
        """Run the predictor over teacher trajectories: score histograms per block, per-step importance and change."""
        seeds = CALIBRATION_SEED + torch.arange(num_samples)
        trajectory = self.trajectories.get(self, self.calibration_conditions(num_samples), seeds)
        steps, blocks = len(self.timesteps), self.spec.num_blocks
        histogram = torch.zeros(blocks, HISTOGRAM_BINS, dtype=torch.float64)
        importance = torch.zeros(steps, dtype=torch.float64)
        error = torch.zeros(steps, dtype=torch.float64)
        seen: dict[str, torch.Tensor] = {}
        scoring = on_first_block(self.teacher, lambda a, k: seen.__setitem__("scores", self.predictor(a, k)))
        blocks_of = dict(enumerate(find_blocks(self.teacher)))
        previous: dict[int, torch.Tensor] = {}
        was_training = self.predictor.training
        self.predictor.eval()
        try:
            with record_outputs(blocks_of, keep=lambda output: output) as recorded:
                for step in tqdm(
                    range(steps), desc="calibrating tokencache", unit="step", disable=self.global_rank > 0
                ):
                    self.teacher_output(trajectory, step)
                    scores = seen["scores"].double().cpu()
                    tokens = scores.shape[-1]
                    outputs = {b: block_image_tokens(blocks_of[b], recorded[b], tokens).float() for b in range(blocks)}
                    if step > 0:
                        for block in range(blocks):
                            histogram[block] += torch.histc(scores[:, block], HISTOGRAM_BINS, 0.0, 1.0)
                        importance[step] = scores[:, self.scored_blocks].mean()
                        error[step] = torch.stack(
                            [(outputs[b] - previous[b]).norm() / previous[b].norm() for b in range(blocks)]
                        ).mean()
                    previous = outputs
        finally:
            scoring.remove()
            self.predictor.train(was_training)
        return TokenCacheCalibration(histogram, importance.float(), error.float())

    def calibration_conditions(self, num_samples: int) -> Condition:
        """What the calibration trajectories are conditioned on: labels 0, 1, … of a class-conditional teacher; of a
        text-conditioned one, the fit's first prompts (items 0 … n−1 of its `PromptDataModule`: the same on every
        rank)."""
        if not self.bundle.text_conditioned:
            return torch.arange(num_samples) % self.bundle.num_classes
        prompts = getattr(getattr(self._trainer, "datamodule", None), "train_set", None)
        if not isinstance(prompts, PromptConditions):
            raise ValueError(
                f"tokencache trainer: teacher {self.hparams.teacher!r} is text-conditioned; its calibration reads the "
                "prompts of the fit's PromptDataModule (export at the end of `fit`, with `--model.export_dir`)"
            )
        condition, _ = prompts.collate([prompts[index] for index in range(num_samples)])
        return condition

    def trained_policy(self) -> TokenCachePolicy:
        """The policy of the current predictor, calibrated on teacher trajectories."""
        hp = self.hparams
        return TokenCachePolicy(
            token_budget=hp.export_token_budget,
            floor=hp.export_floor,
            full_steps=hp.export_full_steps,
            tprr_signal=hp.export_tprr_signal,
            staleness=hp.export_staleness,
            rescore=hp.export_rescore,
            ff_inner_dim=hp.ff_inner_dim,
            predictor_state={k: v.detach().float().cpu().clone() for k, v in self.predictor.state_dict().items()},
            calibration=self.calibrate(hp.calibration_samples),
        )

    def exported_policy(self, steps_trained: int | None = None) -> TokenCachePolicy:
        """The trained policy bound to the teacher (`FrozenTeacherModule.exported_policy`); with `export_flops`, its
        tables set to that target (`tune_tables`), what was tuned recorded in the provenance's `export_tuning`."""
        policy = super().exported_policy(steps_trained)
        if self.hparams.export_flops is None:
            return policy
        setting, record = self.tune_tables(policy, self.hparams.export_flops)
        tuned = setting.of(policy)
        tuned.provenance = {**policy.provenance, "export_tuning": record}
        return tuned

    def tuning_run(self) -> SamplingSetup:
        """The run `export_flops` is tuned on: the trainer's schedule and guidance, `export_tune_samples` noises of
        run `TUNING_RUN_SEED`, class labels balanced over the teacher's classes."""
        hp = self.hparams
        return SamplingSetup(
            model=hp.teacher, steps=hp.steps, scheduler=self.scheduler_name, num_samples=hp.export_tune_samples,
            seed=TUNING_RUN_SEED, guidance_scale=hp.guidance_scale, batch_size=hp.export_tune_samples,
        )  # fmt: skip

    def tune_tables(self, policy: TokenCachePolicy, target: float) -> tuple[TokenCacheSetting, dict]:
        """bench/compare.py's "TokenCache, tuned" choice for the bound `policy` at FLOPs ratio `target`: every
        distinct step table with at most the target's share of full steps (TPRR or one interval), each with the
        token budget that brings its FLOPs (counted on 2 samples) within 0.03 of the target (`tokencache_grid`); the
        one of best PSNR against the uncached samples of `tuning_run` kept (`tune_on_calibration`). Returns it and
        the provenance's record: target, run, every candidate with its FLOPs and PSNR, the one kept. Raises if no
        table reaches the target, naming the FLOPs the tables reach."""
        start = time.perf_counter()
        run = self.tuning_run()
        calibration = CalibrationSet(self.bundle, run)
        measured: dict[tuple, float] = {}  # (full_steps, tprr, token_budget) → FLOPs ratio: each candidate's, kept

        def flops_ratio(candidate: TokenCachePolicy) -> float:
            knobs = (candidate.full_steps, candidate.tprr, candidate.token_budget)
            measured[knobs] = calibration.plan_flops.flops_ratio(candidate)
            return measured[knobs]

        steps = len(self.timesteps)
        grid = tokencache_grid(policy, target, steps, flops_ratio)
        if not grid:
            lowest = min(flops_ratio(TokenCacheSetting(2, tprr, 0.0).of(policy)) for tprr in (True, False))
            raise ValueError(
                f"tokencache trainer: field 'export_flops' is {target}, and no step table (2 or more and at most "
                f"{target:g} × {steps} full steps, TPRR or one interval) reaches it within {SEER_TOLERANCE} at any "
                f"token budget: this policy's tables reach FLOPs ratios {lowest:.3f} (2 full steps, no token "
                "recomputed) to 1 (every step full); nothing exported. Set a target in that range and export again, "
                "e.g. from a checkpoint: "
                "python -m predictors.tokencache_trainer --ckpt CKPT --out DIR --export-flops TARGET"
            )
        tuned = tune_on_calibration(grid, lambda setting: setting.of(policy), calibration.bench, calibration.reference)
        candidates = [
            {**dataclasses.asdict(setting), "flops_ratio": measured[dataclasses.astuple(setting)], "psnr_db": score}
            for setting, score in zip(grid, tuned.scores)
        ]
        record = {
            "export_flops": target,
            "grid": TOKENCACHE_GRID,
            "samples": run.num_samples,
            "seed": run.seed,
            "noise_seeds": "{}–{}".format(*sample_seeds(torch.tensor([0, run.num_samples - 1]), run.seed).tolist()),
            "flops_samples": PLAN_FLOPS_SAMPLES,
            "candidates": candidates,
            "kept": candidates[grid.index(tuned.setting)],
            "wall_s": round(time.perf_counter() - start, 1),
        }
        return tuned.setting, record

    def extra_provenance(self) -> dict:
        return {"calibration_seed": CALIBRATION_SEED}

    def policy_summary(self, policy: TokenCachePolicy) -> str:
        ratios = ", ".join(f"{r:.2f}" for r in policy.block_ratios().tolist())
        full = policy.step_types(len(policy.timesteps)).nonzero().flatten().tolist()
        summary = f"block ratios [{ratios}], full steps {full}"
        tuning = policy.provenance.get("export_tuning")
        if tuning is None:
            return summary
        kept = tuning["kept"]
        setting = TokenCacheSetting(kept["full_steps"], kept["tprr"], kept["token_budget"])
        return (
            f"{summary}; set to FLOPs {tuning['export_flops']}, of {len(tuning['candidates'])} tables: "
            f"{setting.describe()} (FLOPs {kept['flops_ratio']:.3f}, calibration PSNR {kept['psnr_db']:.2f} dB)"
        )


def branch_outputs(model: nn.Module, run) -> dict[tuple[int, str], torch.Tensor]:
    """Every token-wise branch's output (float) during `run()`: {(block, branch name): [batch, tokens, C]}: the
    branches a cache step recomputes token by token, whose tokens the scores rank (a joint one's are [text; image])."""
    modules = {(branch.block, branch.name): branch.module for branch in find_branches(model) if branch.partial}
    with record_outputs(modules, keep=lambda output: first_stream(output).detach().float()) as outputs:
        run()
    return dict(outputs)


def change_rate(earlier: dict, later: dict, gap: int, image_tokens: int | None = None) -> torch.Tensor:
    """The rate objective's target [batch, blocks, tokens] (the blocks with a measured branch, in order): per block
    and token, Σ_branches ‖later − earlier‖ / gap, over the mean (per sample, over blocks and tokens) of
    Σ_branches ‖later‖. `image_tokens`: keep each output's last that many tokens (the image tokens of a joint
    branch's [text; image]; None: every token)."""
    image = slice(None) if image_tokens is None else slice(-image_tokens, None)
    moved, size = [], []
    for block in sorted({block for block, _ in later}):
        names = [key for key in later if key[0] == block]
        moved.append(sum((later[key][:, image] - earlier[key][:, image]).norm(dim=-1) for key in names))
        size.append(sum(later[key][:, image].norm(dim=-1) for key in names))
    moved, size = torch.stack(moved, dim=1), torch.stack(size, dim=1)
    return moved / gap / size.mean(dim=(1, 2), keepdim=True).clamp_min(1e-12)


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


def main(argv: list[str] | None = None) -> int:
    """Export a policy from a training checkpoint (e.g. of a run stopped early): calibrates, then saves."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--ckpt", type=Path, required=True, help="a Lightning checkpoint of TokenCacheTrainer")
    parser.add_argument("--out", type=Path, required=True, help="policy directory to write")
    parser.add_argument(
        "--export-flops", type=float, default=None, help="set the tables to this FLOPs ratio (the trainer's "
        "export_flops; default: the checkpoint's setting)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if not args.ckpt.is_file():
        parser.error(f"--ckpt {args.ckpt}: no such file")
    from predictors.tokencache_trainer import TokenCacheTrainer as trainer  # the class the checkpoint names

    overrides = {} if args.export_flops is None else {"export_flops": args.export_flops}
    try:  # a refused setting (or a teacher directory gone since training) is one line, like train.py's refusals
        module = trainer.load_from_checkpoint(args.ckpt, map_location="cpu", **overrides)
        steps = torch.load(args.ckpt, map_location="cpu", weights_only=False)["global_step"]  # Lightning's format
        exported = module.export(args.out, steps_trained=steps)
    except (ValueError, FileNotFoundError) as error:
        parser.exit(2, f"{parser.prog}: error: --ckpt {args.ckpt}: {error}\n")
    print(module.export_message(exported, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
