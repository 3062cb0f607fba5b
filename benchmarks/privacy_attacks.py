"""What an honest-but-curious server can read from what it receives (used by ``benchmarks/privacy.py``).

The server holds the public base model, the global client model it aggregates, and everything that reaches it:
the uploaded cut-layer activations, with labels on the server the labels, and with labels on the client the
gradients of the client's loss w.r.t. the server's output. It knows the defence in use (its settings are part of
the protocol), so its learned inverters are fitted on public text passed through the same defence.

- :func:`fit_inverter` / :func:`invert`: a linear map or a two-layer MLP from a token's activation to its id,
  fitted on public text run through client blocks the server holds;
- :func:`nearest_token_search`: white-box, position by position, the token whose client-block output (given the
  tokens recovered before it) is nearest the upload;
- :func:`labels_from_gradients`: with labels on the client and a frozen final norm and head (LoRA), the label
  whose gradient w.r.t. the server's output best explains the one the client returned.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hf_fsl_sage.splitting.split import SplitClient
from hf_fsl_sage.transport.defences import ActivationDefence


@dataclass
class Observed:
    """Token ids and the activations of the positions that travelled, one row per kept position."""

    ids: torch.Tensor  # (tokens,)
    hidden: torch.Tensor  # (tokens, width)
    rows: list[int]  # tokens per sequence, in order


@torch.no_grad()
def client_activations(client: SplitClient, batches: list[dict[str, torch.Tensor]],
                       defence: ActivationDefence | None = None, training: bool = False) -> Observed:
    """``client``'s cut-layer output on ``batches`` (through ``defence`` when given), at the kept positions; with
    ``training``, with the dropout of training, as the uploads have it."""
    ids, hidden, rows = [], [], []
    client.train(training)
    for batch in batches:
        mask = batch["attention_mask"].bool()
        if defence is not None and defence.active:
            with defence.on_embeddings(client.input_embeddings()):
                out = client(batch["input_ids"], batch["attention_mask"]).hidden_states
            out = defence.protect(out)
        else:
            out = client(batch["input_ids"], batch["attention_mask"]).hidden_states
        ids.append(batch["input_ids"][mask])
        hidden.append(out[mask].float())
        rows += mask.sum(1).tolist()
    return Observed(torch.cat(ids), torch.cat(hidden), rows)


class _Inverter(nn.Module):
    def __init__(self, width: int, vocab: int, hidden: int | None, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.net = nn.Linear(width, vocab) if hidden is None else nn.Sequential(
            nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, vocab))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


def fit_inverter(public: list[Observed], vocab: int, kind: str = "linear", steps: int = 300, batch: int = 1024,
                 seed: int = 0) -> nn.Module:
    """A token classifier on standardised activations: ``"linear"`` (softmax regression, Adam 1e-2) or ``"mlp"``
    (one hidden layer of 128, GELU, Adam 3e-3), on minibatches of ``batch`` tokens of the public activations
    (of every client model in ``public`` together)."""
    torch.manual_seed(seed)
    x, y = torch.cat([p.hidden for p in public]), torch.cat([p.ids for p in public])
    model = _Inverter(x.shape[1], vocab, None if kind == "linear" else 128, x.mean(0), x.std(0).clamp_min(1e-6))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2 if kind == "linear" else 3e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        pick = torch.randint(x.shape[0], (min(batch, x.shape[0]),), generator=generator)
        loss = F.cross_entropy(model(x[pick]), y[pick])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@torch.no_grad()
def invert(inverter: nn.Module, observed: Observed) -> torch.Tensor:
    return inverter(observed.hidden).argmax(-1)


@torch.no_grad()
def nearest_token_search(client: SplitClient, observed: Observed, vocab: int, max_rows: int, max_tokens: int,
                         clip: float | None = None, chunk: int = 2048) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Recovered ids of the first ``max_tokens`` positions of the first ``max_rows`` sequences, their true ids
    (both flat over positions) and the positions searched per sequence."""
    client.eval()
    found, truth, start, searched = [], [], 0, []
    defence = ActivationDefence(clip)
    for row_length in observed.rows[:max_rows]:
        length = min(row_length, max_tokens)
        target = observed.hidden[start:start + length]
        truth.append(observed.ids[start:start + length])
        start += row_length
        searched.append(length)
        prefix = torch.zeros(0, dtype=torch.long)
        for t in range(length):
            best, best_id = None, 0
            for lo in range(0, vocab, chunk):
                candidates = torch.arange(lo, min(vocab, lo + chunk))
                ids = torch.cat([prefix.expand(len(candidates), t), candidates[:, None]], dim=1)
                out = defence.protect(client(ids).hidden_states[:, t].float())
                distance = (out - target[t]).norm(dim=-1)
                value, index = distance.min(0)
                if best is None or value < best:
                    best, best_id = value, int(candidates[index])
            prefix = torch.cat([prefix, torch.tensor([best_id])])
        found.append(prefix)
    return torch.cat(found), torch.cat(truth), searched


def recovery(found: torch.Tensor, truth: torch.Tensor, rows: list[int]) -> tuple[float, float]:
    """(share of tokens recovered, share of sequences recovered exactly)."""
    hits = found == truth
    exact, start = [], 0
    for length in rows:
        if start + length > hits.numel():
            break
        exact.append(bool(hits[start:start + length].all()))
        start += length
    return float(hits.float().mean()), sum(exact) / max(1, len(exact))


@torch.no_grad()
def labels_from_gradients(norm: nn.Module, head_weight: torch.Tensor, top: torch.Tensor, gradient: torch.Tensor,
                          label_smoothing: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels recovered from the gradients the client returned, with the final norm and head the server knows.

    For a labelled position of the server's output ``h`` (at index ``i``, predicting the token at ``i + 1``) the
    returned gradient is ``J^T W^T (softmax(W norm(h)) - q(y)) / N``, ``J`` the norm's Jacobian, ``q(y)`` the
    smoothed one-hot label and ``N`` the labelled positions of the batch (those whose gradient is not zero). The
    server picks the ``y`` whose predicted gradient is nearest. Returns (recovered labels, the positions they
    belong to) for one sequence batch ``top`` / ``gradient`` of shape (batch, seq, width).
    """
    rows = gradient.reshape(-1, gradient.shape[-1]).float()
    h = top.reshape(-1, top.shape[-1]).float()
    labelled = rows.abs().amax(-1) > 0
    count = int(labelled.sum())
    if count == 0:
        return torch.zeros(0, dtype=torch.long), labelled
    h, rows = h[labelled], rows[labelled]
    weight = head_weight.float()
    vocab = weight.shape[0]
    jacobians = torch.func.vmap(torch.func.jacrev(lambda x: norm(x.unsqueeze(0)).squeeze(0)))(h)  # (n, out, in)
    probs = torch.softmax(norm(h) @ weight.T, dim=-1)
    smoothing = label_smoothing / vocab
    common = torch.einsum("noi,no->ni", jacobians, (probs - smoothing) @ weight) / count
    per_label = torch.einsum("noi,vo->nvi", jacobians, weight) * ((1 - label_smoothing) / count)
    predicted = common.unsqueeze(1) - per_label  # (n, vocab, width)
    return (predicted - rows.unsqueeze(1)).norm(dim=-1).argmin(-1), labelled
