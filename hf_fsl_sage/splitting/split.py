"""Cut a Hugging Face causal LM at a block boundary into a client part and a server part.

One generic mechanism serves every decoder-only family: both halves run the
model's *own* forward code on a shallow copy of the model in which the modules
the half does not hold are replaced by weightless stand-ins.

* The client runs the base model with its decoder-block list truncated to
  ``[0, cut_layer)`` and stops with a forward hook on the last kept block, so
  embedding-stage work (token and position embeddings, scaling, dropout) is done
  exactly as in the unsplit model and nothing after the blocks runs.
* The server runs the causal-LM forward with a zero ``inputs_embeds`` of the
  right shape, so that everything the model computes at model level from the
  shapes, the attention mask and the position ids (causal / sliding-window /
  ALiBi masks, rotary embeddings, per-layer attention types) is computed exactly
  as in the unsplit model. A forward pre-hook on block ``cut_layer`` swaps the
  zero stream for the smashed activations; blocks ``[0, cut_layer)`` are
  weightless stand-ins that keep their plain attributes (``attention_type``,
  ``layer_idx``), output structure and list positions.

Nothing is guessed from names: at split time one forward pass on a two-token
input observes which modules run before the blocks (the embedding stage) and
what each block returns, and checks the cut: blocks run once each in order,
block ``cut_layer`` reads exactly what block ``cut_layer - 1`` returned, and no
other input of a server block depends on client-held weights. Families that
fail this (recurrent depth, extra streams, token-id routing) get a ValueError.
Family-specific knowledge is confined to the adapter tables below.

Tied input/output embeddings: the client owns the input embedding, the server
owns the LM head. When the tied matrix is frozen (the usual LoRA set-up) both
halves read the same tensor, which costs no memory and stays identical. When it
is trainable the server gets its own copy of the head at split time, so the
client's embedding and the server's head train independently, as they would on
two machines; :meth:`SplitCausalLM.untied_after_training` then reports whether
exported weights must be saved untied.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from .families import SERVER_RUNS, UNSUPPORTED_FEATURES, UNSUPPORTED_MODEL_TYPES
from .stand_ins import (
    NotHeld,
    SkippedBlock,
    StopForward,
    block_owner_paths,
    first_output,
    has_params,
    join_path,
    path_of,
    server_stand_ins,
    with_replaced,
)


__all__ = ["Smashed", "SplitClient", "SplitServer", "SplitCausalLM", "split_causal_lm"]

@dataclass
class Smashed:
    """What the client sends to the server: the cut-layer activations and what the server needs besides.

    ``attention_mask`` travels as ``torch.bool`` (1 byte per token) and
    ``position_ids`` only when the caller gave them; otherwise the server derives
    the same default positions from the shape, as the unsplit model does.
    """

    hidden_states: torch.Tensor
    attention_mask: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: t for f in fields(self) if (t := getattr(self, f.name)) is not None}

    @property
    def nbytes(self) -> int:
        """Bytes that cross the wire for this message (tensor payloads in the dtype sent)."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def detach(self) -> Smashed:
        return Smashed(**{f.name: _maybe(getattr(self, f.name), torch.Tensor.detach) for f in fields(self)})

    def to(self, device: torch.device | str) -> Smashed:
        return Smashed(**{f.name: _maybe(getattr(self, f.name), lambda t: t.to(device)) for f in fields(self)})


def _maybe(t: torch.Tensor | None, fn) -> torch.Tensor | None:
    return None if t is None else fn(t)


# ---------------------------------------------------------------- halves
class SplitClient(nn.Module):
    """Embeddings and blocks ``[0, cut_layer)``: ``client(input_ids, attention_mask, position_ids) -> Smashed``."""

    def __init__(self, base: nn.Module, last_block: nn.Module, embedding_path: str):
        super().__init__()
        self.base = base
        self._last_block = [last_block]  # not a submodule: already inside ``base``
        self.embedding_path = embedding_path

    def input_embeddings(self) -> nn.Module:
        """The token embedding this client holds (its own tensor in a client copy)."""
        return self.base.get_submodule(self.embedding_path)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> Smashed:
        captured: list[torch.Tensor] = []

        def stop(module, args, output):  # nothing after the last client block runs on the client
            captured.append(first_output(output))
            raise StopForward

        handle = self._last_block[0].register_forward_hook(stop)
        try:
            self.base(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      inputs_embeds=inputs_embeds, use_cache=False)
        except StopForward:
            pass
        finally:
            handle.remove()
        if not captured:
            raise RuntimeError("the last client block did not run")
        mask = None if attention_mask is None else attention_mask.to(torch.bool)
        return Smashed(captured[-1], mask, position_ids)


class SplitServer(nn.Module):
    """Blocks ``[cut_layer, L)``, final norm and LM head: ``server(smashed, labels=None) -> CausalLMOutput``."""

    def __init__(self, lm: nn.Module, first_block: nn.Module, embed_dim: int):
        super().__init__()
        self.lm = lm
        self._first_block = [first_block]
        self.embed_dim = embed_dim

    @property
    def first_block(self) -> nn.Module:
        """The first decoder block this half runs: the smashed activations enter there."""
        return self._first_block[0]

    def forward(self, smashed: Smashed, labels: torch.Tensor | None = None, **kwargs):
        hidden = smashed.hidden_states

        def inject(module, args, kw):
            if args:
                return (hidden, *args[1:]), kw
            return args, {**kw, "hidden_states": hidden}

        zeros = hidden.new_zeros(*hidden.shape[:2], self.embed_dim)
        mask = None if smashed.attention_mask is None else smashed.attention_mask.long()
        handle = self._first_block[0].register_forward_pre_hook(inject, with_kwargs=True)
        try:
            return self.lm(inputs_embeds=zeros, attention_mask=mask, position_ids=smashed.position_ids, labels=labels,
                           use_cache=False, **kwargs)
        finally:
            handle.remove()


class SplitCausalLM(nn.Module):
    """A causal LM cut after block ``cut_layer - 1``; ``forward`` composes ``server(client(x))``."""

    def __init__(self, client: SplitClient, server: SplitServer, model: nn.Module, cut_layer: int, num_layers: int,
                 head_copied: bool, cut_width: int):
        super().__init__()
        # Width of the smashed activations: the residual stream at the cut (the embedding's width unless a family
        # widens it in its blocks).
        self.cut_width = cut_width
        self.client = client
        self.server = server
        self.cut_layer = cut_layer
        self.num_layers = num_layers
        self.head_copied = head_copied
        self._model = [model]  # the model that was split (PeftModel if one was given); shares all weights

    @property
    def model(self) -> nn.Module:
        return self._model[0]

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, labels=None, **kwargs):
        return self.server(self.client(input_ids, attention_mask, position_ids), labels=labels, **kwargs)

    def untied_after_training(self) -> bool:
        """True when the server's head copy no longer equals the client's input embedding."""
        if not self.head_copied:
            return False
        emb = _unwrap(self.model).get_input_embeddings().weight  # the very tensor the client holds
        head = self.server.lm.get_output_embeddings().weight
        return not torch.equal(emb.detach().to(head.device), head.detach())

    @property
    def first_server_block(self) -> nn.Module:
        """The first decoder block of the server half (block ``cut_layer``)."""
        return self.server.first_block

    def untie_for_export(self) -> None:
        """Give the split model its own LM head, the server's, when that was trained apart from the client's
        embedding (:meth:`untied_after_training`): saving or generating with ``model`` then uses the trained head."""
        lm = _unwrap(self.model)
        lm.config.tie_word_embeddings = False
        if hasattr(lm.config, "get_text_config"):
            lm.config.get_text_config().tie_word_embeddings = False
        lm.get_output_embeddings().weight = self.server.lm.get_output_embeddings().weight


# ---------------------------------------------------------------- construction
def _unwrap(model: nn.Module) -> PreTrainedModel:
    get_base = getattr(model, "get_base_model", None)  # peft.PeftModel
    lm = get_base() if callable(get_base) and not isinstance(model, PreTrainedModel) else model
    if not isinstance(lm, PreTrainedModel):
        raise ValueError(
            f"split_causal_lm expects a transformers causal LM (PreTrainedModel), got {type(model).__name__}. "
            "Load the model with AutoModelForCausalLM.from_pretrained / from_config."
        )
    return lm


def _check_causal_lm(lm: PreTrainedModel) -> str:
    model_type = getattr(lm.config, "model_type", type(lm).__name__)
    if getattr(lm.config, "is_encoder_decoder", False):
        raise ValueError(
            f"{model_type} ({type(lm).__name__}) is an encoder-decoder model; federated split learning here "
            "cuts decoder-only causal LMs. Use a decoder-only model loaded with AutoModelForCausalLM."
        )
    name = type(lm).__name__
    if lm.get_output_embeddings() is None or not (
        name in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()) or name.endswith("ForCausalLM")
    ):
        raise ValueError(
            f"{name} (model_type {model_type!r}) is not a causal LM with an LM head. "
            "Load it with AutoModelForCausalLM.from_pretrained(...) or .from_config(...)."
        )
    if model_type in UNSUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model_type {model_type!r} cannot be split: {UNSUPPORTED_MODEL_TYPES[model_type]}. "
            "Use a supported family (see docs/supported-families.md)."
        )
    text_config = lm.config.get_text_config()
    for attribute, reason in UNSUPPORTED_FEATURES:
        if getattr(text_config, attribute, None):
            raise ValueError(f"this {model_type} model cannot be split: {reason}.")
    return model_type


def _find_blocks(base: nn.Module, num_layers: int, model_type: str) -> str:
    """Path of the list of decoder blocks: the shallowest ModuleList of ``num_layers`` modules, or else (configs
    counting sub-layers) the longest shallowest ModuleList of weighted modules."""
    lists = {n: m for n, m in base.named_modules() if isinstance(m, nn.ModuleList) and len(m) >= 2}
    found = [n for n, m in lists.items() if len(m) == num_layers]
    if not found:
        weighted = [n for n, m in lists.items() if all(has_params(b) for b in m)]
        depth = min((n.count(".") for n in weighted), default=0)
        found = sorted((n for n in weighted if n.count(".") == depth), key=lambda n: -len(lists[n]))[:1]
    if not found:
        raise ValueError(
            f"model_type {model_type!r}: found no list of {num_layers} decoder blocks, so this architecture "
            "cannot be split at a block boundary. Use a supported family (see docs/supported-families.md)."
        )
    return min(found, key=lambda n: n.count("."))


def decoder_blocks(lm: PreTrainedModel) -> tuple[str, str]:
    """``(base_path, blocks_path)``: the base model inside ``lm`` and the list of decoder blocks inside the base."""
    base_path = lm.base_model_prefix if isinstance(getattr(lm, lm.base_model_prefix, None), nn.Module) else ""
    model_type = getattr(lm.config, "model_type", type(lm).__name__)
    return base_path, _find_blocks(lm.get_submodule(base_path), lm.config.get_text_config().num_hidden_layers,
                                   model_type)


def _output_count(output: Any) -> int:
    return len(output) if isinstance(output, (tuple, list)) else 0


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


def _echo_unheld(base: nn.Module, owners: list[str], blocks: nn.ModuleList, counts: dict[int, int]) -> list[nn.Module]:
    """Make the modules whose weights this process does not hold (all on the ``meta`` device) return their input.

    A client's process holds the blocks after the cut only as far as its auxiliary model needs them
    (:mod:`hf_fsl_sage.splitting.materialise`). The checks of :func:`_observe` read what enters each server
    block, never what it computes, so such a block echoes its hidden states in the structure the last block
    before it returned. Undone by deleting the instance attribute ``forward``.
    """
    def unheld(module: nn.Module) -> bool:
        params = list(module.parameters())
        return bool(params) and all(p.is_meta for p in params)

    def echo_block(*args, **kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        n = counts[max(counts)] if counts else 0
        return (hidden, *[None] * (n - 1)) if n else hidden

    def echo(*args, **kwargs):
        return args[0] if args else next(iter(kwargs.values()))

    echoing = []
    for module, forward in [(b, echo_block) for b in blocks] + [
        (child, echo) for owner in owners for child in base.get_submodule(owner).children()
        if child is not blocks and child not in [base.get_submodule(o) for o in owners]
    ]:
        if unheld(module):
            module.forward = forward
            echoing.append(module)
    return echoing


def _observe(base: nn.Module, owners: list[str], blocks: nn.ModuleList, cut_layer: int, token_embedding: nn.Module,
             server_runs: set[str], model_type: str) -> tuple[list[str], list[int], int]:
    """Run ``base`` once on a tiny input and check that it can be cut before block ``cut_layer``.

    Returns the paths (relative to ``base``) of the modules that run before the first block (the embedding
    stage), for blocks ``[0, cut_layer)`` the length of the tuple each returns (0: a bare tensor), and the width
    of the hidden states at the cut (the embedding's width for most families, wider for some).

    Client-held weights (everything outside blocks ``[cut_layer, L)`` and the modules the server runs itself)
    are made to require grad for the run, so that any input of a server block that depends on them shows it.
    The cut is exact only if the blocks run once each and in order, block ``cut_layer`` reads exactly what block
    ``cut_layer - 1`` returned, and nothing else that server blocks read depends on client-held weights.
    """
    called: list[str] = []
    order: list[int] = []
    firsts: dict[int, torch.Tensor] = {}
    counts: dict[int, int] = {}
    leaks: list[str] = []
    seam: list[bool] = []
    handles = []
    for owner in owners:
        for name, child in base.get_submodule(owner).named_children():
            path = join_path(owner, name)
            if child is blocks or path in owners:
                continue
            handles.append(child.register_forward_pre_hook(
                lambda m, a, p=path: None if order else called.append(p)))

    def enter(module, args, kwargs, i):
        hidden = args[0] if args else kwargs.get("hidden_states")
        rest = list(args[1:]) + [v for k, v in kwargs.items() if not (not args and k == "hidden_states")]
        if i == cut_layer:
            before = firsts.get(cut_layer - 1)
            seam.append(isinstance(hidden, torch.Tensor) and before is not None and torch.equal(hidden, before))
        if i >= cut_layer and any(t.requires_grad for t in _tensors(rest)):
            leaks.append(f"block {i}")
        order.append(i)

    def leave(module, args, output, i):
        firsts[i], counts[i] = first_output(output), _output_count(output)

    for i, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(lambda m, a, k, i=i: enter(m, a, k, i), with_kwargs=True))
        handles.append(block.register_forward_hook(lambda m, a, o, i=i: leave(m, a, o, i)))
    echoing = _echo_unheld(base, owners, blocks, counts)
    server_params = {id(p) for b in blocks[cut_layer:] for p in b.parameters()}
    server_params |= {id(p) for path in server_runs for p in base.get_submodule(path).parameters()}
    client_params = [p for p in base.parameters() if id(p) not in server_params]
    shared = {id(p) for b in blocks[:cut_layer] for p in b.parameters()} & server_params
    grad_flags = [(p, p.requires_grad) for p in client_params]
    modes = [(m, m.training) for m in base.modules()]
    device = token_embedding.weight.device
    ids = torch.tensor([[1, 2]], device=device).clamp(max=token_embedding.num_embeddings - 1)
    try:
        base.eval()
        for p in client_params:
            if p.is_floating_point():
                p.requires_grad_(True)
        with torch.enable_grad():
            base(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    finally:
        for h in handles:
            h.remove()
        for m in echoing:
            del m.forward
        for p, flag in grad_flags:
            p.requires_grad_(flag)
        for m, flag in modes:
            m.training = flag
    problem = None
    if shared:
        problem = "blocks on both sides of the cut share weights"
    elif order != list(range(len(blocks))):
        problem = f"the decoder blocks do not run once each in order (observed order {order[:12]})"
    elif not seam or not seam[0]:
        problem = f"block {cut_layer} does not read exactly what block {cut_layer - 1} returned"
    elif leaks:
        problem = f"{leaks[0]} reads, besides the hidden states, values computed from client-held weights"
    if problem:
        raise ValueError(f"model_type {model_type!r} cannot be split before block {cut_layer}: {problem}. "
                         "Use a supported family (see docs/supported-families.md).")
    return called, [counts[i] for i in range(cut_layer)], firsts[cut_layer - 1].shape[-1]


def split_causal_lm(model: nn.Module, cut_layer: int) -> SplitCausalLM:
    """Split ``model`` (a causal LM, optionally a ``peft.PeftModel``) after block ``cut_layer - 1``.

    The client gets the embedding stage and blocks ``[0, cut_layer)``, the server
    blocks ``[cut_layer, L)``, the final norm and the LM head. No weights are
    copied except a trainable tied LM head (see the module docstring); LoRA
    adapters stay in place and trainable. ``server(client(x))`` reproduces the
    unsplit model's logits and loss.
    """
    lm = _unwrap(model)
    model_type = _check_causal_lm(lm)
    base_path, blocks_path = decoder_blocks(lm)
    base = lm.get_submodule(base_path)
    blocks: nn.ModuleList = base.get_submodule(blocks_path)
    num_layers = len(blocks)
    if isinstance(cut_layer, bool) or not isinstance(cut_layer, int) or not 1 <= cut_layer <= num_layers - 1:
        raise ValueError(
            f"cut_layer={cut_layer!r} is out of range for {model_type} with {num_layers} blocks: "
            f"choose an integer in 1 … {num_layers - 1} (the client runs blocks [0, cut_layer))."
        )
    owners = block_owner_paths(blocks_path)

    token_embedding = lm.get_input_embeddings()
    server_runs = {p for p, _ in base.named_modules() if p.rpartition(".")[2] in SERVER_RUNS.get(model_type, ())}
    called, outputs, cut_width = _observe(base, owners, blocks, cut_layer, token_embedding, server_runs, model_type)
    pre = set(called)
    client_repl: dict[str, nn.Module] = {blocks_path: nn.ModuleList(list(blocks[:cut_layer]))}
    skipped = [SkippedBlock(b, n) for b, n in zip(blocks[:cut_layer], outputs)]
    server_repl: dict[str, nn.Module] = {blocks_path: nn.ModuleList(skipped + list(blocks[cut_layer:]))}
    for own in owners:
        for name, child in base.get_submodule(own).named_children():
            path = join_path(own, name)
            if child is blocks or path in owners or not has_params(child) or path in server_runs:
                continue  # (modules in ``server_runs`` are fixed tables both sides run)
            if child is token_embedding or path in pre:
                server_repl.update(server_stand_ins(path, child, token_embedding))
            else:
                client_repl[path] = NotHeld(f"{path!r}", "server")

    head = lm.get_output_embeddings()
    head_path = path_of(lm, head)
    head_copied = head.weight is token_embedding.weight and head.weight.requires_grad
    lm_repl = {join_path(base_path, p): m for p, m in server_repl.items()}
    if head_copied:
        own_head = copy.copy(head)
        own_head._parameters = dict(head._parameters)
        own_head.weight = nn.Parameter(head.weight.detach().clone())
        lm_repl[head_path] = own_head

    embedding_path = path_of(base, token_embedding)
    client = SplitClient(with_replaced(base, client_repl), blocks[cut_layer - 1], embedding_path)
    server = SplitServer(with_replaced(lm, lm_repl), blocks[cut_layer], token_embedding.embedding_dim)
    return SplitCausalLM(client, server, model, cut_layer, num_layers, head_copied, cut_width)
