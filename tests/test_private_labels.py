"""Labels on the client (``private_labels=True``) and the defences on the activations: exact split, nothing of the
labels on the wire, the round trip counted by kind and encoded, equal results where the mode changes nothing,
and noise only where documented."""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import pytest
import torch

from hf_fsl_sage import FSLSageConfig, split_causal_lm
from hf_fsl_sage.federation.federation import trainable_state
from hf_fsl_sage.splitting.split import Smashed
from hf_fsl_sage.transport.base import UP, flatten
from hf_fsl_sage.transport.defences import ActivationDefence
from tests.test_algorithms import make_trainer, server_only_registered  # noqa: F401 - a fixture
from tests.tiny_models import max_split_diff, one_fsl_sage_round, round_problems, tiny_causal_lm


SENDING = ["splitfed_v1", "splitfed_v2", "cse_fsl", "fsl_sage"]


class WireLog(list):
    """``(direction, kind, payload)`` of every message, in order; ``clients`` holds each one's client."""

    clients: list[int]


def wire_log(trainer) -> WireLog:
    """Every message of ``trainer``'s run as it crosses the wire (encoded)."""
    transport, log = trainer.federation.transport, WireLog()
    log.clients = []
    move = transport._move

    def logged(client_id, direction, kind, payload):
        log.append((direction, kind, payload))
        log.clients.append(client_id)
        return move(client_id, direction, kind, payload)

    transport._move = logged
    return log


# ---------------------------------------------------------------- the split
@pytest.mark.parametrize("model_type", ["gpt2", "llama", "gemma2", "cohere", "mamba", "openai-gpt"])
def test_head_on_the_client_gives_the_unsplit_logits_and_loss(model_type):
    """(Every family the support table marks exact is checked in test_split.py.) Gemma-2 soft-caps its logits,
    Cohere scales them, OpenAI GPT has no final norm: what follows the blocks is the model's own code."""
    model = tiny_causal_lm(model_type, num_layers=3)
    logit, loss = max_split_diff(model, seq_len=10, private_labels=True)
    assert logit <= 1e-5 and loss <= 1e-6


def test_the_server_holds_its_blocks_only_and_a_client_copy_keeps_its_head_tied():
    model = tiny_causal_lm("gpt2", num_layers=3)
    model.requires_grad_(True)  # a trainable tied head: the usual split would give the server its own copy
    split = split_causal_lm(model, 1, private_labels=True)
    server = {id(p) for p in split.server.parameters()}
    assert server == {id(p) for b in model.transformer.h[1:] for p in b.parameters()}
    head = split.client.head
    assert head.lm.get_output_embeddings().weight is split.client.input_embeddings().weight
    assert any(p is model.transformer.ln_f.weight for p in head.parameters())
    assert not split.head_copied and not split.untied_after_training()
    from hf_fsl_sage.federation.federation import copy_sharing_frozen

    copy = copy_sharing_frozen(split.client)
    assert copy.head.lm.get_output_embeddings().weight is copy.input_embeddings().weight
    assert copy.input_embeddings().weight is not model.transformer.wte.weight
    with pytest.raises(RuntimeError, match="the LM head is held by the client"):
        split.server.lm.lm_head(torch.zeros(1, 64))


@pytest.mark.parametrize("model_type, problem", [
    ("deepseek_v4", "its server blocks read token_ids (hash-routed MoE layers pick their experts from the token ids), "
                    "so every upload would give the server the text"),
    ("inkling2_text", "'final_input' after the blocks reads block_states"),
])
def test_a_family_whose_carried_inputs_stand_in_the_way_is_refused_by_its_declaration(model_type, problem):
    model = tiny_causal_lm(model_type, num_layers=3)
    with pytest.raises(ValueError, match=re.escape(f"model_type {model_type!r} cannot keep the labels on the client: "
                                                   f"{problem}")):
        split_causal_lm(model, 1, private_labels=True)
    split_causal_lm(model, 1)  # with the labels on the server it splits as before


def test_the_refusal_reads_the_declaration_not_a_list_of_names(monkeypatch):
    """Zaya's router state is an activation: allowed. Declared as revealing the text, the same family is refused."""
    from hf_fsl_sage.splitting import families

    model = tiny_causal_lm("zaya", num_layers=3)
    assert split_causal_lm(model, 1, private_labels=True).private_labels
    (router,) = families.CARRIED_INPUTS["zaya"]
    monkeypatch.setitem(families.CARRIED_INPUTS, "zaya", (dataclasses.replace(router, reveals_text=True),))
    with pytest.raises(ValueError, match="cannot keep the labels on the client: its server blocks read router_state"):
        split_causal_lm(model, 1, private_labels=True)


def test_a_carried_activation_gets_the_unsplit_gradients_through_the_round_trip():
    """Zaya's upload carries the router state: the server's output goes down, the client's head returns the
    gradient w.r.t. it, the server backpropagates to the hidden states and the router state, the client through
    its blocks; every weight gets the unsplit model's gradient."""
    model = tiny_causal_lm("zaya", num_layers=3)
    ids = torch.randint(3, 200, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    model.zero_grad()
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    split = split_causal_lm(model, 2, private_labels=True)
    smashed = split.client(ids, mask)
    leaves = smashed.detach().leaves()
    output = split.server(leaves)  # the server's half, returned to the client
    top = Smashed(output.detach().requires_grad_(True), smashed.attention_mask)
    split.client.head(top, labels=labels).loss.backward()  # the client's half: its head and labels
    output.backward(top.hidden_states.grad)  # the gradient sent back up
    reply = leaves.gradients()
    assert set(reply) == {"hidden_states", "router_state"} and reply["router_state"].abs().max() > 0
    smashed.backward(reply)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == reference.keys()
    for n, g in reference.items():
        assert torch.allclose(grads[n], g, atol=1e-6, rtol=1e-4), n


@pytest.mark.parametrize("algorithm", ["fsl_sage", "splitfed_v2"])
def test_a_family_with_a_carried_activation_trains_with_private_labels(tmp_path, algorithm):
    """One round on Zaya: FSL-SAGE aligns on the true gradients w.r.t. the hidden states and the router state,
    which the server sends down; both halves move and every loss is finite."""
    report = one_fsl_sage_round(tiny_causal_lm("zaya", num_layers=3), str(tmp_path), private_labels=True,
                                algorithm=algorithm)
    if algorithm == "fsl_sage":
        assert not round_problems(report), round_problems(report)
    else:
        assert math.isfinite(report["server_loss"]) and report["client_changed"] > 0 < report["server_changed"]


# ---------------------------------------------------------------- the wire
@pytest.mark.parametrize("algorithm", SENDING)
def test_no_label_reaches_the_server(tmp_path, algorithm):
    """Every server-bound message of a run, as encoded: no labels field, no integer tensor but the row lengths,
    and none of the label tokens' ids anywhere an integer could hide. With labels on the server the same check
    fails (shown once)."""
    trainer = make_trainer(tmp_path, algorithm, use_lora=True, private_labels=True, max_steps=4)
    log = wire_log(trainer)
    trainer.train()
    up = [(kind, payload) for direction, kind, payload in log if direction == UP]
    assert {k for k, _ in up} <= {"smashed", "head_gradient", "client_model", "aux_model"}
    smashed = [p for k, p in up if k == "smashed"]
    assert smashed and all(p["labels"] is None for p in smashed)
    integers = [t for _, p in up for t in flatten(p)[1] if not t.is_floating_point()]
    lengths = [p["lengths"] for p in smashed]
    assert len(integers) == len(lengths) and all(any(t is n for n in lengths) for t in integers)

    if algorithm != "splitfed_v2":
        return
    standard = make_trainer(tmp_path / "standard", algorithm, use_lora=True, max_steps=4)
    log = wire_log(standard)
    standard.train()
    assert all(p["labels"] is not None for d, k, p in log if d == UP and k == "smashed")


def test_the_round_trip_is_counted_by_kind_and_encoded_at_the_kept_positions(tmp_path):
    """Per upload: the server's output down and its gradient up, each as many kept rows as the upload, in the
    codec's bytes (int8: one byte per value and a bf16 scale per row)."""
    trainer = make_trainer(tmp_path, "splitfed_v2", use_lora=True, private_labels=True, max_steps=4,
                           smashed_codec="int8")
    log = wire_log(trainer)
    trainer.train()
    ledger = trainer.federation.transport.ledger
    uploads = ledger.messages["smashed_up"]
    assert uploads == 8 and ledger.messages["server_hidden_down"] == ledger.messages["head_gradient_up"] == uploads
    kept = sum(int(p["rows"]["q"].shape[0]) for d, k, p in log if k == "smashed")
    width = trainer.split.head_shape[-1]
    assert ledger.by_kind["server_hidden_down"] == ledger.by_kind["head_gradient_up"] == kept * (width + 2)
    assert ledger.by_kind["gradient_down"] == kept * (width + 2)


@pytest.mark.parametrize("algorithm", ["splitfed_v2", "cse_fsl"])
def test_with_a_frozen_head_private_labels_change_nothing_but_the_messages(tmp_path, algorithm):
    """With LoRA (frozen final norm and head) the round trip computes the same loss and gradients as the server
    would: the same adapters, the same eval loss."""
    runs = {}
    for private in (False, True):
        trainer = make_trainer(tmp_path / str(private), algorithm, use_lora=True, private_labels=private)
        trainer.train()
        runs[private] = (trainer.evaluate()["eval_loss"], trainer_adapters(trainer))
    assert runs[True][0] == pytest.approx(runs[False][0], abs=1e-6)
    assert runs[True][1].keys() == runs[False][1].keys()
    assert max(float((runs[True][1][k] - runs[False][1][k]).abs().max()) for k in runs[True][1]) <= 1e-6


def trainer_adapters(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}


def test_fsl_sage_aligns_on_the_client_and_learns(tmp_path):
    """The server sends the true gradients at the cut of the buffered uploads; the client aligns its auxiliary
    model on them (cosine up), and the global model learns; its model card and adapter are the usual ones."""
    trainer = make_trainer(tmp_path, "fsl_sage", use_lora=True, private_labels=True, align_epochs=8,
                           learning_rate=1e-2, align_learning_rate=1e-3)
    before = trainer.evaluate()["eval_loss"]
    log = wire_log(trainer)
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    assert after < before - 0.05
    aligned = [h for h in trainer.state.log_history if "align_grad_cosine_after" in h]
    assert aligned and all(h["align_grad_cosine_after"] > h["align_grad_cosine_before"] for h in aligned)
    replies = [p for d, k, p in log if k == "cut_gradient"]
    assert replies and "aux_model_down" not in trainer.federation.transport.ledger.by_kind
    assert all(isinstance(r, list) and r and all(set(e) == {"values"} for e in r) for r in replies)
    # One gradient per upload the client's buffer holds: 4 sequences, 2 per upload
    uploads, expected = {}, []
    for (_, kind, _), c in zip(log, log.clients):
        uploads[c] = uploads.get(c, 0) + (kind == "smashed")
        if kind == "cut_gradient":
            expected.append(min(uploads[c], 2))
    assert [len(r) for r in replies] == expected and max(expected) == 2
    trainer.save_model(str(tmp_path / "final"))
    trainer.create_model_card()
    saved = sorted(p.name for p in (tmp_path / "final").iterdir())
    assert "adapter_model.safetensors" in saved and "adapter_config.json" in saved
    card = (Path(trainer.args.output_dir) / "README.md").read_text()
    assert "the final norm, the LM head and the labels stayed on the clients" in card
    assert "never the labels" in card


def test_the_exchange_rows_decode_to_what_was_sent_for_every_kind(tmp_path):
    """A hidden state sent down and a gradient sent up come back at their positions, zeros elsewhere."""
    from hf_fsl_sage.transport.codecs import ActivationCoder

    coder = ActivationCoder("none", hidden_size=4, vocab_size=10, labels_on_client=True, head_shape=(6,))
    mask = torch.tensor([[True, True, False], [True, False, False]])
    smashed = Smashed(torch.randn(2, 3, 4), mask)
    with pytest.raises(ValueError, match="labels stay on the client"):
        coder.encode(0, "smashed", (smashed, torch.zeros(2, 3, dtype=torch.long)))
    received, labels = coder.decode(0, "smashed", coder.encode(0, "smashed", (smashed, None)))
    assert labels is None and received.hidden_states.shape == (2, 2, 4)
    out = torch.randn(2, 2, 6)
    down = coder.decode(0, "server_hidden", coder.encode(0, "server_hidden", out))
    assert down.shape == (2, 3, 6) and torch.equal(down[mask], out[received.attention_mask])
    grad = torch.randn(2, 3, 6) * mask.unsqueeze(-1)
    up = coder.decode(0, "head_gradient", coder.encode(0, "head_gradient", grad))
    assert up.shape == (2, 2, 6) and torch.equal(up[received.attention_mask], grad[mask])


# ---------------------------------------------------------------- defences
def test_clipping_and_noise_are_what_goes_up_and_nothing_else(tmp_path):
    """Uploaded rows have norm <= C without noise; with noise, the difference from the clipped rows has the
    documented standard deviation (sigma * C per coordinate). Evaluation sees no noise."""
    clip = 0.05  # the tiny model's token vectors are longer (0.1 to 0.2): every one is scaled down to C
    trainer = make_trainer(tmp_path / "clip", "splitfed_v2", use_lora=True, max_steps=2, smashed_clip_norm=clip)
    log = wire_log(trainer)
    trainer.train()
    rows = torch.cat([p["rows"]["values"] for d, k, p in log if k == "smashed"])
    assert rows.norm(dim=-1).tolist() == pytest.approx([clip] * rows.shape[0], rel=1e-5)

    sigma = 0.5
    noisy = make_trainer(tmp_path / "noise", "splitfed_v2", use_lora=True, max_steps=1, smashed_clip_norm=clip,
                         smashed_noise_multiplier=sigma, learning_rate=0.0)
    clean = {}
    original = noisy.federation.defence.protect

    def remember(hidden):
        clean[len(clean)] = ActivationDefence(clip).protect(hidden).detach()
        return original(hidden)

    noisy.federation.defence = ActivationDefence(clip, sigma)
    object.__setattr__(noisy.federation.defence, "protect", remember)
    log = wire_log(noisy)
    noisy.train()
    sent = [p for d, k, p in log if k == "smashed"]
    masks = [torch.arange(int(p["lengths"].max())) < p["lengths"].long().unsqueeze(1) for p in sent]
    diffs = torch.cat([p["rows"]["values"] - clean[i][:, :m.shape[1]][m] for i, (p, m) in enumerate(zip(sent, masks))])
    assert float(diffs.std()) == pytest.approx(sigma * clip, rel=0.1)
    assert abs(float(diffs.mean())) < 0.05 * sigma * clip

    plain = make_trainer(tmp_path / "plain", "splitfed_v2", use_lora=True, max_steps=1, learning_rate=0.0)
    assert noisy.evaluate()["eval_loss"] == pytest.approx(plain.evaluate()["eval_loss"], abs=1e-6)


def test_fedavg_ignores_the_defences_and_private_labels(tmp_path):
    runs = []
    for settings in ({}, {"private_labels": True, "smashed_clip_norm": 0.1, "smashed_noise_multiplier": 3.0,
                          "embedding_dx_epsilon": 1.0}):
        trainer = make_trainer(tmp_path / str(len(runs)), "fedavg", use_lora=True, max_steps=4, **settings)
        trainer.train()
        runs.append((trainer.evaluate()["eval_loss"], trainable_state(trainer.split.client)))
    assert runs[0][0] == runs[1][0]


def test_dx_noise_has_the_documented_law():
    """Norm ~ Gamma(H, 1/epsilon) (mean H/epsilon, variance H/epsilon^2) and a direction without preference."""
    torch.manual_seed(0)
    width, epsilon = 16, 4.0
    defence = ActivationDefence(embedding_epsilon=epsilon)
    noise = defence.perturb_embeddings(torch.zeros(20000, width))
    norms = noise.norm(dim=-1)
    assert float(norms.mean()) == pytest.approx(width / epsilon, rel=0.02)
    assert float(norms.var()) == pytest.approx(width / epsilon**2, rel=0.05)
    directions = noise / norms.unsqueeze(-1)
    assert float(directions.mean(0).abs().max()) < 0.03


def test_dx_noise_reaches_the_uploads_only_in_training(tmp_path):
    torch.manual_seed(0)
    trainer = make_trainer(tmp_path, "splitfed_v2", use_lora=True, max_steps=1, embedding_dx_epsilon=1.0)
    client = trainer.federation.clients[0]
    batch = {"input_ids": torch.randint(0, 50, (2, 6))}
    client.model.module.eval()
    quiet = trainer.federation.client_forward(client, batch).hidden_states.detach()
    client.model.module.train()
    noisy = trainer.federation.client_forward(client, batch).hidden_states.detach()
    assert torch.equal(quiet, client.model.module(batch["input_ids"]).hidden_states.detach())
    assert float((noisy - quiet).abs().max()) > 0.1


@pytest.mark.parametrize("settings, problem", [
    ({"smashed_noise_multiplier": 1.0}, "smashed_noise_multiplier needs smashed_clip_norm"),
    ({"smashed_clip_norm": 0.0}, "smashed_clip_norm=0.0 must be > 0"),
    ({"smashed_clip_norm": 1.0, "smashed_noise_multiplier": -1.0}, "smashed_noise_multiplier=-1.0 must be >= 0"),
    ({"embedding_dx_epsilon": 0}, "embedding_dx_epsilon=0 must be > 0"),
])
def test_bad_defence_settings_are_refused_with_the_fix(tmp_path, settings, problem):
    with pytest.raises(ValueError, match=problem):
        FSLSageConfig(output_dir=str(tmp_path), report_to="none", **settings)


@pytest.mark.usefixtures("server_only_registered")
def test_an_algorithm_written_without_private_labels_gets_the_round_trip(tmp_path):
    """The one-module algorithm of the tests (registered outside the package; its serve calls server_step) keeps
    the labels on the clients unchanged: each upload is served with one round trip, and the server trains."""
    trainer = make_trainer(tmp_path, "server_only_test", clients_per_round=None, max_steps=8, local_steps=4,
                           server_update_interval=2, private_labels=True, use_lora=True)
    before = {n: p.detach().clone() for n, p in trainer.split.server.named_parameters() if p.requires_grad}
    trainer.train()
    messages = trainer.federation.transport.ledger.messages
    assert trainer.algorithm.served == messages["smashed_up"] == 12
    assert messages["server_hidden_down"] == messages["head_gradient_up"] == 12
    after = dict(trainer.split.server.named_parameters())
    assert all(not torch.equal(before[n], after[n]) for n in before)
    logged = [h["server_loss"] for h in trainer.state.log_history if "server_loss" in h]
    assert logged and all(math.isfinite(v) for v in logged)  # reported by the clients, who hold the labels
