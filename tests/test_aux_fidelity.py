"""aux_trainable="all" (what trains is what is sent, and counted) and the held-out gradient cosine."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from hf_fsl_sage.splitting.split import Smashed
from tests.helpers import lora, make_trainer


def test_all_aux_weights_train_are_sent_and_counted_with_lora(tmp_path):
    trainer = make_trainer(tmp_path, peft_config=lora(), algorithm="fsl_sage", aux_trainable="all",
                           aux_num_layers=1, align_interval=2, max_steps=12, local_steps=4, num_clients=3)
    algorithm = trainer.algorithm
    aux = algorithm.aux[0].module
    start = {n: p.detach().clone() for n, p in aux.named_parameters()}
    embedding = trainer.split.client.input_embeddings().weight.detach().clone()
    trainer.train()

    # Every weight of the block and the final norm trains (LoRA's adapters included), and nothing else of the aux.
    trainable = {n for n, p in aux.named_parameters() if p.requires_grad}
    assert trainable == set(start) and any(n.endswith("mlp.c_fc.weight") for n in trainable)
    changed = {n for n, p in aux.named_parameters() if not torch.equal(p, start[n])}
    assert any("c_fc" in n and "lora" not in n for n in changed) and any("ln_f" in n for n in changed)
    # The client loaded exactly what the server aligned; the head still reads the frozen embedding.
    server_copy = dict(algorithm.server_aux[0].aux.module.named_parameters())
    assert all(torch.equal(p, server_copy[n]) for n, p in aux.named_parameters())
    assert torch.equal(trainer.split.client.input_embeddings().weight, embedding)
    # The client and server halves still train only their adapters.
    assert all("lora_" in n for n, p in trainer.split.named_parameters() if p.requires_grad)

    # Ledger: one GPT-2 block of width d with LoRA r on c_attn, plus the final norm, in fp32, per aux message.
    d, r = 64, 4
    block = 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + 2 * d + (d * 4 * d + 4 * d) + (4 * d * d + d)
    adapters = r * d + 3 * d * r
    per_message = 4 * (block + adapters + 2 * d)
    assert per_message == 204_544
    messages = 2 * 3  # rounds 0 and 2 of 3 align (align_interval 2), each for 3 clients
    ledger = trainer.federation.transport.ledger
    assert ledger.messages["aux_model_down"] == messages
    assert ledger.by_kind["aux_model_down"] == messages * per_message


def test_adapters_only_by_default_with_lora(tmp_path):
    trainer = make_trainer(tmp_path, peft_config=lora(), algorithm="fsl_sage", aux_num_layers=1, max_steps=1)
    aux = trainer.algorithm.aux[0].module
    assert {n for n, p in aux.named_parameters() if p.requires_grad} == {
        n for n, _ in aux.named_parameters() if "lora_" in n}


def _direct_gradient(module, hidden, mask, labels, smoothing):
    """d CE(module(h), y)/dh from full logits, shifted by one, label smoothing, mean over labelled tokens."""
    hidden = hidden.detach().requires_grad_(True)
    logits = module(Smashed(hidden, mask, None)).logits
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                           ignore_index=-100, label_smoothing=smoothing)
    return torch.autograd.grad(loss, hidden)[0]


@pytest.mark.parametrize("algorithm", ["fsl_sage", "cse_fsl"])
def test_heldout_cosine_equals_a_direct_computation_on_a_hand_made_upload(tmp_path, algorithm):
    trainer = make_trainer(tmp_path, algorithm=algorithm, aux_num_layers=1, max_steps=4, local_steps=2,
                           align_interval=1)
    trainer.train()  # the aux models move away from their copy of the server blocks
    algo, fed = trainer.algorithm, trainer.federation
    client = fed.clients[1]
    used = algo.server_aux[1].aux.module if algorithm == "fsl_sage" else algo.aux[1].module
    if algorithm == "fsl_sage":  # the server measures with the copy it last sent, not the client's own object
        with torch.no_grad():
            for p in algo.aux[1].module.parameters():
                p.add_(1.0)
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(3, 7, 64, generator=generator)
    mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2, [1] * 6 + [0]])
    labels = torch.randint(0, 50, (3, 7), generator=generator)
    labels[1, 5:], labels[2, 6:], labels[0, :2] = -100, -100, -100
    # Expected from copies taken before the upload is served: the server has not stepped on it yet.
    server, estimator = copy.deepcopy(fed.server.module).eval(), copy.deepcopy(used).eval()
    true = _direct_gradient(server, hidden, mask, labels, 0.1)
    estimate = _direct_gradient(estimator, hidden, mask, labels, 0.1)
    a, b = estimate.flatten(1), true.flatten(1)
    expected = float(((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))).mean())

    algo.log_sums()  # drop what training measured
    algo.train()
    for group in fed.server.optimizer.param_groups:  # the schedule ended at 0: let this server step move it
        group["lr"] = 1e-2
    assert not getattr(algo, "replies_at", lambda r, k: False)(1, 1)  # no alignment in this serve
    algo.serve(client, (Smashed(hidden, mask, None), labels), 1, 1)
    (total, count), = algo.log_sums().values()
    assert count == 1 and total == pytest.approx(expected, abs=1e-5)
    assert 0.0 < expected < 0.999  # an estimate, not the true gradient
    assert not all(torch.equal(p, q) for p, q in zip(server.parameters(), fed.server.module.parameters()))


def test_heldout_cosine_is_logged_and_can_be_turned_off(tmp_path):
    on = make_trainer(tmp_path / "on", algorithm="fsl_sage", aux_num_layers=1, max_steps=4, local_steps=2,
                      logging_steps=2)
    on.train()
    logged = [h["aux_grad_cosine_heldout"] for h in on.state.log_history if "loss" in h]
    assert len(logged) == 2 and all(-1.0 <= c <= 1.0 for c in logged)
    off = make_trainer(tmp_path / "off", algorithm="fsl_sage", aux_num_layers=1, max_steps=4, local_steps=2,
                       logging_steps=2, aux_heldout_cosine=False)
    off.train()
    assert not any("aux_grad_cosine_heldout" in h for h in off.state.log_history)
    for key in ("loss", "server_loss"):  # measuring changes nothing of the training
        assert [h[key] for h in on.state.log_history if "loss" in h] == [h[key] for h in off.state.log_history
                                                                          if "loss" in h]
