"""Everything family-specific about splitting; the mechanism in ``split.py`` is generic."""

from __future__ import annotations


# Families that cannot be cut exactly at a block boundary, with the reason (the generic check in ``_observe``
# catches such models too; this table gives the known ones a precise message).
_MULTIMODAL = "multimodal wrapper: with text only, its forward needs the token embedding on the server"
UNSUPPORTED_MODEL_TYPES: dict[str, str] = {
    "blt": "byte latent transformer: byte encoder, patch transformer and byte decoder, not one stack of blocks",
    "cpmant": "its forward needs input_ids (segments and mask come from the token ids; no inputs_embeds path)",
    "deepseek_v4": "hash-routed MoE layers pick experts from the token ids, which the server does not have",
    "dory": "recurrent depth: a group of blocks is run several times in a loop",
    "hrm_text": "hierarchical recurrent model: its block lists are run repeatedly in cycles",
    "gemma3n": _MULTIMODAL,
    "gemma3n_text": "AltUp keeps parallel residual streams and every block reads per-layer inputs of the tokens",
    "gemma4": _MULTIMODAL + " (split the text-only Gemma4ForCausalLM instead)",
    "gemma4_unified": _MULTIMODAL + " (split the text-only Gemma4UnifiedForCausalLM instead)",
    "gemma4_assistant": "speculative-decoding assistant that reads the target model's key/value states",
    "gemma4_unified_assistant": "speculative-decoding assistant that reads the target model's key/value states",
    "git": "image-text model whose text decoder runs over image and text tokens together",
    "hy_v4": "shared sparse-attention layers reuse top-k indices computed by an earlier layer",
    "inkling2_text": "block attention residuals: every block reads a stack of earlier blocks' outputs",
    "inkling2_loop_text": "block attention residuals: every block reads a stack of earlier blocks' outputs",
    "mllama": "cross-attention layers to image features are skipped without an image, so block indices shift",
    "mllama_text_model": "cross-attention layers to image features are skipped without an image",
    "musicgen": "audio decoder over parallel codebook streams with its own text encoder",
    "musicgen_melody": "audio decoder over parallel codebook streams with its own text encoder",
    "prophetnet": "n-gram decoder: besides the main stream it carries n-gram streams built from embeddings",
    "reformer": "reversible residual layers run all blocks inside one autograd function on two streams",
    "xlm": "per-layer modules live in parallel lists and the residual additions happen outside them",
    "xlnet": "permutation LM: its layers take a (content, query) stream pair with relative positions",
    "xmod": "the model reads the language-adapter table of block 0 at model level",
    "zaya": "each block hands its router state to the next block",
    "zamba": "hybrid layers re-read the original token embeddings and share one transformer across depths",
    "zamba2": "hybrid layers re-read the original token embeddings and share transformers across depths",
}

# Config features that make a model of an otherwise supported family unsplittable: (attribute, reason).
UNSUPPORTED_FEATURES: list[tuple[str, str]] = [
    ("hidden_size_per_layer_input", "per-layer inputs computed from the token ids feed every block (set "
                                    "hidden_size_per_layer_input=0 or use a model without them)"),
    ("rescale_every", "RWKV's inference-time rescaling divides the weights of every block in place, on both sides "
                      "of the cut, whenever the model switches between training and evaluation (load it with "
                      "rescale_every=0: in float32 the outputs are the same)"),
]

# Embedding-stage modules (by attribute name) that the server runs itself: their output is used by every
# block, not only added to the token embeddings, and they are fixed tables computed from positions.
SERVER_RUNS: dict[str, tuple[str, ...]] = {
    "roformer": ("embed_positions",),  # sinusoidal table feeding the rotary embedding of every layer
}
