"""Activation codecs: error bounds from the number formats, exact byte counts, padding that never travels."""

from __future__ import annotations

import pytest
import torch

from hf_fsl_sage.splitting.loss import ChunkedLMLoss
from hf_fsl_sage.splitting.split import Smashed, split_causal_lm
from hf_fsl_sage.transport.codecs import (
    CODECS,
    ActivationCoder,
    MalformedUpload,
    decode_labels,
    encode_labels,
    label_dtype,
)
from hf_fsl_sage.transport.local import LocalTransport
from tests.launches import CODEC_RUNS, EQUAL_GROUP, adapter, result
from tests.tiny_models import tiny_causal_lm


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


# Bytes per kept position of the hidden states (with the per-token scale), written out from the formats.
PER_TOKEN = {"none": H * 4, "bf16": H * 2, "fp16": H * 2, "int8": H * 1 + 2, "int4": H // 2 + 2}
# Bytes per label: the smallest integer holding the token ids 0..V-1 and the ignore index (one more code).
LABEL_BYTES = {200: 1, 255: 1, 256: 2, 50257: 2, 65535: 2, 65536: 4, None: 8}


@pytest.mark.parametrize("vocab", [50257, 200, None])
@pytest.mark.parametrize("name", sorted(CODECS))
def test_ledger_counts_the_encoded_bytes_of_the_kept_positions_only(name, vocab):
    smashed, labels, mask = _upload()
    kept, batch = int(mask.sum()), mask.shape[0]  # 7 + 5 + 2 = 14 of 21 positions
    assert kept == 14
    transport = LocalTransport()
    transport.coder = ActivationCoder(name, hidden_size=H, vocab_size=vocab)
    server_smashed, server_labels = transport.to_server(0, "smashed", (smashed, labels))
    gradient = torch.randn(3, 7, H) * mask.unsqueeze(-1)
    client_gradient = transport.to_client(0, "gradient", gradient)
    # encoded hidden rows and coded labels of the kept positions; one length per row (1 byte: seq <= 255)
    assert transport.ledger.by_kind["smashed_up"] == kept * (PER_TOKEN[name] + LABEL_BYTES[vocab]) + batch * 1
    assert transport.ledger.by_kind["gradient_down"] == kept * PER_TOKEN[name]
    # padding comes back as zeros (hidden, gradient) and -100 (labels); no NaN crossed the wire
    assert not server_smashed.hidden_states.isnan().any()
    assert torch.equal(server_smashed.hidden_states[~mask], torch.zeros(7, H))
    assert torch.equal(server_labels, labels) and torch.equal(server_smashed.attention_mask, mask)
    assert torch.equal(client_gradient[~mask], torch.zeros(7, H))
    if name == "none":
        assert torch.equal(server_smashed.hidden_states[mask], smashed.hidden_states[mask])
        assert torch.equal(client_gradient, gradient)


def test_the_whole_message_is_counted_down_to_the_byte():
    """GPT-2's vocabulary, rows of 300 positions: int16 labels, int16 lengths; written out by hand."""
    batch, seq, hidden = 2, 300, 8
    mask = torch.zeros(batch, seq, dtype=torch.bool)
    mask[0, :300] = True
    mask[1, :17] = True
    labels = torch.full((batch, seq), -100)
    labels[mask] = 50256  # the largest GPT-2 id
    labels[1, 0] = 0
    transport = LocalTransport()
    transport.coder = ActivationCoder("int8", hidden_size=hidden, vocab_size=50257)
    got, got_labels = transport.to_server(0, "smashed", (Smashed(torch.randn(batch, seq, hidden), mask), labels))
    # 317 kept positions: 8 int8 codes + a bf16 scale + an int16 label each; 2 int16 lengths
    assert transport.ledger.by_kind["smashed_up"] == 317 * (8 + 2 + 2) + 2 * 2
    assert torch.equal(got_labels, labels) and torch.equal(got.attention_mask, mask)


@pytest.mark.parametrize("vocab, ids", [(255, [0, 254]), (256, [0, 255]), (65535, [0, 32767, 32768, 65534]),
                                        (65536, [0, 65535]), (1 << 20, [0, (1 << 20) - 1]), (None, [0, 1 << 40])])
def test_labels_map_to_the_smallest_integer_and_back_exactly(vocab, ids):
    labels = torch.tensor([*ids, -100])
    dtype = label_dtype(vocab)
    assert dtype.itemsize == LABEL_BYTES.get(vocab, 4)
    codes = encode_labels(labels, dtype)
    assert codes.dtype == dtype and len(set(codes.tolist())) == len(ids) + 1  # -100 has a code of its own
    assert torch.equal(decode_labels(codes), labels)


def test_rows_are_sent_up_to_the_longest_one_and_come_back_at_the_clients_width():
    """Padding past the longest row (a collator padding to a multiple, or to a fixed width) does not travel:
    the server gets the batch up to its longest row; the gradient comes back at the client's width."""
    smashed, labels, mask = _upload(seq=7)
    wide = Smashed(torch.cat([smashed.hidden_states, torch.full((3, 5, H), float("nan"))], 1),
                   torch.cat([mask, torch.zeros(3, 5, dtype=torch.bool)], 1))
    wide_labels = torch.cat([labels, torch.full((3, 5), -100)], 1)
    transport = LocalTransport()
    transport.coder = ActivationCoder("none", hidden_size=H, vocab_size=50)
    got, got_labels = transport.to_server(0, "smashed", (wide, wide_labels))
    assert got.hidden_states.shape == (3, 7, H) and torch.equal(got.attention_mask, mask)
    assert torch.equal(got_labels, labels)
    back = transport.to_client(0, "gradient", torch.ones(3, 7, H) * mask.unsqueeze(-1))
    assert back.shape == (3, 12, H) and torch.equal(back, wide.attention_mask.unsqueeze(-1).float().expand(-1, -1, H))


def test_a_mask_that_is_not_right_padding_travels_as_it_is():
    smashed, labels, mask = _upload()
    left = mask.flip(1)  # left padding: kept positions are not a prefix of each row
    hidden = smashed.hidden_states.flip(1)
    coder = ActivationCoder("bf16", hidden_size=H, vocab_size=50)
    encoded = coder.encode(0, "smashed", (Smashed(hidden, left), torch.full_like(labels, -100)))
    assert encoded["lengths"] is None and torch.equal(encoded["mask"], left)
    got, _ = coder.decode(0, "smashed", encoded)
    assert torch.equal(got.attention_mask, left) and torch.equal(got.hidden_states[~left], torch.zeros(7, H))


def test_nothing_of_a_padding_position_is_encoded():
    smashed, labels, _ = _upload()
    for name in CODECS:
        encoded = ActivationCoder(name, hidden_size=H, vocab_size=50).encode(0, "smashed", (smashed, labels))
        rows = encoded["rows"]
        assert all(t.shape[0] == 14 for t in rows.values()) and encoded["labels"].shape == (14,)
        assert all(not t.float().isnan().any() for t in rows.values())
        assert encoded["mask"] is None and encoded["lengths"].tolist() == [7, 5, 2]


@pytest.mark.parametrize("where, problem", [((2, 3), "has a label or predicts a labelled token"),
                                            ((1, 5), "has a label or predicts a labelled token")])
def test_padding_that_carries_or_predicts_a_label_is_refused(where, problem):
    smashed, labels, _ = _upload()
    labels[where] = 7  # (2, 3): padding position 2 would predict it; (1, 5): a label on padding (kept 4 predicts it)
    with pytest.raises(ValueError, match=problem):
        ActivationCoder("none").encode(0, "smashed", (smashed, labels))


def test_a_label_outside_the_vocabulary_is_refused_by_the_sender():
    smashed, labels, _ = _upload()
    labels[0, 3] = 50
    with pytest.raises(ValueError, match="label 50 is outside the vocabulary"):
        ActivationCoder("none", vocab_size=50).encode(0, "smashed", (smashed, labels))


def _crafted(change) -> dict:
    smashed, labels, _ = _upload()
    message = ActivationCoder("int8", hidden_size=H, vocab_size=300).encode(0, "smashed", (smashed, labels))
    change(message)
    return message


def _set(key, value):
    def change(message):
        message[key] = value
    return change


def _rows(key, value):
    def change(message):
        message["rows"][key] = value
    return change


@pytest.mark.parametrize("change, problem", [
    (_set("extra", None), "not a dict of exactly rows, lengths, mask, position_ids and labels"),
    (_set("labels", torch.zeros(14, dtype=torch.int64)), "labels are not a tensor of torch.int16"),
    (_set("labels", torch.zeros(13, dtype=torch.int16)), r"labels of shape \(13,\) for 14 kept positions"),
    (_set("labels", torch.full((14,), 300 - 32768, dtype=torch.int16)), "a label is outside the vocabulary"),
    (_set("lengths", torch.tensor([7, 5, 3], dtype=torch.uint8)), r"leading sizes \[\(14,\)\], expected \(15,\)"),
    (_set("lengths", torch.tensor([7, 9, -2], dtype=torch.int16)), "a row length is negative"),
    (_set("lengths", torch.tensor([7, 5, 2, 0], dtype=torch.uint8)), "4 rows, more than a batch"),
    (_set("lengths", torch.tensor([7., 5., 2.])), "lengths are not a 1-d tensor"),
    (_set("mask", torch.ones(3, 7, dtype=torch.bool)), "both row lengths and a mask"),
    (_rows("scale", torch.ones(1, dtype=torch.bfloat16)), r"leading sizes \[\(1,\), \(14,\)\]"),
    (_rows("scale", torch.ones(14, dtype=torch.float32)), "scale is torch.float32"),
    (_rows("q", torch.zeros(14, H + 1, dtype=torch.int8)), r"q is torch.int8 of shape \(14, 17\)"),
    (_rows("values", torch.zeros(14, H)), r"does not hold the fields \['q', 'scale'\]"),
])
def test_a_malformed_upload_is_refused_before_it_is_decoded(change, problem):
    coder = ActivationCoder("int8", hidden_size=H, vocab_size=300)
    with pytest.raises(MalformedUpload, match=problem):
        coder.decode(0, "smashed", _crafted(change), {"batch": 3})


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
@pytest.mark.parametrize("width", [9, 12])
def test_dropping_padding_changes_neither_the_server_loss_nor_its_gradient(model_type, width):
    """Through the transport (padding dropped, zeros rebuilt) the server computes what it computes on the
    client's full activations; the gradient it sends back is the full one, zeros at the padding included.
    Bit for bit when the batch is as wide as its longest row; up to rounding when it is padded wider."""
    model = tiny_causal_lm(model_type, num_layers=3)
    split = split_causal_lm(model, 1).eval()
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab - 1, (3, width))
    mask = torch.ones_like(ids)
    mask[0, 9:] = 0
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    loss_fn = ChunkedLMLoss(split.server, 1024)
    with torch.no_grad():
        smashed = split.client(ids, mask, None)

    def server(s: Smashed, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = s.hidden_states.detach().requires_grad_(True)
        loss = loss_fn(Smashed(hidden, s.attention_mask, s.position_ids), y)
        loss.backward()
        return loss.detach(), hidden.grad

    direct_loss, direct_grad = server(smashed, labels)
    reference = model(input_ids=ids, attention_mask=mask, labels=labels).loss.detach()
    transport = LocalTransport()
    transport.coder = ActivationCoder("none", hidden_size=split.server.embed_dim, vocab_size=vocab)
    received, received_labels = transport.to_server(0, "smashed", (smashed, labels))
    assert torch.equal(received_labels, labels[:, :9])
    loss, grad = server(received, received_labels)
    back = transport.to_client(0, "gradient", grad)
    assert float((direct_loss - reference).abs()) < 1e-5
    assert torch.equal(direct_grad[mask == 0], torch.zeros_like(direct_grad[mask == 0]))
    if width == 9:
        assert float(loss) == float(direct_loss)
        assert torch.equal(back, direct_grad)
    else:
        assert float(loss) == pytest.approx(float(direct_loss), rel=1e-6)
        torch.testing.assert_close(back, direct_grad, rtol=1e-5, atol=1e-6 * float(direct_grad.abs().max()))
        assert torch.equal(back[mask == 0], torch.zeros_like(back[mask == 0]))


@pytest.mark.slow
@pytest.mark.xdist_group(EQUAL_GROUP)
@pytest.mark.parametrize("algorithm, codec", CODEC_RUNS)
def test_three_processes_decode_exactly_like_one(equal_runs, algorithm, codec):
    """Encoded on the client's process, decoded on the server's (and back): the same run as in one process."""
    one, three = (equal_runs / side / f"{algorithm}-{codec}" for side in ("one", "three"))
    a, b = adapter(one), adapter(three)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5
    assert result(three)["ledger"] == result(one)["ledger"]
    assert result(three)["eval"]["eval_loss"] == pytest.approx(result(one)["eval"]["eval_loss"], abs=1e-5)
