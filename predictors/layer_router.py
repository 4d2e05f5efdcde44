"""`LayerRouter`: one gate logit per (sampling step, block, branch), the trainable part of Learning-to-Cache."""

from __future__ import annotations

import torch
from torch import nn


class LayerRouter(nn.Module):
    """Scores = sigmoid(logits); logits start equal (`init_logit`) so training alone orders the slots.

    With `forecast_logit` (the forecast action) a second logit per slot chooses, where the slot is not computed,
    between forecasting (logit > 0) and reusing; it starts at that value everywhere.
    """

    def __init__(
        self,
        num_steps: int,
        num_blocks: int,
        num_branches: int,
        init_logit: float = 2.0,
        clamp: float = 5.0,
        forecast_logit: float | None = None,
    ):
        super().__init__()
        shape = (num_steps, num_blocks, num_branches)
        self.logits = nn.Parameter(torch.full(shape, float(init_logit)))
        self.register_parameter("forecast_logits", None)
        if forecast_logit is not None:
            self.add_forecast(forecast_logit)
        self.clamp = clamp

    def add_forecast(self, forecast_logit: float) -> None:
        """The forecast-vs-reuse logits, all `forecast_logit` to start."""
        self.forecast_logits = nn.Parameter(torch.full_like(self.logits.detach(), float(forecast_logit)))

    def forward(self) -> torch.Tensor:
        return torch.sigmoid(self.logits)

    @torch.no_grad()
    def clamp_(self) -> None:
        self.logits.clamp_(-self.clamp, self.clamp)
        if self.forecast_logits is not None:
            self.forecast_logits.clamp_(-self.clamp, self.clamp)
