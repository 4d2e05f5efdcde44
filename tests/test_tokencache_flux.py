"""TokenCache on Flux.1 (`embedded:digits-flux`): the trainer's blend on the token-wise branches, the export's plan
partial exactly there, and what `infer.py sample` executes is that plan; a block class without a `ScoredBlock` is
refused (the other families: tests/test_tokencache_families.py)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from diffusers.models.resnet import ResnetBlock2D
from test_tokencache import quiet_trainer

import l2c
from data.conditions import ClassConditionDataModule
from l2c import Action
from l2c.adapters import BLOCK_FAMILIES
from l2c.hooks import on_first_block
from l2c.policies.tokencache import TokenCachePolicy, token_partial_slots
from l2c.token_importance import SCORED_BLOCKS, TokenImportancePredictor, scored_block
from predictors.tokencache_trainer import TokenCacheTrainer

STEPS = 4
# embedded:digits-flux: 2 double blocks (attn, ff, ff_context), then 4 single blocks (attn, proj_mlp, proj_out).
TOKEN_WISE = {(0, "ff"), (1, "ff"), *((b, n) for b in (2, 3, 4, 5) for n in ("proj_mlp", "proj_out"))}


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokencache-flux")
    module = TokenCacheTrainer(
        teacher="embedded:digits-flux", steps=STEPS, ff_inner_dim=16, lr=0.01, objective="blend",
        export_dir=str(root / "policy"), export_full_steps=2, export_token_budget=0.5, calibration_samples=2,
    )  # fmt: skip
    before = module.predictor.head.weight.detach().clone()
    trainer = quiet_trainer(2, root)
    L.seed_everything(0, verbose=False)
    trainer.fit(module, ClassConditionDataModule(num_classes=10, samples_per_epoch=4, batch_size=2, seed=100))
    return SimpleNamespace(module=module, root=root, head=before)


def test_predictor_copies_the_first_double_block_and_scores_the_image_tokens(fitted):
    module = fitted.module
    first = module.teacher.transformer_blocks[0]
    block = TokenImportancePredictor.from_teacher(module.teacher, ff_inner_dim=16).block  # as built, before training
    assert torch.equal(block.attn.to_q.weight, first.attn.to_q.weight)
    assert torch.equal(block.ff.net[0].proj.weight, first.ff.net[0].proj.weight[:16])
    assert isinstance(block.ff_context, torch.nn.Identity)  # feeds only the text stream, which the head never reads
    assert not torch.equal(module.predictor.head.weight.detach(), fitted.head)  # the blend trained it
    seen = {}
    handle = on_first_block(module.teacher, lambda a, k: seen.setdefault("scores", module.predictor(a, k)))
    try:
        trajectory = module.trajectories.get(module, torch.tensor([3]), torch.tensor([7]))
        with torch.no_grad(), module.uncached():
            module.teacher_output(trajectory, 1)
    finally:
        handle.remove()
    assert seen["scores"].shape[1:] == (6, 64)  # every block, the 64 image tokens (no text token)


def test_export_is_partial_exactly_on_the_token_wise_slots_and_infer_executes_its_plan(fitted, tmp_path):
    import infer

    policy = l2c.load_policy(fitted.root / "policy")
    assert isinstance(policy, TokenCachePolicy)
    spec = policy.target.model
    slots = {(b, spec.branches[i]) for b, i in policy.partial_slots.nonzero().tolist()}
    assert slots == TOKEN_WISE
    plan = policy.plan_for(spec, torch.tensor(policy.timesteps))
    full = policy.step_types(STEPS).bool()
    present = spec.present()
    cache = plan.actions[~full]
    partial = cache == Action.PARTIAL
    assert int(partial.sum()) > 0 and bool(partial[:, ~policy.partial_slots].logical_not().all())
    non_token_wise = present & ~policy.partial_slots  # joint attention, ff_context: reused on cache steps
    assert bool((cache[:, non_token_wise] == Action.REUSE).all())
    assert bool((plan.actions[full][:, present] == Action.COMPUTE).all())

    out = tmp_path / "report"
    args = ["sample", "--model", "embedded:digits-flux", "--policy", str(fitted.root / "policy"), "--steps", "4"]
    args += ["--num-samples", "2", "--batch-size", "2", "--out", str(out), "--no-progress"]
    assert infer.main(args) == 0
    report = json.loads((out / "report.json").read_text())
    calls = report["executed"]["partial"] / int(partial.sum())
    assert calls == int(calls) and calls >= 1  # the plan's partial slots, once per denoiser call of each step
    reused = int((plan.actions[:, present] == Action.REUSE).sum())
    assert report["executed"]["reuse"] == reused * calls
    assert report["flops_ratio"] < 1.0


def test_every_block_family_has_a_scored_block_other_blocks_and_unbound_flux_policies_are_refused(fitted):
    assert {family.block_class for family in BLOCK_FAMILIES} <= {entry.block_class for entry in SCORED_BLOCKS}
    with pytest.raises(TypeError, match="cannot score the tokens of a ResnetBlock2D"):
        scored_block(ResnetBlock2D(in_channels=4, out_channels=4, temb_channels=None, groups=2))
    policy = l2c.load_policy(fitted.root / "policy")
    unbound = TokenCachePolicy(
        **policy.params(), predictor_state=policy.predictor_state, calibration=policy.calibration
    )  # fmt: skip
    assert not bool(token_partial_slots(fitted.module.teacher).all())
    with pytest.raises(ValueError, match="field 'partial_slots' is unset and this flux model"):
        unbound.apply(fitted.module.teacher, timesteps=fitted.module.timesteps)
