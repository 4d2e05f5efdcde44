"""Trains the embedded teachers: what they share (`EmaTeacher`) and the DiT digits teacher (`DigitsTeacher`)."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, DiTTransformer2DModel
from torch import nn


class EmaTeacher(L.LightningModule):
    """AdamW with a linear warm-up, EMA weights of the trained module, and export of the EMA copy.

    A subclass builds its trained module, names it in `trained`, calls `start_ema()` and writes the export in
    `export`. Hyperparameters read here: `lr`, `warmup_steps`, `ema_decay`, `export_dir`, `export_every_n_steps`.
    """

    @property
    def trained(self) -> nn.Module:
        """What the optimizer trains and the EMA tracks."""
        raise NotImplementedError

    def start_ema(self) -> None:
        self.ema = copy.deepcopy(self.trained).requires_grad_(False).eval()

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        decay = min(self.hparams.ema_decay, (1 + self.global_step) / (10 + self.global_step))
        with torch.no_grad():
            ema_params = list(self.ema.parameters())
            torch._foreach_lerp_(ema_params, list(self.trained.parameters()), 1 - decay)
        every = self.hparams.export_every_n_steps
        if every and self.hparams.export_dir and (self.global_step % every == 0) and self.trainer.is_global_zero:
            self.export(self.hparams.export_dir)

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.trained.parameters(), lr=self.hparams.lr, weight_decay=0.0)
        warmup = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / max(1, self.hparams.warmup_steps))
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": warmup, "interval": "step"}}

    def export(self, directory: str | Path) -> Path:
        raise NotImplementedError

    def on_fit_end(self) -> None:
        if self.hparams.export_dir and self.trainer.is_global_zero:
            path = self.export(self.hparams.export_dir)
            print(f"exported teacher to {path}")


class DigitsTeacher(EmaTeacher):
    """A small class-conditional `DiTTransformer2DModel` on 16×16 digits: DDPM epsilon objective, EMA exported.

    Label dropout for classifier-free guidance comes from the DiT's own label embedding
    (`class_dropout_prob=0.1` in training mode), so the null class is `num_classes`.
    """

    def __init__(
        self,
        num_layers: int = 6,
        num_attention_heads: int = 4,
        attention_head_dim: int = 32,
        num_classes: int = 10,
        sample_size: int = 16,
        patch_size: int = 2,
        num_train_timesteps: int = 1000,
        beta_schedule: str = "squaredcos_cap_v2",
        lr: float = 1e-3,
        warmup_steps: int = 200,
        ema_decay: float = 0.999,
        export_dir: str | None = None,
        export_every_n_steps: int = 0,
    ) -> None:
        """
        Args:
            num_layers: Transformer blocks of the DiT.
            num_attention_heads: Attention heads per block.
            attention_head_dim: Width of one head (hidden size: heads × head width).
            num_classes: Class labels (the digits: 10); the null class for guidance is `num_classes`.
            sample_size: Image side in pixels.
            patch_size: Patch side in pixels.
            num_train_timesteps: Steps of the DDPM training schedule.
            beta_schedule: The DDPM noise schedule (a diffusers `beta_schedule`).
            lr: Peak learning rate of AdamW.
            warmup_steps: Linear learning-rate warm-up steps.
            ema_decay: Decay of the exported EMA weights.
            export_dir: Where the EMA teacher is written in diffusers format (none: no export).
            export_every_n_steps: Also export every N optimizer steps (0: only at the end of fit).
        """
        super().__init__()
        self.save_hyperparameters()
        self.transformer = DiTTransformer2DModel(
            num_attention_heads=num_attention_heads,
            attention_head_dim=attention_head_dim,
            in_channels=1,
            num_layers=num_layers,
            sample_size=sample_size,
            patch_size=patch_size,
            num_embeds_ada_norm=num_classes,
        )
        self.start_ema()
        self.scheduler = DDPMScheduler(
            num_train_timesteps=num_train_timesteps,
            beta_schedule=beta_schedule,
            prediction_type="epsilon",
            clip_sample=True,
        )
        self.register_buffer("alphas_cumprod", self.scheduler.alphas_cumprod.clone(), persistent=False)

    @property
    def trained(self) -> nn.Module:
        return self.transformer

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        noise = torch.randn_like(images)
        t = torch.randint(0, self.hparams.num_train_timesteps, (images.shape[0],), device=self.device)
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * images + (1 - a).sqrt() * noise
        pred = self.transformer(noisy, timestep=t, class_labels=labels).sample
        loss = F.mse_loss(pred, noise)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def export(self, directory: str | Path) -> Path:
        """Write the EMA teacher as `<dir>/transformer` + `<dir>/scheduler` in diffusers format."""
        directory = Path(directory)
        self.ema.save_pretrained(directory / "transformer")
        self.scheduler.save_pretrained(directory / "scheduler")
        return directory
