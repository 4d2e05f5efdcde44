"""The MMDiT and video families (Flux.1, Flux.2, SD3.5, Wan 2.x, Qwen-Image) in their unmodified pipelines.

Each pipeline is built from tiny configs with a tiny VAE of its own class and no text encoder (the prompt embeddings
are passed to `pipe(...)` directly, as a user with precomputed embeddings calls it), fully offline.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import ClassVar

import pytest
import torch
from diffusers import (
    AutoencoderKLFlux2,
    AutoencoderKLQwenImage,
    AutoencoderKLWan,
    FlowMatchEulerDiscreteScheduler,
    Flux2Pipeline,
    Flux2Transformer2DModel,
    FluxPipeline,
    FluxTransformer2DModel,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    WanPipeline,
    WanTransformer3DModel,
)
from l2c_testing import FixedPlanPolicy, partial_policy, plan_maker, tiny_vae
from torch.utils.flop_counter import FlopCounterMode

import l2c
from l2c import Action
from l2c.adapters import find_blocks, find_branches, model_family
from l2c.policies.blockcache import BlockCachePolicy
from l2c.policies.duca import DuCaPolicy
from l2c.policies.toca import DIT_DDIM50, ToCaPolicy

STEPS = 4


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def _seeded(build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    torch.manual_seed(0)
    return build().eval()


def flux_pipeline() -> FluxPipeline:
    """Guidance-distilled Flux.1 (guidance embedded): one double and one single block, hidden 16."""
    transformer = _seeded(
        lambda: FluxTransformer2DModel(
            in_channels=16,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=16,
            pooled_projection_dim=8,
            guidance_embeds=True,
            axes_dims_rope=(2, 2, 4),
        )
    )
    return FluxPipeline(
        FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True),
        tiny_vae(shift_factor=0.0),
        None,
        None,
        None,
        None,
        transformer,
    )


def flux2_pipeline() -> Flux2Pipeline:
    transformer = _seeded(
        lambda: Flux2Transformer2DModel(
            in_channels=4,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=24,  # three stacked layers of a width-8 text encoder, as Flux2Pipeline encodes
            timestep_guidance_channels=256,
            axes_dims_rope=(4, 4, 4, 4),
        )
    )
    vae = _seeded(
        lambda: AutoencoderKLFlux2(
            sample_size=32,
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            block_out_channels=[4, 4],
            layers_per_block=1,
            latent_channels=1,
            norm_num_groups=1,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
    )
    return Flux2Pipeline(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), vae, None, None, transformer)


def sd3_pipeline() -> StableDiffusion3Pipeline:
    """SD3.5-style: block 0 with dual attention (`attn2`), the last block `context_pre_only` (no `ff_context`)."""
    transformer = _seeded(
        lambda: SD3Transformer2DModel(
            sample_size=8,
            in_channels=4,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=16,
            caption_projection_dim=16,
            pooled_projection_dim=8,
            out_channels=4,
            pos_embed_max_size=16,
            dual_attention_layers=(0,),
        )
    )
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    vae = tiny_vae(shift_factor=0.0)
    return StableDiffusion3Pipeline(transformer, scheduler, vae, None, None, None, None, None, None)


def wan_pipeline() -> WanPipeline:
    transformer = _seeded(
        lambda: WanTransformer3DModel(
            num_attention_heads=2,
            attention_head_dim=8,
            text_dim=16,
            freq_dim=16,
            ffn_dim=32,
            num_layers=2,
            rope_max_seq_len=32,
        )
    )
    vae = _seeded(
        lambda: AutoencoderKLWan(
            base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
        )
    )
    return WanPipeline(None, None, vae, FlowMatchEulerDiscreteScheduler(shift=3.0), transformer)


def qwen_pipeline() -> QwenImagePipeline:
    transformer = _seeded(
        lambda: QwenImageTransformer2DModel(
            in_channels=16,
            out_channels=4,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=16,
            axes_dims_rope=(2, 2, 4),
        )
    )
    vae = _seeded(
        lambda: AutoencoderKLQwenImage(
            base_dim=24,
            z_dim=4,
            dim_mult=[1, 2, 4],
            num_res_blocks=1,
            temperal_downsample=[False, True],
            latents_mean=[0.0] * 4,
            latents_std=[1.0] * 4,
        )
    )
    return QwenImagePipeline(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), vae, None, None, transformer)


def _embeds(generator: torch.Generator, batch: int, *shape: int) -> torch.Tensor:
    """One prompt's embeddings for every row (with one noise generator per row of the same seed: equal samples)."""
    return torch.randn(1, *shape, generator=generator).expand(batch, *shape)


def _noise(batch: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(1) for _ in range(batch)]


def _flux_call(pipe, batch=1, size=32, steps=STEPS, true_cfg_scale=1.0):
    """Embedded guidance, one call per step; with `true_cfg_scale` > 1 also true CFG with a negative prompt, two
    calls per step in `cache_context("cond")` and `("uncond")`, each with the embedded guidance."""
    g = torch.Generator().manual_seed(0)
    negative = {}
    if true_cfg_scale > 1:
        negative = dict(
            negative_prompt_embeds=_embeds(g, batch, 5, 16), negative_pooled_prompt_embeds=_embeds(g, batch, 8)
        )
    return pipe(
        prompt_embeds=_embeds(g, batch, 5, 16),
        pooled_prompt_embeds=_embeds(g, batch, 8),
        **negative,
        true_cfg_scale=true_cfg_scale,
        height=size,
        width=size,
        num_inference_steps=steps,
        guidance_scale=3.5,
        generator=_noise(batch),
        output_type="pt",
    ).images


def _flux2_call(pipe, batch=1, size=32, steps=STEPS):
    g = torch.Generator().manual_seed(0)
    return pipe(
        prompt_embeds=_embeds(g, batch, 5, 24),
        height=size,
        width=size,
        num_inference_steps=steps,
        guidance_scale=4.0,
        generator=_noise(batch),
        output_type="pt",
    ).images


def _sd3_call(pipe, batch=1, size=16, steps=STEPS):
    """True CFG, batched: the transformer sees [uncond; cond] rows in one call."""
    g = torch.Generator().manual_seed(0)
    return pipe(
        prompt_embeds=_embeds(g, batch, 5, 16),
        pooled_prompt_embeds=_embeds(g, batch, 8),
        negative_prompt_embeds=_embeds(g, batch, 5, 16),
        negative_pooled_prompt_embeds=_embeds(g, batch, 8),
        height=size,
        width=size,
        num_inference_steps=steps,
        guidance_scale=5.0,
        generator=_noise(batch),
        output_type="pt",
    ).images


def _wan_call(pipe, batch=1, size=32, steps=STEPS):
    """True CFG as two transformer calls per step, in `cache_context("cond")` and `("uncond")`."""
    g = torch.Generator().manual_seed(0)
    return pipe(
        prompt_embeds=_embeds(g, batch, 5, 16),
        negative_prompt_embeds=_embeds(g, batch, 5, 16),
        height=size,
        width=size,
        num_frames=5,
        num_inference_steps=steps,
        guidance_scale=5.0,
        generator=_noise(batch),
        output_type="pt",
    ).frames


def _qwen_call(pipe, batch=1, size=32, steps=STEPS):
    """True CFG as two transformer calls per step, in `cache_context("cond")` and `("uncond")`."""
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(batch, 5, dtype=torch.long)
    return pipe(
        prompt_embeds=_embeds(g, batch, 5, 16),
        prompt_embeds_mask=mask,
        negative_prompt_embeds=_embeds(g, batch, 5, 16),
        negative_prompt_embeds_mask=mask,
        true_cfg_scale=4.0,
        height=size,
        width=size,
        num_inference_steps=steps,
        generator=_noise(batch),
        output_type="pt",
    ).images


@dataclass(frozen=True)
class Family:
    name: str
    build: Callable
    call: Callable
    branches: tuple[str, ...]  # the plan's columns
    hooked: int  # branch modules hooked (absent ones are not)
    calls_per_step: int  # transformer calls per step (2: cond and uncond contexts)


FAMILIES = {
    f.name: f
    for f in (
        Family("flux", flux_pipeline, _flux_call, ("attn", "ff", "ff_context", "proj_mlp", "proj_out"), 6, 1),
        Family("flux2", flux2_pipeline, _flux2_call, ("attn", "ff", "ff_context"), 4, 1),
        Family("sd3", sd3_pipeline, _sd3_call, ("attn", "attn2", "ff", "ff_context"), 6, 1),
        Family("wan", wan_pipeline, _wan_call, ("attn1", "attn2", "ffn"), 6, 2),
        Family("qwenimage", qwen_pipeline, _qwen_call, ("attn", "img_mlp", "txt_mlp"), 6, 2),
    )
}


# Flux.1 with true CFG on top of its embedded guidance: the cases that count calls per step and contexts run it too.
FLUX_TRUE_CFG = Family("flux", flux_pipeline, partial(_flux_call, true_cfg_scale=4.0), FAMILIES["flux"].branches, 6, 2)
WITH_TRUE_CFG = {**FAMILIES, "flux-true-cfg": FLUX_TRUE_CFG}

_SIZES = {"flux": 32, "flux2": 32, "sd3": 16, "wan": 32, "qwenimage": 32}  # each call's default size


def _pipe(family: Family):
    pipe = family.build()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _flops(run: Callable[[], object]) -> tuple[object, dict[str, int]]:
    with FlopCounterMode(display=False) as counter:
        result = run()
    return result, {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}


def _snapshot(model: torch.nn.Module) -> dict[str, set[str]]:
    """Each module's attributes (the pipelines' own `cache_context` leaves an empty registry on the model)."""
    return {name: set(module.__dict__) for name, module in model.named_modules()}


@pytest.mark.parametrize("name", list(WITH_TRUE_CFG))
def test_full_identical_static_saves_its_flops_and_remove_restores(name):
    family = WITH_TRUE_CFG[name]
    pipe = _pipe(family)
    model = pipe.transformer
    reference, full_flops = _flops(lambda: family.call(pipe))
    before = _snapshot(model)

    runtime = l2c.load_policy("full").apply(pipe)
    assert runtime.spec.family == family.name and runtime.branch_names == family.branches
    assert len(runtime.branches) == family.hooked
    assert torch.equal(family.call(pipe), reference)
    assert runtime.executed == Counter({Action.COMPUTE: STEPS * family.calls_per_step * family.hooked})
    runtime.remove()

    runtime = l2c.load_policy("static:interval=2").apply(pipe)
    cached, static_flops = _flops(lambda: family.call(pipe))
    assert torch.isfinite(cached).all() and not torch.equal(cached, reference)
    half = STEPS // 2 * family.calls_per_step * family.hooked
    assert runtime.executed == Counter({Action.COMPUTE: half, Action.REUSE: half})
    # Exactly the reused half of the branches' work is skipped; everything outside the branches runs as before.
    branch_flops = sum(_branch_flops(model, full_flops).values())
    assert branch_flops > 0
    assert full_flops["Global"] - static_flops["Global"] == branch_flops // 2
    runtime.remove()
    assert torch.equal(family.call(pipe), reference)
    assert _snapshot(model) == before


def _path(model: torch.nn.Module, module: torch.nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


def _branch_flops(model: torch.nn.Module, flops: dict[str, int]) -> dict[tuple[int, str], int]:
    prefix = type(model).__name__
    return {(b.block, b.name): flops.get(f"{prefix}.{_path(model, b.module)}", 0) for b in find_branches(model)}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_a_block_whose_branches_all_reuse_skips_at_least_95_percent_of_its_flops(name):
    family = FAMILIES[name]
    pipe = _pipe(family)
    model = pipe.transformer
    prefix = type(model).__name__
    _, computed = _flops(lambda: family.call(pipe, steps=2))
    runtime = FixedPlanPolicy(plan_maker({1: Action.REUSE})).apply(pipe)
    _, reused = _flops(lambda: family.call(pipe, steps=2))
    runtime.remove()
    for block in find_blocks(model):
        key = f"{prefix}.{_path(model, block)}"
        per_step = computed[key] / 2
        reuse_step = reused[key] - per_step  # step 0 computes in both runs
        assert reuse_step / per_step <= 0.05, (key, reuse_step, per_step)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_taylorseer_forecasts_the_tuple_and_tensor_branches(name):
    family = FAMILIES[name]
    pipe = _pipe(family)
    reference = family.call(pipe, steps=6)
    runtime = l2c.load_policy("taylorseer:interval=2,order=1,warmup=1").apply(pipe)
    cached = family.call(pipe, steps=6)
    assert runtime.executed[Action.FORECAST] > 0
    assert torch.isfinite(cached).all() and not torch.equal(cached, reference)
    assert (cached - reference).abs().max() < 1.0
    runtime.remove()


@pytest.mark.parametrize("name", list(WITH_TRUE_CFG))
def test_batch_independence(name):
    family = WITH_TRUE_CFG[name]
    pipe = _pipe(family)
    runtime = l2c.load_policy("static:interval=2").apply(pipe)
    alone = family.call(pipe)
    pair = family.call(pipe, batch=2)  # the same sample twice: each row must come out as it does alone
    assert pair.shape[0] == 2 and torch.isfinite(pair).all()
    for row in pair:
        assert torch.allclose(row, alone[0], atol=1e-5, rtol=0)
    runtime.remove()


@pytest.mark.parametrize("name", ["wan", "qwenimage", "flux-true-cfg"])
def test_cond_and_uncond_contexts_keep_their_own_cache_and_step(name):
    family = WITH_TRUE_CFG[name]
    pipe = _pipe(family)
    runtime = l2c.load_policy("static:interval=2").apply(pipe)
    states = pipe.transformer._diffusers_hook.get_hook("l2c_step").states
    seen, first = [], {}

    def after_call(module, args, output):  # the pipeline resets the states at its end: read them per call
        name, state = states.context.name, states.get_state()
        seen.append((name, state.step))
        first.setdefault(name, l2c.extension.first_stream(state.stores[(1, family.branches[-1])].output))

    handle = pipe.transformer.register_forward_hook(after_call)
    family.call(pipe)
    handle.remove()
    assert seen == [(context, step) for step in range(STEPS) for context in ("cond", "uncond")]  # not counted twice
    assert not torch.equal(first["cond"], first["uncond"])  # each context caches its own outputs
    half = STEPS // 2 * 2 * family.hooked
    assert runtime.executed == Counter({Action.COMPUTE: half, Action.REUSE: half})
    runtime.remove()


# The per-token branches on image (video) tokens; the joint attentions, the text MLPs, SD3.5's image self-attention,
# Wan's self-attention and Flux.2's fused single-block module compute or reuse (see l2c/adapters.py).
PARTIAL_BRANCHES = {
    "flux": ("ff", "proj_mlp", "proj_out"),
    "flux2": ("ff",),
    "sd3": ("ff",),
    "wan": ("attn2", "ffn"),
    "qwenimage": ("img_mlp",),
}


class OutputRecorder:
    """Plain forward hooks on the named branches: each call's returned output, and what the class's own forward
    (which bypasses the runtime's hook on the instance) computes from the same input, i.e. a fresh computation."""

    def __init__(self, model: torch.nn.Module, names: tuple[str, ...]) -> None:
        self.calls: dict[tuple[int, str], list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.handles = []
        for branch in find_branches(model):
            if branch.name in names:
                self.calls[(branch.block, branch.name)] = []
                hook = self._hook((branch.block, branch.name))
                self.handles.append(branch.module.register_forward_hook(hook, with_kwargs=True))

    def _hook(self, key):
        def hook(module, args, kwargs, output):
            self.calls[key].append((output, type(module).forward(module, *args, **kwargs)))

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@pytest.mark.parametrize("name", list(FAMILIES))
def test_token_partial_on_image_tokens_ratio_one_equals_full_and_a_ratio_below_recomputes_only_the_selected(name):
    family = FAMILIES[name]
    pipe = _pipe(family)
    branches = PARTIAL_BRANCHES[name]
    reference = family.call(pipe)
    runtime = partial_policy(1.0, STEPS, branches=branches).apply(pipe)
    assert (family.call(pipe) - reference).abs().max() <= 1e-6
    hooked = sum(b.name in branches for b in runtime.branches)
    assert runtime.executed[Action.PARTIAL] == (STEPS - 1) * family.calls_per_step * hooked
    runtime.remove()

    runtime = partial_policy(0.5, STEPS, branches=branches).apply(pipe)
    recorder = OutputRecorder(pipe.transformer, branches)
    cached = family.call(pipe)
    recorder.remove()
    runtime.remove()
    assert torch.isfinite(cached).all() and (cached - reference).abs().max() > 1e-6
    per_step = family.calls_per_step  # the calls of one step: one per cache context, each with its own store
    assert len(recorder.calls) == hooked
    for key, calls in recorder.calls.items():
        assert len(calls) == STEPS * per_step, key
        for index in range(per_step, len(calls)):
            output, fresh = calls[index]
            before = calls[index - per_step][0]
            kept = (output == before).all(-1)  # [batch, tokens]: rows returned as the cache held them
            recomputed = (output == fresh).all(-1) & ~kept
            assert (kept | recomputed).all(), key  # every row is either its cached value or a fresh computation
            text = 5 if key[1] in ("proj_mlp", "proj_out") else 0  # Flux single blocks: [text; image], text recomputed
            image = output.shape[1] - text
            selected = round(0.5 * image)
            assert (recomputed.sum(1) == text + selected).all(), key
            assert (kept.sum(1) == image - selected).all(), key
    for other in sorted(set(family.branches) - set(branches)):  # every other branch refuses a partial step
        runtime = partial_policy(0.5, STEPS, branches=(other,)).apply(pipe)
        with pytest.raises(RuntimeError, match=f"block [0-9]+ {other} cannot be recomputed token by token"):
            family.call(pipe)
        runtime.remove()
    assert torch.equal(family.call(pipe), reference)


def _image_tokens(family: Family, pipe, size: int) -> tuple[int, torch.Tensor]:
    """The image (video) token count the transformer sees at `size`, and the run's timestep table."""
    seen = []

    def record(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        seen.append(model_family(module).image_tokens(module, hidden))

    handle = pipe.transformer.register_forward_pre_hook(record, with_kwargs=True)
    runtime = l2c.load_policy("full").apply(pipe)
    family.call(pipe, size=size)
    runtime.remove()
    handle.remove()
    return seen[0], runtime.timesteps.clone()


def _table(timesteps: torch.Tensor) -> str:
    return re.escape(str([round(t, 4) for t in timesteps.tolist()]))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_a_saved_plan_loads_and_another_resolution_needs_step_match_index(name, tmp_path):
    family = FAMILIES[name]
    pipe = _pipe(family)
    size = _SIZES[name]
    tokens, timesteps = _image_tokens(family, pipe, size)
    other_tokens, other_timesteps = _image_tokens(family, pipe, size * 3 // 2)
    assert other_tokens != tokens
    shifts = model_family(pipe.transformer).dynamic_shift
    assert shifts == (not torch.allclose(timesteps, other_timesteps))  # Flux, Flux.2, Qwen-Image: the shift moves
    policy = l2c.load_policy("static:interval=2")
    runtime = policy.apply(pipe)
    expected = family.call(pipe)
    runtime.remove()
    reused = STEPS // 2 * family.calls_per_step * family.hooked

    bound = policy.bind(pipe, timesteps, "FlowMatchEulerDiscreteScheduler", num_tokens=tokens)
    bound.save_pretrained(tmp_path / "policy", model_card=False)
    loaded = l2c.load_policy(tmp_path / "policy")
    assert loaded.target.model.family == name and loaded.target.model.num_tokens == tokens
    runtime = loaded.apply(pipe)
    assert torch.equal(family.call(pipe), expected) and runtime.executed[Action.REUSE] == reused
    runtime.remove()

    # Another resolution is refused: where the shift depends on it, naming both timestep tables; else the token count.
    if shifts:
        refusal = f"field 'timesteps' is {_table(timesteps)} in the policy, {_table(other_timesteps)} in the run"
    else:
        refusal = rf"'num_tokens' \(image tokens\) is {tokens} in the policy, {other_tokens} in the run"
    runtime = loaded.apply(pipe)
    with pytest.raises(ValueError, match=refusal):
        family.call(pipe, size=size * 3 // 2)
    runtime.remove()
    # ... unless matched by step index, explicitly.
    for apply in (
        lambda: l2c.load_policy(tmp_path / "policy", step_match="index").apply(pipe),
        lambda: loaded.apply(pipe, step_match="index"),
    ):
        runtime = apply()
        assert torch.isfinite(family.call(pipe, size=size * 3 // 2)).all()
        assert runtime.executed[Action.REUSE] == reused
        runtime.remove()


@dataclass
class FluxToCa(ToCaPolicy):
    """ToCa with factors for Flux's branch names (`toca.py` has factors for attn1/attn2/ff only): image-token
    partial steps on `ff`, `proj_mlp`, `proj_out`; the attentions and the text MLP reuse between full steps."""

    kind = "toca"
    presets: ClassVar[dict[str, dict]] = {"flux": {**DIT_DDIM50, "score": "none", "ratio": 0.3, "step_weight": 0.0}}
    attn_factor: float = 0.0
    ff_context_factor: float = 0.0
    proj_mlp_factor: float = 1.0
    proj_out_factor: float = 1.0


class FluxDuCa(FluxToCa):
    between_kind = DuCaPolicy.between_kind


@pytest.mark.parametrize("policy", [FluxToCa, FluxDuCa])
def test_toca_and_duca_run_token_partial_on_flux_image_tokens(policy):
    pipe = _pipe(FAMILIES["flux"])
    reference = _flux_call(pipe, steps=6)
    runtime = policy(interval=3).apply(pipe)
    cached = _flux_call(pipe, steps=6)
    assert runtime.executed[Action.PARTIAL] > 0 and runtime.executed[Action.REUSE] > 0
    assert torch.isfinite(cached).all() and not torch.equal(cached, reference)
    assert (cached - reference).abs().max() < 1.0
    runtime.remove()


@pytest.mark.parametrize("name", list(FAMILIES))
@pytest.mark.parametrize("kind", ["toca", "duca"])
def test_stock_toca_and_duca_run_on_each_family_with_its_preset(kind, name):
    """The registered presets (not a test subclass) in each unmodified pipeline: image-token partial steps on the
    per-token branches only, the joint attentions and text MLPs reused between full steps (l2c/policies/toca.py)."""
    family = FAMILIES[name]
    pipe = _pipe(family)
    reference = family.call(pipe, steps=6)
    runtime = l2c.load_policy(f"{kind}:interval=3").apply(pipe)
    cached = family.call(pipe, steps=6)
    plan = runtime.plan
    runtime.remove()
    assert runtime.executed[Action.PARTIAL] > 0 and runtime.executed[Action.REUSE] > 0
    partial = {runtime.branch_names[i] for i in (plan.actions == Action.PARTIAL).nonzero()[:, 2].tolist()}
    assert partial == set(PARTIAL_BRANCHES[name]) & set(runtime.branch_names)
    assert torch.isfinite(cached).all() and not torch.equal(cached, reference)
    assert (cached - reference).abs().max() < 1.0


def test_toca_refuses_a_model_it_has_no_branch_factors_for():
    spec = l2c.ModelSpec("generic", num_blocks=1, branches=("mystery",), hidden_size=8, num_tokens=None)
    with pytest.raises(ValueError, match=r"no branch factor for \['mystery'\] of this model \(generic\)"):
        ToCaPolicy().resolved(spec)


@pytest.mark.parametrize("score", ["attention", "cross_entropy"])
def test_toca_refuses_a_query_key_score_on_wan(score):
    pipe = _pipe(FAMILIES["wan"])
    with pytest.raises(ValueError, match=f"score '{score}' cannot be read on wan"):
        l2c.load_policy(f"toca:score={score}").apply(pipe)


def _step_states(pipe) -> Callable[[], object]:
    """The running trajectory state of the current cache context (read in a forward hook, before the pipeline's end
    resets it)."""
    states = pipe.transformer._diffusers_hook.get_hook("l2c_step").states
    return states.get_state


# Any change below 10 (every change these tiny models make): compute again two steps later. Steps 0 and 1 compute,
# step 1 measures the first change, so step 2 reuses and step 3 computes: a quarter of the branch work is skipped.
ADACACHE_EVERY_2 = "adacache:codebook=10:2"


@pytest.mark.parametrize("name", list(WITH_TRUE_CFG))
def test_adacache_probes_each_familys_attention_and_skips_the_reused_steps_flops(name):
    family = WITH_TRUE_CFG[name]
    pipe = _pipe(family)
    model = pipe.transformer
    reference, full_flops = _flops(lambda: family.call(pipe))
    runtime = l2c.load_policy(ADACACHE_EVERY_2).apply(pipe)
    state_of, seen = _step_states(pipe), {}

    def after_call(module, args, output):
        state = state_of()
        seen[id(state)] = state.signals["adacache"]

    handle = model.register_forward_hook(after_call)
    cached, ada_flops = _flops(lambda: family.call(pipe))
    handle.remove()
    runtime.remove()
    assert len(seen) == family.calls_per_step  # one per cache context, each deciding on its own
    middle = runtime.spec.num_blocks // 2
    for ada in seen.values():
        assert ada.probe == (middle, family.branches[0])  # the (self/joint) attention, which every block has
        rows = len(ada.next_compute)  # SD3: [uncond; cond], each row deciding on its own
        actions = (Action.COMPUTE, Action.COMPUTE, Action.REUSE, Action.COMPUTE)
        assert ada.history == [(step, [int(action)] * rows) for step, action in enumerate(actions)]
        assert [step for step, _, _ in ada.changes] == [1, 3]
        assert all(0 < change < 10 for _, _, changes in ada.changes for change in changes)
    quarter = family.calls_per_step * family.hooked
    assert runtime.executed == Counter({Action.COMPUTE: 3 * quarter, Action.REUSE: quarter})
    branch_flops = sum(_branch_flops(model, full_flops).values())
    assert branch_flops > 0 and full_flops["Global"] - ada_flops["Global"] == branch_flops // STEPS
    assert torch.isfinite(cached).all() and not torch.equal(cached, reference)


@pytest.mark.parametrize("name", list(WITH_TRUE_CFG))
def test_adacache_rows_decide_apart_on_each_family(name):
    """Two copies of one sample; the second is made to compute at every step (the uncached sample), the first
    reuses step 2 as it does alone: there only the second's rows run, through every family's branches."""
    family = WITH_TRUE_CFG[name]
    pipe = _pipe(family)
    uncached = family.call(pipe)
    runtime = l2c.load_policy(ADACACHE_EVERY_2).apply(pipe)
    alone = family.call(pipe)
    state_of = _step_states(pipe)

    def after_call(module, args, output):
        state = state_of()
        second = torch.arange(state.batch_size) % 2 == 1  # its rows (SD3 batches [uncond; cond]: rows 1 and 3)
        state.signals["adacache"].next_compute[second] = state.step + 1

    handle = pipe.transformer.register_forward_hook(after_call)
    pair = family.call(pipe, batch=2)
    handle.remove()
    runtime.remove()
    assert torch.allclose(pair[0], alone[0], atol=1e-5, rtol=0)
    assert torch.allclose(pair[1], uncached[0], atol=1e-5, rtol=0)
    assert not torch.allclose(alone[0], uncached[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("name", "option", "block", "has"),
    [
        ("flux", "probe_branch=ff", 1, ["attn", "proj_mlp", "proj_out"]),
        ("sd3", "probe_branch=attn2", 1, ["attn", "ff"]),
    ],
)
def test_adacache_refuses_a_probe_slot_no_module_executes(name, option, block, has):
    """Flux's middle block is a single block (no `ff`); SD3.5's dual attention is on block 0 only."""
    pipe = _pipe(FAMILIES[name])
    branch = option.partition("=")[2]
    refusal = f"block {block} of this model ({name}) has no {branch!r} branch (it has {has}), so the probe would never"
    with pytest.raises(ValueError, match=re.escape(refusal)):
        l2c.load_policy(f"adacache:{option}").apply(pipe)
    l2c.load_policy(f"adacache:{option},probe_block=0").apply(pipe).remove()  # block 0 has it
    with pytest.raises(ValueError, match=r"field 'probe_branch' is 'attn1'; the model's branches are \['attn'"):
        l2c.load_policy("adacache:probe_branch=attn1").apply(pipe)  # an explicit (or saved) attn1 means attn1


@pytest.mark.parametrize("name", list(WITH_TRUE_CFG))
def test_blockcache_calibrates_on_each_family_and_skips_exactly_its_reused_branches(name, tmp_path):
    family = WITH_TRUE_CFG[name]
    pipe = _pipe(family)
    model = pipe.transformer
    _, full_flops = _flops(lambda: family.call(pipe))
    calibrated = BlockCachePolicy().calibrate(pipe, lambda: family.call(pipe))
    assert calibrated.provenance["calibration"] == {"runs": 1, "model_calls": STEPS * family.calls_per_step}
    spec = calibrated.target.model
    present = spec.present()
    change = calibrated.change
    assert change.shape == (STEPS, spec.num_blocks, len(family.branches))
    assert (change[0] == 0).all() and (change[:, ~present] == 0).all()
    assert (change[1:, present] > 0).all()  # every executed branch measured, joint (tuple) outputs included
    # A threshold among the measured changes: some branches reuse, some compute.
    policy = dataclasses.replace(calibrated, threshold=float(change[1:, present].median()))
    runtime = policy.apply(pipe)
    cached, flops = _flops(lambda: family.call(pipe))
    runtime.remove()
    reused = (runtime.plan.actions == Action.REUSE) & present
    assert reused.any() and (~reused[1:] & present).any()
    assert runtime.executed[Action.REUSE] == int(reused.sum()) * family.calls_per_step
    index = {branch: i for i, branch in enumerate(family.branches)}
    saved = sum(
        int(reused[:, block, index[branch]].sum()) * work // STEPS
        for (block, branch), work in _branch_flops(model, full_flops).items()
    )
    assert saved > 0 and full_flops["Global"] - flops["Global"] == saved
    policy.save_pretrained(tmp_path / "policy", model_card=False)
    loaded = l2c.load_policy(tmp_path / "policy")
    assert torch.equal(loaded.change, change) and loaded.threshold == policy.threshold
    runtime = loaded.apply(pipe)
    assert torch.equal(family.call(pipe), cached)
    runtime.remove()


@pytest.mark.parametrize("name", list(FAMILIES))
def test_dato_refuses_the_mmdit_and_video_families_saying_why_and_what_works(name):
    pipe = _pipe(FAMILIES[name])
    with pytest.raises(ValueError, match=f"dato policy: the {name} family is not supported") as refusal:
        l2c.load_policy("dato:interval=2").apply(pipe)
    message = str(refusal.value)
    assert "BasicTransformerBlock self-attention (DiT, PixArt, SD UNets)" in message
    assert "use static, toca or duca (token-partial on image tokens), taylorseer, adacache or blockcache" in message
    assert ("rotary" in message) == (name != "sd3")
