"""Tiny real diffusers models, hand-made plans and recorders shared by the l2c tests (no network, fp32, CPU)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiTPipeline,
    DiTTransformer2DModel,
    DPMSolverMultistepScheduler,
    PixArtAlphaPipeline,
    PixArtTransformer2DModel,
    UNet2DConditionModel,
)
from torch import nn

import l2c

DIT_KWARGS = dict(
    num_attention_heads=2,
    attention_head_dim=8,
    in_channels=4,
    num_layers=2,
    sample_size=8,
    patch_size=2,
    num_embeds_ada_norm=10,
)
PIXART_KWARGS = dict(
    num_attention_heads=2,
    attention_head_dim=8,
    in_channels=4,
    out_channels=8,
    num_layers=2,
    cross_attention_dim=16,
    caption_channels=16,
    sample_size=8,
    patch_size=2,
    norm_num_groups=1,
)

# Stable-Diffusion-style: BasicTransformerBlocks inside Transformer2DModels at two resolutions (latent and latent / 2).
UNET_KWARGS = dict(
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=1,
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=8,
    sample_size=16,
)


def tiny_dit(seed: int = 0, **overrides) -> DiTTransformer2DModel:
    torch.manual_seed(seed)
    return DiTTransformer2DModel(**{**DIT_KWARGS, **overrides}).eval()


def tiny_pixart(seed: int = 0, **overrides) -> PixArtTransformer2DModel:
    torch.manual_seed(seed)
    return PixArtTransformer2DModel(**{**PIXART_KWARGS, **overrides}).eval()


def tiny_unet(seed: int = 0, **overrides) -> UNet2DConditionModel:
    """A tiny text-conditioned UNet: 4 BasicTransformerBlocks (down 0, mid, up 1 twice), hidden 32 or 64."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(**{**UNET_KWARGS, **overrides}).eval()


def tiny_vae(seed: int = 0, **config) -> AutoencoderKL:
    """A 2-level KL VAE; `config` adds to it (e.g. Flux's and SD3's `shift_factor`)."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        block_out_channels=[8, 8],
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
        **config,
    ).eval()


def tiny_dit_pipeline(scheduler=None, seed: int = 0) -> DiTPipeline:
    """An unmodified DiTPipeline; 1000 class embeddings so that classifier-free guidance's null class 1000 exists."""
    transformer = tiny_dit(seed, out_channels=8, num_embeds_ada_norm=1000)
    pipe = DiTPipeline(transformer=transformer, vae=tiny_vae(seed), scheduler=scheduler or DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_tokenizer():
    """A T5-style fast tokenizer built offline: word-level vocabulary trained in-process, `</s>` appended."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = ["a photo of a cat", "a red dog on the green grass", "an astronaut riding a horse on the moon"]
    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=["<pad>", "</s>", "<unk>"]))
    eos = tokenizer.token_to_id("</s>")
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", eos)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def tiny_pixart_pipeline(scheduler=None, seed: int = 0) -> PixArtAlphaPipeline:
    from transformers import T5Config, T5EncoderModel

    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=PIXART_KWARGS["caption_channels"],
        d_kv=8,
        d_ff=32,
        num_layers=1,
        num_heads=2,
        relative_attention_num_buckets=8,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    text_encoder = T5EncoderModel(config).eval()
    pipe = PixArtAlphaPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=tiny_vae(seed),
        transformer=tiny_pixart(seed),
        scheduler=scheduler or DPMSolverMultistepScheduler(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def ddim_timesteps(num_steps: int) -> torch.Tensor:
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(num_steps)
    return scheduler.timesteps.clone()


def dit_inputs(batch: int = 1, seed: int = 1, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 4, size, size, generator=generator)
    labels = torch.randint(0, 10, (batch,), generator=generator)
    return latents, labels


@torch.no_grad()
def ddim_sample(model: nn.Module, latents: torch.Tensor, labels: torch.Tensor, num_steps: int):
    """A DDIM sampling run with a DiT: returns the final latents and the model output of every step."""
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(num_steps)
    x, outputs = latents.clone(), []
    for t in scheduler.timesteps:
        eps = model(x, timestep=t.expand(x.shape[0]), class_labels=labels).sample
        outputs.append(eps)
        x = scheduler.step(eps[:, :4], t, x).prev_sample
    return x, outputs


@dataclass
class FixedPlanPolicy(l2c.CachePolicy):
    """A test policy: `make(spec, num_steps)` builds the plan; `selector` optionally replaces the token selector."""

    kind = "test"
    make: Callable[[l2c.ModelSpec, int], l2c.Plan]
    selector: Callable | None = None

    def build_plan(self, spec: l2c.ModelSpec, num_steps: int) -> l2c.Plan:
        return self.make(spec, num_steps)

    def token_selector(self):
        return self.selector if self.selector is not None else super().token_selector()


def plan_maker(actions_by_step: dict[int, int], ratio: float = 1.0, branches: tuple[str, ...] | None = None):
    """Every step computes except those in `actions_by_step` (step -> Action), applied to `branches` (all if None)."""

    def make(spec: l2c.ModelSpec, num_steps: int) -> l2c.Plan:
        plan = l2c.Plan.full(num_steps, spec.num_blocks, len(spec.branches))
        columns = [i for i, name in enumerate(spec.branches) if branches is None or name in branches]
        for step, action in actions_by_step.items():
            plan.actions[step, :, columns] = int(action)
            if action == l2c.Action.PARTIAL:
                plan.token_ratio[step, :, columns] = ratio
        return plan

    return make


def partial_policy(ratio: float, num_steps: int, branches=None, selector=None) -> FixedPlanPolicy:
    steps = {s: l2c.Action.PARTIAL for s in range(1, num_steps)}
    return FixedPlanPolicy(plan_maker(steps, ratio, branches), selector)


class BranchRecorder:
    """Plain torch forward hooks on every attn1/attn2/ff: records what each branch module returned, per call.

    With `fresh=True` it also recomputes the branch from scratch with the class's own forward (which bypasses the
    diffusers hooks that live on the instance), i.e. what COMPUTE would have returned for the same input.
    """

    def __init__(self, model: nn.Module, fresh: bool = False) -> None:
        self.calls: dict[tuple[int, str], list[dict]] = {}
        self.handles = []
        for index, block in enumerate(model.transformer_blocks):
            for name in ("attn1", "attn2", "ff"):
                module = getattr(block, name, None)
                if module is not None:
                    self.calls[(index, name)] = []
                    hook = self._hook((index, name), fresh)
                    self.handles.append(module.register_forward_hook(hook, with_kwargs=True))

    def _hook(self, key, fresh):
        def hook(module, args, kwargs, output):
            record = {"output": output, "input": args[0] if args else kwargs["hidden_states"]}
            if fresh:
                with torch.no_grad():
                    record["fresh"] = type(module).forward(module, *args, **kwargs)
            self.calls[key].append(record)

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class ComputeCounter:
    """Counts real computations of each branch via forward hooks on `attn1.to_q` and `ff.net[0]` (never hooked by
    l2c, only called when the branch actually runs), with the number of tokens each computation processed."""

    def __init__(self, model: nn.Module) -> None:
        self.tokens: list[tuple[int, str, int]] = []  # (block, branch, tokens computed)
        self.keys: list[tuple[int, int]] = []  # (block, tokens fed to attn1.to_k)
        self.handles = []
        for index, block in enumerate(model.transformer_blocks):
            for name, module in (("attn1", block.attn1.to_q), ("ff", block.ff.net[0])):
                self.handles.append(module.register_forward_hook(self._hook(index, name)))
            self.handles.append(block.attn1.to_k.register_forward_hook(self._key_hook(index)))

    def _hook(self, index, name):
        def hook(module, args, output):
            self.tokens.append((index, name, int(args[0].shape[1])))

        return hook

    def _key_hook(self, index):
        def hook(module, args, output):
            self.keys.append((index, int(args[0].shape[1])))

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
