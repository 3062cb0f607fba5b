"""Aligning an auxiliary model to the server by gradient matching (FSL-SAGE)."""

from __future__ import annotations

import torch
from torch import nn

from ...splitting.loss import ChunkedLMLoss
from ...splitting.split import Smashed, SplitServer
from ..gradients import gradient_wrt_hidden, mean_cosine


def true_gradients(server_loss: ChunkedLMLoss, server: nn.Module, buffer: list[tuple[Smashed, torch.Tensor]],
                   label_smoothing: float) -> list[torch.Tensor]:
    """The current server's gradient w.r.t. each buffered upload, in eval mode (no dropout)."""
    was_training = server.training
    server.eval()
    try:
        return [gradient_wrt_hidden(server_loss, s, y, label_smoothing) for s, y in buffer]
    finally:
        server.train(was_training)


def align(
    aux: SplitServer,
    aux_loss: ChunkedLMLoss,
    buffer: list[tuple[Smashed, torch.Tensor]],
    targets: list[torch.Tensor],
    epochs: int,
    optimizer: torch.optim.Optimizer,
    label_smoothing: float,
) -> tuple[float, float]:
    """Train ``aux`` so that its gradient w.r.t. the smashed activations matches ``targets``, the server's.

    The targets are the server's true gradients on the buffered uploads (:func:`true_gradients`, or with private
    labels the ones the server computed from the client's returned gradient when each upload was served).
    The objective per buffered batch is ``||g_aux - g||^2 / ||g||^2``: the
    paper's squared error, made scale-free so that Adam's epsilon cannot swamp
    the tiny per-token gradients of a mean loss. The auxiliary model runs in eval mode
    (no dropout) so estimates are deterministic. Returns the mean
    cosine similarity between estimate and target before and after.
    """
    was_training = aux.training
    aux.eval()

    def cosine() -> float:
        sims = [mean_cosine(gradient_wrt_hidden(aux_loss, s, y, label_smoothing), g)
                for (s, y), g in zip(buffer, targets)]
        weights = [g.shape[0] for g in targets]
        return float(sum(c * w for c, w in zip(sims, weights)) / sum(weights))

    before = cosine()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for _ in range(epochs):
        for (smashed, labels), target in zip(buffer, targets):
            estimate = gradient_wrt_hidden(aux_loss, smashed, labels, label_smoothing, create_graph=True)
            objective = (estimate - target).pow(2).sum() / target.pow(2).sum().clamp_min(1e-30)
            grads = torch.autograd.grad(objective, params, allow_unused=True)
            for p, g in zip(params, grads):
                p.grad = g
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    after = cosine()
    aux.train(was_training)
    return before, after
