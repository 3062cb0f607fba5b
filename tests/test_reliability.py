"""Non-finite values and failed clients: raise with a precise error, or skip / drop and go on, exactly."""

from __future__ import annotations

import math

import pytest
import torch

from hf_fsl_sage.federation.federation import load_trainable_state, trainable_state
from hf_fsl_sage.federation.guard import Guard, NonFiniteError
from tests.helpers import compact_e2e, lora, make_trainer, tiny_gpt2


VOCAB = compact_e2e()[2]
N_EMBD, RANK = 64, 4
# The client half of the tiny GPT-2 holds block 0; LoRA r=4 on c_attn (64 -> 192): A is 4 x 64, B is 192 x 4.
CLIENT_MODEL_BYTES = (RANK * N_EMBD + 3 * N_EMBD * RANK) * 4


def _poison_forward(trainer, client: int, at_step: int) -> None:
    """Client ``client``'s forward returns NaN activations at global step ``at_step``."""
    fed, forward = trainer.federation, trainer.federation.client_forward

    def poisoned(c, batch):
        smashed = forward(c, batch)
        if c.index == client and trainer.state.global_step == at_step:
            smashed.hidden_states = smashed.hidden_states * float("nan")
        return smashed

    fed.client_forward = poisoned


def _finite(module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in trainable_state(module).values())


@pytest.mark.parametrize("algorithm", ["fsl_sage", "splitfed_v2"])
def test_nan_activations_raise_naming_the_party_and_the_step(tmp_path, algorithm):
    trainer = make_trainer(tmp_path, model=tiny_gpt2(VOCAB), peft_config=lora(), algorithm=algorithm, max_steps=8)
    _poison_forward(trainer, client=1, at_step=5)
    with pytest.raises(NonFiniteError) as caught:
        trainer.train()
    # FSL-SAGE's client steps on its own (NaN) estimate first; SplitFed's server gets the NaN upload first.
    party = "gradients of client 1" if algorithm == "fsl_sage" else "smashed message of client 1"
    assert f"non-finite {party} at round 1, global step 5" in str(caught.value), str(caught.value)
    assert "set nonfinite='skip'" in str(caught.value)
    assert _finite(trainer.split.client) and _finite(trainer.split.server)


@pytest.mark.parametrize("algorithm", ["fsl_sage", "splitfed_v2", "cse_fsl"])
def test_nan_activations_are_skipped_counted_and_the_run_goes_on(tmp_path, algorithm):
    trainer = make_trainer(tmp_path, model=tiny_gpt2(VOCAB), peft_config=lora(), algorithm=algorithm, max_steps=8,
                           nonfinite="skip", logging_steps=8)
    _poison_forward(trainer, client=1, at_step=4)  # the first step of round 1, a step with an upload
    trainer.train()
    logged = [h for h in trainer.state.log_history if "skipped_updates" in h]
    # Skipped: FSL-SAGE the client's update and its upload; CSE-FSL also the auxiliary model's update; SplitFed
    # the upload (the server then sends no gradient and the client does not step).
    expected = {"fsl_sage": 2, "cse_fsl": 3, "splitfed_v2": 1}[algorithm]
    assert logged and logged[-1]["skipped_updates"] == expected, logged
    assert trainer.state.global_step == 8
    assert _finite(trainer.split.client) and _finite(trainer.split.server)


def _aggregation_case(tmp_path, poisoned_value: float, **settings):
    trainer = make_trainer(tmp_path, model=tiny_gpt2(VOCAB), peft_config=lora(), **settings)
    fed = trainer.federation
    states = []
    for c, value in enumerate([1.0, poisoned_value, 4.0]):
        state = {k: torch.full_like(v, value) for k, v in trainable_state(fed.clients[c].model.module).items()}
        load_trainable_state(fed.clients[c].model.module, state)
        states.append(state)
    return trainer, fed, [fed.clients[c].num_examples for c in range(3)]


def test_a_nan_client_model_is_left_out_of_fedavg_and_the_weights_renormalised(tmp_path):
    trainer, fed, sizes = _aggregation_case(tmp_path, float("nan"), nonfinite="skip")
    trainer.federation.transport.context = "round 0, global step 4"
    fed.aggregate([0, 1, 2])
    expected = (sizes[0] * 1.0 + sizes[2] * 4.0) / (sizes[0] + sizes[2])
    for name, value in trainable_state(trainer.split.client).items():
        assert torch.allclose(value, torch.full_like(value, expected)), name
    assert fed.guard.skipped_updates == 1


def test_a_nan_client_model_raises_before_aggregation(tmp_path):
    trainer, fed, _ = _aggregation_case(tmp_path, float("inf"))
    before = {k: v.clone() for k, v in trainable_state(trainer.split.client).items()}
    trainer.federation.transport.context = "round 2, global step 12"
    with pytest.raises(NonFiniteError, match="non-finite client_model state of client 1 at round 2, global step 12"):
        fed.aggregate([0, 1, 2])
    assert all(torch.equal(before[k], v) for k, v in trainable_state(trainer.split.client).items())


def test_a_dropped_client_is_left_out_of_fedavg(tmp_path):
    trainer, fed, sizes = _aggregation_case(tmp_path, 2.0, client_failures="drop")
    fed.guard.dropped = {1}
    fed.aggregate([0, 1, 2])
    expected = (sizes[0] * 1.0 + sizes[2] * 4.0) / (sizes[0] + sizes[2])
    assert all(torch.allclose(v, torch.full_like(v, expected)) for v in trainable_state(trainer.split.client).values())
    assert fed.transport.ledger.by_kind["client_model_up"] == 2 * CLIENT_MODEL_BYTES  # nothing from client 1


def _failing_step(trainer, client: int, at_step: int) -> None:
    algorithm, compute = trainer.algorithm, trainer.algorithm.client_compute

    def failing(c, batch, round_index, local_step):
        if c.index == client and trainer.state.global_step == at_step:
            raise RuntimeError("device lost")
        return compute(c, batch, round_index, local_step)

    algorithm.client_compute = failing


def test_a_failing_client_stops_the_run_by_default(tmp_path):
    trainer = make_trainer(tmp_path, model=tiny_gpt2(VOCAB), peft_config=lora(), max_steps=8)
    _failing_step(trainer, client=2, at_step=4)
    with pytest.raises(RuntimeError, match="device lost"):
        trainer.train()


def test_a_failing_client_is_dropped_for_the_rest_of_the_round_only(tmp_path):
    """Client 2 fails at the first step of round 1 (4 local steps, uploads every 2): it uploads nothing for the
    rest of that round and its model is left out of the round's FedAvg; it is back in round 2."""
    clean = make_trainer(tmp_path / "clean", model=tiny_gpt2(VOCAB), peft_config=lora(), max_steps=12,
                         client_failures="drop")
    clean.train()
    failed = make_trainer(tmp_path / "failed", model=tiny_gpt2(VOCAB), peft_config=lora(), max_steps=12,
                          client_failures="drop")
    _failing_step(failed, client=2, at_step=4)
    failed.train()
    a, b = clean.federation.transport.ledger, failed.federation.transport.ledger
    assert a.by_kind["client_model_up"] - b.by_kind["client_model_up"] == CLIENT_MODEL_BYTES
    per_upload = a.by_kind["smashed_up"] / a.messages["smashed_up"]
    assert 0 < a.by_kind["smashed_up"] - b.by_kind["smashed_up"] <= 2 * per_upload * 1.5  # its 2 uploads of round 1
    assert b.by_kind["client_model_down"] == a.by_kind["client_model_down"]  # round 2 still broadcasts to it
    assert [h["dropped_clients"] for h in failed.state.log_history if "dropped_clients" in h][-1] == 1
    assert _finite(failed.split.client)


def test_simulated_failures_resume_exactly(tmp_path):
    common = {"peft_config": lora(dropout=0.1), "max_steps": 12, "client_failures": "drop",
                  "simulate_client_failures": 0.3, "save_strategy": "steps", "save_steps": 6}
    full = make_trainer(tmp_path / "a", model=tiny_gpt2(VOCAB, seed=2, dropout=0.1), **common)
    full.train()
    dropped = [h["dropped_clients"] for h in full.state.log_history if "dropped_clients" in h]
    assert dropped and dropped[-1] > 0  # some clients did fail
    resumed = make_trainer(tmp_path / "b", model=tiny_gpt2(VOCAB, seed=2, dropout=0.1), **common)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "out" / "checkpoint-6"))
    for a, b in ((full.split.client, resumed.split.client), (full.split.server, resumed.split.server)):
        sa, sb = trainable_state(a), trainable_state(b)
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert full.federation.transport.ledger.state_dict() == resumed.federation.transport.ledger.state_dict()
    assert full.federation.guard.dropped_clients == resumed.federation.guard.dropped_clients
    assert not math.isnan(full.state.log_history[-1].get("train_loss", 0.0))


def test_clients_of_a_lost_process_stay_out_of_later_rounds_until_a_restart():
    guard = Guard(client_failures="drop")
    guard.lose([1, 3], count=True)
    guard.lose([3], count=True)  # already out: not counted twice
    guard.new_round()
    assert guard.dropped == {1, 3} and guard.dropped_clients == 2
    other = Guard(client_failures="drop")
    other.lose([1, 3], count=False)  # a client process learns of it too, but only the server's process counts
    assert other.dropped == {1, 3} and other.dropped_clients == 0
    restarted = Guard(client_failures="drop")
    restarted.load_state_dict(guard.state_dict())
    assert restarted.dropped == {1, 3} and restarted.dropped_clients == 2  # out for the rest of the saved round
    restarted.new_round()
    assert restarted.dropped == set()  # the restart brought their process back
