"""DaTo: dynamics, token grids, base tokens and pruning on hand-made tensors; end to end on a tiny DiT, a tiny
Stable-Diffusion-style UNet2DConditionModel and the embedded teacher (exact equality at prune 0, exact token
counts and FLOPs when pruning)."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DDIMScheduler
from l2c_testing import ddim_sample, ddim_timesteps, dit_inputs, tiny_dit, tiny_unet

import infer
import l2c
from l2c import Action
from l2c.adapters import find_blocks
from l2c.metrics import count_flops
from l2c.policies import AdaCachePolicy, DaToPolicy, DuCaPolicy, StaticPolicy, ToCaPolicy
from l2c.policies.dato import (
    DYNAMICS,
    PRUNING,
    base_tokens,
    dynamics_map,
    epsilon,
    prune_tokens,
    token_dynamics,
    token_grid,
)


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def trajectory(model):
    """The (single, default-context) trajectory state of a hooked model."""
    states = model._diffusers_hook.get_hook("l2c_step").states._state_cache
    assert len(states) == 1
    return next(iter(states.values()))


class TokenCounter:
    """Tokens fed to every attn1's `to_q` and `to_k` (never hooked by l2c: they run only when attn1 computes)."""

    def __init__(self, model) -> None:
        self.queries: list[tuple[int, int]] = []  # (block, tokens)
        self.keys: list[tuple[int, int]] = []
        self.handles = []
        for index, block in enumerate(find_blocks(model)):
            for name, log in (("to_q", self.queries), ("to_k", self.keys)):
                hook = self._hook(index, log)
                self.handles.append(getattr(block.attn1, name).register_forward_hook(hook))

    @staticmethod
    def _hook(index, log):
        def hook(module, args, output):
            log.append((index, int(args[0].shape[1])))

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


# == hand-made tensors =============================================================================================
def test_dynamics_map_averages_the_change_over_channels():
    before = torch.zeros(1, 2, 2, 2)
    now = torch.tensor([[[[1.0, -2.0], [0.0, 4.0]], [[3.0, 2.0], [0.0, -4.0]]]])
    assert torch.equal(dynamics_map(now, before), torch.tensor([[[2.0, 2.0], [0.0, 4.0]]]))


def test_epsilon_drops_learned_sigma_channels():
    learned_sigma = tiny_dit(out_channels=8)
    sample = torch.arange(2 * 8 * 2 * 2, dtype=torch.float32).view(2, 8, 2, 2)
    assert torch.equal(epsilon(learned_sigma, sample), sample[:, :4])
    assert torch.equal(epsilon(tiny_unet(), sample[:, :4]), sample[:, :4])


@pytest.mark.parametrize(
    ("tokens", "height", "width", "grid"),
    [
        (64, 16, 16, (8, 8)),  # DiT, patch 2
        (192, 16, 12, (16, 12)),  # UNet, latent level
        (48, 16, 12, (8, 6)),  # UNet, one downsampling
        (9, 5, 5, (3, 3)),  # padded convolution: ceil(5 / 2)
        (4, 3, 3, (2, 2)),
    ],
)
def test_token_grid_rule(tokens, height, width, grid):
    assert token_grid(tokens, height, width) == grid


def test_token_grid_rejects_token_counts_that_tile_no_grid():
    with pytest.raises(ValueError, match="50 tokens.*16×16"):
        token_grid(50, 16, 16)


def test_token_dynamics_averages_the_pixels_of_each_token():
    pixels = torch.arange(16, dtype=torch.float32).view(1, 4, 4)
    assert torch.equal(token_dynamics(pixels, 2, 2), torch.tensor([[2.5, 4.5, 10.5, 12.5]]))
    assert torch.equal(token_dynamics(pixels, 4, 4), pixels.view(1, 16))


def test_base_tokens_are_the_most_dynamic_token_of_every_cell():
    # A 4×4 token grid, 2×2 cells; per cell the highest dynamics (second row: ties go to the lowest index).
    dynamics = torch.tensor(
        [
            [
                [0.1, 0.9, 0.2, 0.3],
                [0.4, 0.2, 0.8, 0.1],
                [0.5, 0.5, 0.0, 0.0],
                [0.6, 0.1, 0.0, 0.7],
            ],
            [
                [1.0, 1.0, 0.0, 0.0],
                [1.0, 1.0, 0.0, 0.0],
                [0.0, 0.0, 0.0, 0.0],
                [0.0, 0.0, 0.0, 0.0],
            ],
        ]
    )
    assert base_tokens(dynamics.view(2, 16), 4, 4, 2).tolist() == [[1, 6, 12, 15], [0, 2, 8, 10]]
    # A 3×2 grid: the edge row is a cell of its own (1×2).
    ragged = torch.tensor([[0.0, 1.0, 2.0, 0.0, 0.0, 5.0]])
    assert base_tokens(ragged, 3, 2, 2).tolist() == [[2, 5]]


def crafted_features() -> torch.Tensor:
    """6 tokens with known cosines: 0 = e1 and 3 = e2 are the bases; 1 ≈ e1 (0.995), 4 ≈ e2 (0.981),
    2 between e2 and e3 (0.707 to e2), 5 = e3 (0 to both bases)."""
    return torch.tensor(
        [
            [1.0, 0.0, 0.0],
            [1.0, 0.1, 0.0],
            [0.0, 1.0, 1.0],
            [0.0, 1.0, 0.0],
            [0.2, 1.0, 0.0],
            [0.0, 0.0, 1.0],
        ]
    ).unsqueeze(0)


def pruned_set(pruning, num_tokens: int) -> list[list[int]]:
    return [sorted(set(range(num_tokens)) - set(row)) for row in pruning.kept.tolist()]


def test_prune_tokens_drops_the_tokens_most_similar_to_their_base():
    pruning = prune_tokens(crafted_features(), torch.tensor([[0, 3]]), 2)
    assert pruned_set(pruning, 6) == [[1, 4]]
    assert pruning.kept.tolist() == [[0, 2, 3, 5]]
    # 1 restores from token 0 (kept position 0), 4 from token 3 (position 2); kept tokens map to themselves.
    assert pruning.source.tolist() == [[0, 0, 1, 2, 2, 3]]


def test_prune_tokens_restore_ties_go_to_the_lowest_kept_token():
    pruning = prune_tokens(crafted_features(), torch.tensor([[0, 3]]), 3)
    assert pruned_set(pruning, 6) == [[1, 2, 4]]  # 2 (0.707 to e2) before 5 (0)
    # 2 is equally similar to 3 and 5 (0.707): restored from 3, the lower index (kept position 1).
    assert pruning.kept.tolist() == [[0, 3, 5]]
    assert pruning.source.tolist() == [[0, 0, 1, 1, 1, 2]]


def test_prune_tokens_decides_each_sample_alone():
    features = torch.cat([crafted_features(), crafted_features().flip(1)])  # row 1: token i is row 0's 5 − i
    pruning = prune_tokens(features, torch.tensor([[0, 3], [5, 2]]), 2)
    assert pruned_set(pruning, 6) == [[1, 4], [1, 4]]
    assert pruning.kept.tolist() == [[0, 2, 3, 5], [0, 2, 3, 5]]
    assert pruning.source.tolist() == [[0, 0, 1, 2, 2, 3], [0, 1, 1, 2, 3, 3]]


# == end to end on a tiny DiT ======================================================================================
STEPS = 6  # static interval 2: full steps 0, 2, 4; DaTo prunes from step 2 (dynamics need two outputs)


def dato_run(model, policy, x, labels):
    runtime = policy.apply(model, timesteps=ddim_timesteps(STEPS))
    (final, outputs), flops = count_flops(lambda: ddim_sample(model, x, labels, STEPS))
    return runtime, final, outputs, flops


def test_dato_without_pruning_is_exactly_the_schedule_alone():
    model = tiny_dit()
    x, labels = dit_inputs(batch=2)
    results = []
    for policy in (StaticPolicy(interval=2), DaToPolicy(interval=2, prune=0.0)):
        runtime, final, _, flops = dato_run(model, policy, x, labels)
        results.append((final, flops, dict(runtime.executed)))
        runtime.remove()
    assert torch.equal(results[0][0], results[1][0])
    assert results[0][1:] == results[1][1:]


def test_dato_dynamics_are_the_change_of_epsilon_without_sigma():
    model = tiny_dit(out_channels=8)
    x, labels = dit_inputs(batch=2)
    runtime, _, outputs, _ = dato_run(model, DaToPolicy(interval=2, prune=0.5), x, labels)
    expected = (outputs[-1][:, :4] - outputs[-2][:, :4]).abs().mean(dim=1)
    assert torch.equal(trajectory(model).signals[DYNAMICS], expected)
    runtime.remove()


def test_dato_prunes_queries_and_keys_and_restores_from_kept_outputs():
    model = tiny_dit()
    x, labels = dit_inputs(batch=2)
    counter = TokenCounter(model)
    outputs: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {0: [], 1: []}
    handles = [
        block.attn1.register_forward_hook(lambda m, a, o, i=i: outputs[i].append((a[0], o)))
        for i, block in enumerate(model.transformer_blocks)
    ]
    runtime, *_ = dato_run(model, DaToPolicy(interval=2, prune=0.5), x, labels)
    counter.remove()
    for handle in handles:
        handle.remove()
    # 16 tokens, 4 bases, prune 0.5 → 8 pruned; step 0 computes all 16; steps 2 and 4 run on 8 tokens.
    assert counter.queries == [(0, 16), (1, 16)] + [(0, 8), (1, 8)] * 2
    assert counter.keys == counter.queries  # pruned tokens are not keys/values either
    for block, attn in enumerate(b.attn1 for b in model.transformer_blocks):
        step, pruning = trajectory(model).signals[(PRUNING, block)]
        assert step == 4
        hidden, restored = outputs[block][4]
        kept = hidden.gather(1, pruning.kept.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        fresh = type(attn).forward(attn, kept)  # self-attention among the kept tokens only
        expected = fresh.gather(1, pruning.source.unsqueeze(-1).expand(-1, -1, fresh.shape[-1]))
        assert torch.equal(restored, expected)
        assert torch.equal(outputs[block][5][1], restored)  # step 5 reuses the restored output
    runtime.remove()


def test_dato_flops_drop_by_the_pruned_attention_minus_the_scoring():
    model = tiny_dit()
    x, labels = dit_inputs(batch=2)
    flops = {}
    for policy in (StaticPolicy(interval=2), DaToPolicy(interval=2, prune=0.5)):
        runtime, *_, flops[policy.kind] = dato_run(model, policy, x, labels)
        runtime.remove()
    attn = model.transformer_blocks[0].attn1
    batch, tokens, kept, bases, channels = 2, 16, 8, 4, 16
    _, attn_all = count_flops(lambda: attn(torch.randn(batch, tokens, channels)))
    _, attn_kept = count_flops(lambda: attn(torch.randn(batch, kept, channels)))
    pruned = tokens - kept
    scoring = 2 * batch * channels * ((tokens - bases) * bases + pruned * kept)  # the two similarity products
    pruned_calls = 2 * 2  # steps 2 and 4, two blocks
    assert flops["static"] - flops["dato"] == pruned_calls * (attn_all - attn_kept - scoring)


def test_dato_sample_alone_equals_sample_in_a_batch():
    model = tiny_dit()
    x, labels = dit_inputs(batch=3, seed=5)
    runtime = DaToPolicy(interval=2, prune=0.5).apply(model, timesteps=ddim_timesteps(STEPS))
    alone, _ = ddim_sample(model, x[1:2], labels[1:2], STEPS)
    batch, _ = ddim_sample(model, x, labels, STEPS)
    assert (alone[0] - batch[1]).abs().max() <= 1e-5
    runtime.remove()


def test_dato_pruning_ff_too_shares_the_block_decision():
    model = tiny_dit()
    x, labels = dit_inputs(batch=2)
    ff_tokens = []
    handles = [
        b.ff.net[0].register_forward_hook(lambda m, a, o: ff_tokens.append(a[0].shape[1])) for b in find_blocks(model)
    ]
    runtime, *_ = dato_run(model, DaToPolicy(interval=2, prune=0.5, branches="attn1+ff"), x, labels)
    for handle in handles:
        handle.remove()
    assert ff_tokens == [16, 16] + [8, 8] * 2
    runtime.remove()


# == a Stable-Diffusion-style UNet2DConditionModel =================================================================
def unet_sample(model, latents: torch.Tensor, text: torch.Tensor, num_steps: int) -> torch.Tensor:
    """DDIM on a text-conditioned UNet, called as StableDiffusionPipeline calls it (positional sample, timestep)."""
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(num_steps)
    x = latents.clone()
    for t in scheduler.timesteps:
        eps = model(x, t, encoder_hidden_states=text).sample
        x = scheduler.step(eps, t, x).prev_sample
    return x


def unet_inputs(batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    return torch.randn(batch, 4, 16, 12, generator=g), torch.randn(batch, 5, 32, generator=g)  # a 16×12 latent


def test_unet_blocks_are_found_in_execution_order():
    model = tiny_unet()
    assert [b.attn1.to_q.in_features for b in find_blocks(model)] == [32, 64, 32, 32]  # down 0, mid, up 1 ×2
    spec = l2c.adapters.model_spec(model)
    assert (spec.family, spec.num_blocks, spec.branches) == ("generic", 4, ("attn1", "attn2", "ff"))


def test_dato_on_a_unet_prunes_each_resolution_on_its_own_grid():
    model = tiny_unet()
    latents, text = unet_inputs()
    timesteps = ddim_timesteps(STEPS)
    uncached = unet_sample(model, latents, text, STEPS)
    with DaToPolicy(interval=1, prune=0.0).apply(model, timesteps=timesteps):
        assert torch.equal(unet_sample(model, latents, text, STEPS), uncached)
    with StaticPolicy(interval=2).apply(model, timesteps=timesteps):
        static = unet_sample(model, latents, text, STEPS)
    with DaToPolicy(interval=2, prune=0.0).apply(model, timesteps=timesteps):
        assert torch.equal(unet_sample(model, latents, text, STEPS), static)
    counter = TokenCounter(model)
    with DaToPolicy(interval=2, prune=0.4).apply(model, timesteps=timesteps):
        pruned = unet_sample(model, latents, text, STEPS)
    counter.remove()
    # 16×12 = 192 tokens at the latent level (floor(76.8) = 76 pruned), 8×6 = 48 below (19 pruned).
    full = [(0, 192), (1, 48), (2, 192), (3, 192)]
    assert counter.queries == full + [(0, 116), (1, 29), (2, 116), (3, 116)] * 2
    assert counter.keys == counter.queries
    assert torch.isfinite(pruned).all() and not torch.equal(pruned, static)


def test_unet_flops_fall_when_pruning():
    model = tiny_unet()
    latents, text = unet_inputs()
    flops = {}
    for prune in (0.0, 0.4):
        with DaToPolicy(interval=2, prune=prune).apply(model, timesteps=ddim_timesteps(STEPS)):
            _, flops[prune] = count_flops(lambda: unet_sample(model, latents, text, STEPS))
    assert flops[0.4] < flops[0.0]


@pytest.mark.parametrize(
    ("policy", "action"),
    [(ToCaPolicy(), Action.PARTIAL), (DuCaPolicy(), Action.PARTIAL), (AdaCachePolicy(), Action.REUSE)],
)
def test_the_other_training_free_policies_run_on_a_unet(policy, action):
    model = tiny_unet()
    latents, text = unet_inputs()
    with policy.apply(model, timesteps=ddim_timesteps(STEPS)) as runtime:
        out = unet_sample(model, latents, text, STEPS)
    assert torch.isfinite(out).all() and runtime.executed[action] > 0


# == presets, errors, saving, infer.py =============================================================================
def test_preset_loads_with_its_options():
    policy = l2c.load_policy("dato:interval=3,prune=0.5,branches=attn1+ff")
    assert type(policy) is DaToPolicy
    assert policy.params() == {
        "interval": 3,
        "first_full": 0,
        "last_full": 0,
        "prune": 0.5,
        "cell": 2,
        "branches": "attn1+ff",
        "schedule": "",
    }


@pytest.mark.parametrize(
    ("preset", "word"),
    [
        ("dato:prune=1", "prune"),
        ("dato:prune=-0.1", "prune"),
        ("dato:cell=1", "cell"),
        ("dato:branches=attn3", "branches"),
        ("dato:interval=0", "dato policy: field 'interval'"),
    ],
)
def test_bad_presets_raise_value_error(preset, word):
    with pytest.raises(ValueError, match=word):
        l2c.load_policy(preset)


def test_pruned_branch_must_exist_in_the_model():
    with pytest.raises(ValueError, match="attn2"):
        DaToPolicy(branches="attn2").apply(tiny_dit(), timesteps=ddim_timesteps(4))


def test_save_and_load_round_trip(tmp_path):
    bound = DaToPolicy(interval=3, prune=0.3).bind(tiny_dit(), ddim_timesteps(STEPS), "DDIMScheduler")
    loaded = l2c.load_policy(bound.save_pretrained(tmp_path / "p"))
    assert type(loaded) is DaToPolicy and loaded.params() == bound.params()


def test_infer_samples_with_dato_and_counts_the_scoring(tmp_path):
    argv = ["sample", "--model", "embedded:digits", "--steps", "6", "--scheduler", "ddim", "--num-samples", "2"]
    ratios = {}
    for preset in ("static:interval=2", "dato:interval=2,prune=0.5"):
        out = tmp_path / preset.replace(":", "_")
        assert infer.main([*argv, "--seed", "0", "--out", str(out), "--no-progress", "--policy", preset]) == 0
        ratios[preset] = json.loads((out / "report.json").read_text())["flops_ratio"]
    assert ratios["dato:interval=2,prune=0.5"] < ratios["static:interval=2"]
