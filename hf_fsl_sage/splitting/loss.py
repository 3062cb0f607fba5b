"""Causal-LM loss without materialising full-vocabulary logits for every position."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as activation_checkpoint

from .stand_ins import PassThrough, path_of, with_replaced


IGNORE_INDEX = -100


def causal_lm_loss(
    hidden: torch.Tensor,
    head: nn.Module,
    labels: torch.Tensor,
    label_smoothing: float = 0.0,
    chunk_tokens: int = 1024,
    checkpoint: bool = True,
) -> torch.Tensor:
    """Mean next-token cross-entropy over positions whose label is not -100.

    Only the positions that carry a label go through ``head`` (for E2E that is
    the reference text only), ``chunk_tokens`` at a time; with ``checkpoint``
    and more than one chunk, each chunk's logits are recomputed in the backward
    pass instead of being kept, so peak memory is one chunk of logits. A single
    chunk is not recomputed: the backward pass starts with its logits alive
    either way, so recomputing them would cost a head forward and save nothing.
    Matches transformers' ``ForCausalLMLoss`` (shift by one, fp32 logits, mean
    over labelled tokens). Use ``checkpoint=False`` when second-order gradients
    are needed.
    """
    targets = labels[:, 1:].reshape(-1).to(hidden.device)
    keep = (targets != IGNORE_INDEX).nonzero(as_tuple=True)[0]
    if keep.numel() == 0:
        return hidden.sum() * 0.0
    states = hidden[:, :-1].reshape(-1, hidden.shape[-1]).index_select(0, keep)
    targets = targets.index_select(0, keep)

    def chunk_loss(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(head(h).float(), y, reduction="sum", label_smoothing=label_smoothing)

    total = hidden.new_zeros((), dtype=torch.float32)
    checkpoint = checkpoint and torch.is_grad_enabled() and states.shape[0] > chunk_tokens
    for start in range(0, states.shape[0], chunk_tokens):
        h, y = states[start : start + chunk_tokens], targets[start : start + chunk_tokens]
        if checkpoint:
            total = total + activation_checkpoint(chunk_loss, h, y, use_reentrant=False)
        else:
            total = total + chunk_loss(h, y)
    return total / keep.numel()


class _HeadlessOutput(PassThrough):
    """The trunk's LM head: returns the final hidden states, and shows the real head's ``weight``
    (some families read it in their forward, e.g. Mamba for the dtype of its logits)."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self._head = [head]  # not a submodule: the trunk shares the server's weights, it owns none

    @property
    def weight(self) -> torch.Tensor:
        return self._head[0].weight


class ChunkedLMLoss(nn.Module):
    """Loss of a split server (or auxiliary model) computed from its final hidden states, chunk by chunk.

    ``trunk`` is the same forward with the LM head replaced by an identity, so
    it returns the final-norm hidden states; the head is applied to labelled
    positions only. The first call checks on the real batch that head(trunk)
    reproduces the model's own logits; families that post-process logits
    (soft-capping, scaling) fall back to the model's own loss path.
    """

    def __init__(self, server: nn.Module, chunk_tokens: int = 1024):
        super().__init__()
        self.server = server
        self.chunk_tokens = chunk_tokens
        lm = server.lm
        head = lm.get_output_embeddings()
        head_path = path_of(lm, head)
        trunk = copy.copy(server)
        trunk._modules = dict(server._modules)
        trunk.lm = with_replaced(lm, {head_path: _HeadlessOutput(head)})
        self._trunk = [trunk]  # shares every weight with ``server``
        self._head_path = head_path
        self.fast: bool | None = None

    @property
    def head(self) -> nn.Module:
        return self.server.lm.get_submodule(self._head_path)

    def forward(self, smashed, labels: torch.Tensor, label_smoothing: float = 0.0, checkpoint: bool = True):
        if self.fast is None:
            self.fast = self._head_reproduces_logits(smashed)
        if self.fast:
            hidden = self._trunk[0](smashed).logits
            return causal_lm_loss(hidden, self.head, labels, label_smoothing, self.chunk_tokens, checkpoint)
        logits = self.server(smashed).logits
        return causal_lm_loss(logits, PassThrough(), labels, label_smoothing, self.chunk_tokens, checkpoint=False)

    @torch.no_grad()
    def _head_reproduces_logits(self, smashed) -> bool:
        # Without dropout and without drawing from the random generators, so that the first call (whenever
        # it comes, e.g. right after a resume) changes neither the check's outcome nor later random draws.
        device = smashed.hidden_states.device
        training = self.server.training
        self.server.eval()
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                reference = self.server(smashed).logits
                hidden = self._trunk[0](smashed).logits
        finally:
            self.server.train(training)
        return hidden.shape[:-1] == reference.shape[:-1] and torch.allclose(self.head(hidden), reference, rtol=1e-4,
                                                                            atol=1e-5)
