"""The five algorithms on tiny runs: schedules and byte counts checked exactly, learning, equivalences, resume."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from functools import lru_cache
from pathlib import Path

import datasets
import pytest
import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM, GPT2Config

from hf_fsl_sage import FSLSageConfig, FSLSageTrainer
from hf_fsl_sage.algorithms import ALGORITHMS, Algorithm, StepResult, register
from hf_fsl_sage.algorithms.auxiliary import AuxiliaryLossAlgorithm
from hf_fsl_sage.e2e.data import E2E_SAMPLE_PATH, load_e2e_csv, offline_gpt2_tokenizer, split_by_mr, tokenize_e2e
from hf_fsl_sage.federation.federation import trainable_parameters
from hf_fsl_sage.federation.schedule import GlobalStepDataset

ALGORITHM_NAMES = ["fedavg", "splitfed_v1", "splitfed_v2", "cse_fsl", "fsl_sage"]
SPLITFED = ("splitfed_v1", "splitfed_v2")
PERIODIC = ("cse_fsl", "fsl_sage")  # upload every server_update_interval steps
N_EMBD, N_LAYER, LORA_R = 32, 3, 4
ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- fixtures
@lru_cache(maxsize=None)
def tiny_e2e(max_length: int = 40) -> tuple[datasets.Dataset, datasets.Dataset, int, int]:
    """Real E2E sample rows, GPT-2 tokenized, ids renumbered densely: (train, eval, vocab, pad id)."""
    tok = offline_gpt2_tokenizer()
    splits = split_by_mr(load_e2e_csv(E2E_SAMPLE_PATH), eval_fraction=0.1, seed=0)
    parts = {k: tokenize_e2e(v, tok, max_length=max_length) for k, v in splits.items()}
    used = sorted({t for ds in parts.values() for row in ds["input_ids"] for t in row})
    index = {t: i for i, t in enumerate(used)}

    def renumber(row):
        return {"input_ids": [index[t] for t in row["input_ids"]],
                "labels": [t if t < 0 else index[t] for t in row["labels"]]}

    train, evalset = (parts[k].map(renumber) for k in ("train", "validation"))
    return train, evalset, len(used), index[tok.eos_token_id]


def collate(pad: int):
    def fn(rows):
        width = max(len(r["input_ids"]) for r in rows)
        return {key: torch.tensor([list(r[key]) + [fill] * (width - len(r[key])) for r in rows])
                for key, fill in (("input_ids", pad), ("attention_mask", 0), ("labels", -100))}
    return fn


def tiny_gpt2(vocab: int, seed: int = 0, dropout: float = 0.0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(GPT2Config(
        n_layer=N_LAYER, n_embd=N_EMBD, n_head=2, n_positions=64, vocab_size=vocab,
        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout))


def lora() -> LoraConfig:
    return LoraConfig(r=LORA_R, lora_alpha=32, lora_dropout=0.0, target_modules=["c_attn"], fan_in_fan_out=True)


def make_trainer(tmp_path: Path, algorithm: str, use_lora: bool = False, seed: int = 0, eval_rows: int = 64,
                 **overrides) -> FSLSageTrainer:
    train, evalset, vocab, pad = tiny_e2e()
    settings = dict(output_dir=str(tmp_path / "out"), algorithm=algorithm, num_clients=3, clients_per_round=2,
                    local_steps=4, max_steps=10, per_device_train_batch_size=2, per_device_eval_batch_size=32,
                    aux_num_layers=1, server_update_interval=2, align_interval=2, align_epochs=1,
                    align_buffer_size=4, learning_rate=3e-3, warmup_steps=0, logging_steps=5,
                    save_strategy="no", report_to="none", seed=seed, disable_tqdm=True)
    settings.update(overrides)
    return FSLSageTrainer(model=tiny_gpt2(vocab, seed), args=FSLSageConfig(**settings), train_dataset=train,
                          eval_dataset=evalset.select(range(eval_rows)), data_collator=collate(pad),
                          peft_config=lora() if use_lora else None)


def trainable_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in trainable_parameters(module).values())


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


# ---------------------------------------------------------------- exact byte accounting
def model_bytes(trainer: FSLSageTrainer, use_lora: bool) -> dict[str, int]:
    """fp32 bytes of the trainable parameters each model transfer carries, from the config alone."""
    args, d, vocab = trainer.args, N_EMBD, trainer.model.config.vocab_size
    server_blocks, aux_blocks = N_LAYER - args.cut_layer, args.aux_num_layers
    if use_lora:  # LoRA A (r x d) and B (3d x r) on every block's c_attn, nothing else trains
        per_block = LORA_R * d + 3 * d * LORA_R
        counts = {"client": args.cut_layer * per_block, "server": server_blocks * per_block,
                  "aux": aux_blocks * per_block}
    else:
        block = 12 * d * d + 13 * d  # GPT-2 block: 2 LayerNorms, c_attn, attn c_proj, c_fc, mlp c_proj
        counts = {"client": vocab * d + 64 * d + args.cut_layer * block,  # wte, wpe, blocks
                  "server": server_blocks * block + 2 * d + vocab * d,  # blocks, ln_f, the server's own head
                  "aux": aux_blocks * block + 2 * d}  # blocks, ln_f; the head reads the client embedding
    return {k: 4 * v for k, v in counts.items()}


def expected_traffic(trainer: FSLSageTrainer, use_lora: bool) -> tuple[Counter, Counter]:
    """(bytes, messages) by kind and direction that ``trainer.args.algorithm`` must send on this run."""
    args, algo = trainer.args, trainer.args.algorithm
    sizes = model_bytes(trainer, use_lora)
    steps = GlobalStepDataset(trainer.schedule, trainer.train_dataset, trainer.data_collator)
    nbytes, messages = Counter(), Counter()

    def send(kind: str, size: int) -> None:
        nbytes[kind] += size
        messages[kind] += 1

    for step in range(args.max_steps):
        item = steps[step]
        round_index, local = item["round"], item["local_step"]
        for batch in item["clients"].values():
            b, s = batch["input_ids"].shape
            if local == 0:
                send("client_model_down", sizes["client"])
                if algo == "fedavg":
                    send("server_model_down", sizes["server"])
                if algo == "cse_fsl" or (algo == "fsl_sage" and round_index % args.align_interval == 0):
                    send("aux_model_down", sizes["aux"])
            if algo in SPLITFED or (algo in PERIODIC and local % args.server_update_interval == 0):
                send("smashed_up", b * s * (N_EMBD * 4 + 1 + 8))  # fp32 hidden, bool mask, int64 labels
            if algo in SPLITFED:
                send("gradient_down", b * s * N_EMBD * 4)  # fp32 d loss / d hidden
            if item["round_end"]:
                send("client_model_up", sizes["client"])
                if algo == "fedavg":
                    send("server_model_up", sizes["server"])
                if algo == "cse_fsl":
                    send("aux_model_up", sizes["aux"])
    return nbytes, messages


@pytest.mark.parametrize("use_lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("algorithm", ALGORITHM_NAMES)
def test_schedule_and_bytes_are_exact(tmp_path, algorithm, use_lora):
    trainer = make_trainer(tmp_path, algorithm, use_lora)
    sizes = model_bytes(trainer, use_lora)
    assert trainable_bytes(trainer.split.client) == sizes["client"]
    assert trainable_bytes(trainer.split.server) == sizes["server"]
    if isinstance(trainer.algorithm, AuxiliaryLossAlgorithm):
        assert trainable_bytes(trainer.algorithm.aux[0].module) == sizes["aux"]
    client_before, server_before = snapshot(trainer.split.client), snapshot(trainer.split.server)

    trainer.train()
    nbytes, messages = expected_traffic(trainer, use_lora)
    ledger = trainer.federation.transport.ledger
    assert dict(ledger.by_kind) == dict(nbytes)
    assert dict(ledger.messages) == dict(messages)
    up = sum(v for k, v in nbytes.items() if k.endswith("_up"))
    down = sum(v for k, v in nbytes.items() if k.endswith("_down"))
    assert (ledger.up, ledger.down) == (up, down)

    # What crosses the wire, per algorithm
    kinds = set(ledger.by_kind)
    if algorithm == "fedavg":
        assert kinds == {"client_model_down", "client_model_up", "server_model_down", "server_model_up"}
    elif algorithm in SPLITFED:  # activations up and gradients down at every step, for every participant
        assert kinds == {"client_model_down", "client_model_up", "smashed_up", "gradient_down"}
        assert ledger.messages["smashed_up"] == ledger.messages["gradient_down"] == 2 * trainer.args.max_steps
    else:  # every server_update_interval steps, never a gradient
        assert kinds == {"client_model_down", "client_model_up", "smashed_up", "aux_model_down"} | (
            {"aux_model_up"} if algorithm == "cse_fsl" else set())
        assert ledger.messages["smashed_up"] == 2 * 5  # local steps 0, 2 of rounds 0, 1 and step 0 of round 2
    if algorithm == "fsl_sage":  # aux down only in aligning rounds 0 and 2, to their two participants
        assert ledger.messages["aux_model_down"] == 4

    # The same numbers in the logs, with the same keys for every algorithm
    logged = [h for h in trainer.state.log_history if "comm_bytes" in h and "loss" in h]
    assert [h["step"] for h in logged] == [5, 10]
    assert all({"loss", "server_loss", "comm_bytes_up", "comm_bytes_down"} <= h.keys() for h in logged)
    assert (logged[-1]["comm_bytes_up"], logged[-1]["comm_bytes_down"], logged[-1]["comm_bytes"]) == (up, down, up + down)

    # Both halves of the global model trained; with LoRA the base stayed frozen
    for before, module in ((client_before, trainer.split.client), (server_before, trainer.split.server)):
        after = dict(module.named_parameters())
        changed = {n for n in before if not torch.equal(before[n], after[n])}
        assert changed == set(trainable_parameters(module)), set(trainable_parameters(module)) ^ changed


# ---------------------------------------------------------------- learning
@pytest.mark.parametrize("algorithm", ALGORITHM_NAMES)
def test_each_algorithm_learns(tmp_path, algorithm):
    trainer = make_trainer(tmp_path, algorithm, num_clients=3, clients_per_round=None, local_steps=5, max_steps=40,
                           per_device_train_batch_size=4, server_update_interval=2, align_interval=2,
                           align_epochs=3, align_buffer_size=8, logging_steps=40, eval_rows=96)
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    assert after < before - 1.2, (algorithm, before, after)


# ---------------------------------------------------------------- algorithm-specific behaviour
def test_with_one_client_splitfed_and_fedavg_train_the_same_model(tmp_path):
    """One client, no clipping: SplitFed's returned gradient is exact, so every scheme trains the same weights."""
    finals = {}
    for algorithm in ("fedavg", "splitfed_v1", "splitfed_v2"):
        trainer = make_trainer(tmp_path / algorithm, algorithm, use_lora=True, num_clients=1, clients_per_round=None,
                               local_steps=3, max_steps=6, max_grad_norm=0.0)
        trainer.train()
        finals[algorithm] = {**{f"c.{n}": p.detach() for n, p in trainable_parameters(trainer.split.client).items()},
                             **{f"s.{n}": p.detach() for n, p in trainable_parameters(trainer.split.server).items()}}
    for algorithm in ("splitfed_v1", "splitfed_v2"):
        for name, value in finals["fedavg"].items():
            torch.testing.assert_close(finals[algorithm][name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_splitfed_v1_averages_per_client_server_copies(tmp_path):
    trainer = make_trainer(tmp_path, "splitfed_v1", clients_per_round=None, max_steps=4)
    fed, copies = trainer.federation, trainer.algorithm.server_copies
    assert all(copies[c.index].module is not fed.server.module for c in fed.clients)
    assert {f"server_{i}" for i in range(3)} <= trainer.parties().keys()
    global_before = snapshot(fed.server.module)
    trainer.train()
    copies = [trainable_parameters(copies[c.index].module) for c in fed.clients]
    weights = [c.num_examples for c in fed.clients]
    for name, p in trainable_parameters(fed.server.module).items():
        assert not torch.equal(copies[0][name], copies[1][name])  # the copies trained apart ...
        average = sum(w * c[name] for w, c in zip(weights, copies)) / sum(weights)
        torch.testing.assert_close(p.detach(), average.detach())  # ... into their weighted average
        assert not torch.equal(p.detach(), global_before[name])
    assert not fed.server.optimizer.state  # the global server model itself never steps, it is only averaged into


def test_cse_fsl_trains_and_averages_the_aux_models(tmp_path):
    trainer = make_trainer(tmp_path, "cse_fsl", clients_per_round=None, max_steps=4, use_lora=True)
    fed, algorithm = trainer.federation, trainer.algorithm
    assert {f"aux_{i}" for i in range(3)} <= trainer.parties().keys()  # aux optimizer and schedule checkpointed
    embedding = fed.clients[0].model.module.input_embeddings().weight
    head = algorithm.aux[0].module.lm.get_output_embeddings()
    assert head._embedding[0].weight is embedding  # head tied to the client
    initial = {n: t.clone() for n, t in algorithm.global_aux.items()}
    trainer.train()
    auxes = [trainable_parameters(algorithm.aux[c.index].module) for c in fed.clients]
    weights = [c.num_examples for c in fed.clients]
    for name, value in algorithm.global_aux.items():
        assert not torch.equal(value, initial[name])
        assert not torch.equal(auxes[0][name], auxes[1][name])
        average = sum(w * a[name] for w, a in zip(weights, auxes)) / sum(weights)
        torch.testing.assert_close(value, average.detach())


def test_fsl_sage_aligns_under_warmup(tmp_path):
    """Only alignment updates FSL-SAGE's aux models; a warm-up of the other parties must not freeze it."""
    trainer = make_trainer(tmp_path, "fsl_sage", clients_per_round=None, warmup_steps=5, align_epochs=3)
    auxes = [aux.module for aux in trainer.algorithm.aux.values()]
    before = [snapshot(aux) for aux in auxes]
    trainer.train()
    for old, aux in zip(before, auxes):
        assert all(not torch.equal(old[n], p) for n, p in trainable_parameters(aux).items())
    aligned = [h for h in trainer.state.log_history if "align_grad_cosine_before" in h]
    assert [h["round"] for h in aligned] == [0, 2]
    assert all(h["align_grad_cosine_after"] != h["align_grad_cosine_before"] for h in aligned)


@pytest.mark.parametrize("algorithm", ["fedavg", "splitfed_v1", "cse_fsl"])
def test_resume_gives_the_same_weights(tmp_path, algorithm):
    """Server copies (mid-round) and the global aux model (at a round boundary) survive a checkpoint."""
    common = dict(use_lora=True, max_steps=10, save_strategy="steps", save_steps=2)
    full = make_trainer(tmp_path / "a", algorithm, **common)
    full.train()
    for step in (4, 6):  # end of round 0; middle of round 1
        resumed = make_trainer(tmp_path / f"b{step}", algorithm, **common)
        resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "out" / f"checkpoint-{step}"))
        pairs = [(full.split.client, resumed.split.client), (full.split.server, resumed.split.server)]
        for a, b in zip(full.federation.clients, resumed.federation.clients):
            pairs += [(a.model.module, b.model.module)]
        for own in ("server_copies", "aux"):  # the algorithm's own copies of the server model or aux models
            a, b = getattr(full.algorithm, own, {}), getattr(resumed.algorithm, own, {})
            pairs += [(a[c].module, b[c].module) for c in a]
        for module_a, module_b in pairs:
            params_a, params_b = trainable_parameters(module_a), trainable_parameters(module_b)
            for name in params_a:
                torch.testing.assert_close(params_a[name], params_b[name], rtol=0, atol=1e-6, msg=f"{step}: {name}")
        assert full.federation.transport.ledger.state_dict() == resumed.federation.transport.ledger.state_dict()


def test_all_algorithms_are_registered():
    assert set(ALGORITHM_NAMES) <= ALGORITHMS.keys()
    assert {name: issubclass(ALGORITHMS[name], AuxiliaryLossAlgorithm) for name in ALGORITHM_NAMES} == {
        "fedavg": False, "splitfed_v1": False, "splitfed_v2": False, "cse_fsl": True, "fsl_sage": True}


# ---------------------------------------------------------------- a sixth algorithm, from this file only
@register("server_only_test")
class ServerOnly(Algorithm):
    """Frozen clients upload their activations every ``upload_interval`` steps; only the server trains."""

    display_name = "Server-only fine-tuning (test)"

    def __init__(self, federation, *, upload_interval: int):
        super().__init__(federation)
        self.upload_interval, self.served = upload_interval, 0

    @classmethod
    def from_config(cls, args, federation):
        return cls(federation, upload_interval=args.server_update_interval)

    def uploads_at(self, round_index, local_step):
        return local_step % self.upload_interval == 0

    def client_compute(self, client, batch, round_index, local_step):
        with torch.no_grad():
            smashed = self.fed.client_forward(client, batch)
        return StepResult(loss=0.0), (smashed, batch["labels"])

    def serve(self, client, upload, round_index, local_step):
        self.served += 1
        return StepResult(server_loss=self.fed.server_step(*upload)), None

    def state_dict(self):
        return {"served": self.served}

    def load_state_dict(self, state):
        self.served = state["served"]

    def model_card_rows(self):
        return [("upload interval (local steps)", self.upload_interval)]


def test_an_algorithm_registered_outside_the_package_trains(tmp_path):
    from hf_fsl_sage.integrations.model_card import render_model_card

    trainer = make_trainer(tmp_path, "server_only_test", clients_per_round=None, max_steps=8, local_steps=4,
                           server_update_interval=2)
    assert isinstance(trainer.algorithm, ServerOnly) and trainer.algorithm.upload_interval == 2
    client_before, server_before = snapshot(trainer.split.client), snapshot(trainer.split.server)
    trainer.train()
    # 8 global steps x 3 clients, an upload at local steps 0 and 2 of each 4-step round: 12 uploads, no reply.
    ledger = trainer.federation.transport.ledger
    assert trainer.algorithm.served == 12 and ledger.messages["smashed_up"] == 12
    assert set(ledger.by_kind) == {"client_model_down", "client_model_up", "smashed_up"}
    server_after = dict(trainer.split.server.named_parameters())
    assert all(not torch.equal(server_before[n], server_after[n]) for n in trainable_parameters(trainer.split.server))
    for name, p in trainer.split.client.named_parameters():  # averaged, never stepped: equal up to rounding
        torch.testing.assert_close(p.detach(), client_before[name], rtol=1e-6, atol=1e-7)
    card = str(render_model_card(trainer))
    assert "Server-only fine-tuning (test)" in card and "| upload interval (local steps) | 2 |" in card


# ---------------------------------------------------------------- benchmark
@pytest.mark.slow
def test_compare_algorithms_quick(tmp_path):
    out = tmp_path / "compare_algorithms_quick.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compare_algorithms.py"), "--quick",
                    "--output-dir", str(tmp_path)], check=True, cwd=ROOT, timeout=600)
    results = json.loads(out.read_text())
    assert {"config", "settings"} <= results.keys()
    for setting in results["settings"].values():
        assert set(ALGORITHM_NAMES) <= setting["algorithms"].keys() and "centralized" in setting
        for name in ALGORITHM_NAMES:
            row = setting["algorithms"][name]
            assert {"curve", "final_eval_loss", "bytes_to_target", "client_trainable_params",
                    "client_total_params"} <= row.keys()
            assert row["curve"][0]["bytes"] == 0 and row["curve"][-1]["bytes"] > 0
    assert (tmp_path / "compare_algorithms_quick.png").is_file()
