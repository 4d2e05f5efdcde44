"""TokenCache on SD3/3.5, Flux.2, Wan 2.x and Qwen-Image: the predictor copies each family's first block and scores
the image (video) tokens of the very calls the model makes; in the unmodified pipeline the policy runs partial
exactly on the token-wise slots, recomputing exactly the predictor's top tokens; and the trainer fits on each tiny
family, exports, and the export loads and runs in the family's pipeline."""

from __future__ import annotations

import copy
import warnings

import lightning as L
import pytest
import torch
from test_families import _SIZES, FAMILIES, PARTIAL_BRANCHES, STEPS, OutputRecorder, _image_tokens, _pipe
from test_family_training import FRAMES, GUIDANCE, SIZE, _user_call, saved_teacher
from test_family_training import STEPS as PIPELINE_STEPS
from torch import nn

import l2c
from l2c import Action
from l2c.adapters import find_blocks
from l2c.hooks import on_first_block
from l2c.policies.scores import top_tokens
from l2c.policies.tokencache import SIGNAL, TokenCacheCalibration, TokenCachePolicy, token_partial_slots
from l2c.token_importance import TokenImportancePredictor, block_image_tokens, mlp_width
from predictors.tokencache_trainer import HISTOGRAM_BINS, TokenCacheTrainer

NAMES = ("sd3", "flux2", "wan", "qwenimage")
# Per family: the first block's image MLP (narrowed by ff_inner_dim) and its text MLP (an identity in the copy).
MLP = {"sd3": "ff", "flux2": "ff", "wan": "ffn", "qwenimage": "img_mlp"}
TEXT_ONLY = {"sd3": "ff_context", "flux2": "ff_context", "wan": None, "qwenimage": "txt_mlp"}
INNER = 8


def _out_projection(mlp: nn.Module) -> nn.Linear:
    return mlp.linear_out if hasattr(mlp, "linear_out") else mlp.net[-1]  # Flux.2's SwiGLU MLP, or a FeedForward


@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_predictor_copies_the_first_block_and_scores_the_image_tokens_of_the_models_own_calls(name):
    family = FAMILIES[name]
    pipe = _pipe(family)
    model = pipe.transformer
    first, blocks = find_blocks(model)[0], len(find_blocks(model))
    predictor = TokenImportancePredictor.from_teacher(model, ff_inner_dim=INNER)
    attention = family.branches[0]  # attn, or Wan's attn1
    assert torch.equal(getattr(predictor.block, attention).to_q.weight, getattr(first, attention).to_q.weight)
    if TEXT_ONLY[name] is not None:
        assert isinstance(getattr(predictor.block, TEXT_ONLY[name]), nn.Identity)
    # The narrowed MLP is the teacher's with only its first INNER hidden units: the same output as the whole MLP
    # whose output projection reads nothing from the other units.
    narrowed, whole = getattr(predictor.block, MLP[name]), getattr(first, MLP[name])
    assert predictor.ff_inner_dim == INNER < mlp_width(whole)
    truncated = copy.deepcopy(whole)
    _out_projection(truncated).weight[:, INNER:] = 0
    x = torch.randn(2, 3, predictor.norm.normalized_shape[0])
    torch.testing.assert_close(narrowed(x), truncated(x), atol=1e-6, rtol=0)

    tokens, _ = _image_tokens(family, pipe, _SIZES[name])  # counted from the latents the model is called with
    calls = []  # every call of the first block in a 2-step run
    handle = on_first_block(model, lambda a, k: calls.append((a, k)))
    family.call(pipe, steps=2)
    handle.remove()
    assert len(calls) == 2 * family.calls_per_step
    exact = TokenImportancePredictor.from_teacher(model)  # MLP whole: its image tokens are the teacher block's
    for args, kwargs in calls:
        scores = predictor(args, kwargs)
        rows = (args[0] if args else kwargs["hidden_states"]).shape[0]  # SD3: [uncond; cond]
        assert scores.shape == (rows, blocks, tokens)
        # The text-only submodules replaced by identities change nothing the head reads.
        image = exact.image_tokens(exact.block(*args, **kwargs))
        torch.testing.assert_close(image, block_image_tokens(first, first(*args, **kwargs), tokens), atol=1e-6, rtol=0)


class ScoredRecorder(OutputRecorder):
    """`OutputRecorder` (each call's output and a fresh computation of it) that also keeps the predictor's scores of
    the call, read from the running trajectory state."""

    def __init__(self, pipe, names: tuple[str, ...]) -> None:
        self.states = pipe.transformer._diffusers_hook.get_hook("l2c_step").states
        super().__init__(pipe.transformer, names)

    def _hook(self, key):
        def hook(module, args, kwargs, output):
            scores = self.states.get_state().signals.get(SIGNAL)
            self.calls[key].append((output, type(module).forward(module, *args, **kwargs), scores))

        return hook


def _policy(model: nn.Module, steps: int, budget: float) -> TokenCachePolicy:
    """A TokenCache policy for `model` without training: its predictor's head drawn at random (distinct scores per
    token), a calibration in which every block has the same scores (so each block's ratio is the budget) and one
    interval (full steps 0, 2, …)."""
    predictor = TokenImportancePredictor.from_teacher(model, ff_inner_dim=INNER)
    torch.manual_seed(1)
    nn.init.normal_(predictor.head.weight)
    histogram = torch.zeros(len(find_blocks(model)), HISTOGRAM_BINS)
    histogram[:, HISTOGRAM_BINS // 2] = 1.0
    calibration = TokenCacheCalibration(histogram, torch.zeros(steps), torch.zeros(steps))
    return TokenCachePolicy(
        token_budget=budget, floor=0.0, full_steps=steps // 2, tprr=False, staleness="none", ff_inner_dim=INNER,
        predictor_state=predictor.state_dict(), calibration=calibration,
    )  # fmt: skip


@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_policy_in_the_unmodified_pipeline_recomputes_exactly_the_predictors_top_tokens_on_the_token_wise_slots(name):
    family = FAMILIES[name]
    pipe = _pipe(family)
    model = pipe.transformer
    tokens, timesteps = _image_tokens(family, pipe, _SIZES[name])
    policy = _policy(model, STEPS, 0.5).bind(pipe, timesteps, "FlowMatchEulerDiscreteScheduler", num_tokens=tokens)
    slots, spec = policy.partial_slots, policy.target.model
    assert torch.equal(slots, token_partial_slots(model))
    assert {spec.branches[i] for _, i in slots.nonzero().tolist()} == set(PARTIAL_BRANCHES[name])
    reference = family.call(pipe)
    runtime = policy.apply(pipe)
    recorder = ScoredRecorder(pipe, PARTIAL_BRANCHES[name])
    cached = family.call(pipe)
    recorder.remove()
    runtime.remove()

    plan, present, calls = runtime.plan, spec.present(), family.calls_per_step
    cache = ~policy.step_types(STEPS).bool()
    partial = plan.actions == Action.PARTIAL
    assert bool(partial[cache][:, slots].all()) and not bool(partial[:, ~slots].any() or partial[~cache].any())
    assert bool((plan.actions[cache][:, present & ~slots] == Action.REUSE).all())  # attentions, text MLPs
    assert runtime.executed[Action.PARTIAL] == int(partial.sum()) * calls
    assert runtime.executed[Action.REUSE] == int((plan.actions[:, present] == Action.REUSE).sum()) * calls
    assert len(recorder.calls) == int(slots.sum())
    # On a cache step each token-wise branch returns fresh outputs for exactly its block's top half of the
    # predictor's scores of that call (staleness "none": the score alone) and its cached outputs for the rest.
    for (block, branch), seen in recorder.calls.items():
        assert len(seen) == STEPS * calls
        for index, (output, fresh, scores) in enumerate(seen):
            if not cache[index // calls]:
                assert torch.equal(output, fresh)
                continue
            kept, recomputed = (output == seen[index - calls][0]).all(-1), (output == fresh).all(-1)
            assert bool((kept ^ recomputed).all()), (block, branch, index)
            top = torch.zeros_like(recomputed).scatter_(1, top_tokens(scores[:, block], tokens // 2), True)
            assert torch.equal(recomputed, top), (block, branch, index)
    assert torch.isfinite(cached).all() and not torch.equal(cached, reference)


# Each objective on two families; the rate objective on Flux.2 also trains around its single blocks, which have no
# token-wise branch (their scores are neither trained nor budgeted, and the export caches them whole).
OBJECTIVES = {"sd3": "blend", "flux2": "rate", "wan": "blend", "qwenimage": "rate"}


@pytest.mark.parametrize("name", NAMES)
def test_trainer_fits_on_the_tiny_family_and_its_export_loads_and_runs_in_the_unmodified_pipeline(name, tmp_path):
    pipe, teacher, data = saved_teacher(name, tmp_path)
    module = TokenCacheTrainer(
        teacher=str(teacher), steps=PIPELINE_STEPS, objective=OBJECTIVES[name], ff_inner_dim=INNER, lr=0.01,
        guidance_scale=GUIDANCE, height=SIZE, width=SIZE, num_frames=FRAMES, export_dir=str(tmp_path / "policy"),
        export_full_steps=2, export_token_budget=0.5, calibration_samples=2,
    )  # fmt: skip
    before = module.predictor.head.weight.detach().clone()
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, data)
    assert module.global_step == 2 and not torch.equal(module.predictor.head.weight.detach(), before)

    policy = l2c.load_policy(tmp_path / "policy")
    assert isinstance(policy, TokenCachePolicy) and policy.target.model.family == name
    slots = policy.partial_slots
    assert torch.equal(slots, token_partial_slots(module.teacher))
    assert bool(slots.any(1).all()) == (name != "flux2")  # Flux.2's single blocks have no token-wise slot ...
    assert bool((policy.block_ratios()[~slots.any(1)] == 0).all())  # ... and are cached whole on cache steps
    pipe = type(pipe).from_pretrained(teacher)  # the unmodified pipeline, as a user loads it
    pipe.set_progress_bar_config(disable=True)
    condition, seeds = next(iter(data.train_dataloader()))
    runtime = policy.apply(pipe)
    with torch.no_grad():
        images = _user_call(name, pipe, condition, module.noise_for(seeds))
    runtime.remove()
    partial = runtime.plan.actions == Action.PARTIAL
    assert int(partial.sum()) > 0 and not bool(partial[:, ~slots].any())
    assert runtime.executed[Action.PARTIAL] == int(partial.sum()) * FAMILIES[name].calls_per_step
    assert torch.isfinite(images).all()
