"""Gradients w.r.t. the smashed activations, and how well an auxiliary model's estimate them (CSE-FSL, FSL-SAGE)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..splitting.loss import ChunkedLMLoss
from ..splitting.split import Smashed


def gradient_wrt_hidden(
    loss_fn: ChunkedLMLoss, smashed: Smashed, labels: torch.Tensor, label_smoothing: float, create_graph: bool = False
) -> torch.Tensor:
    """d loss(model(h), y) / d h for the smashed batch (h detached from any client graph).

    When the upload carries activations besides the hidden states (:meth:`Smashed.activations`), the result is
    the gradient w.r.t. all of them, flattened per sequence and concatenated: shape ``(batch, numel / batch)``.
    """
    leaves = smashed.leaves()
    activations = list(leaves.activations().values())
    loss = loss_fn(leaves, labels, label_smoothing, checkpoint=not create_graph)
    grads = torch.autograd.grad(loss, activations, create_graph=create_graph, allow_unused=True)
    grads = [torch.zeros_like(a) if g is None else g for a, g in zip(activations, grads)]
    return grads[0] if len(grads) == 1 else torch.cat([g.flatten(1) for g in grads], dim=1)


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean over sequences of the cosine similarity of two gradients with the batch dimension first."""
    return F.cosine_similarity(a.flatten(1).float(), b.flatten(1).float(), dim=1, eps=1e-12).mean()


def heldout_cosine(aux_loss: ChunkedLMLoss, server_loss: ChunkedLMLoss, modules: tuple[nn.Module, ...],
                   smashed: Smashed, labels: torch.Tensor, label_smoothing: float) -> float:
    """Mean cosine, over the sequences of an upload, between the auxiliary and the true gradient w.r.t. it.

    ``modules`` (the auxiliary model and the server model) run in eval mode, as in the alignment's own
    cosines, so the figure does not depend on dropout draws; their modes are restored afterwards.
    """
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        target = gradient_wrt_hidden(server_loss, smashed, labels, label_smoothing)
        estimate = gradient_wrt_hidden(aux_loss, smashed, labels, label_smoothing)
        return float(mean_cosine(estimate, target))
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)
