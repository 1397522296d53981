"""The training loss: label-smoothed cross-entropy on the loss-mask positions, as sums (the trainer divides
by the update's token count), with the LM head run only where the loss is taken."""

from __future__ import annotations

import torch
from torch import nn

from steps.model.gpt2 import GPT2

LABEL_SMOOTH_MIN = 1e-4  # the original switches label smoothing on above this value
TOKEN_MEAN_EPS = 1e-4  # the original's term in the token mean's denominator


def token_mean_scale(world: int, loss_tokens: torch.Tensor) -> torch.Tensor:
    """What each rank's summed loss is multiplied by: the mean over the update's loss tokens (all micro-batches and
    ranks, plus the original's 1e-4), times `world` because DDP averages gradients over ranks. Both update paths
    (steps/train.py, steps/training/static_update.py) compute it here."""
    return world / (loss_tokens + TOKEN_MEAN_EPS)


def masked_lm_loss(model: GPT2, batch: dict[str, torch.Tensor], label_smooth: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums over loss-mask positions of the label-smoothed loss and of the plain NLL (a batch from steps.training.data.collate).

    The LM head runs only on masked positions: with the clm objective most positions are context, and the
    vocabulary projection is the biggest matmul of the model.
    """
    hidden, _ = model.hidden(batch["input"])
    positions = batch["positions"]  # flat indices of the mask's nonzero positions (steps.training.data.collate)
    targets = batch["target"].view(-1).index_select(0, positions)
    weights = batch["mask"].view(-1).index_select(0, positions)
    return loss_at_positions(model, hidden, positions, targets, weights, label_smooth)


def static_lm_loss(model: GPT2, batch: dict[str, torch.Tensor], label_smooth: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The same sums for a static-shape batch (steps.training.static_update.static_batch): its positions, targets and
    weights come listed and padded to a fixed count on the host; padding slots weigh 0."""
    hidden, _ = model.hidden(batch["input"])
    return loss_at_positions(model, hidden, batch["index"], batch["target"], batch["weight"], label_smooth)


def loss_at_positions(model: GPT2, hidden: torch.Tensor, index: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor,
                      label_smooth: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted sums of the loss and the NLL at the flat positions `index` of `hidden` [B, T, C].

    Per token, with z the logits:
        nll = logsumexp(z) - z[y],  smooth = logsumexp(z) - mean(z),  loss = (1 - e) * nll + e * smooth
    which is the original's (1 - e) * -logp[y] + e * mean_v(-logp[v]).
    """
    logits = model.logits(hidden.flatten(0, 1).index_select(0, index)).float()
    lse = torch.logsumexp(logits, dim=-1)
    nll = lse - logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    if label_smooth > LABEL_SMOOTH_MIN:
        loss = (1.0 - label_smooth) * nll + label_smooth * (lse - logits.mean(dim=-1))
    else:
        loss = nll
    return (loss * weights).sum(), (nll * weights).sum()


class LossModule(nn.Module):
    """Wraps the model so DDP's forward hook sees the whole loss computation."""

    def __init__(self, model: GPT2, label_smooth: float):
        super().__init__()
        self.model = model
        self.label_smooth = label_smooth

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return masked_lm_loss(self.model, batch, self.label_smooth if self.training else 0.0)
