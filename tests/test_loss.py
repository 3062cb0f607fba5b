"""The chunked LM-head loss: equal to the plain loss, and the head recomputed only where it saves memory."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hf_fsl_sage.splitting.loss import causal_lm_loss


class CountingHead(nn.Linear):
    """An LM head that counts its forward passes (the recomputation of a checkpointed chunk is one)."""

    calls = 0

    def forward(self, x):
        CountingHead.calls += 1
        return super().forward(x)


def _case(positions: int = 12, hidden: int = 8, vocab: int = 20):
    torch.manual_seed(0)
    head = CountingHead(hidden, vocab, bias=False)
    states = torch.randn(2, positions, hidden, requires_grad=True)
    labels = torch.randint(0, vocab, (2, positions))
    labels[0, :3] = -100
    return head, states, labels


def _run(chunk_tokens: int, checkpoint: bool):
    head, states, labels = _case()
    CountingHead.calls = 0
    loss = causal_lm_loss(states, head, labels, 0.1, chunk_tokens, checkpoint)
    loss.backward()
    return loss.detach(), states.grad, head.weight.grad, CountingHead.calls


def test_chunked_loss_matches_the_plain_loss_and_recomputes_only_several_chunks():
    head, states, labels = _case()
    logits = head(states)[:, :-1].reshape(-1, 20)
    plain = F.cross_entropy(logits, labels[:, 1:].reshape(-1), label_smoothing=0.1)
    # 2 x 11 predicted positions, 19 of them labelled
    one_chunk, several, unchecked = _run(64, True), _run(5, True), _run(64, False)
    assert float((one_chunk[0] - plain.detach()).abs()) < 1e-6
    # one chunk: its logits are the peak with or without recomputation, so the head runs once
    assert one_chunk[3] == 1 and unchecked[3] == 1
    # 19 labelled positions in chunks of 5: 4 chunks, each run forward and again in the backward pass
    assert several[3] == 8
    for a, b in zip(one_chunk[:3], unchecked[:3]):
        assert torch.equal(a, b)
    for a, b in zip(one_chunk[:3], several[:3]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
