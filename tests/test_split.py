"""The block-boundary split: exactness over many families, ownership, wire bytes, PEFT, tying, dtypes, errors."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import sys
from pathlib import Path

import pytest
import torch
import transformers
from packaging.requirements import Requirement
from packaging.version import Version
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from hf_fsl_sage import Smashed, split_causal_lm
from hf_fsl_sage.splitting.families import UNSUPPORTED_MODEL_TYPES, private_labels_problem
from tests.family_support import SEQ_LEN, check_family, describe, families_to_check, installed_families
from tests.processes import run
from tests.tiny_models import max_split_diff, sample_batch, tiny_causal_lm, tiny_config


ROOT = Path(__file__).resolve().parents[1]
SUPPORT = json.loads((ROOT / "benchmarks" / "results" / "split_support.json").read_text())
ROWS = {r["family"]: r for r in SUPPORT["families"]}
# Every family of the installed transformers that the split does not refuse by design, enumerated at collection.
FAMILIES = families_to_check()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: thread start-up costs more than it saves, and much more on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _ids(model, batch: int = 2, seq_len: int = SEQ_LEN) -> torch.Tensor:
    vocab = model.config.get_text_config().vocab_size
    return torch.randint(3, vocab - 8, (batch, seq_len))


def _param_ids(module: torch.nn.Module) -> set[int]:
    return {id(p) for p in module.parameters()}


# ---------------------------------------------------------------- every family: exact, and one training round
@pytest.mark.parametrize("model_type", FAMILIES)
def test_family_splits_exactly_and_trains(model_type: str) -> None:
    """Exact at every cut (logits, loss; padding cases; NaN never passes), with the labels on the server and on
    the client (refused only where the family's declaration rules it out), then one FSL-SAGE round: client step
    on the aux estimate, server step, alignment and FedAvg run, stay finite and move both halves."""
    row = check_family(model_type)
    assert row["status"] == "exact" and row["trains"], describe(row)
    refused = private_labels_problem(model_type) is not None
    assert row["private_labels"] == ("refused" if refused else "exact"), describe(row)


def test_every_installed_family_is_checked_or_refused_by_name() -> None:
    """What the family test runs is every causal-LM family of the installed transformers, less those the split
    refuses by design (each with its reason): a family a new release adds is checked the day it is installed."""
    (mark,) = [m for m in test_family_splits_exactly_and_trains.pytestmark if m.name == "parametrize"]
    checked = set(mark.args[1])
    installed = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)  # AutoModelForCausalLM's registry, read here directly
    missing = sorted(installed - checked - set(UNSUPPORTED_MODEL_TYPES))
    assert not missing, f"families of transformers {transformers.__version__} that no test checks: {missing}"
    assert checked <= installed and not checked & set(UNSUPPORTED_MODEL_TYPES)
    assert all(UNSUPPORTED_MODEL_TYPES[f] for f in installed - checked)  # a refusal says why


def test_support_table_lists_the_installed_families() -> None:
    """The checked-in table (benchmarks/split_support.py, the same check as above) was measured on the installed
    version's family list, found every checked family exact and training, and the page shows that table."""
    regenerate = (f"the table was measured on transformers {SUPPORT['transformers']}; regenerate it for "
                  f"{transformers.__version__} with `python benchmarks/split_support.py`")
    installed = set(installed_families())
    assert set(ROWS) == installed, f"{regenerate} (new: {sorted(installed - set(ROWS))}, gone: " \
                                   f"{sorted(set(ROWS) - installed)})"
    assert all(ROWS[f]["status"] == "exact" and ROWS[f]["trains"] for f in FAMILIES), regenerate
    assert all(ROWS[f]["status"] == "unsupported" for f in installed - set(FAMILIES)), regenerate
    assert all(ROWS[f].get("private_labels") == ("refused" if private_labels_problem(f) else "exact")
               for f in FAMILIES), regenerate
    assert SUPPORT["exact"] == SUPPORT["trains"] == len(FAMILIES) and SUPPORT["total"] == len(installed)
    split_support = _benchmark()
    page = split_support.TABLE_PAGE.read_text()
    table = split_support.markdown(SUPPORT["families"], SUPPORT["command"], SUPPORT["transformers"])
    assert f"{split_support.START}\n{table}\n{split_support.END}" in page, "the page's table is not the JSON's"


def test_supported_transformers_range_is_the_range_ci_runs() -> None:
    """pyproject.toml admits only the transformers minor version the table was measured on, and the installed one
    lies in it: pip in CI installs a version the tests (and the table) cover, and a new release is admitted by
    raising the bound together with the table."""
    (line,) = re.findall(r'^\s*"(transformers\b[^"]*)",', (ROOT / "pyproject.toml").read_text(), re.MULTILINE)
    requirement = Requirement(line)
    measured = Version(SUPPORT["transformers"])
    assert requirement.specifier.contains(transformers.__version__), (requirement, transformers.__version__)
    assert requirement.specifier.contains(str(measured))
    following = Version(f"{measured.major}.{measured.minor + 1}.0")
    assert not requirement.specifier.contains(str(following)), f"{requirement} admits {following}, not measured"


@pytest.mark.slow
def test_support_benchmark_quick_checks_one_family_of_each_kind(tmp_path) -> None:
    """``benchmarks/split_support.py --quick`` (CI): the same check in a worker process, for a plain family and one
    family of each kind of carried input; the rows are written where asked, the table is left alone."""
    output = tmp_path / "quick.json"
    done = run([sys.executable, str(ROOT / "benchmarks" / "split_support.py"), "--quick", "--workers", "1",
                "--output", str(output)], dict(os.environ), timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {r["family"]: r for r in json.loads(output.read_text())["families"]}
    assert rows.keys() == {"llama", "zaya", "inkling2_text", "deepseek_v4"}
    assert all(r["status"] == "exact" and r["trains"] for r in rows.values()), [describe(r) for r in rows.values()]
    assert {f: r.get("carried") for f, r in rows.items()} == {
        "llama": None, "zaya": ["router_state"], "inkling2_text": ["block_states"], "deepseek_v4": ["token_ids"]}
    assert rows["deepseek_v4"]["reveals_text"] == ["token_ids"]
    assert "| zaya | ZayaForCausalLM | exact and trains (the upload also carries router_state) |" in done.stdout


def _benchmark():
    spec = importlib.util.spec_from_file_location("split_support", ROOT / "benchmarks" / "split_support.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_max_split_diff_sees_nan() -> None:
    """NaN in both the split and the unsplit logits is not agreement: the difference is infinite."""
    model = tiny_causal_lm("llama", num_layers=3)
    assert max_split_diff(model, seq_len=SEQ_LEN) == (0.0, 0.0)
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    assert max_split_diff(model, seq_len=SEQ_LEN) == (math.inf, math.inf)


def test_sample_batch_covers_padding_cases() -> None:
    batches = sample_batch(tiny_causal_lm("llama", num_layers=2))
    assert batches["no_mask"]["attention_mask"] is None
    assert batches["right_pad"]["attention_mask"][-1, -1] == 0
    assert batches["left_pad"]["attention_mask"][-1, 0] == 0 and batches["left_pad"]["position_ids"] is None
    assert batches["left_pad_pos"]["position_ids"][-1, -1] == batches["left_pad_pos"]["attention_mask"][-1].sum() - 1


# ---------------------------------------------------------------- who holds what
@pytest.mark.parametrize(("model_type", "client_prefixes", "server_prefixes"), [
    ("llama", ["model.embed_tokens."], ["model.norm.", "lm_head."]),
    ("bloom", ["transformer.word_embeddings.", "transformer.word_embeddings_layernorm."],
     ["transformer.ln_f.", "lm_head."]),
    ("opt", ["model.decoder.embed_tokens.", "model.decoder.embed_positions."],
     ["model.decoder.final_layer_norm.", "lm_head."]),
])
def test_client_and_server_parameters(model_type: str, client_prefixes: list[str], server_prefixes: list[str]) -> None:
    model = tiny_causal_lm(model_type, num_layers=3, tie_word_embeddings=False)
    blocks = {"llama": "model.layers.", "bloom": "transformer.h.", "opt": "model.decoder.layers."}[model_type]
    named = dict(model.named_parameters(remove_duplicate=False))
    split = split_causal_lm(model, 2)

    def expected(prefixes: list[str], block_ids: range) -> set[int]:
        keep = [*prefixes, *(f"{blocks}{i}." for i in block_ids)]
        return {id(p) for n, p in named.items() if n.startswith(tuple(keep))}

    client, server = _param_ids(split.client), _param_ids(split.server)
    extra = {n for n, p in named.items() if id(p) in client and not n.startswith((blocks, *client_prefixes))}
    assert not extra, f"client also holds {extra}"
    assert expected(client_prefixes, range(2)) <= client
    assert server == expected(server_prefixes, range(2, 3))
    assert not client & server
    assert client | server == _param_ids(model)


def test_gpt2_embedding_stage_and_tied_head_ownership() -> None:
    model = tiny_causal_lm("gpt2", num_layers=3)
    tr = model.transformer
    for p in tr.wte.parameters():
        p.requires_grad_(False)  # frozen tied matrix: both halves read the same tensor
    split = split_causal_lm(model, 1)
    client, server = _param_ids(split.client), _param_ids(split.server)
    assert client == _param_ids(tr.wte) | _param_ids(tr.wpe) | _param_ids(tr.h[0])
    assert server == _param_ids(tr.h[1]) | _param_ids(tr.h[2]) | _param_ids(tr.ln_f) | _param_ids(tr.wte)
    assert client & server == {id(tr.wte.weight)} and not split.head_copied


def test_smashed_nbytes_is_exact() -> None:
    model = tiny_causal_lm("llama", num_layers=2)
    split = split_causal_lm(model, 1)
    ids = _ids(model, 3, 7)
    mask = torch.ones_like(ids)
    positions = torch.arange(7).expand(3, -1)
    smashed = split.client(ids, attention_mask=mask, position_ids=positions)
    assert smashed.attention_mask.dtype == torch.bool
    assert smashed.nbytes == 3 * 7 * 64 * 4 + 3 * 7 * 1 + 3 * 7 * 8
    bare = split.client(ids)
    assert bare.nbytes == 3 * 7 * 64 * 4 and set(bare.tensors()) == {"hidden_states"}
    moved = smashed.detach().to("cpu")
    assert isinstance(moved, Smashed) and not moved.hidden_states.requires_grad and moved.nbytes == smashed.nbytes


def test_cut_width_is_the_residual_streams_width() -> None:
    # Qwen4Exp widens the residual stream to 4x the embedding's width inside its blocks; Llama keeps it.
    for model_type, factor in (("llama", 1), ("qwen4_exp", 4)):
        model = tiny_causal_lm(model_type, num_layers=2)
        split = split_causal_lm(model, 1)
        smashed = split.client(_ids(model, 2, 5))
        embedding = model.get_input_embeddings().embedding_dim
        assert split.cut_width == smashed.hidden_states.shape[-1] == factor * embedding, model_type


# ---------------------------------------------------------------- PEFT
@pytest.mark.parametrize(("model_type", "targets"), [("llama", ["q_proj", "v_proj"]), ("gpt2", ["c_attn"])])
def test_lora_split_trains_both_halves(model_type: str, targets: list[str]) -> None:
    model = tiny_causal_lm(model_type, num_layers=3)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False,
                                                  fan_in_fan_out=model_type == "gpt2"))
    split = split_causal_lm(peft_model, 1)
    assert split.model is peft_model
    for half in (split.client, split.server):
        lora = {n: p for n, p in half.named_parameters() if "lora_" in n}
        assert lora and all(p.requires_grad for p in lora.values())
        assert not any(p.requires_grad for n, p in half.named_parameters() if "lora_" not in n)
    assert not split.head_copied  # the tied matrix is frozen: shared, not copied

    ids = _ids(model)
    with torch.no_grad():
        ref = peft_model(input_ids=ids).logits
        assert torch.allclose(split(ids).logits, ref, atol=1e-5, rtol=0)

    # as on the wire: the server returns d loss / d smashed, the client backpropagates it
    smashed = split.client(ids)
    received = smashed.detach()
    received.hidden_states.requires_grad_(True)
    split.server(received, labels=ids).loss.backward()
    grad = received.hidden_states.grad
    assert grad is not None and grad.abs().sum() > 0
    smashed.hidden_states.backward(grad)
    client_lora = [p for n, p in split.client.named_parameters() if "lora_" in n]
    assert all(p.grad is not None for p in client_lora) and sum(p.grad.abs().sum() for p in client_lora) > 0

    # composed backward reaches the client adapters too
    peft_model.zero_grad()
    split.server(split.client(ids), labels=ids).loss.backward()
    assert sum(p.grad.abs().sum() for p in client_lora) > 0


# ---------------------------------------------------------------- tied embeddings
def test_trainable_tied_embedding_gives_the_server_its_own_head() -> None:
    model = tiny_causal_lm("gpt2", num_layers=3)
    split = split_causal_lm(model, 1)
    assert split.head_copied
    head = split.server.lm.get_output_embeddings().weight
    assert head is not model.transformer.wte.weight and torch.equal(head, model.transformer.wte.weight)
    assert not split.untied_after_training()
    ids = _ids(model)
    optimizer = torch.optim.SGD(split.server.parameters(), lr=0.1)
    split.server(split.client(ids).detach(), labels=ids).loss.backward()
    optimizer.step()
    assert split.untied_after_training()


# ---------------------------------------------------------------- dtypes and training mode
def _fp16_matmul_supported() -> bool:
    try:
        torch.ones(2, 2, dtype=torch.float16) @ torch.ones(2, 2, dtype=torch.float16)
        return True
    except RuntimeError:
        return False


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_half_precision(model_type: str, dtype: torch.dtype) -> None:
    if dtype is torch.float16 and not _fp16_matmul_supported():
        pytest.skip("no fp16 matmul on this CPU")
    model = tiny_causal_lm(model_type, num_layers=3).to(dtype)
    split = split_causal_lm(model, 1)
    ids = _ids(model)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    with torch.no_grad():
        smashed = split.client(ids, attention_mask=mask)
        out = split.server(smashed, labels=ids)
        ref = model(input_ids=ids, attention_mask=mask, labels=ids)
    assert smashed.hidden_states.dtype == dtype
    assert smashed.nbytes == smashed.hidden_states.numel() * 2 + mask.numel()
    # The same kernels on the same inputs in the same order: bit for bit the unsplit model's output.
    assert out.logits.dtype == ref.logits.dtype == dtype
    assert torch.equal(out.logits, ref.logits)
    assert torch.equal(out.loss, ref.loss)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_training_mode_gradients_match_without_dropout(model_type: str) -> None:
    zero = dict(attention_dropout=0.0) if model_type == "llama" else dict(resid_pdrop=0.0, embd_pdrop=0.0,
                                                                          attn_pdrop=0.0)
    model = tiny_causal_lm(model_type, num_layers=3, **zero).train()
    ids = _ids(model)
    model(input_ids=ids, labels=ids).loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    split = split_causal_lm(model, 2)
    split.server(split.client(ids), labels=ids).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    if split.head_copied:  # the tied matrix is two matrices after the split: their gradients add up
        grads["transformer.wte.weight"] = grads["transformer.wte.weight"] + \
            split.server.lm.get_output_embeddings().weight.grad
    for name, g in ref.items():
        assert torch.allclose(grads[name], g, atol=1e-6, rtol=1e-5), name


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize("cut", [0, 3, -1, 1.0, "1", True])
def test_bad_cut_layer(cut) -> None:
    model = tiny_causal_lm("llama", num_layers=3)
    with pytest.raises(ValueError, match=r"llama.*choose an integer in 1 … 2"):
        split_causal_lm(model, cut)


@pytest.mark.parametrize("model_type", ["t5", "bart"])
def test_encoder_decoder_is_rejected(model_type: str) -> None:
    model = AutoModelForSeq2SeqLM.from_config(tiny_config(model_type, num_layers=2))
    with pytest.raises(ValueError, match=rf"{model_type}.*encoder-decoder.*AutoModelForCausalLM"):
        split_causal_lm(model, 1)


@pytest.mark.parametrize("model_type", ["bert", "llama"])
def test_model_without_lm_head_is_rejected(model_type: str) -> None:
    model = AutoModel.from_config(tiny_config(model_type, num_layers=2))
    with pytest.raises(ValueError, match=rf"{model_type}.*AutoModelForCausalLM"):
        split_causal_lm(model, 1)


def test_unsupported_family_and_feature_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"zamba2.*cannot be split: hybrid layers"):
        split_causal_lm(tiny_causal_lm("zamba2", num_layers=2), 1)
    assert AutoConfig.for_model("rwkv").rescale_every  # the family's default rescales at inference
    with pytest.raises(ValueError, match=r"rwkv.*rescal.*rescale_every=0"):
        split_causal_lm(tiny_causal_lm("rwkv", num_layers=2, rescale_every=1), 1)
    config = AutoConfig.for_model("gemma4_text")
    assert config.hidden_size_per_layer_input  # the family's default has per-layer inputs
    model = AutoModelForCausalLM.from_config(tiny_config("gemma4_text", num_layers=2, hidden_size_per_layer_input=16))
    with pytest.raises(ValueError, match=r"gemma4_text.*per-layer inputs.*hidden_size_per_layer_input=0"):
        split_causal_lm(model, 1)


def test_a_cut_between_a_layer_and_one_reading_its_keys_and_values_is_refused() -> None:
    """Kolibri-1.1's layer 3 reads the keys and values layer 1 stored: cuts 2 and 3 would leave them on the
    client, so they are refused (naming the block that reads them); at cut 1 both are the server's."""
    model = tiny_causal_lm("kolibri1_1", num_layers=4, kv_source_layers=[0, 1, 2, 1], index_layers=[1])
    assert model.model.layers[3].self_attn.is_kv_shared_layer
    for cut in (2, 3):
        with pytest.raises(ValueError, match=rf"kolibri1_1.*before block {cut}: block 3 reads.*client-held weights"):
            split_causal_lm(model, cut)
    assert max_split_diff(model, cut_layers=[1], seq_len=SEQ_LEN) == (0.0, 0.0)


def test_non_module_is_rejected() -> None:
    with pytest.raises(ValueError, match="AutoModelForCausalLM"):
        split_causal_lm(torch.nn.Linear(2, 2), 1)
