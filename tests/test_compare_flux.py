"""The peers and the comparison's presets on the second embedded teacher (`embedded:digits-flux`, a
FluxTransformer2DModel): exact branch counts where a peer hooks leaf projections, the model left as it was between
peers, and presets that do not fit the model skipped with a note."""

import pytest
import torch

from l2c import compare
from l2c.adapters import find_branches, model_spec
from l2c.evaluate import SamplingSetup
from l2c.models import load_model
from l2c.peers import DBCache, FBCache, TaylorSeer
from l2c.plan import Action
from l2c.policies.taylorseer import compute_steps
from l2c.sampling import initial_noise, sample

STEPS = 6


@pytest.fixture(scope="module")
def bundle():
    return load_model("embedded:digits-flux")


def run(bundle, peer):
    """Two samples (classes 3 and 7) of STEPS steps, with `peer` applied (None: uncached); the images and counts."""
    setup = SamplingSetup(model="embedded:digits-flux", steps=STEPS)
    noise, labels, denoiser = initial_noise(2, bundle.sample_shape, 0), torch.tensor([3, 7]), bundle.denoiser(1.5)
    scheduler = setup.new_scheduler(bundle.scheduler_config)
    if peer is None:
        return sample(denoiser, scheduler, noise, labels, STEPS), None
    with peer.apply(bundle.transformer, scheduler.timesteps.clone()) as applied:
        images = sample(denoiser, scheduler, noise, labels, STEPS)
    return images, applied.executed


def model_state(model):
    return {name: (set(vars(m)), list(m._modules)) for name, m in model.named_modules()}


def test_taylorseer_on_flux_counts_its_leaf_projections_only_when_they_compute(bundle):
    # Flux single blocks' branches `proj_mlp` and `proj_out` are Linear layers that diffusers' hook replaces on
    # predicted steps: they count as computed on the rule's steps only.
    branches = len(find_branches(bundle.transformer))
    assert branches == 2 * 3 + 4 * 3
    _, executed = run(bundle, TaylorSeer(interval=2, warmup=1))
    computed = len(compute_steps(STEPS, 2, 1))
    assert executed == {Action.COMPUTE: computed * branches, Action.REUSE: (STEPS - computed) * branches}


def test_dbcache_on_flux_leaves_the_block_order_diffusers_hooks_rely_on(bundle):
    pytest.importorskip("cache_dit")
    model = bundle.transformer
    before = model_state(model)
    reference, _ = run(bundle, None)
    _, executed = run(bundle, DBCache(threshold=1e6, front=1, warmup=2))
    assert executed[Action.REUSE] > 0
    assert model_state(model) == before  # cache-dit re-adds the block lists it wrapped at the end of `_modules`
    # FBCache's head is the first listed block list: after DBCache it is still the double-stream blocks
    out, executed = run(bundle, FBCache(threshold=0.0))
    assert torch.equal(out, reference) and executed[Action.REUSE] == 0


def test_presets_that_do_not_fit_flux_are_skipped_with_a_note(bundle):
    notes = []
    rows = compare.preset_rows("DaTo", ["dato:interval=2"], notes, model_spec(bundle.transformer))
    assert rows == [] and "skipped DaTo" in notes[0] and "flux family is not supported" in notes[0]
    assert len(compare.preset_rows("ToCa", ["toca:interval=2"], notes, model_spec(bundle.transformer))) == 1
