"""Each process holds only its parties: a client's process neither loads nor keeps the server's weights.

Three processes (server on 0, clients [0, 2] on 1 and [1, 3] on 2), FSL-SAGE, a GPT-2 of 3 blocks of width
32 with an untied LM head, cut after block 0, one auxiliary block copied from the server (block 1), loaded
from a directory by path. Expected bytes are counted from the GPT-2 architecture, not from the code.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.distributed_run import tiny_config
from tests.helpers import PadCollator, compact_e2e
from tests.launches import adapter, check, result, run_one, run_three


# The module's runs (three processes and one) are made once: under pytest-xdist its tests stay on one worker.
pytestmark = pytest.mark.xdist_group("materialise")


E, BLOCKS, POSITIONS, R = 32, 3, 64, 4


def _block() -> int:  # ln_1, c_attn, c_proj, ln_2, c_fc, mlp c_proj (weights and biases)
    return 2 * E + (3 * E * E + 3 * E) + (E * E + E) + 2 * E + (4 * E * E + 4 * E) + (4 * E * E + E)


LORA = R * E + 3 * E * R  # lora_A (E -> r) and lora_B (r -> 3E) on one block's c_attn


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The model written once, trained from that directory in three processes and in one (fp32)."""
    root = tmp_path_factory.mktemp("materialise")
    from transformers import AutoModelForCausalLM

    _, _, vocab, _ = compact_e2e()
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config(BLOCKS, E, vocab, tie_word_embeddings=False)).save_pretrained(
        root / "base")
    common = ("--model_path", str(root / "base"), "--holdings")
    check(run_three(root / "three", *common))
    check(run_one(root / "one", *common))
    return root, vocab


def _holdings(out: Path, rank: int) -> dict:
    import json

    return json.loads((out / f"holdings-rank{rank}.json").read_text())


@pytest.mark.slow
def test_client_processes_hold_no_server_weights_and_the_server_no_client_copies(runs):
    root, vocab = runs
    frozen_client_side = vocab * E + POSITIONS * E + 2 * _block() + 2 * E  # embeddings, blocks 0 and 1, final norm
    for rank in (1, 2):
        held = _holdings(root / "three", rank)
        assert not [n for n in held["model"] if ".h.2." in n or "lm_head" in n]  # by name
        assert any(".h.0." in n for n in held["model"]) and any("wte" in n for n in held["model"])
        # by bytes: the global adapters of blocks 0-1 in the model, and per client (two here) its own client
        # adapters (block 0) and auxiliary adapters (block 1); the auxiliary copies share block 1's frozen weights
        assert held["bytes"] == 4 * (frozen_client_side + 2 * LORA + 2 * 2 * LORA)
    server = _holdings(root / "three", 0)
    whole = vocab * E + POSITIONS * E + BLOCKS * _block() + 2 * E + vocab * E  # untied head
    # the global adapters of the 3 blocks and the server's copy of each of the 4 auxiliary models: no client's
    assert server["bytes"] == 4 * (whole + BLOCKS * LORA + 4 * LORA)
    single = _holdings(root / "one", 0)
    assert single["bytes"] == 4 * (whole + BLOCKS * LORA + 4 * LORA + 4 * 2 * LORA)  # plus the 4 clients' own


@pytest.mark.slow
def test_loaded_by_path_three_processes_train_exactly_like_one(runs):
    root, _ = runs
    a, b = adapter(root / "one"), adapter(root / "three")
    assert a.keys() == b.keys() and len(a) == 2 * BLOCKS
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5
    one, three = result(root / "one"), result(root / "three")
    assert one["ledger"] == three["ledger"]
    assert three["eval"]["eval_loss"] == pytest.approx(one["eval"]["eval_loss"], abs=1e-5)


@pytest.mark.slow
def test_the_server_saves_the_whole_global_model(runs):
    """The adapter saved by process 0 on top of the base from disk gives the loss the trainer evaluated."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    root, _ = runs
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(root / "base"), root / "three" / "final")
    model.eval()
    _, evalset, _, pad = compact_e2e()
    rows, collate = evalset.select(range(32)), PadCollator(pad)
    losses = []
    with torch.no_grad():
        for start in (0, 16):  # the run's evaluation batches (per_device_eval_batch_size=16)
            batch = collate([rows[i] for i in range(start, start + 16)])
            losses.append(float(model(**batch).loss))
    assert sum(losses) / 2 == pytest.approx(result(root / "three")["eval"]["eval_loss"], abs=1e-5)


@pytest.mark.slow
def test_bf16_base_keeps_adapters_fp32_and_sends_bf16_activations(runs, tmp_path):
    root, _ = runs
    check(run_three(tmp_path / "bf16", "--model_path", str(root / "base"), "--holdings", "--dtype", "bfloat16"))
    for rank in (0, 1, 2):
        held = _holdings(tmp_path / "bf16", rank)
        assert held["trainable_dtypes"] == ["torch.float32"] and "torch.bfloat16" in held["dtypes"]
    assert {t.dtype for t in load_file(str(tmp_path / "bf16" / "final" / "adapter_model.safetensors")).values()} == {
        torch.float32}
    fp32, bf16 = result(root / "three")["ledger"]["by_kind"], result(tmp_path / "bf16")["ledger"]["by_kind"]
    # An upload carries, per kept token, the hidden state (E values in the base's dtype) and a 2-byte label (the
    # vocabulary is below 65,536), plus one length per row: the same tokens and side bytes S in both runs, so
    # fp32 = 4 E T + S and bf16 = 2 E T + S with 2 T <= S <= 4 T (a row holds at least one token).
    tokens, rest = divmod(fp32["smashed_up"] - bf16["smashed_up"], 2 * E)
    side = fp32["smashed_up"] - 4 * E * tokens
    assert rest == 0 and tokens > 0 and 2 * tokens <= side <= 4 * tokens
    assert {k: v for k, v in bf16.items() if k != "smashed_up"} == {k: v for k, v in fp32.items() if k != "smashed_up"}
