"""Tiny random causal LMs of any installed family, for tests and support checks (no download).

``tiny_config(model_type)`` starts from the family's default config and shrinks
every size-like field by name (hidden sizes, heads, experts, state sizes, low-rank
dims), using the config's ``attribute_map`` so that one set of standard names
serves every family. Per-layer lists (``layer_types``, block types, MoE layer
flags) are rebuilt for the requested depth so that every kind of layer the family
has occurs, and sliding windows are made short enough to matter on ~12 tokens.
Token ids (pad/bos/eos and special ids) are moved inside the small vocabulary.
"""

from __future__ import annotations

import math
import re
from dataclasses import fields
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel


__all__ = [
    "FAMILY_INIT",
    "FAMILY_NOTES",
    "SLIDING_WINDOW",
    "TINY",
    "max_split_diff",
    "one_fsl_sage_round",
    "round_problems",
    "sample_batch",
    "tiny_causal_lm",
    "tiny_config",
]

SLIDING_WINDOW = 4
TINY: dict[str, Any] = {  # standard names; mapped through each config's attribute_map
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "intermediate_size": 96,
    "vocab_size": 256,
    "max_position_embeddings": 256,
}

# Field-name patterns (full match) -> tiny value, first match wins. Applied to int fields only.
_PATTERNS: list[tuple[str, Any]] = [
    (r"(n_|num_)?(attention_|attn_)?(heads|head)|.*attention_heads", 4),
    (r".*(key_value|kv)_heads|num_query_groups|.*_kv_heads", 2),
    (r".*nope_head_dim", 8),
    (r".*rope_head_dim", 8),
    (r".*(head_dim|head_size|d_head|dim_head|attention_head_dim|headdim)", 16),
    (r".*(kv_lora_rank)", 16),
    (r".*(rotary_dim|rotary_emb_base_dim)", 8),
    (r".*(q_lora_rank|o_lora_rank)", 32),
    (r"index_(n|num)_heads", 2),
    (r"index_topk", 8),
    (r".*(num_local_experts|num_experts|n_routed_experts|moe_num_experts|n_experts)", 4),
    (r".*(experts_per_tok|experts_per_token|moe_topk|moe_k|top_k)", 2),
    (r".*(n_shared_experts|num_shared_experts|moe_num_shared_experts)", 1),
    (r"(n_group|num_expert_group|topk_group)", 1),
    (r"first_k_dense_replace|num_dense_layers", 1),
    (r".*(moe_intermediate|expert_ffn|shared_expert.*intermediate|shared_intermediate|expert_intermediate).*", 32),
    (r".*(intermediate|ffn|d_ff|dff|dim_ff|d_inner|feed_forward|inner).*size.*|ffn_dim|d_inner|dim_ff|dff", 96),
    (r".*(state_size|d_state|ssm_state)", 8),
    (r".*(d_conv|conv_kernel|conv_kernel_size|conv_dim|conv1d_width|conv_L_cache)", 4),
    (r".*(chunk_size|chunk_length|mamba_chunk)", 4),
    (r"adapter_input_size|adapter_out_dim", 64),
    (r".*(n_groups|ngroups|mamba_n_groups)", 1),
    (r"(time_step_rank|mamba_dt_rank)", 8),
    (r".*(rank|lru_width|router_hidden_size)", 16),
    (r".*(d_model|n_embd|embed_dim|emb_dim|embedding_size|embedding_dim|hidden_size|d_embed|dim|width)", 64),
    (r".*(max_position_embeddings|n_positions|n_ctx|max_seq_len|context_length|max_target_positions)", 256),
    (r".*(sliding_window|window_size|attention_window_size|local_attention|sliding_window_size)", SLIDING_WINDOW),
    (r".*(vocab_size|vocab)", 256),
    (r".*layer_period", 2),
    (r".*layer_offset", 1),
    (r".*sliding_window_pattern|global_attn_every_n_layers|no_rope_layer_interval|full_attn_every.*", 2),
]
_KEEP = re.compile(r".*(token_id|token_index|_id|num_labels|seed|pretraining_tp|multiple_of|max_window_layers|"
                   r"num_hidden_layers|n_layer|num_layers|_layers|n_layers|scale.*|.*factor.*|.*cycles|.*passes)")
_LAYER_LISTS = re.compile(r".*(layer_types|layers_block_type|block_types|attention_types|mlp_layer_types|"
                          r"no_rope_layers|layer_rope_theta|attention_layers|num_attention_heads_per_layer|"
                          r"indexer_types|intermediate_size)")

# Fields some default configs leave None (they expect a checkpoint) although the model needs them.
_FILL_NONE: list[tuple[str, Any]] = [
    (r".*(num_local_experts|num_experts|n_routed_experts)", 4),
    (r".*(experts_per_tok|experts_per_token)", 2),
    (r"(n_group|num_expert_group|topk_group|n_shared_experts)", 1),
    (r"indexer_n_heads", 2),
    (r"indexer_kv_heads", 1),
    (r"indexer_head_dim", 16),
    (r"indexer_budget", 8),
    (r"indexer_compress_ratio", 2),
]

# SSM (Mamba-2 style) heads: (heads, head dim, expand) fields; heads * head_dim must equal expand * hidden.
_SSM_HEADS = [("num_heads", "head_dim", "expand"), ("mamba_n_heads", "mamba_d_head", "mamba_expand"),
              ("n_mamba_heads", "mamba_headdim", "mamba_expand"),
              ("mamba_num_heads", "mamba_head_dim", "mamba_expand")]


# ---------------------------------------------------------------- per-family extras (kept small)
def _cycled(*kinds: str):
    return lambda n: [kinds[i % len(kinds)] for i in range(n)]


_ROPE = {"rope_type": "default", "rope_theta": 10000.0}
# Sizes of the sliding-window layers, which the family reads from its own ``swa_*`` arguments (MLA head: nope + rope).
_DOTS3_SWA = {"swa_num_attention_heads": 4, "swa_num_key_value_heads": 4, "swa_q_lora_rank": 32,
              "swa_kv_lora_rank": 16, "swa_head_dim": 16, "swa_qk_nope_head_dim": 8, "swa_v_head_dim": 16}
# Values may be callables of the number of layers.
FAMILY_OVERRIDES: dict[str, dict[str, Any]] = {
    "qwen2": {"use_sliding_window": True, "max_window_layers": 1},
    "qwen2_moe": {"use_sliding_window": True, "max_window_layers": 1},
    "qwen3": {"use_sliding_window": True, "max_window_layers": 1},
    "qwen3_moe": {"use_sliding_window": True, "max_window_layers": 1},
    "gpt_neo": {"attention_types": lambda n: [[["global", "local"], n // 2]] + [[["global"], n % 2]] * (n % 2),
                "window_size": SLIDING_WINDOW},
    "zamba": {"attn_layer_period": 1, "attn_layer_offset": 0, "attention_head_dim": None},
    "bamba": {"attn_layer_indices": lambda n: list(range(1, n, 2))},
    "granitemoehybrid": {"layer_types": _cycled("linear_attention", "full_attention")},
    "lfm2_moe": {"layer_types": _cycled("conv", "full_attention")},
    "cohere_compass_text": {"layer_types": _cycled("sliding_attention", "full_attention"),
                            "rope_parameters": {"sliding_attention": _ROPE, "full_attention": _ROPE}},
    "gemma3n_text": {"num_kv_shared_layers": 2},
    "gemma4_text": {"hidden_size_per_layer_input": 0},
    "gemma4_unified_text": {"hidden_size_per_layer_input": 0},
    "xmod": {"default_language": "en_XX"},
    "dots3_note_text": _DOTS3_SWA,
    "dots3_note": _DOTS3_SWA,
    "rwkv": {"rescale_every": 0},
    "kimi_linear": {"linear_num_heads": 4},  # 32 by default: the reference delta-rule kernel's cost grows with it
    "dbrx": {"attn_config": {"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
             "ffn_config": {"ffn_hidden_size": 64, "moe_num_experts": 4, "moe_top_k": 2}},
    # every layer reads its own keys and values (one index layer); a cut between a layer and one reading its
    # keys and values is refused
    "kolibri1_1": {"kv_source_layers": lambda n: list(range(n)), "index_layers": [1]},
    # a block-attention residual block per layer, so the stack crossing the cut has an entry per client block
    "inkling2_text": {"n_layers_per_attn_res_block": 1},
    # the last block looped twice: on the server at every cut of a 3-block model
    "inkling2_loop_text": {"n_layers_per_attn_res_block": 1, "loop_layer_index_start": lambda n: n - 1,
                           "loop_layer_index_end": lambda n: n, "loop_num_passes": 2},
}


def _random_hash_routes(model: PreTrainedModel) -> None:
    """Hash-routed MoE layers start with an all-zero token-to-expert table (the checkpoint fills it), which routes
    every token to expert 0: draw a table, so that outputs depend on the token ids the layers read."""
    experts = model.config.get_text_config().num_local_experts
    with torch.no_grad():
        for name, table in model.named_buffers():
            if name.endswith("tid2eid"):
                table.copy_(torch.randint(0, experts, table.shape))


# Per-family changes to a freshly built tiny model (weights a checkpoint would provide).
FAMILY_INIT = {"deepseek_v4": _random_hash_routes}


# What the tiny model of a family leaves out, where that matters for what is checked.
FAMILY_NOTES: dict[str, str] = {
    "inkling2_loop_text": "looped blocks after the cut; a cut inside or after the loop is refused",
    "kolibri1_1": "each layer with its own keys and values: none shared across the cut",
    "gemma4_text": "without per-layer inputs (hidden_size_per_layer_input=0); with them: unsupported",
    "gemma4_unified_text": "without per-layer inputs (hidden_size_per_layer_input=0); with them: unsupported",
    "rwkv": "without inference-time rescaling (rescale_every=0); with it: unsupported",
}


def _field_names(cls: type[PretrainedConfig]) -> set[str]:
    try:
        return {f.name for f in fields(cls)}
    except TypeError:
        return set()


def _safe_get(cfg: PretrainedConfig, name: str) -> Any:
    try:
        return getattr(cfg, name, None)
    except Exception:  # noqa: BLE001 - per-layer attributes refuse global access
        return None


def _tiny_value(name: str, value: Any) -> Any:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        return value
    if _KEEP.fullmatch(name) and not re.fullmatch(r".*(vocab|window).*", name):
        return value
    for pattern, tiny in _PATTERNS:
        if re.fullmatch(pattern, name):
            return min(value, tiny) if "window" not in name else tiny
    return value


def _per_layer(values: list, num_layers: int) -> list:
    """A ``num_layers``-long list in which every distinct value of ``values`` occurs (cycled, first-seen order)."""
    distinct: list = []
    for v in values:
        if v not in distinct:
            distinct.append(v)
    # keep the family's first layer kind first; cycle the others so that each appears
    return [distinct[i % len(distinct)] for i in range(num_layers)]


def _tiny_kwargs(cfg: PretrainedConfig, num_layers: int) -> dict[str, Any]:
    cls = type(cfg)
    names = _field_names(cls) or set(cfg.to_dict())
    amap = getattr(cls, "attribute_map", {}) or {}
    default_layers = getattr(cfg, "num_hidden_layers", None)
    kw: dict[str, Any] = {}
    subs = set(getattr(cls, "sub_configs_defaults", {}) or {})
    try:
        derived = {f.name for f in fields(cls) if f.default is None}
        class_defaults = {f.name: f.default for f in fields(cls) if isinstance(f.default, int)}
    except TypeError:
        derived, class_defaults = set(), {}
    for name in names:
        if name in subs or name.startswith("_"):
            continue
        value = _safe_get(cfg, name)
        original = value
        if (value is None or (value == 0 and "window" in name)) and name in class_defaults:
            value = class_defaults[name]  # e.g. a window the default config switched off (None, or 0 in Qwen2-MoE)
        if value is None:
            value = next((v for p, v in _FILL_NONE if re.fullmatch(p, name)), None)
        new = _tiny_value(name, value)
        if isinstance(value, PretrainedConfig):  # a nested config that is not a declared sub-config
            new = {**value.to_dict(), **_tiny_kwargs(value, num_layers)}
        elif isinstance(value, list) and value and default_layers and _LAYER_LISTS.fullmatch(name):
            if name in derived and len(set(map(str, value))) == 1:
                continue  # one kind only: let the config derive it in __post_init__ (it may depend on overrides)
            new = _per_layer(value, num_layers)
        elif isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value) \
                and default_layers and max(value) < default_layers \
                and re.fullmatch(r".*(layers|idxs|ids|indices)", name):
            new = [i for i in range(num_layers) if i % 2 == 1] or [0]  # a layer-index list: every other layer
        if new is not original:
            kw[name] = new
    # standard names through the attribute map
    for std, value in TINY.items():
        field = amap.get(std, std)
        if field in names:
            kw[field] = value
    field = amap.get("num_hidden_layers", "num_hidden_layers")
    if field in names:
        kw[field] = num_layers
    for name in ("n_layer", "num_layers", "n_layers", "decoder_layers"):
        if name in names and name not in kw and isinstance(getattr(cfg, name, None), int):
            kw[name] = num_layers
    _make_consistent(kw, names, amap)
    return kw


def _make_consistent(kw: dict[str, Any], names: set[str], amap: dict[str, str]) -> None:
    """Fix the few relations between sizes that configs validate."""
    hidden = kw.get(amap.get("hidden_size", "hidden_size"), TINY["hidden_size"])
    heads = amap.get("num_attention_heads", "num_attention_heads")
    if "kv_lora_rank" in names and amap.get("num_key_value_heads", "num_key_value_heads") in names:
        kw[amap.get("num_key_value_heads", "num_key_value_heads")] = kw.get(heads, 4)  # MLA: one kv head per head
    for n_heads, head_dim, expand in _SSM_HEADS:
        if {n_heads, head_dim, expand} <= names and n_heads != heads:
            inner = int(kw.get(expand, 2) * hidden)
            kw[expand] = kw.get(expand, 2)
            kw[head_dim] = 16
            kw[n_heads] = inner // 16
    if {"qk_rope_head_dim", "head_dim"} <= names:  # MLA: the rotary part of each head
        kw["head_dim"] = kw.get("qk_rope_head_dim", 8)
    if "is_decoder" in names:  # encoder families registered as causal LMs run causally only as decoders
        kw["is_decoder"] = True
    if "mamba_d_ssm" in names:
        kw["mamba_d_ssm"] = None


def _token_ids(values: dict[str, Any], vocab: int) -> dict[str, Any]:
    """Token-id fields of ``values`` outside (or at the top of) a ``vocab``-sized vocabulary, moved inside."""
    low = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    out: dict[str, Any] = {}
    for name, value in values.items():
        if not name.endswith(("token_id", "token_index")) and name not in ("decoder_start_token_id", "mask_index"):
            continue
        if isinstance(value, list):
            kept = [v for v in value if isinstance(v, int) and v < vocab - 8]
            out[name] = kept or [low.get(name, 2)]
        elif isinstance(value, int) and not isinstance(value, bool) and value >= vocab - 8:
            out[name] = low.get(name, vocab - 1 - sum(map(ord, name)) % 5)
    return out


def _with_layer_count(cfg: PretrainedConfig, default: PretrainedConfig, num_layers: int) -> None:
    """Make per-layer lists derived in ``__post_init__`` match ``num_layers``, with every kind the default has."""
    for name, value in list(vars(cfg).items()):
        if not (isinstance(value, list) and value and _LAYER_LISTS.fullmatch(name)
                and all(isinstance(v, str) for v in value)):
            continue
        kinds = getattr(default, name, None) or value
        if len(value) != num_layers or not set(kinds) <= set(value):
            setattr(cfg, name, _per_layer(kinds, num_layers))


def _build(cfg: PretrainedConfig, num_layers: int, overrides: dict[str, Any]) -> dict[str, Any]:
    """Constructor kwargs for a tiny version of ``cfg`` (overrides in standard or own names win)."""
    kw = _tiny_kwargs(cfg, num_layers)
    amap = getattr(type(cfg), "attribute_map", {}) or {}
    kw.update({amap.get(k, k): v for k, v in overrides.items()})
    vocab = kw.get(amap.get("vocab_size", "vocab_size"), getattr(cfg, "vocab_size", None)) or TINY["vocab_size"]
    current = {n: _safe_get(cfg, n) for n in _field_names(type(cfg))}
    kw.update(_token_ids({**current, **kw}, vocab))
    return kw


def _encoder_sizes(sub: PretrainedConfig) -> dict[str, Any]:
    """Sizes of a non-text (vision, audio) sub-config the name patterns miss: channel widths and block counts."""
    found = {k: 64 for k, v in sub.to_dict().items()
             if re.fullmatch(r".*channels?", k) and isinstance(v, int) and v > 64}
    return found | ({"num_blocks": 2} if isinstance(getattr(sub, "num_blocks", None), int) else {})


def tiny_config(model_type: str, num_layers: int = 4, **overrides: Any) -> PretrainedConfig:
    """A tiny random-init config of family ``model_type`` with ``num_layers`` decoder blocks.

    ``overrides`` use standard names (``hidden_size``, ``num_attention_heads`` …) or the family's own;
    for composite (multimodal) configs they apply to the text config.
    """
    default = AutoConfig.for_model(model_type)
    text_default = default.get_text_config()
    extra = {k: v(num_layers) if callable(v) else v for k, v in FAMILY_OVERRIDES.get(model_type, {}).items()}
    overrides = {**extra, **overrides}
    kw: dict[str, Any] = {}
    for key in getattr(type(default), "sub_configs_defaults", {}) or {}:  # vision, audio … and text sub-configs
        sub = getattr(default, key, None)
        if isinstance(sub, PretrainedConfig):
            is_text = sub is text_default
            sub_kw = _build(sub, num_layers if is_text else 2, overrides if is_text else _encoder_sizes(sub))
            kw[key] = type(sub)(**sub_kw).to_dict()
    root = _build(default, num_layers, overrides if text_default is default else {})
    kw.update({k: v for k, v in root.items() if k not in kw})
    cfg = type(default)(**kw)
    _with_layer_count(cfg.get_text_config(), text_default, num_layers)
    return cfg


def tiny_causal_lm(model_type: str, seed: int = 0, **kw: Any) -> PreTrainedModel:
    """``AutoModelForCausalLM.from_config(tiny_config(model_type, **kw))`` in fp32 eval mode, seeded."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **kw), dtype=torch.float32)
    if model_type in FAMILY_INIT:
        FAMILY_INIT[model_type](model)
    return model.eval()


# ---------------------------------------------------------------- exactness check
def sample_batch(model: PreTrainedModel, batch: int = 2, seq_len: int = 12, pad: int = 4, seed: int = 0
                 ) -> dict[str, dict[str, torch.Tensor | None]]:
    """Inputs for the exactness check: no mask, right padding, left padding with and without position ids."""
    vocab = model.config.get_text_config().vocab_size
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, max(4, vocab - 8), (batch, seq_len), generator=gen)
    right = torch.ones_like(ids)
    right[-1, seq_len - pad:] = 0
    left = torch.ones_like(ids)
    left[-1, :pad] = 0
    left_pos = (left.cumsum(-1) - 1).clamp(min=0)
    return {
        "no_mask": {"input_ids": ids, "attention_mask": None, "position_ids": None},
        "right_pad": {"input_ids": ids, "attention_mask": right, "position_ids": None},
        "left_pad_pos": {"input_ids": ids, "attention_mask": left, "position_ids": left_pos},
        "left_pad": {"input_ids": ids, "attention_mask": left, "position_ids": None},
    }


def _labels(inputs: dict[str, torch.Tensor | None]) -> torch.Tensor:
    labels = inputs["input_ids"].clone()
    if inputs["attention_mask"] is not None:
        labels[inputs["attention_mask"] == 0] = -100
    return labels


def max_split_diff(model: PreTrainedModel, cut_layers: list[int] | None = None, seq_len: int = 12,
                   cases: list[str] | None = None, private_labels: bool = False) -> tuple[float, float]:
    """Largest |Δlogit| and |Δloss| between ``server(client(x))`` and ``model(x)`` over cuts and padding cases.

    With ``private_labels``, between ``client.head(server(client(x)))`` (the final norm and head on the client)
    and ``model(x)``.

    Non-finite values (NaN or infinity) in either model's logits or loss count as an infinite difference.
    """
    from hf_fsl_sage.splitting.split import split_causal_lm

    num_layers = split_causal_lm(model, 1).num_layers
    batches = sample_batch(model, seq_len=seq_len)
    worst_logit = worst_loss = 0.0
    with torch.no_grad():
        refs = {}
        for case, inputs in batches.items():
            if cases is None or case in cases:
                given = {k: v for k, v in inputs.items() if v is not None}
                refs[case] = model(**given, labels=_labels(inputs), use_cache=False)
        for cut in cut_layers or range(1, num_layers):
            split = split_causal_lm(model, cut, private_labels=private_labels)
            for case, ref in refs.items():
                inputs = batches[case]
                out = split(**inputs, labels=_labels(inputs))
                worst_logit = max(worst_logit, _max_abs_diff(out.logits, ref.logits))
                worst_loss = max(worst_loss, _max_abs_diff(out.loss, ref.loss))
    return worst_logit, worst_loss


def _max_abs_diff(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want|, infinite when either holds a NaN or an infinity (a NaN must never compare as equal)."""
    if not (torch.isfinite(got).all() and torch.isfinite(want).all()):
        return math.inf
    return (got.float() - want.float()).abs().max().item()


# ---------------------------------------------------------------- one training round
def one_fsl_sage_round(model: PreTrainedModel, output_dir: str, seq_len: int = 10, seed: int = 0,
                       **overrides) -> dict[str, float]:
    """Train ``model`` for one FSL-SAGE round on random tokens and report what happened.

    A client takes one local step on its auxiliary gradient estimate and uploads, the server
    steps and aligns the client's auxiliary model on that upload, and the client models are
    averaged (one client: what is family-specific is the split, the auxiliary model and the
    steps, not the averaging). Returns the round's client and server losses, the alignment cosines, the
    global model's loss after the round (``eval_loss``) and the fraction of the client's and the
    server's trainable tensors that changed. ``overrides`` change the run's settings (``FSLSageConfig``).
    """
    import datasets
    from transformers import default_data_collator

    from hf_fsl_sage.config import FSLSageConfig
    from hf_fsl_sage.trainer import FSLSageTrainer

    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(3, max(4, vocab - 8), (4, seq_len), generator=torch.Generator().manual_seed(seed)).tolist()
    rows = datasets.Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * seq_len] * 4, "labels": ids})
    args = FSLSageConfig(output_dir=output_dir, num_clients=1, local_steps=1, max_steps=1,
                         per_device_train_batch_size=2, per_device_eval_batch_size=4, aux_num_layers=1,
                         server_update_interval=1, align_interval=1, align_epochs=1, aux_heldout_cosine=False,
                         weight_decay=0.0,  # only gradients move weights: a client step without its estimate shows
                         warmup_steps=0, logging_steps=1,
                         save_strategy="no", report_to="none", disable_tqdm=True, use_cpu=True, seed=seed,
                         **overrides)
    trainer = FSLSageTrainer(model=model, args=args, train_dataset=rows, eval_dataset=rows,
                             data_collator=default_data_collator)
    halves = {"client": trainer.split.client, "server": trainer.split.server}
    before = {k: {n: p.detach().clone() for n, p in h.named_parameters() if p.requires_grad}
              for k, h in halves.items()}
    trainer.train()
    report = {k: v for h in trainer.state.log_history for k, v in h.items()
              if k in ("loss", "server_loss", "align_grad_cosine_before", "align_grad_cosine_after")}
    report["eval_loss"] = trainer.evaluate()["eval_loss"]
    for k, half in halves.items():
        now = {n: p for n, p in half.named_parameters() if p.requires_grad}
        report[f"{k}_changed"] = sum(not torch.equal(now[n], t) for n, t in before[k].items()) / max(1, len(now))
    return report


def round_problems(report: dict[str, float]) -> list[str]:
    """What is wrong with a :func:`one_fsl_sage_round` report: missing or non-finite losses, unmoved halves."""
    expected = ("loss", "server_loss", "align_grad_cosine_before", "align_grad_cosine_after", "eval_loss")
    problems = [f"no {k}" for k in expected if k not in report]
    problems += [f"{k} = {v}" for k, v in report.items() if not math.isfinite(v)]
    return problems + [f"{k} == 0" for k in ("client_changed", "server_changed") if report.get(k) == 0]
