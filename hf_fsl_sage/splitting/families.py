"""Everything family-specific about splitting; the mechanism in ``split.py`` is generic."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


# Families that cannot be cut exactly at a block boundary, with the reason (the generic check in ``observe_cut``
# catches such models too; this table gives the known ones a precise message).
_MULTIMODAL = "multimodal wrapper: with text only, its forward needs the token embedding on the server"
UNSUPPORTED_MODEL_TYPES: dict[str, str] = {
    "blt": "byte latent transformer: byte encoder, patch transformer and byte decoder, not one stack of blocks",
    "cpmant": "its forward needs input_ids (segments and mask come from the token ids; no inputs_embeds path)",
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
    "mllama": "cross-attention layers to image features are skipped without an image, so block indices shift",
    "mllama_text_model": "cross-attention layers to image features are skipped without an image",
    "musicgen": "audio decoder over parallel codebook streams with its own text encoder",
    "musicgen_melody": "audio decoder over parallel codebook streams with its own text encoder",
    "prophetnet": "n-gram decoder: besides the main stream it carries n-gram streams built from embeddings",
    "reformer": "reversible residual layers run all blocks inside one autograd function on two streams",
    "xlm": "per-layer modules live in parallel lists and the residual additions happen outside them",
    "xlnet": "permutation LM: its layers take a (content, query) stream pair with relative positions",
    "xmod": "the model reads the language-adapter table of block 0 at model level",
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


@dataclass(frozen=True)
class CarriedInput:
    """An input of the server's decoder blocks, besides the hidden states, that the client computes and sends.

    ``argument`` is the parameter of the blocks' ``forward`` that receives it; it travels in the upload under
    ``name`` (``Smashed.carried``), is checked on receipt and counted in the
    ledger. ``scope`` says how the model hands it on from block to block, and so where the server puts it:

    - ``"first"``: into block ``cut_layer`` only; the later blocks get theirs from the block before (a router
      state each block returns with its hidden states);
    - ``"every"``: into every server block, as the model passes the same value to all of them (token ids);
    - ``"stack"``: the model stacks earlier blocks' inputs along dimension -2 and passes the stack to every
      block, and to the model-level modules in ``readers`` after the blocks: the client's entries, first in
      the stack, replace the server's there.

    A floating-point value is an activation: the server's loss is differentiated with respect to it as with
    respect to the hidden states (gradients sent back, estimated and aligned). ``reveals_text`` marks a value
    that gives the server the text itself (token ids): a split that keeps the labels on the client cannot use
    the family.
    """

    name: str
    argument: str
    scope: Literal["first", "every", "stack"]
    reason: str
    reveals_text: bool = False
    readers: tuple[str, ...] = ()


_BLOCK_STACK = CarriedInput("block_states", "block_states", "stack", readers=("final_input",),
                            reason="block attention residuals: every block reads a stack of earlier blocks' inputs")
# What each family's server blocks read besides the hidden states, declared once here; the split checks at
# split time that block ``cut_layer`` receives each of them and that nothing else it reads comes from the client.
CARRIED_INPUTS: dict[str, tuple[CarriedInput, ...]] = {
    "deepseek_v4": (CarriedInput("token_ids", "input_ids", "every", reveals_text=True,
                                 reason="hash-routed MoE layers pick their experts from the token ids"),),
    "inkling2_text": (_BLOCK_STACK,),
    "inkling2_loop_text": (_BLOCK_STACK,),
    "zaya": (CarriedInput("router_state", "prev_router_hidden_states", "first",
                          reason="each block's router reads the router state of the block before"),),
}


def carried_inputs(model_type: str) -> tuple[CarriedInput, ...]:
    """What ``model_type``'s server blocks read besides the hidden states (empty for most families)."""
    return CARRIED_INPUTS.get(model_type, ())


def text_revealing_inputs(model_type: str) -> list[str]:
    """Names of the carried inputs of ``model_type`` that give the server the text (e.g. token ids).

    A split that keeps the labels on the client refuses these families: what it hides in the labels would
    travel in the upload anyway.
    """
    return [c.name for c in carried_inputs(model_type) if c.reveals_text]


def private_labels_problem(model_type: str) -> str | None:
    """Why ``model_type`` cannot keep the labels on the client (``private_labels=True``), from what its server
    blocks read (:data:`CARRIED_INPUTS`); ``None`` if it can.

    Two kinds of carried input stand in the way: one that gives the server the text (token ids), which would
    travel in every upload, and one that a module after the blocks reads (a stack of every block's input), which
    the client's final norm would need from all of the server's blocks.
    """
    for c in carried_inputs(model_type):
        if c.reveals_text:
            return f"its server blocks read {c.name} ({c.reason}), so every upload would give the server the text"
        if c.readers:
            return (f"{c.readers[0]!r} after the blocks reads {c.name} ({c.reason}), which the client's final norm "
                    "would need from every server block")
    return None
