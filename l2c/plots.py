"""Pictures a person would rather look at than read: sample grids and plan heatmaps."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

from .plan import Action, Plan  # noqa: E402


def image_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 1) -> np.ndarray:
    """[B, C, H, W] in [-1, 1] → one uint8 HxWxC (or HxW) array laid out row by row."""
    images = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    count, channels, height, width = images.shape
    nrow = nrow or math.ceil(math.sqrt(count))
    rows = math.ceil(count / nrow)
    grid = torch.full((channels, rows * (height + pad) + pad, nrow * (width + pad) + pad), 255, dtype=torch.uint8)
    for i in range(count):
        r, c = divmod(i, nrow)
        top, left = pad + r * (height + pad), pad + c * (width + pad)
        grid[:, top : top + height, left : left + width] = images[i]
    array = grid.permute(1, 2, 0).numpy()
    return array[..., 0] if channels == 1 else array


def save_comparison(uncached: torch.Tensor, cached: torch.Tensor, path: Path, title: str) -> Path:
    """Uncached samples, cached samples and their absolute difference, side by side."""
    difference = (cached - uncached).abs() * 2 - 1
    panels = [("uncached", uncached), (title, cached), ("|difference|", difference)]
    figure, axes = plt.subplots(1, 3, figsize=(12, 4.4))
    for axis, (name, images) in zip(axes, panels):
        axis.imshow(image_grid(images), cmap="gray", vmin=0, vmax=255)
        axis.set_title(name)
        axis.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def save_grid(images: torch.Tensor, path: Path, min_cell: int = 48) -> Path:
    """The grid as a PNG, each sample enlarged (nearest neighbour) to at least `min_cell` pixels."""
    scale = max(1, -(-min_cell // images.shape[-1]))
    grid = image_grid(images).repeat(scale, axis=0).repeat(scale, axis=1)
    plt.imsave(path, grid, cmap="gray", vmin=0, vmax=255)
    return path


def save_plan(plan: Plan, branches: tuple[str, ...], path: Path, title: str) -> Path:
    """Steps × (block, branch) map of what runs: computed, reused, or partially recomputed."""
    steps, blocks, num_branches = plan.actions.shape
    table = plan.actions.reshape(steps, blocks * num_branches).numpy().T
    colors = ListedColormap(["#2b6cb0", "#e2e8f0", "#ed8936"])
    figure, axis = plt.subplots(figsize=(max(6, steps * 0.35), max(3, blocks * num_branches * 0.22)))
    axis.imshow(table, cmap=colors, vmin=0, vmax=len(Action) - 1, aspect="auto", interpolation="nearest")
    axis.set_yticks(
        range(blocks * num_branches), [f"{b}.{name}" for b in range(blocks) for name in branches], fontsize=7
    )
    axis.set_xticks(range(steps))
    axis.set_xlabel("sampling step")
    axis.set_title(
        f"{title}: blue computed, grey reused, orange partial ({plan.compute_fraction():.0%} of branch work)"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def router_figure(scores: torch.Tensor, branches: tuple[str, ...], title: str):
    """Steps × (block, branch) heatmap of router scores, for TensorBoard and the docs."""
    steps, blocks, num_branches = scores.shape
    figure, axis = plt.subplots(figsize=(max(6, steps * 0.35), max(3, blocks * num_branches * 0.22)))
    image = axis.imshow(scores.reshape(steps, -1).T.cpu().numpy(), cmap="viridis", vmin=0, vmax=1, aspect="auto")
    axis.set_yticks(
        range(blocks * num_branches), [f"{b}.{name}" for b in range(blocks) for name in branches], fontsize=7
    )
    axis.set_xticks(range(steps))
    axis.set_xlabel("sampling step")
    axis.set_title(title)
    figure.colorbar(image, ax=axis, fraction=0.03)
    figure.tight_layout()
    return figure


PARETO_MARKERS = "os^vD<>pP*Xhd"


def save_pareto(rows: list[dict], path: Path, title: str) -> Path:
    """flops_ratio against psnr_db and against digit_accuracy, one marker and colour per method, joined by knob.

    Rows at the 100 dB PSNR cap (the uncached reference itself) are left off the PSNR panel so the axis shows the
    differences between methods.
    """
    metrics = [m for m in ("psnr_db", "digit_accuracy") if any(row.get(m) is not None for row in rows)]
    figure, axes = plt.subplots(1, len(metrics), figsize=(6.5 * len(metrics), 5), squeeze=False)
    methods = list(dict.fromkeys(row["method"] for row in rows))
    palette = plt.get_cmap("tab20")
    colors = [palette((2 * i) % 20 + (2 * i) // 20) for i in range(len(methods))]  # dark shades first
    for axis, metric in zip(axes[0], metrics):
        for index, method in enumerate(methods):
            mine = [r for r in rows if r["method"] == method and r.get(metric) is not None]
            mine = [r for r in mine if metric != "psnr_db" or r[metric] < 100.0]
            points = sorted((r["flops_ratio"], r[metric]) for r in mine)
            if not points:
                continue
            x, y = zip(*points)
            marker = PARETO_MARKERS[index % len(PARETO_MARKERS)]
            axis.plot(x, y, marker=marker, color=colors[index], label=method, linewidth=1, markersize=7)
        axis.set_xlabel("flops_ratio (cached ÷ uncached FLOPs)")
        axis.set_ylabel(metric)
        axis.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8, loc="lower right")  # the last panel has every method, uncached included
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
