"""Trains `embedded:digits-flux`: a small `FluxTransformer2DModel` on 16×16 digits by rectified flow.

The second embedded teacher, of the MMDiT kind (double- and single-stream blocks), so every benchmark can also run
on a second architecture and a second sampler (`FlowMatchEulerDiscreteScheduler`). It is conditioned through
`encoder_hidden_states` / `pooled_projections` from a learned per-class table (`l2c.flux_digits.ClassTable`),
trained with it and shipped beside it.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from torch import nn

from l2c.digits import IMAGE_SIZE
from l2c.flux_digits import CLASS_TABLE_FILE, PACK, ClassTable, flux_forward

from .teacher import EmaTeacher


class FluxDigitsTeacher(EmaTeacher):
    """Rectified flow: x_t = (1 − t)·x₀ + t·noise, the transformer predicts the velocity noise − x₀.

    Flow times are drawn logit-normal (SD3 / Flux training: t = sigmoid(n), n ~ N(0, 1)). Labels are replaced by
    the table's null row with probability `label_dropout` for classifier-free guidance. The EMA copy of the
    transformer and of the class table is what gets exported.
    """

    def __init__(
        self,
        num_layers: int = 2,
        num_single_layers: int = 4,
        num_attention_heads: int = 4,
        attention_head_dim: int = 32,
        axes_dims_rope: tuple[int, int, int] = (8, 12, 12),
        text_tokens: int = 4,
        joint_attention_dim: int = 64,
        pooled_projection_dim: int = 64,
        num_classes: int = 10,
        label_dropout: float = 0.1,
        shift: float = 1.0,
        lr: float = 1e-3,
        warmup_steps: int = 200,
        ema_decay: float = 0.999,
        export_dir: str | None = None,
        export_every_n_steps: int = 0,
    ) -> None:
        """
        Args:
            num_layers: Double-stream blocks (`FluxTransformerBlock`).
            num_single_layers: Single-stream blocks (`FluxSingleTransformerBlock`).
            num_attention_heads: Attention heads per block.
            attention_head_dim: Width of one head (hidden size: heads × head width).
            axes_dims_rope: Rotary widths of the (unused, row, column) id axes; they must sum to the head width.
            text_tokens: Tokens per class in the table's `encoder_hidden_states`.
            joint_attention_dim: Width of those tokens.
            pooled_projection_dim: Width of the table's `pooled_projections`.
            num_classes: Class labels (the digits: 10); the null row for guidance is `num_classes`.
            label_dropout: Probability of training a sample on the null row.
            shift: The sampler's fixed timestep shift (written into the exported scheduler config; the image size
                is fixed, so no resolution-dependent shift).
            lr: Peak learning rate of AdamW.
            warmup_steps: Linear learning-rate warm-up steps.
            ema_decay: Decay of the exported EMA weights.
            export_dir: Where the EMA teacher is written (none: no export).
            export_every_n_steps: Also export every N optimizer steps (0: only at the end of fit).
        """
        super().__init__()
        self.save_hyperparameters()
        if sum(axes_dims_rope) != attention_head_dim:
            raise ValueError(f"axes_dims_rope {tuple(axes_dims_rope)} must sum to attention_head_dim "
                             f"{attention_head_dim}")  # fmt: skip
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=PACK * PACK,  # one pixel channel, packed 2×2
            num_layers=num_layers,
            num_single_layers=num_single_layers,
            attention_head_dim=attention_head_dim,
            num_attention_heads=num_attention_heads,
            joint_attention_dim=joint_attention_dim,
            pooled_projection_dim=pooled_projection_dim,
            guidance_embeds=False,
            axes_dims_rope=tuple(axes_dims_rope),
        )
        table = ClassTable(num_classes, text_tokens, joint_attention_dim, pooled_projection_dim, IMAGE_SIZE)
        self.model = nn.ModuleDict({"transformer": transformer, "class_table": table})
        self.start_ema()
        self.scheduler = FlowMatchEulerDiscreteScheduler(shift=shift, use_dynamic_shifting=False)

    @property
    def trained(self) -> nn.Module:
        return self.model

    def loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The rectified-flow loss of one batch (label dropout applied in training mode)."""
        if self.training and self.hparams.label_dropout > 0:
            drop = torch.rand(len(labels), device=labels.device) < self.hparams.label_dropout
            labels = torch.where(drop, torch.full_like(labels, self.hparams.num_classes), labels)
        noise = torch.randn_like(images)
        t = torch.sigmoid(torch.randn(len(images), device=images.device))
        noisy = (1 - t.view(-1, 1, 1, 1)) * images + t.view(-1, 1, 1, 1) * noise
        text, pooled = self.model["class_table"](labels)
        velocity = flux_forward(self.model["transformer"], noisy, t, text, pooled)
        return F.mse_loss(velocity, noise - images)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.loss(*batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def export(self, directory: str | Path) -> Path:
        """Write `<dir>/transformer` + `<dir>/scheduler` (diffusers format) and `<dir>/class_table.safetensors`."""
        directory = Path(directory)
        self.ema["transformer"].save_pretrained(directory / "transformer")
        self.scheduler.save_pretrained(directory / "scheduler")
        self.ema["class_table"].save(directory / CLASS_TABLE_FILE)
        return directory
