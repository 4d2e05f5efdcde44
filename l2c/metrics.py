"""Cost and quality metrics for cached sampling: FLOPs, fidelity to the uncached reference, digit quality.

Every metric returns a plain Python number so it can go straight into `report.json`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from .digits import load_digits_split
from .digits_classifier import DigitsClassifier, load_digits_classifier

T = TypeVar("T")

PSNR_CAP_DB = 100.0
"""PSNR of identical images is +inf, which JSON cannot hold; per-sample PSNR is capped here instead.

100 dB is an RMS error of 1e-5 of the data range: far below what any policy that really skips computation
produces, so the cap only merges "bit-identical" with "differs by float round-off", never two real policies.
"""


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# torch has FLOP formulas for the GPU kernels of `scaled_dot_product_attention` only: the CPU kernel would count 0,
# hiding every attention product (q·kᵀ and attention·v) on CPU. It is counted as the GPU kernels are.
CPU_ATTENTION_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops}


def count_flops(fn: Callable[[], T]) -> tuple[T, int]:
    """Run `fn()` and count its FLOPs with torch's dispatcher-level counter.

    Counting the operations actually dispatched (rather than estimating from a plan) means skipped branches cost
    nothing and recomputed ones cost what they really cost, whichever policy or model is running.
    """
    counter = FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS)
    with counter:
        result = fn()
    return result, int(counter.get_total_flops())


def branch_flops(model: torch.nn.Module, fn: Callable[[], object]) -> dict[str, float]:
    """FLOPs of each branch kind (`attn1`, `attn2`, `ff`), mean over the blocks that have it, while `fn()` calls
    `model` once.

    Budgets in "fraction of branch work" weigh slots by these: an MLP slot can cost twice a self-attention slot.
    """
    totals: dict[str, list[float]] = {}
    for branch, flops in _counted_branches(model, fn):
        totals.setdefault(branch.name, []).append(flops)
    return {name: sum(values) / len(values) for name, values in totals.items()}


def slot_flops(model: torch.nn.Module, fn: Callable[[], object]) -> torch.Tensor:
    """FLOPs of each plan slot [blocks, branches] (the model's `ModelSpec` columns) while `fn()` calls `model` once;
    0 where no module runs (a Flux double block's `attn` and a single block's `attn` are different work)."""
    from .adapters import model_spec

    spec = model_spec(model)
    table = torch.zeros(spec.num_blocks, len(spec.branches), dtype=torch.float64)
    for branch, flops in _counted_branches(model, fn):
        table[branch.block, spec.branches.index(branch.name)] = flops
    return table


def _counted_branches(model: torch.nn.Module, fn: Callable[[], object]) -> list[tuple[object, float]]:
    from .adapters import find_branches

    counter = FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS)
    with counter:
        fn()
    counts = counter.get_flop_counts()
    names = {id(module): name for name, module in model.named_modules()}
    prefix = type(model).__name__
    return [
        (branch, float(sum(counts.get(f"{prefix}.{names[id(branch.module)]}", {}).values())))
        for branch in find_branches(model)
    ]


def _check_pair(pred: torch.Tensor, ref: torch.Tensor) -> None:
    if pred.shape != ref.shape or pred.ndim != 4:
        shapes = f"{tuple(pred.shape)} and {tuple(ref.shape)}"
        raise ValueError(f"expected two image batches [B, C, H, W] of one shape, got {shapes}")


def psnr_db(pred: torch.Tensor, ref: torch.Tensor, data_range: float = 2.0) -> float:
    """Mean over samples of each sample's PSNR (dB) against its reference, each capped at `PSNR_CAP_DB`.

    Per-sample then mean (not one PSNR of the pooled batch MSE), so one badly broken sample cannot be averaged
    away in MSE space and a batch's number does not depend on how samples are grouped. Values are not clamped:
    the default `data_range` of 2.0 is that of images in [-1, 1]. Errors are summed in float64 (torchmetrics
    applies its log constants in float32, so values are exact to ~1e-6 dB, far below anything that matters).
    """
    _check_pair(pred, ref)
    pred, ref = pred.detach().double(), ref.detach().to(pred.device, torch.float64)
    per_sample = peak_signal_noise_ratio(pred, ref, data_range=data_range, reduction="none", dim=(1, 2, 3))
    return float(per_sample.clamp(max=PSNR_CAP_DB).mean())


def ssim(pred: torch.Tensor, ref: torch.Tensor, data_range: float = 2.0) -> float:
    """Mean SSIM over the batch (torchmetrics defaults: 11×11 Gaussian window, sigma 1.5), in float64.

    SSIM complements PSNR by scoring local structure, so it distinguishes a blurred sample from a uniformly
    offset one at equal MSE. Images must be at least 6 pixels on each side (the window is reflect-padded).
    """
    _check_pair(pred, ref)
    pred, ref = pred.detach().double(), ref.detach().to(pred.device, torch.float64)
    return float(structural_similarity_index_measure(pred, ref, data_range=data_range))


def gaussian_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean [F] and unbiased covariance [F, F] of a feature set [N, F] (N ≥ 2), in float64."""
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"expected features [N, F] with N >= 2, got {tuple(features.shape)}")
    features = features.detach().to(torch.float64)
    return features.mean(dim=0), torch.cov(features.T).reshape(features.shape[1], features.shape[1])


def _psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a symmetric PSD matrix; tiny negative eigenvalues from round-off become 0."""
    eigenvalues, eigenvectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (eigenvectors * eigenvalues.clamp(min=0).sqrt()) @ eigenvectors.T


def frechet_terms(
    mu_a: torch.Tensor, sigma_a: torch.Tensor, mu_b: torch.Tensor, sigma_b: torch.Tensor
) -> tuple[float, float]:
    """The Fréchet distance's two terms: where the sets lie, ||mu_a - mu_b||², and how they spread,
    tr(Σa + Σb - 2 (Σa Σb)^½). Apart, they say whether a change of FD comes from a shift of the features or from a
    change of their spread (a set that spreads less than the other can lower the second term without moving).

    tr (Σa Σb)^½ is computed as tr (Σa^½ Σb Σa^½)^½ (similar matrices): a symmetric PSD eigenproblem, so unlike
    `scipy.linalg.sqrtm` of the non-symmetric product it needs no complex arithmetic and stays stable for the
    rank-deficient covariances that small sample sets and dead ReLU features give.
    """
    mu_a, sigma_a, mu_b, sigma_b = (t.to(torch.float64) for t in (mu_a, sigma_a, mu_b, sigma_b))
    root_a = _psd_sqrt(sigma_a)
    middle = root_a @ sigma_b @ root_a
    trace_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    spread = torch.trace(sigma_a) + torch.trace(sigma_b) - 2 * trace_sqrt
    return float((mu_a - mu_b).square().sum()), max(float(spread), 0.0)


def frechet_distance_from_stats(
    mu_a: torch.Tensor, sigma_a: torch.Tensor, mu_b: torch.Tensor, sigma_b: torch.Tensor
) -> float:
    """||mu_a - mu_b||² + tr(Σa + Σb - 2 (Σa Σb)^½), the Fréchet (2-Wasserstein²) distance of two Gaussians
    (the sum of `frechet_terms`)."""
    return sum(frechet_terms(mu_a, sigma_a, mu_b, sigma_b))


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to feature sets a [N, F] and b [M, F] (N, M ≥ 2; float64).

    The FID construction, on whatever features are passed: it compares both the location and the spread of two
    sample sets, so it penalises a policy that collapses diversity even when each sample looks plausible.
    """
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"expected features [N, F] and [M, F], got {tuple(a.shape)} and {tuple(b.shape)}")
    return frechet_distance_from_stats(*gaussian_stats(a), *gaussian_stats(b))


class DigitsQuality:
    """Digit quality of generated 16×16 digits, judged by the shipped classifier against the held-out real digits.

    The held-out split is the one neither the teacher nor the classifier trained on, so the real-feature statistics
    (computed once, here) are an honest target. Use one instance for a whole evaluation.
    """

    IMAGE_SHAPE = (1, 16, 16)

    def __init__(
        self,
        classifier: DigitsClassifier | None = None,
        device: torch.device | str | None = None,
        batch_size: int = 512,
    ) -> None:
        self.classifier = classifier if classifier is not None else load_digits_classifier(device)
        self.classifier.eval()
        self.device = next(self.classifier.parameters()).device
        self.batch_size = batch_size
        real = load_digits_split("test")
        self.real_features = self.features(real.images)
        self.real_mu, self.real_sigma = gaussian_stats(self.real_features)

    def _batches(self, images: torch.Tensor) -> Iterator[torch.Tensor]:
        if tuple(images.shape[1:]) != self.IMAGE_SHAPE or images.shape[0] == 0:
            raise ValueError(f"expected digit images [B>0, 1, 16, 16] in [-1, 1], got {tuple(images.shape)}")
        images = images.detach()
        for start in range(0, images.shape[0], self.batch_size):
            yield images[start : start + self.batch_size].to(self.device, torch.float32).clamp(-1, 1)

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Classifier penultimate features [B, 64] (float64, CPU) of images clamped to [-1, 1]."""
        return torch.cat([self.classifier.features(b).cpu() for b in self._batches(images)]).double()

    @torch.no_grad()
    def accuracy(self, images: torch.Tensor, labels: torch.Tensor | Sequence[int]) -> float:
        """Fraction of images the classifier assigns to their requested label: does class conditioning survive?"""
        predicted = torch.cat([self.classifier(b).argmax(dim=1).cpu() for b in self._batches(images)])
        labels = torch.as_tensor(labels, dtype=torch.int64).cpu().reshape(-1)
        if labels.shape != predicted.shape:
            raise ValueError(f"got {predicted.numel()} images but {labels.numel()} labels")
        return float((predicted == labels).double().mean())

    def fd_digits(self, images: torch.Tensor) -> float:
        """Fréchet distance between classifier features of the held-out real digits and of `images` (B ≥ 2).

        Lower is better; small B inflates it (sample covariance noise), so compare numbers at equal B only.
        """
        mu, sigma = gaussian_stats(self.features(images))
        return frechet_distance_from_stats(self.real_mu, self.real_sigma, mu, sigma)
