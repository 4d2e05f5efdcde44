"""l2c.metrics and the shipped digits classifier: exact values on constructed inputs, real behaviour on real digits."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import scipy.linalg
import torch

import l2c.digits_classifier as digits_classifier
from l2c.digits import load_digits_split
from l2c.digits_classifier import (
    CLASSIFIER_PATH,
    DigitsClassifier,
    evaluate_accuracy,
    load_digits_classifier,
    train_digits_classifier,
)
from l2c.metrics import (
    PSNR_CAP_DB,
    DigitsQuality,
    count_flops,
    frechet_distance,
    frechet_terms,
    gaussian_stats,
    psnr_db,
    ssim,
)


@pytest.fixture(scope="module")
def test_split():
    return load_digits_split("test")


@pytest.fixture(scope="module")
def quality():
    return DigitsQuality()


def hadamard(n: int) -> torch.Tensor:
    """Sylvester Hadamard matrix: ±1 entries, orthogonal columns, every column but the first has zero mean."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


# --- classifier ---------------------------------------------------------------------------------------------------


def test_shipped_classifier_loads_frozen_and_is_accurate(test_split):
    assert CLASSIFIER_PATH.is_file() and CLASSIFIER_PATH.stat().st_size < 1_000_000
    model = load_digits_classifier()
    assert isinstance(model, DigitsClassifier) and not model.training
    assert not any(p.requires_grad for p in model.parameters())
    x = test_split.images[:5]
    assert model.features(x).shape == (5, 64) and model(x).shape == (5, 10)
    assert evaluate_accuracy(model, test_split.images, test_split.labels) >= 0.97


def test_missing_weights_say_how_to_regenerate(monkeypatch, tmp_path):
    monkeypatch.setattr(digits_classifier, "CLASSIFIER_PATH", tmp_path / "absent.safetensors")
    with pytest.raises(FileNotFoundError, match=r"python -m l2c\.digits_classifier"):
        load_digits_classifier()


def test_training_is_deterministic_and_leaves_global_state_alone():
    threads = torch.get_num_threads()
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first, _ = train_digits_classifier(seed=0, epochs=1)
    assert torch.equal(torch.rand(3), expected_next)  # the caller's RNG stream is untouched
    assert torch.get_num_threads() == threads
    second, _ = train_digits_classifier(seed=0, epochs=1)
    assert not first.training
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.slow
def test_full_training_reaches_the_accuracy_bar():
    _, accuracy = train_digits_classifier(seed=0)
    assert accuracy >= 0.97


# --- count_flops --------------------------------------------------------------------------------------------------


def test_count_flops_of_a_matmul():
    a, b = torch.randn(4, 8), torch.randn(8, 16)
    result, flops = count_flops(lambda: a @ b)
    assert torch.equal(result, a @ b)
    assert flops == 2 * 4 * 8 * 16


# --- psnr / ssim --------------------------------------------------------------------------------------------------


def test_psnr_of_a_known_mse():
    ref = torch.rand(2, 1, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    offset = torch.tensor([0.02, 0.2], dtype=torch.float64)[:, None, None, None]
    # MSE 4e-4 → 10·log10(2² / 4e-4) = 40 dB; MSE 4e-2 → 20 dB; the documented mean of per-sample PSNRs is 30 dB
    # (one PSNR of the pooled MSE would be 22.97 dB). Tolerance: torchmetrics' log constants are float32.
    assert psnr_db(ref[:1] + offset[:1], ref[:1]) == pytest.approx(40.0, abs=1e-5)
    assert psnr_db(ref + offset, ref) == pytest.approx(30.0, abs=1e-5)
    assert psnr_db(ref + offset, ref, data_range=1.0) == pytest.approx(30.0 - 20 * math.log10(2), abs=1e-5)


def test_psnr_of_identical_images_is_capped_and_json_safe():
    images = torch.rand(3, 1, 16, 16) * 2 - 1
    value = psnr_db(images, images.clone())
    assert value == PSNR_CAP_DB
    assert json.loads(json.dumps({"psnr_db": value}, allow_nan=False)) == {"psnr_db": PSNR_CAP_DB}


def test_ssim_of_identical_images_is_one_and_drops_with_noise():
    images = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert ssim(images, images.clone()) == pytest.approx(1.0, abs=1e-12)
    noisy = images + 0.3 * torch.randn(images.shape, generator=torch.Generator().manual_seed(1))
    assert ssim(noisy, images) < 0.9


def test_image_metrics_reject_mismatched_shapes():
    with pytest.raises(ValueError):
        psnr_db(torch.zeros(2, 1, 16, 16), torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError):
        ssim(torch.zeros(16, 16), torch.zeros(16, 16))


# --- frechet_distance ---------------------------------------------------------------------------------------------


def test_frechet_distance_of_a_set_with_itself_is_zero():
    features = torch.randn(200, 16, generator=torch.Generator().manual_seed(0)) @ torch.randn(16, 16)
    assert frechet_distance(features, features) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_matches_the_closed_form_for_diagonal_gaussians():
    # Zero-mean, mutually orthogonal ±1 Hadamard columns give samples whose covariance is exactly diagonal, so
    # the distance must be ||mu_a - mu_b||² + Σ_i (σ_a,i - σ_b,i)² using the samples' own means and variances.
    a = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) + hadamard(8)[:, 1:4] * torch.tensor([1.0, 3.0, 0.2])
    b = torch.tensor([0.0, 1.0, 0.5], dtype=torch.float64) + hadamard(16)[:, 1:4] * torch.tensor([2.0, 0.5, 0.2])
    for x in (a, b):
        cov = torch.cov(x.T)
        assert torch.allclose(cov, torch.diag(torch.diagonal(cov)), atol=1e-12)
    expected = (a.mean(0) - b.mean(0)).square().sum() + (a.var(0).sqrt() - b.var(0).sqrt()).square().sum()
    assert frechet_distance(a, b) == pytest.approx(float(expected), rel=1e-10)
    assert frechet_distance(b, a) == pytest.approx(float(expected), rel=1e-10)


def test_frechet_terms_split_location_from_spread():
    # The same Hadamard construction: each term has its closed form, and shifting one set moves only the first.
    a = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) + hadamard(8)[:, 1:4] * torch.tensor([1.0, 3.0, 0.2])
    b = torch.tensor([0.0, 1.0, 0.5], dtype=torch.float64) + hadamard(16)[:, 1:4] * torch.tensor([2.0, 0.5, 0.2])
    (mu_a, sigma_a), (mu_b, sigma_b) = gaussian_stats(a), gaussian_stats(b)
    location, spread = frechet_terms(mu_a, sigma_a, mu_b, sigma_b)
    assert location == pytest.approx(float((a.mean(0) - b.mean(0)).square().sum()), rel=1e-12)
    assert spread == pytest.approx(float((a.var(0).sqrt() - b.var(0).sqrt()).square().sum()), rel=1e-10)
    assert location + spread == pytest.approx(frechet_distance(a, b), rel=1e-12)
    shifted = frechet_terms(mu_a, sigma_a, mu_b + torch.tensor([0.0, 3.0, 0.0], dtype=torch.float64), sigma_b)
    assert shifted[0] == pytest.approx(location - 9.0 + 36.0, rel=1e-12)  # second mean: (−2 − 4)² instead of (−2 − 1)²
    assert shifted[1] == pytest.approx(spread, rel=1e-12)


def test_frechet_distance_agrees_with_scipy_sqrtm_on_correlated_features():
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(300, 8, generator=generator, dtype=torch.float64) @ torch.randn(8, 8, generator=generator).double()
    b = torch.randn(250, 8, generator=generator, dtype=torch.float64) @ torch.randn(8, 8, generator=generator).double()
    mu_a, mu_b = a.mean(0).numpy(), b.mean(0).numpy()
    sigma_a, sigma_b = np.cov(a.numpy(), rowvar=False), np.cov(b.numpy(), rowvar=False)
    covmean = scipy.linalg.sqrtm(sigma_a @ sigma_b).real
    expected = ((mu_a - mu_b) ** 2).sum() + np.trace(sigma_a + sigma_b - 2 * covmean)
    assert frechet_distance(a, b) == pytest.approx(float(expected), rel=1e-8)


# --- DigitsQuality ------------------------------------------------------------------------------------------------


def test_digits_quality_accuracy_on_real_digits(quality, test_split):
    assert quality.accuracy(test_split.images, test_split.labels) >= 0.97
    assert quality.accuracy(test_split.images, (test_split.labels + 1) % 10) <= 0.03
    assert quality.accuracy(test_split.images[:3], test_split.labels[:3].tolist()) in (0.0, 1 / 3, 2 / 3, 1.0)


def test_digits_quality_clamps_before_classifying(quality, test_split):
    images = test_split.images[:16]
    assert torch.equal(quality.features(images * 3), quality.features((images * 3).clamp(-1, 1)))


def test_fd_digits_is_zero_for_the_real_digits_and_large_for_noise(quality, test_split):
    assert quality.fd_digits(test_split.images) == pytest.approx(0.0, abs=1e-6)
    n = len(test_split.labels)
    other_real = quality.fd_digits(load_digits_split("train").images[:n])
    noise = torch.rand(n, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    fd_noise = quality.fd_digits(noise)
    assert fd_noise > 10 * other_real > 0
