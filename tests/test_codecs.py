"""Activation codecs: error bounds from the number formats, exact byte counts, padding that never travels."""

from __future__ import annotations

import pytest
import torch

from hf_fsl_sage.splitting.loss import ChunkedLMLoss
from hf_fsl_sage.splitting.split import Smashed, split_causal_lm
from hf_fsl_sage.testing_utils import tiny_causal_lm
from hf_fsl_sage.transport.base import LocalTransport, payload_nbytes
from hf_fsl_sage.transport.codecs import CODECS, ActivationCoder

H = 16  # hidden size of the hand-made activations


def _activations(rows: int = 64, hidden: int = H) -> torch.Tensor:
    """Rows spanning 12 orders of magnitude (activations ~1, per-token gradients of a mean loss ~1e-6)."""
    torch.manual_seed(0)
    magnitude = 10.0 ** torch.linspace(-9, 3, rows).unsqueeze(-1)
    return torch.randn(rows, hidden) * magnitude


def _round_trip(name: str, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    codec = CODECS[name]
    encoded = codec.encode(x)
    return codec.decode(encoded, torch.float32), encoded


def test_none_is_exact_and_casts_round_to_nearest():
    x = _activations()
    back, _ = _round_trip("none", x)
    assert torch.equal(back, x)
    # bf16 keeps 8 significant bits: round to nearest is within half a step, 2^-8 of the value
    back, encoded = _round_trip("bf16", x)
    assert encoded["values"].dtype == torch.bfloat16
    assert bool(((back - x).abs() <= 2**-8 * x.abs()).all())
    # fp16: 11 significant bits down to 2^-14; below, subnormals spaced 2^-24 (error <= 2^-25)
    small = torch.cat([x[x.abs().amax(-1) < 6e4], torch.tensor([[2.0**-20, -3 * 2.0**-24] + [0.0] * (H - 2)])])
    back, encoded = _round_trip("fp16", small)
    assert encoded["values"].dtype == torch.float16
    bound = torch.where(small.abs() >= 2**-14, 2**-11 * small.abs(), torch.full_like(small, 2.0**-25))
    assert bool(((back - small).abs() <= bound).all())
    with pytest.raises(ValueError, match="exceeds the torch.float16 range .* use smashed_codec='bf16'"):
        CODECS["fp16"].encode(torch.tensor([[7e4, 0.0]]))


@pytest.mark.parametrize("name, levels", [("int8", 127), ("int4", 7)])
def test_absmax_codes_err_by_at_most_half_a_step_of_their_token_scale(name, levels):
    x = _activations()
    x[3] = 0.0  # an all-zero token has scale 0 and decodes to zeros
    back, encoded = _round_trip(name, x)
    scale = encoded["scale"].float()
    assert encoded["scale"].dtype == torch.bfloat16 and scale.shape == (64,)
    exact = x.abs().amax(-1) / levels
    # the scale is absmax / levels rounded up to bf16: never below (nothing clips), less than one bf16 step above
    assert bool((scale >= exact).all()) and bool((scale <= exact * (1 + 2**-7)).all())
    assert bool(((back - x).abs() <= scale.unsqueeze(-1) / 2).all())
    assert torch.equal(back[3], torch.zeros(H))
    if name == "int4":
        assert encoded["q"].dtype == torch.uint8 and encoded["q"].shape == (64, H // 2)
    else:
        assert encoded["q"].dtype == torch.int8 and encoded["q"].shape == (64, H)


def _upload(batch: int = 3, seq: int = 7) -> tuple[Smashed, torch.Tensor, torch.Tensor]:
    """Right-padded smashed batch with NaN activations at the padding (they must never be read), and labels."""
    torch.manual_seed(1)
    mask = torch.ones(batch, seq, dtype=torch.bool)
    mask[1, 5:] = False
    mask[2, 2:] = False
    hidden = torch.randn(batch, seq, H)
    hidden[~mask] = float("nan")
    labels = torch.randint(0, 50, (batch, seq))
    labels[~mask] = -100
    labels[0, :2] = -100  # a prompt: kept, but no loss
    return Smashed(hidden, mask, None), labels, mask


# bytes per kept position of the hidden states and per-token side information, written out from the formats
PER_TOKEN = {"none": H * 4, "bf16": H * 2, "fp16": H * 2, "int8": H * 1 + 2, "int4": H // 2 + 2}


@pytest.mark.parametrize("name", sorted(CODECS))
def test_ledger_counts_the_encoded_bytes_of_the_kept_positions_only(name):
    smashed, labels, mask = _upload()
    kept, positions = int(mask.sum()), mask.numel()  # 7 + 5 + 2 = 14 of 21
    assert kept == 14
    transport = LocalTransport()
    transport.coder = ActivationCoder(name)
    server_smashed, server_labels = transport.to_server(0, "smashed", (smashed, labels))
    gradient = torch.randn(3, 7, H) * mask.unsqueeze(-1)
    client_gradient = transport.to_client(0, "gradient", gradient)
    # smashed: encoded hidden rows, int64 labels of the kept positions, the bool mask of all positions
    assert transport.ledger.by_kind["smashed_up"] == kept * (PER_TOKEN[name] + 8) + positions * 1
    assert transport.ledger.by_kind["gradient_down"] == kept * PER_TOKEN[name]
    # padding comes back as zeros (hidden, gradient) and -100 (labels); no NaN crossed the wire
    assert not server_smashed.hidden_states.isnan().any()
    assert torch.equal(server_smashed.hidden_states[~mask], torch.zeros(7, H))
    assert torch.equal(server_labels, labels) and torch.equal(server_smashed.attention_mask, mask)
    assert torch.equal(client_gradient[~mask], torch.zeros(7, H))
    if name == "none":
        assert torch.equal(server_smashed.hidden_states[mask], smashed.hidden_states[mask])
        assert torch.equal(client_gradient, gradient)


def test_nothing_of_a_padding_position_is_encoded():
    smashed, labels, _ = _upload()
    for name in CODECS:
        encoded, sent_labels = ActivationCoder(name).encode(0, "smashed", (smashed, labels))
        rows = encoded.hidden_states
        assert all(t.shape[0] == 14 for t in rows.values()) and sent_labels.shape == (14,)
        assert all(not t.float().isnan().any() for t in rows.values())
        assert payload_nbytes(encoded) < payload_nbytes(smashed)


def test_padding_that_predicts_a_labelled_token_is_refused():
    smashed, labels, _ = _upload()
    labels[2, 3] = 7  # position 2 (padding) would predict it
    with pytest.raises(ValueError, match="a padding position .* predicts a labelled token"):
        ActivationCoder("none").encode(0, "smashed", (smashed, labels))


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_dropping_padding_changes_neither_the_server_loss_nor_its_gradient(model_type):
    """Through the transport (padding dropped, zeros rebuilt) the server computes exactly what it computes on
    the client's full activations; the gradient it sends back is the full one, zeros at the padding included."""
    model = tiny_causal_lm(model_type, num_layers=3)
    split = split_causal_lm(model, 1).eval()
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab - 1, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    loss_fn = ChunkedLMLoss(split.server, 1024)
    with torch.no_grad():
        smashed = split.client(ids, mask, None)

    def server(s: Smashed) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = s.hidden_states.detach().requires_grad_(True)
        loss = loss_fn(Smashed(hidden, s.attention_mask, s.position_ids), labels)
        loss.backward()
        return loss.detach(), hidden.grad

    direct_loss, direct_grad = server(smashed)
    reference = model(input_ids=ids, attention_mask=mask, labels=labels).loss.detach()
    transport = LocalTransport()
    received, received_labels = transport.to_server(0, "smashed", (smashed, labels))
    assert torch.equal(received_labels, labels)
    loss, grad = server(received)
    assert float((direct_loss - reference).abs()) < 1e-5
    assert float(loss) == float(direct_loss)
    assert torch.equal(direct_grad[mask == 0], torch.zeros_like(direct_grad[mask == 0]))
    assert torch.equal(transport.to_client(0, "gradient", grad), direct_grad)


@pytest.mark.slow
@pytest.mark.parametrize("algorithm, codec", [("splitfed_v2", name) for name in sorted(CODECS) if name != "none"]
                         + [("fsl_sage", "int8")])
def test_three_processes_decode_exactly_like_one(tmp_path, algorithm, codec):
    """Encoded on the client's process, decoded on the server's (and back): the same run as in one process."""
    from test_distributed import _adapter, _check, _result, _single, _three

    _check(_single(tmp_path / "one", "--algorithm", algorithm, "--smashed_codec", codec))
    _check(_three(tmp_path / "three", "--algorithm", algorithm, "--smashed_codec", codec))
    one, three = _result(tmp_path / "one"), _result(tmp_path / "three")
    a, b = _adapter(tmp_path / "one"), _adapter(tmp_path / "three")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5
    assert three["ledger"] == one["ledger"]
    assert three["eval"]["eval_loss"] == pytest.approx(one["eval"]["eval_loss"], abs=1e-5)
