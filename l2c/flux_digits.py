"""How `embedded:digits-flux` is called: its learned class table, patch packing and rotary position ids.

A `FluxTransformer2DModel` takes no class labels: it is conditioned through `encoder_hidden_states` (text tokens)
and `pooled_projections`. The project's digits model learns one row of each per class, plus a null row for
classifier-free guidance, and ships them beside the transformer as `class_table.safetensors`:

    encoder_hidden_states  float32 [num_classes + 1, text_tokens, joint_attention_dim]
    pooled_projections     float32 [num_classes + 1, pooled_projection_dim]
    (row c: class c; the last row, index num_classes: the null condition)
    metadata "sample_size": the image side in pixels the model was trained at (16)

Images are packed as Flux's pipeline packs latents (2×2 patches → channels, `FluxPipeline._pack_latents`), image
ids are (0, row, column) of each patch and text ids are zeros (`FluxPipeline._prepare_latent_image_ids`), and the
timestep is the flow time t ∈ [0, 1] (the pipeline's `t / 1000`; the transformer scales it by 1000 itself).
The trainer (`predictors.flux_teacher`) and the sampler (`l2c.sampling`) share these, so they cannot disagree.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import FluxTransformer2DModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

CLASS_TABLE_FILE = "class_table.safetensors"
PACK = 2  # pixels per patch side: Flux packs 2×2 patches into channels


class ClassTable(nn.Module):
    """One learned (text tokens, pooled vector) condition per class; the last row is the null condition."""

    def __init__(
        self, num_classes: int, text_tokens: int, joint_attention_dim: int, pooled_projection_dim: int, sample_size: int
    ) -> None:
        super().__init__()
        self.sample_size = sample_size
        self.encoder_hidden_states = nn.Parameter(torch.randn(num_classes + 1, text_tokens, joint_attention_dim))
        self.pooled_projections = nn.Parameter(torch.randn(num_classes + 1, pooled_projection_dim))

    @property
    def num_classes(self) -> int:
        return len(self.pooled_projections) - 1

    @property
    def null_class(self) -> int:
        return self.num_classes

    def forward(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(encoder_hidden_states [B, T, D], pooled_projections [B, P]) of class labels (`null_class`: null)."""
        return self.encoder_hidden_states[labels], self.pooled_projections[labels]

    def save(self, path: str | Path) -> None:
        state = {name: tensor.detach().float().cpu().contiguous() for name, tensor in self.state_dict().items()}
        layout = "row c = class c; last row = null condition (guidance)"
        save_file(state, str(path), metadata={"layout": layout, "sample_size": str(self.sample_size)})

    @classmethod
    def load(cls, path: str | Path, transformer: FluxTransformer2DModel | None = None) -> ClassTable:
        """The table at `path`, its layout checked (and against `transformer`'s input widths, when given)."""
        state = load_file(str(path))
        with safe_open(str(path), "pt") as handle:
            sample_size = (handle.metadata() or {}).get("sample_size", "")
        if not sample_size.isdigit():
            raise ValueError(f"{path}: metadata 'sample_size' is {sample_size!r}, expected the image side in pixels")
        expected = {"encoder_hidden_states": 3, "pooled_projections": 2}
        if set(state) != set(expected) or any(state[k].ndim != n for k, n in expected.items()):
            found = {k: tuple(v.shape) for k, v in state.items()}
            raise ValueError(
                f"{path}: expected tensors encoder_hidden_states [classes + 1, tokens, dim] and "
                f"pooled_projections [classes + 1, dim], found {found}"
            )
        text, pooled = state["encoder_hidden_states"], state["pooled_projections"]
        if len(text) != len(pooled) or len(text) < 2:
            raise ValueError(f"{path}: encoder_hidden_states has {len(text)} rows, pooled_projections {len(pooled)}; "
                             "expected the same count ≥ 2 (classes + the null row)")  # fmt: skip
        if transformer is not None:
            config = transformer.config
            widths = {"joint_attention_dim": (text.shape[2], config.joint_attention_dim),
                      "pooled_projection_dim": (pooled.shape[1], config.pooled_projection_dim)}  # fmt: skip
            for field, (found, wanted) in widths.items():
                if found != wanted:
                    raise ValueError(f"{path}: rows are {found} wide, but the transformer's {field} is {wanted}")
        table = cls(len(pooled) - 1, text.shape[1], text.shape[2], pooled.shape[1], int(sample_size))
        table.load_state_dict(state)
        return table


def pack(images: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] → [B, (H/2)(W/2), 4C], as `FluxPipeline._pack_latents`."""
    b, c, h, w = images.shape
    patches = images.view(b, c, h // PACK, PACK, w // PACK, PACK).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // PACK) * (w // PACK), c * PACK * PACK)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of `pack`: [B, (H/2)(W/2), 4C] → [B, C, H, W]."""
    b, _, packed = tokens.shape
    c = packed // (PACK * PACK)
    patches = tokens.view(b, height // PACK, width // PACK, c, PACK, PACK).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, c, height, width)


def image_ids(height: int, width: int, device: torch.device | str) -> torch.Tensor:
    """[(H/2)(W/2), 3] rotary ids (0, row, column) of the packed patches."""
    rows, cols = torch.meshgrid(torch.arange(height // PACK), torch.arange(width // PACK), indexing="ij")
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).float().to(device)


def flux_forward(
    transformer: FluxTransformer2DModel,
    images: torch.Tensor,
    t: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    pooled_projections: torch.Tensor,
) -> torch.Tensor:
    """The transformer's velocity (noise − x₀) for images [B, C, H, W] at flow times t [B] ∈ [0, 1], unpacked."""
    height, width = images.shape[-2:]
    dtype = next(transformer.parameters()).dtype
    txt_ids = torch.zeros(encoder_hidden_states.shape[1], 3, device=images.device)
    out = transformer(
        hidden_states=pack(images).to(dtype),
        encoder_hidden_states=encoder_hidden_states.to(dtype),
        pooled_projections=pooled_projections.to(dtype),
        timestep=t.to(dtype),
        img_ids=image_ids(height, width, images.device),
        txt_ids=txt_ids,
    ).sample
    return unpack(out, height, width)
