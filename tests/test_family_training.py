"""The trainers on the model families: plan slots no block executes are neither work nor budget, and the rollout
trainer's export runs in each family's unmodified pipeline as the trainer's hard-gate rollout."""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from l2c_testing import tiny_tokenizer
from test_families import flux2_pipeline, flux_pipeline, qwen_pipeline, sd3_pipeline, wan_pipeline

import l2c
from data.prompts import PromptDataModule
from l2c import Action
from l2c.adapters import model_spec
from l2c.models import load_model
from predictors.l2c_trainer import ForecastRouterTrainer, RolloutRouterTrainer

# embedded:digits-flux: 2 double blocks (attn, ff, ff_context) then 4 single blocks (attn, proj_mlp, proj_out).
FLUX_DIGITS_ABSENT = (*((b, n) for b in (0, 1) for n in ("proj_mlp", "proj_out")),
                      *((b, n) for b in (2, 3, 4, 5) for n in ("ff", "ff_context")))  # fmt: skip


def test_digits_flux_plan_counts_and_budgets_only_the_slots_its_blocks_execute(tmp_path):
    spec = model_spec(load_model("embedded:digits-flux").transformer)
    assert spec.branches == ("attn", "ff", "ff_context", "proj_mlp", "proj_out")
    assert spec.absent == FLUX_DIGITS_ABSENT and int(spec.present().sum()) == 18  # of 6 × 5 columns
    assert l2c.ModelSpec.from_dict(spec.to_dict()) == spec

    steps, budget = 4, 0.75  # reuse steps 1 and 3: 2 × 18 real slots
    module = RolloutRouterTrainer(teacher="embedded:digits-flux", steps=steps, export_budget=budget, lr=0.05)
    labels, seeds = torch.tensor([3]), torch.tensor([7])
    module.on_fit_start()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module.training_step((labels, seeds), 0).backward()
        module.on_before_optimizer_step(None)
        assert module.router.logits.grad.isfinite().all()
    finally:
        module.on_fit_end()
    costs = module.branch_costs
    assert bool((costs[~spec.present()] == 0).all()) and bool((costs[spec.present()] > 0).all())
    assert costs[0, 0] > costs[2, 0]  # a double block's joint attention (two streams, out projections) > a single's

    policy = module.export(tmp_path / "policy")
    computed = policy.computed_mask(steps, spec.present())
    kept = int(computed[1::2][:, spec.present()].sum())
    assert policy.reuse_summary(steps) == f"computed {kept} of 36 branch slots in reuse steps"
    plan = l2c.load_policy(tmp_path / "policy").plan_for(spec, module.timesteps)
    assert plan.compute_fraction() == (36 + kept) / 72
    # FLOPs-weighted: the computed work is the budget's, to within half the dearest slot.
    work = costs.double().expand(steps, -1, -1)
    spent = float(work[computed.to(costs.device)].sum() / work.sum())
    assert abs(spent - budget) <= float(costs.max() / work.sum()) / 2 + 1e-9


# -- the rollout trainer on each tiny family, its export in the unmodified pipeline ---------------------------------
STEPS, SIZE, FRAMES = 3, 32, 5
PROMPTS = ["a photo of a cat", "a red dog on the green grass"]


def _clip(tokenizer, hidden: int, projection: int | None = None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=16, num_hidden_layers=1,
                            num_attention_heads=2, max_position_embeddings=16, projection_dim=projection or hidden,
                            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                            bos_token_id=tokenizer.pad_token_id)  # fmt: skip
    return (CLIPTextModel if projection is None else CLIPTextModelWithProjection)(config).eval()


def _t5(tokenizer, width: int, umt5: bool = False):
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    config_class, model_class = (UMT5Config, UMT5EncoderModel) if umt5 else (T5Config, T5EncoderModel)
    config = config_class(vocab_size=len(tokenizer), d_model=width, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                          relative_attention_num_buckets=8, pad_token_id=tokenizer.pad_token_id,
                          eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    return model_class(config).eval()


def _tokenizer(max_length: int = 8):
    tokenizer = tiny_tokenizer()
    tokenizer.model_max_length = max_length
    return tokenizer


def flux_with_encoders():
    pipe = flux_pipeline()
    torch.manual_seed(0)
    pipe.register_modules(text_encoder=_clip(_tokenizer(), 8), tokenizer=_tokenizer(),
                          text_encoder_2=_t5(_tokenizer(), 16), tokenizer_2=_tokenizer())  # fmt: skip
    return pipe


def _mistral3(tokenizer, hidden: int):
    """A Mistral-3 text tower deep enough for the layers Flux2Pipeline stacks (10, 20, 30)."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    text = dict(model_type="mistral", vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=16,
                num_hidden_layers=30, num_attention_heads=2, num_key_value_heads=2, head_dim=4,
                max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    vision = dict(model_type="pixtral", hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                  num_attention_heads=2, head_dim=4, image_size=16, patch_size=4)  # fmt: skip
    config = Mistral3Config(text_config=text, vision_config=vision, vocab_size=len(tokenizer))
    return Mistral3ForConditionalGeneration(config).eval()


def flux2_with_encoders():
    """Flux2Pipeline calls its tokenizer's `apply_chat_template` on [system, user] messages: the tiny one's template
    renders the user's text only (the system message's words are not in its vocabulary)."""
    pipe = flux2_pipeline()
    tokenizer = _tokenizer()
    tokenizer.chat_template = (
        "{% for message in messages %}{% if message['role'] == 'user' %}{% for part in message['content'] %}"
        "{{ part['text'] }}{% endfor %}{% endif %}{% endfor %}"
    )
    torch.manual_seed(0)
    pipe.register_modules(text_encoder=_mistral3(tokenizer, 8), tokenizer=tokenizer)
    return pipe


def sd3_with_encoders():
    pipe = sd3_pipeline()
    torch.manual_seed(0)
    pipe.register_modules(text_encoder=_clip(_tokenizer(), 8, 4), tokenizer=_tokenizer(),
                          text_encoder_2=_clip(_tokenizer(), 8, 4), tokenizer_2=_tokenizer(),
                          text_encoder_3=_t5(_tokenizer(), 16), tokenizer_3=_tokenizer())  # fmt: skip
    return pipe


def wan_with_encoders():
    pipe = wan_pipeline()
    torch.manual_seed(0)
    pipe.register_modules(text_encoder=_t5(_tokenizer(), 16, umt5=True), tokenizer=_tokenizer())
    return pipe


def qwen_with_encoders():
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    pipe = qwen_pipeline()
    tokenizer = _tokenizer()
    text = dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]})  # fmt: skip
    vision = dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=16,
                  fullatt_block_indexes=[0])  # fmt: skip
    torch.manual_seed(0)
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, vocab_size=len(tokenizer), hidden_size=16,
                              bos_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    pipe.register_modules(text_encoder=Qwen2_5_VLForConditionalGeneration(config).eval(), tokenizer=tokenizer)
    return pipe


def _user_call(name: str, pipe, condition, noise: torch.Tensor):
    """`pipe(...)` as a user with the cached embeddings calls it, guidance as the family uses it; latents out."""
    n = len(condition)
    common = dict(latents=noise, height=SIZE, width=SIZE, num_inference_steps=STEPS, output_type="latent")
    null = condition.null_embeds.expand(n, -1, -1)
    if name == "flux":  # guidance-distilled: embedded guidance, one row per sample
        return pipe(prompt_embeds=condition.embeds, pooled_prompt_embeds=condition.pooled, guidance_scale=GUIDANCE,
                    **common).images  # fmt: skip
    if name == "flux-true-cfg":  # true CFG as two calls per step, each with the embedded guidance
        return pipe(prompt_embeds=condition.embeds, pooled_prompt_embeds=condition.pooled,
                    negative_prompt_embeds=null, negative_pooled_prompt_embeds=condition.null_pooled.expand(n, -1),
                    true_cfg_scale=TRUE_CFG, guidance_scale=GUIDANCE, **common).images  # fmt: skip
    if name == "flux2":  # guidance-distilled (embedded); the pipeline takes its latents unpacked, [C, h, w]
        side = math.isqrt(noise.shape[1])
        unpacked = noise.transpose(1, 2).reshape(n, noise.shape[2], side, side)
        return pipe(prompt_embeds=condition.embeds, guidance_scale=GUIDANCE, **{**common, "latents": unpacked}).images
    if name == "sd3":  # true CFG, batched
        return pipe(prompt_embeds=condition.embeds, pooled_prompt_embeds=condition.pooled,
                    negative_prompt_embeds=null, negative_pooled_prompt_embeds=condition.null_pooled.expand(n, -1),
                    guidance_scale=GUIDANCE, **common).images  # fmt: skip
    if name == "wan":  # true CFG as two calls per step
        return pipe(prompt_embeds=condition.embeds, negative_prompt_embeds=null, guidance_scale=GUIDANCE,
                    num_frames=FRAMES, **common).frames  # fmt: skip
    if name == "qwenimage":  # true CFG (rescaled to the conditional norm) as two calls per step
        return pipe(prompt_embeds=condition.embeds, prompt_embeds_mask=condition.mask, negative_prompt_embeds=null,
                    negative_prompt_embeds_mask=condition.null_mask.expand(n, -1), true_cfg_scale=GUIDANCE,
                    **common).images  # fmt: skip
    raise AssertionError(name)


GUIDANCE, TRUE_CFG = 3.0, 2.0
BUILDERS = {"flux": flux_with_encoders, "flux2": flux2_with_encoders, "sd3": sd3_with_encoders,
            "wan": wan_with_encoders, "qwenimage": qwen_with_encoders}  # fmt: skip
# each case: (family, the trainer's guidance settings besides guidance_scale)
CASES = {**{name: (name, {}) for name in BUILDERS}, "flux-true-cfg": ("flux", {"true_cfg_scale": TRUE_CFG})}


def saved_teacher(family: str, root: Path):
    """The family's tiny pipeline saved as a teacher directory under `root`, and its prompts' data module (text
    conditions encoded by the pipeline's own encoders): (pipeline, directory, data module)."""
    pipe = BUILDERS[family]()
    teacher = root / "teacher"
    pipe.save_pretrained(teacher)
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    data = PromptDataModule(dataset=str(prompts), text_encoder=str(teacher), column="text", max_length=8,
                            cache_dir=str(root / "cache"), embeds_dtype="float32", samples_per_epoch=2,
                            batch_size=2, shuffle=False)  # fmt: skip
    return pipe, teacher, data


@pytest.mark.parametrize("trainer_class", [RolloutRouterTrainer, ForecastRouterTrainer], ids=["rollout", "forecast"])
@pytest.mark.parametrize("name", list(CASES))
def test_rollout_trainer_on_a_tiny_family_exports_a_policy_its_pipeline_samples_as_the_hard_gate_rollout(
    name, trainer_class, tmp_path
):
    family, guidance = CASES[name]
    pipe, teacher, data = saved_teacher(family, tmp_path)
    module = trainer_class(teacher=str(teacher), steps=STEPS, export_budget=0.75, lr=0.05,
                                  guidance_scale=GUIDANCE, height=SIZE, width=SIZE, num_frames=FRAMES,
                                  **guidance)  # fmt: skip
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, data)
    assert module.global_step == 2
    condition, seeds = next(iter(data.train_dataloader()))
    module.on_fit_start()
    try:
        with torch.no_grad():
            expected = module.rollout(condition.to(module.device), seeds, module.plan_gates())
    finally:
        module.runtime.remove()
        module.runtime = None
    exported = module.export(tmp_path / "policy")
    assert {"height", "width", "num_frames"} <= set(exported.provenance)  # the resolution it was trained at

    pipe = type(pipe).from_pretrained(teacher)  # the unmodified pipeline, as a user loads it
    pipe.set_progress_bar_config(disable=True)
    runtime = l2c.load_policy(tmp_path / "policy").apply(pipe)
    with torch.no_grad():
        images = _user_call(name, pipe, condition, module.noise_for(seeds))
    assert runtime.executed[Action.REUSE] + runtime.executed[Action.FORECAST] > 0
    runtime.remove()
    torch.testing.assert_close(images, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["wan", "flux-true-cfg"])
def test_checkpointed_rollout_gradients_equal_the_plain_ones_with_two_cache_contexts(name, tmp_path):
    """True CFG as two calls keeps a cache per context (cond, uncond): checkpointing restores both before
    recomputing."""
    family, guidance = CASES[name]
    teacher = tmp_path / "teacher"
    BUILDERS[family]().save_pretrained(teacher)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    data = PromptDataModule(dataset=str(prompts), text_encoder=str(teacher), column="text", max_length=8,
                            cache_dir=str(tmp_path / "cache"), embeds_dtype="float32", samples_per_epoch=2,
                            batch_size=2, shuffle=False)  # fmt: skip
    data.prepare_data()
    data.setup()
    condition, seeds = next(iter(data.train_dataloader()))
    grads = []
    for checkpointed in (False, True):
        module = RolloutRouterTrainer(teacher=str(teacher), steps=STEPS, export_budget=0.75, guidance_scale=GUIDANCE,
                                      height=SIZE, width=SIZE, num_frames=FRAMES,
                                      checkpoint_steps=checkpointed, **guidance)  # fmt: skip
        module.on_fit_start()
        try:
            module.training_step((condition, seeds), 0).backward()
        finally:
            module.runtime.remove()
        grads.append(module.router.logits.grad)
    assert bool((grads[0][1:] != 0).any())
    torch.testing.assert_close(grads[1], grads[0], atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize(
    ("family", "value", "message"),
    [
        ("embedded:digits", 2.0, "teacher 'embedded:digits' is not a Flux pipeline"),
        ("sd3", 2.0, "StableDiffusion3Pipeline has no true-CFG mode on top of its guidance"),
        ("qwenimage", 4.0, "QwenImagePipeline has no true-CFG mode on top of its guidance"),
        ("flux", 0.5, "field 'true_cfg_scale' must be ≥ 1"),
    ],
)
def test_true_cfg_scale_is_refused_where_the_teachers_pipeline_has_no_such_mode(family, value, message, tmp_path):
    teacher = family
    if family in BUILDERS:
        teacher = str(tmp_path / "teacher")
        BUILDERS[family]().save_pretrained(teacher)
    with pytest.raises(ValueError, match=re.escape(message)):
        RolloutRouterTrainer(
            teacher=teacher, steps=STEPS, export_budget=0.75, height=SIZE, width=SIZE, true_cfg_scale=value
        )
