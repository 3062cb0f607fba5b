"""FSLSageTrainer end to end on real E2E rows: learning, alignment, save/load, families, data, config errors.

Exact byte counts and resuming, for every algorithm, are in ``test_algorithms.py``.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, default_data_collator

from hf_fsl_sage import FSLSageConfig, FSLSageTrainer
from hf_fsl_sage.config import _has_accelerator
from hf_fsl_sage.federation.federation import trainable_parameters
from tests.helpers import PadCollator, compact_e2e, lora, make_trainer, tiny_gpt2


@pytest.mark.slow
@pytest.mark.parametrize("use_lora", [False, True], ids=["full", "lora"])
def test_fsl_sage_learns_and_alignment_helps(tmp_path, use_lora):
    """Full fine-tuning from scratch, and LoRA on a briefly pre-trained base (LoRA's real use)."""
    vocab = compact_e2e()[2]
    peft_config = lora(target_modules=("c_attn", "c_proj", "c_fc")) if use_lora else None
    trainer = make_trainer(tmp_path, model=tiny_gpt2(vocab, pretrained=use_lora), peft_config=peft_config,
                           max_steps=100, local_steps=5, align_interval=4, align_epochs=10, align_buffer_size=16,
                           aux_num_layers=2, logging_steps=20, learning_rate=1e-2 if use_lora else 1e-3)
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()
    # LoRA on a tiny briefly pre-trained base moves slowly: a centralized LoRA run with the same
    # samples gains about as much; full fine-tuning from scratch gains several nats.
    assert after["eval_loss"] < before - (0.03 if use_lora else 1.5), (before, after["eval_loss"])
    assert after["eval_perplexity"] == pytest.approx(math.exp(after["eval_loss"]))

    history = trainer.state.log_history
    aligned = [h for h in history if "align_grad_cosine_before" in h]
    assert len(aligned) == 5  # rounds 0, 4, ..., 16 of 20
    gain = sum(h["align_grad_cosine_after"] - h["align_grad_cosine_before"] for h in aligned) / len(aligned)
    assert gain > 0.02, aligned
    logged = [h for h in history if "loss" in h and "comm_bytes" in h]
    assert len(logged) == 5
    assert all({"server_loss", "round", "comm_bytes_up", "comm_bytes_down"} <= h.keys() for h in logged)
    assert [h["comm_bytes"] for h in logged] == sorted(h["comm_bytes"] for h in logged)
    assert logged[-1]["comm_bytes"] == trainer.federation.transport.ledger.total


def test_peft_save_load_reproduces_trained_split_logits(tmp_path):
    train, evalset, vocab, pad = compact_e2e()
    trainer = make_trainer(tmp_path, model=tiny_gpt2(vocab, seed=1), peft_config=lora())
    trainer.train()
    out = tmp_path / "final"
    trainer.save_model(str(out))
    assert (out / "adapter_config.json").is_file() and (out / "aux" / "client_0.safetensors").is_file()

    batch = PadCollator(pad)([evalset[i] for i in range(4)])
    with torch.no_grad():
        trainer.split.eval()
        expected = trainer.split(batch["input_ids"], batch["attention_mask"]).logits
        loaded = PeftModel.from_pretrained(tiny_gpt2(vocab, seed=1), str(out)).eval()
        got = loaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    untrained = tiny_gpt2(vocab, seed=1).eval()(input_ids=batch["input_ids"]).logits
    assert not torch.allclose(untrained, expected, atol=1e-3)  # training changed the model


def test_full_save_load_unties_the_trained_head(tmp_path):
    train, evalset, vocab, pad = compact_e2e()
    trainer = make_trainer(tmp_path)
    trainer.train()
    assert trainer.split.head_copied and trainer.split.untied_after_training()
    out = tmp_path / "final"
    trainer.save_model(str(out))
    loaded = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert loaded.config.tie_word_embeddings is False
    batch = PadCollator(pad)([evalset[i] for i in range(4)])
    with torch.no_grad():
        trainer.split.eval()
        expected = trainer.split(batch["input_ids"], batch["attention_mask"]).logits
        got = loaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()


def test_tensorboard_logging(tmp_path):
    trainer = make_trainer(tmp_path, report_to=["tensorboard"], max_steps=8)
    trainer.train()
    events = list((tmp_path / "out").rglob("events.out.tfevents.*"))
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = EventAccumulator(str(events[0].parent)).Reload().Tags()["scalars"]
    assert {"train/loss", "train/server_loss", "train/comm_bytes"} <= set(tags)


@pytest.mark.skipif(_has_accelerator(), reason="a machine without an accelerator")
def test_evaluation_on_a_cpu_pins_no_memory_and_does_not_warn_about_it(tmp_path):
    trainer = make_trainer(tmp_path)
    assert trainer.args.dataloader_pin_memory is False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.evaluate()
    assert not [w for w in caught if "pin_memory" in str(w.message)], [str(w.message) for w in caught]


def test_llama_family_trains(tmp_path):
    train, evalset, vocab, pad = compact_e2e()
    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=3, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, vocab_size=vocab, max_position_embeddings=64)
    model = AutoModelForCausalLM.from_config(config)
    trainer = make_trainer(tmp_path, model=model, max_steps=40, local_steps=5, align_interval=2)
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    assert trainer.evaluate()["eval_loss"] < before - 0.5
    assert any("align_grad_cosine_after" in h for h in trainer.state.log_history)


def test_llama_lora_split_has_adapters_on_both_halves(tmp_path):
    train, evalset, vocab, pad = compact_e2e()
    config = LlamaConfig(num_hidden_layers=3, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, vocab_size=vocab, max_position_embeddings=64)
    trainer = make_trainer(tmp_path, model=AutoModelForCausalLM.from_config(config), max_steps=4,
                           peft_config=LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"]))
    server_before = {n: p.detach().clone() for n, p in trainable_parameters(trainer.split.server).items()}
    trainer.train()
    assert all("lora_" in n for n in trainable_parameters(trainer.split.client))
    moved = [n for n, p in trainable_parameters(trainer.split.server).items() if not torch.equal(p, server_before[n])]
    assert moved and all("lora_" in n for n in moved)


def test_text_column_and_dirichlet_partition(tmp_path):
    import datasets

    from e2e_task.data import offline_gpt2_tokenizer

    texts = [f"the {c} shop serves {f} food" for c in ("coffee", "tea", "pizza", "noodle") for f in ("thai", "french")]
    ds = datasets.Dataset.from_dict({"text": texts * 4, "group": [t.split()[1] for t in texts] * 4})
    args = FSLSageConfig(output_dir=str(tmp_path), num_clients=2, local_steps=2, max_steps=4, partition="dirichlet",
                         partition_column="group", per_device_train_batch_size=2, aux_num_layers=1,
                         align_epochs=1, report_to="none", save_strategy="no", disable_tqdm=True)
    trainer = FSLSageTrainer(model=tiny_gpt2(50257), args=args, train_dataset=ds,
                             processing_class=offline_gpt2_tokenizer())
    assert sorted(i for part in trainer.schedule.partitions for i in part) == list(range(len(ds)))
    trainer.train()
    assert trainer.state.global_step == 4


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("algorithm", "fedsgd", "algorithm='fedsgd' is unknown"),
        ("num_clients", 0, "num_clients=0"),
        ("clients_per_round", 11, "clients_per_round=11"),
        ("local_steps", 0, "local_steps=0"),
        ("aux_init", "zeros", "aux_init='zeros'"),
        ("partition", "dirichlet", "needs partition_column"),
        ("dirichlet_alpha", 0.0, "dirichlet_alpha=0.0"),
        ("gradient_accumulation_steps", 2, "gradient_accumulation_steps=2"),
    ],
)
def test_config_rejects_bad_values(tmp_path, field, value, message):
    with pytest.raises(ValueError, match=message):
        FSLSageConfig(output_dir=str(tmp_path), **{field: value})


def test_aux_num_layers_larger_than_the_server_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="aux_num_layers=5 exceeds the 2 blocks"):
        make_trainer(tmp_path, aux_num_layers=5)


def test_decoder_wrapper_family_gets_its_auxiliary_head_from_the_client_embedding(tmp_path):
    """Bart-style *ForCausalLM keeps its embedding below a wrapper; the aux head must still find it."""
    from transformers import BartConfig

    train, evalset, vocab, pad = compact_e2e()
    config = BartConfig(vocab_size=vocab, d_model=32, decoder_layers=3, encoder_layers=1, decoder_attention_heads=4,
                        encoder_attention_heads=4, decoder_ffn_dim=64, encoder_ffn_dim=64, max_position_embeddings=64,
                        pad_token_id=pad, bos_token_id=0, eos_token_id=pad, decoder_start_token_id=0)
    trainer = make_trainer(tmp_path, model=AutoModelForCausalLM.from_config(config), max_steps=4)
    client, aux = trainer.federation.clients[0], trainer.algorithm.aux[0].module
    assert aux.lm.get_output_embeddings()._embedding[0] is client.model.module.input_embeddings()
    # The server's copy, which it aligns, reads the embedding of the global client model it holds.
    server_aux = trainer.algorithm.server_aux[0].aux.module
    assert server_aux.lm.get_output_embeddings()._embedding[0] is trainer.split.client.input_embeddings()
    trainer.train()
    assert trainer.state.global_step == 4


def test_alignment_trains_under_learning_rate_warm_up(tmp_path):
    """The alignment optimizer runs at its own fixed rate, not at the clients' warm-up rate (0 at step 0)."""
    trainer = make_trainer(tmp_path, warmup_steps=500, max_steps=4, align_interval=1)
    trainer.train()
    aligned = [h for h in trainer.state.log_history if "align_grad_cosine_before" in h]
    assert aligned and all(h["align_grad_cosine_after"] != h["align_grad_cosine_before"] for h in aligned)
    assert all(g["lr"] == 1e-3 for g in trainer.algorithm.server_aux[0].optimizer.param_groups)


# ---------------------------------------------------------------- the first hour: saving, reloading, data, epochs
def test_a_base_given_as_a_folder_reloads_with_auto_peft_and_the_card_is_fsl_sages(tmp_path, monkeypatch):
    """The adapter records the folder's absolute path (given relative), save_model writes the FSL-SAGE card, and
    AutoPeftModelForCausalLM rebuilds the trained model from another directory."""
    from peft import AutoPeftModelForCausalLM

    from e2e_task.data import offline_gpt2_tokenizer

    _, evalset, _, pad = compact_e2e()
    monkeypatch.chdir(tmp_path)
    tiny_gpt2(50257, seed=1).save_pretrained("base")  # the tokenizer's vocabulary: AutoPeft* resizes to it
    offline_gpt2_tokenizer().save_pretrained("base")
    trainer = make_trainer(tmp_path, model="base", peft_config=lora(), algorithm="splitfed_v2", num_clients=2,
                           max_steps=2, per_device_eval_batch_size=4)
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    card = (tmp_path / "final" / "README.md").read_text()
    assert "federated split learning" in card and "More Information Needed" not in card

    batch = PadCollator(pad)([evalset[i] for i in range(4)])
    monkeypatch.chdir(tmp_path / "final")  # "base" no longer resolves relative to here
    with torch.no_grad():
        trainer.split.eval()
        expected = trainer.split(batch["input_ids"], batch["attention_mask"]).logits
        loaded = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "final")).eval()
        got = loaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert loaded.peft_config["default"].base_model_name_or_path == str(tmp_path / "base")
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()


def test_saving_an_adapter_whose_base_has_no_path_warns_how_to_reload(tmp_path, caplog):
    trainer = make_trainer(tmp_path, model=tiny_gpt2(compact_e2e()[2]), peft_config=lora(), max_steps=1)
    with caplog.at_level("WARNING", logger="hf_fsl_sage"):
        trainer.save_model(str(tmp_path / "final"))
    assert "names no base model" in caplog.text and "PeftModel.from_pretrained(base, " in caplog.text
    assert not list(tmp_path.glob("final/*.bin"))  # training_args.json instead of Trainer's pickle
    assert (tmp_path / "final" / "training_args.json").is_file()


def test_a_text_column_is_truncated_to_the_models_positions(tmp_path):
    """The tokenizer allows 1,024 tokens; the model has 64 positions: rows keep 64 tokens and training runs."""
    import datasets

    from e2e_task.data import offline_gpt2_tokenizer

    tokenizer = offline_gpt2_tokenizer()
    assert tokenizer.model_max_length == 1024
    ds = datasets.Dataset.from_dict({"text": [" ".join(["coffee shop"] * (40 + i)) for i in range(8)]})
    args = FSLSageConfig(output_dir=str(tmp_path), algorithm="splitfed_v2", num_clients=2, local_steps=1,
                         max_steps=1, per_device_train_batch_size=2, report_to="none", save_strategy="no",
                         disable_tqdm=True)
    trainer = FSLSageTrainer(model=tiny_gpt2(50257, n_embd=16, n_head=2, n_layer=2), args=args, train_dataset=ds,
                             processing_class=tokenizer)
    assert max(len(r) for r in trainer.train_dataset["input_ids"]) == 64
    trainer.train()


@pytest.mark.parametrize(("participants", "steps_per_epoch"), [(2, 5), (1, 10)])
def test_epoch_counts_passes_over_the_clients_shares(tmp_path, participants, steps_per_epoch):
    """40 rows over 2 clients at batch 4: a pass over a share is 5 local steps, one per global step when both
    take part, one per two global steps when one of them does. num_train_epochs counts the same epochs."""
    import datasets

    ds = datasets.Dataset.from_dict({"input_ids": [[(3 * i + j) % 50 for j in range(8)] for i in range(40)]})
    args = FSLSageConfig(output_dir=str(tmp_path), algorithm="splitfed_v2", num_clients=2,
                         clients_per_round=participants, local_steps=1, num_train_epochs=2,
                         per_device_train_batch_size=4, logging_steps=1, report_to="none", save_strategy="no",
                         disable_tqdm=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50))
    trainer = FSLSageTrainer(model=model, args=args, train_dataset=ds, data_collator=default_data_collator)
    assert trainer.args.max_steps == 2 * steps_per_epoch
    trainer.train()
    epochs = {h["step"]: h["epoch"] for h in trainer.state.log_history if "loss" in h}
    assert epochs[steps_per_epoch] == pytest.approx(1.0) and epochs[2 * steps_per_epoch] == pytest.approx(2.0)
