"""What crosses the cut besides the hidden states, for the families whose server blocks need it.

Zaya's routers read the router state of the block before, Inkling-2's blocks a stack of earlier blocks'
inputs, DeepSeek-V4's hash-routed experts the token ids. Each is declared per family
(``hf_fsl_sage.splitting.families.CARRIED_INPUTS``), taken from the client's forward, sent in the upload, checked
on receipt, counted in the ledger, and, when it is an activation, differentiated like the hidden states.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from hf_fsl_sage import Smashed, SplitCausalLM, split_causal_lm
from hf_fsl_sage.algorithms.base import Algorithm
from hf_fsl_sage.federation.state_io import load_state, save_state
from hf_fsl_sage.splitting.families import text_revealing_inputs
from hf_fsl_sage.transport.base import conforms, flatten, payload_nbytes, unflatten
from hf_fsl_sage.transport.codecs import ActivationCoder, MalformedUpload
from hf_fsl_sage.transport.distributed import MalformedMessage, decode_header, encode_header, pack, unpack
from hf_fsl_sage.transport.local import LocalTransport
from tests.launches import EQUAL_GROUP, adapter, result
from tests.tiny_models import tiny_causal_lm


CUT, BATCH, SEQ, HIDDEN, VOCAB = 2, 2, 7, 64, 256


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    return {f: tiny_causal_lm(f, num_layers=3) for f in ("zaya", "inkling2_text", "deepseek_v4")}


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, VOCAB - 8, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0  # right padding
    return ids, mask


def _client_side(model: torch.nn.Module) -> tuple[SplitCausalLM, torch.Tensor, torch.Tensor, Smashed]:
    """The model split before block ``CUT``, the inputs and what the client sends for them."""
    split = split_causal_lm(model, CUT)
    ids, mask = _inputs()
    with torch.no_grad():
        return split, ids, mask, split.client(ids, mask)


# (family, carried name, its shape after batch and sequence, floating point)
CARRIED = [("zaya", "router_state", (16,), True),  # the tiny model's router_hidden_size
           ("inkling2_text", "block_states", (CUT, HIDDEN), True),  # the inputs of blocks 0 and 1 (one per block)
           ("deepseek_v4", "token_ids", (), False)]


@pytest.mark.parametrize(("family", "name", "shape", "floating"), CARRIED)
def test_the_upload_carries_what_the_family_declares(models, family, name, shape, floating) -> None:
    split, ids, mask, smashed = _client_side(models[family])
    value = smashed.carried[name]
    assert set(smashed.carried) == {name} and value.shape == (BATCH, SEQ, *shape)
    assert value.is_floating_point() == floating and split.carried_shapes[name][0] == shape
    if not floating:
        assert torch.equal(value, ids)  # the token ids themselves
    hidden = smashed.hidden_states
    assert smashed.nbytes == hidden.numel() * 4 + mask.numel() + value.numel() * value.element_size()
    assert list(smashed.activations()) == ["hidden_states", name] if floating else ["hidden_states"]


@pytest.mark.parametrize(("family", "name", "shape", "floating"), CARRIED)
def test_the_server_reads_what_is_carried(models, family, name, shape, floating) -> None:
    """The split is exact with the carried value (the family tests check that) and not without it."""
    split, ids, mask, smashed = _client_side(models[family])
    with torch.no_grad():
        reference = models[family](input_ids=ids, attention_mask=mask).logits
        assert torch.allclose(split.server(smashed).logits, reference, atol=1e-5, rtol=0)
        value = smashed.carried[name]  # (Inkling-2 normalises the stack: a rescaled one would read the same)
        other = torch.randn_like(value) * value.std() * 4 if floating else (value + 1) % VOCAB
        changed = split.server(Smashed(smashed.hidden_states, smashed.attention_mask, None, {name: other})).logits
    assert (changed - reference).abs().max() > 1e-3


def test_token_ids_are_declared_as_revealing_the_text(models) -> None:
    """A split that keeps the labels on the client must refuse DeepSeek-V4: its upload holds the text anyway."""
    assert text_revealing_inputs("deepseek_v4") == ["token_ids"]
    assert text_revealing_inputs("zaya") == text_revealing_inputs("llama") == []
    assert split_causal_lm(models["deepseek_v4"], CUT).text_revealing_inputs == ["token_ids"]
    assert split_causal_lm(models["inkling2_text"], CUT).text_revealing_inputs == []


@pytest.mark.parametrize("family", ["zaya", "inkling2_text"])
def test_split_training_gets_the_unsplit_gradients(models, family) -> None:
    """As on the wire: the server differentiates its loss w.r.t. the hidden states and the carried activations,
    sends both gradients back, the client backpropagates them; every weight gets the unsplit model's gradient."""
    model = models[family]
    ids, mask = _inputs()
    labels = ids.masked_fill(mask == 0, -100)
    model.zero_grad()
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    split = split_causal_lm(model, CUT)
    smashed = split.client(ids, mask)
    leaves = smashed.detach().leaves()
    split.server(leaves, labels=labels).loss.backward()
    reply = leaves.gradients()
    assert isinstance(reply, dict) and set(reply) == set(smashed.activations())
    smashed.backward(reply)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    if split.head_copied:  # the tied matrix is two matrices after the split: their gradients add up
        embedding = next(n for n, p in model.named_parameters() if p is model.get_input_embeddings().weight)
        grads[embedding] = grads[embedding] + split.server.lm.get_output_embeddings().weight.grad
    assert grads.keys() == reference.keys()
    for n, g in reference.items():
        assert torch.allclose(grads[n], g, atol=1e-6, rtol=1e-4), n


def _coder(split, codec: str = "none") -> ActivationCoder:
    return ActivationCoder(codec, hidden_size=split.cut_width, vocab_size=VOCAB, hidden_shape=split.cut_shape,
                           carried=split.carried_shapes)


@pytest.mark.parametrize(("family", "name", "shape", "floating"), CARRIED)
def test_the_ledger_counts_the_carried_bytes_of_the_kept_positions(models, family, name, shape, floating) -> None:
    split, ids, mask, smashed = _client_side(models[family])
    labels = ids.masked_fill(mask == 0, -100)
    transport = LocalTransport()
    transport.coder = _coder(split)
    received, received_labels = transport.to_server(0, "smashed", (smashed, labels))
    kept = int(mask.sum())  # 7 + 4
    per_token = 2 if not floating else 4 * torch.Size(shape).numel()  # token ids as labels (int16: 256 ids), fp32
    hidden = 4 * torch.Size(split.cut_shape).numel()
    assert transport.ledger.by_kind["smashed_up"] == kept * (hidden + 2 + per_token) + BATCH  # labels int16, lengths
    keep = mask.bool()
    assert torch.equal(received.carried[name][keep], smashed.carried[name][keep])
    assert torch.equal(received_labels, labels)
    with torch.no_grad():
        assert torch.allclose(split.server(received, labels=labels).loss, split.server(smashed, labels=labels).loss)


def _encoded(split, coder: ActivationCoder | None = None) -> dict:
    ids, mask = _inputs()
    with torch.no_grad():
        smashed = split.client(ids.clamp(max=199), mask)
    return (coder or _coder(split)).encode(0, "smashed", (smashed, ids.clamp(max=199).masked_fill(mask == 0, -100)))


@pytest.mark.parametrize(("change", "problem"), [
    (lambda m: m.pop("carried"), "exactly rows, lengths, mask, position_ids, labels and carried"),
    (lambda m: m["carried"].pop("token_ids"), r"carries \[\] besides the hidden states, expected \['token_ids'\]"),
    (lambda m: m["carried"].update(token_ids=m["carried"]["token_ids"][:-1]), r"int16 tensor of shape \(11"),
    (lambda m: m["carried"].update(token_ids=m["carried"]["token_ids"].long()), "not a torch.int16 tensor"),
])
def test_a_malformed_carried_input_is_refused_on_receipt(models, change, problem) -> None:
    split = split_causal_lm(models["deepseek_v4"], CUT)
    message = _encoded(split)
    change(message)
    with pytest.raises(MalformedUpload, match=problem):
        _coder(split).decode(0, "smashed", message)


def test_token_ids_outside_the_vocabulary_are_refused(models) -> None:
    split = split_causal_lm(models["deepseek_v4"], CUT)
    coder = ActivationCoder("none", hidden_size=split.cut_width, vocab_size=200, hidden_shape=split.cut_shape,
                            carried=split.carried_shapes)
    message = _encoded(split, coder)
    assert coder.decode(0, "smashed", _encoded(split, coder)) is not None  # ids below 200 pass
    message["carried"]["token_ids"] = torch.full_like(message["carried"]["token_ids"], 250)  # uint8 codes >= 200
    with pytest.raises(MalformedUpload, match="token_ids is outside the vocabulary"):
        coder.decode(0, "smashed", message)


def test_the_expected_upload_names_the_carried_inputs(models) -> None:
    split, ids, mask, smashed = _client_side(models["zaya"])
    expected, limits = Algorithm.expected_upload(SimpleNamespace(fed=SimpleNamespace(split=split, batch_size=2)),
                                                 None)
    labels = ids.masked_fill(mask == 0, -100)
    assert conforms((smashed, labels), expected, limits) is None
    bare = Smashed(smashed.hidden_states, smashed.attention_mask)
    assert "keys differ (missing ['router_state']" in conforms((bare, labels), expected, limits)
    narrow = Smashed(smashed.hidden_states, smashed.attention_mask, None,
                     {"router_state": smashed.carried["router_state"][..., :8]})
    assert "router_state']: shape (2, 7, 8), expected ('batch', 'seq', 16)" in conforms((narrow, labels), expected,
                                                                                          limits)


@pytest.mark.parametrize("family", ["deepseek_v4", "inkling2_text"])
def test_the_wire_format_carries_the_encoded_upload_exactly(models, family) -> None:
    """Header and buffer between processes (torch.distributed): the receiver rebuilds the message bit for bit."""
    split = split_causal_lm(models[family], CUT)
    message = _encoded(split)
    spec, tensors = flatten(message)
    kind, client, got_spec = decode_header(encode_header("smashed", 1, spec))
    back = unflatten(got_spec, unpack(pack(tensors, torch.device("cpu")), got_spec[1]))
    assert (kind, client) == ("smashed", 1) and back.keys() == message.keys()
    assert back["carried"].keys() == message["carried"].keys() and payload_nbytes(back) == payload_nbytes(message)
    assert all(torch.equal(a, b) for a, b in zip(flatten(back)[1], tensors))
    smashed, labels = _coder(split).decode(1, "smashed", back)
    assert set(smashed.carried) == set(split.carried_shapes)


def test_the_wire_format_carries_a_smashed_with_carried_inputs_and_refuses_a_malformed_one() -> None:
    smashed = Smashed(torch.randn(2, 3, 4, 8), None, None, {"a": torch.randn(2, 3, 5), "b": torch.ones(2, 3).long()})
    spec, tensors = flatten(smashed)
    back = unflatten(decode_header(encode_header("x", 0, spec))[2], tensors)
    assert torch.equal(back.hidden_states, smashed.hidden_states) and back.carried.keys() == {"a", "b"}
    assert torch.equal(back.carried["b"], smashed.carried["b"]) and back.nbytes == smashed.nbytes
    structure, layout = spec
    bad = (list(structure[:4]) + [["tensor"]], layout[:3] + [layout[-1]])  # carried as a bare tensor
    with pytest.raises(MalformedMessage, match="carried inputs are not a dict node"):
        decode_header(encode_header("x", 0, bad))


def test_a_checkpoint_keeps_the_carried_inputs(tmp_path) -> None:
    """FSL-SAGE's alignment buffer holds uploads: a resumed run must get their carried inputs back."""
    smashed = Smashed(torch.randn(2, 3, 8), torch.ones(2, 3, dtype=torch.bool), None,
                      {"router_state": torch.randn(2, 3, 4), "token_ids": torch.arange(6).view(2, 3)})
    save_state({"buffer": [(smashed, torch.zeros(2, 3).long())]}, str(tmp_path / "state.safetensors"))
    back = load_state(str(tmp_path / "state.safetensors"))["buffer"][0][0]
    assert back.carried.keys() == smashed.carried.keys()
    assert all(torch.equal(back.carried[n], t) for n, t in smashed.carried.items())


@pytest.mark.slow
@pytest.mark.xdist_group(EQUAL_GROUP)
def test_three_processes_carry_the_router_state_exactly_like_one(equal_runs) -> None:
    """Server on process 0, clients on 1 and 2: the router state crosses processes in the upload and its gradient
    in the reply (SplitFed-V2, a tiny zaya, 4 global steps); the run equals the one-process run (adapters, bytes,
    losses)."""
    one, three = result(equal_runs / "one" / "router_state"), result(equal_runs / "three" / "router_state")
    assert three["world_size"] == 3
    a, b = adapter(equal_runs / "one" / "router_state"), adapter(equal_runs / "three" / "router_state")
    assert a.keys() == b.keys() and max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5
    assert any(float(t.abs().max()) > 1e-4 for k, t in a.items() if "lora_B" in k and ".layers.0." in k)
    assert three["ledger"] == one["ledger"] and one["ledger"]["by_kind"]["gradient_down"] > 0
    assert three["eval"]["eval_loss"] == pytest.approx(one["eval"]["eval_loss"], abs=1e-5)
