"""`LayerRouter`: one gate logit per (sampling step, block, branch), the trainable part of Learning-to-Cache."""

from __future__ import annotations

import torch
from torch import nn


class LayerRouter(nn.Module):
    """Scores = sigmoid(logits); logits start equal (`init_logit`) so training alone orders the slots."""

    def __init__(self, num_steps: int, num_blocks: int, num_branches: int, init_logit: float = 2.0, clamp: float = 5.0):
        super().__init__()
        self.logits = nn.Parameter(torch.full((num_steps, num_blocks, num_branches), float(init_logit)))
        self.clamp = clamp

    def forward(self) -> torch.Tensor:
        return torch.sigmoid(self.logits)

    @torch.no_grad()
    def clamp_(self) -> None:
        self.logits.clamp_(-self.clamp, self.clamp)
