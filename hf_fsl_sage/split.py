"""Cut a Hugging Face causal LM at a block boundary into a client part and a server part.

One generic mechanism serves every decoder-only family: both halves run the
model's *own* forward code on a shallow copy of the model in which the modules
the half does not hold are replaced by weightless stand-ins.

* The client runs the base model with its decoder-block list truncated to
  ``[0, cut_layer)`` and reads the output of the last kept block with a forward
  hook. Embedding-stage work (token and position embeddings, scaling, dropout)
  is therefore done exactly as in the unsplit model.
* The server runs the causal-LM forward with a zero ``inputs_embeds`` of the
  right shape, so that everything the model computes at model level from the
  shapes, the attention mask and the position ids (causal / sliding-window /
  ALiBi masks, rotary embeddings, per-layer attention types) is computed exactly
  as in the unsplit model. A forward pre-hook on block ``cut_layer`` swaps the
  zero stream for the smashed activations; blocks ``[0, cut_layer)`` are
  weightless pass-throughs that keep their attributes (``attention_type``,
  ``layer_idx``) and list positions, so index-based lookups stay right.

Which modules run before the blocks is not guessed from names: it is observed
once, at split time, by running the embedding stage on a two-token input.

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

__all__ = ["Smashed", "SplitClient", "SplitServer", "SplitCausalLM", "split_causal_lm"]

# Families whose forward needs more than hidden states, mask and positions at
# the cut (e.g. per-layer inputs computed from the token ids), with the reason.
UNSUPPORTED_MODEL_TYPES: dict[str, str] = {}


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


# ---------------------------------------------------------------- stand-ins
class _NotHeld(nn.Module):
    """Placeholder for a module the other side owns; calling it is a bug."""

    def __init__(self, what: str, owner: str):
        super().__init__()
        self.what, self.owner = what, owner

    def forward(self, *args, **kwargs):
        raise RuntimeError(f"{self.what} is held by the {self.owner}, not on this side of the split")


class _PassThrough(nn.Module):
    """Returns its first input unchanged (shape-preserving stand-in)."""

    def forward(self, *args, **kwargs):
        return args[0] if args else next(iter(kwargs.values()))


class _SkippedBlock(_PassThrough):
    """A client-side block as seen by the server: no weights, same plain attributes."""

    def __init__(self, block: nn.Module):
        super().__init__()
        for key, value in vars(block).items():
            if not key.startswith("_") and key != "training" and isinstance(value, (str, int, float, bool)):
                setattr(self, key, value)


class _ZeroAddend(nn.Module):
    """Stand-in for a positional embedding table: its output is only ever added, so a scalar zero serves."""

    def forward(self, *args, **kwargs):
        return torch.zeros(())


class _ZeroProjection(nn.Module):
    """Stand-in for a projection at the embedding stage: zeros of the output shape."""

    def __init__(self, out_features: int):
        super().__init__()
        self.out_features = out_features

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], self.out_features)


def _server_stand_in(module: nn.Module) -> nn.Module | None:
    """Weightless stand-in for an embedding-stage module on the server, or None to keep the module."""
    if isinstance(module, nn.Embedding):
        return _ZeroAddend()
    if isinstance(module, nn.Linear):
        return _ZeroProjection(module.out_features)
    if "norm" in type(module).__name__.lower():
        return _PassThrough()
    return None


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _with_replaced(root: nn.Module, replacements: dict[str, nn.Module]) -> nn.Module:
    """Shallow copy of ``root`` with the submodules at dotted ``replacements`` paths swapped; all else shared."""
    new = copy.copy(root)
    new._modules = dict(root._modules)
    nested: dict[str, dict[str, nn.Module]] = {}
    for path, module in replacements.items():
        head, _, rest = path.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = module
        else:
            new._modules[head] = module
    for head, sub in nested.items():
        new._modules[head] = _with_replaced(root._modules[head], sub)
    return new


def _first_output(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    return output[0]


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


# ---------------------------------------------------------------- halves
class SplitClient(nn.Module):
    """Embeddings and blocks ``[0, cut_layer)``: ``client(input_ids, attention_mask, position_ids) -> Smashed``."""

    def __init__(self, base: nn.Module, last_block: nn.Module):
        super().__init__()
        self.base = base
        self._last_block = [last_block]  # not a submodule: already inside ``base``

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> Smashed:
        captured: list[torch.Tensor] = []
        handle = self._last_block[0].register_forward_hook(lambda m, a, out: captured.append(_first_output(out)))
        try:
            self.base(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                inputs_embeds=inputs_embeds,
                use_cache=False,
            )
        finally:
            handle.remove()
        mask = None if attention_mask is None else attention_mask.to(torch.bool)
        return Smashed(captured[-1], mask, position_ids)


class SplitServer(nn.Module):
    """Blocks ``[cut_layer, L)``, final norm and LM head: ``server(smashed, labels=None) -> CausalLMOutput``."""

    def __init__(self, lm: nn.Module, first_block: nn.Module, embed_dim: int):
        super().__init__()
        self.lm = lm
        self._first_block = [first_block]
        self.embed_dim = embed_dim

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
            return self.lm(
                inputs_embeds=zeros,
                attention_mask=mask,
                position_ids=smashed.position_ids,
                labels=labels,
                use_cache=False,
                **kwargs,
            )
        finally:
            handle.remove()


class SplitCausalLM(nn.Module):
    """A causal LM cut after block ``cut_layer - 1``; ``forward`` composes ``server(client(x))``."""

    def __init__(self, client: SplitClient, server: SplitServer, model: nn.Module, cut_layer: int, num_layers: int,
                 head_copied: bool):
        super().__init__()
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
        emb = self.client.base.get_input_embeddings().weight
        head = self.server.lm.get_output_embeddings().weight
        return not torch.equal(emb.detach().to(head.device), head.detach())


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
            "Use a supported family (see the README's table)."
        )
    return model_type


def _find_blocks(base: nn.Module, num_layers: int, model_type: str) -> str:
    found = [n for n, m in base.named_modules() if isinstance(m, nn.ModuleList) and len(m) == num_layers]
    if not found:
        raise ValueError(
            f"model_type {model_type!r}: found no list of {num_layers} decoder blocks, so this architecture "
            "cannot be split at a block boundary. Use a supported family (see the README's table)."
        )
    return min(found, key=lambda n: n.count("."))


class _Stop(Exception):
    pass


def _embedding_stage(base: nn.Module, owners: list[str], blocks: nn.ModuleList) -> list[str]:
    """Paths (relative to ``base``) of the modules that run before the first block, observed on a tiny input."""
    called: list[str] = []
    handles = []
    for owner in owners:
        for name, child in base.get_submodule(owner).named_children():
            path = _join(owner, name)
            if child is blocks or path in owners:
                continue
            handles.append(child.register_forward_pre_hook(lambda m, a, p=path: called.append(p)))

    def stop(*_):
        raise _Stop

    handles.append(blocks[0].register_forward_pre_hook(stop))
    emb = base.get_input_embeddings()
    device = emb.weight.device
    ids = torch.tensor([[1, 2]], device=device).clamp(max=emb.num_embeddings - 1)
    try:
        with torch.no_grad():
            base(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    except _Stop:
        pass
    else:
        raise ValueError(f"{type(base).__name__}: the decoder blocks did not run; this model cannot be split.")
    finally:
        for h in handles:
            h.remove()
    return called


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
    num_layers = lm.config.get_text_config().num_hidden_layers
    if not isinstance(cut_layer, int) or not 1 <= cut_layer <= num_layers - 1:
        raise ValueError(
            f"cut_layer={cut_layer!r} is out of range for {model_type} with {num_layers} blocks: "
            f"choose an integer in 1 … {num_layers - 1} (the client runs blocks [0, cut_layer))."
        )
    base_path = lm.base_model_prefix if isinstance(getattr(lm, lm.base_model_prefix, None), nn.Module) else ""
    base = lm.get_submodule(base_path)
    blocks_path = _find_blocks(base, num_layers, model_type)
    blocks: nn.ModuleList = base.get_submodule(blocks_path)
    owner = blocks_path.rpartition(".")[0]
    owners = [".".join(owner.split(".")[:i]) for i in range(owner.count(".") + 2)] if owner else [""]

    token_embedding = base.get_input_embeddings()
    pre = set(_embedding_stage(base, owners, blocks))
    client_repl: dict[str, nn.Module] = {blocks_path: nn.ModuleList(list(blocks[:cut_layer]))}
    server_repl: dict[str, nn.Module] = {
        blocks_path: nn.ModuleList([_SkippedBlock(b) for b in blocks[:cut_layer]] + list(blocks[cut_layer:]))
    }
    for own in owners:
        for name, child in base.get_submodule(own).named_children():
            path = _join(own, name)
            if child is blocks or path in owners or not _has_params(child):
                continue
            if child is token_embedding:
                server_repl[path] = _NotHeld("the token embedding", "client")
            elif path in pre:
                stand_in = _server_stand_in(child)
                if stand_in is not None:
                    server_repl[path] = stand_in
            else:
                client_repl[path] = _PassThrough()

    head = lm.get_output_embeddings()
    head_path = next(n for n, m in lm.named_modules() if m is head)
    head_copied = head.weight is token_embedding.weight and head.weight.requires_grad
    lm_repl = {_join(base_path, p): m for p, m in server_repl.items()}
    if head_copied:
        own_head = copy.copy(head)
        own_head._parameters = dict(head._parameters)
        own_head.weight = nn.Parameter(head.weight.detach().clone())
        lm_repl[head_path] = own_head

    client = SplitClient(_with_replaced(base, client_repl), blocks[cut_layer - 1])
    server = SplitServer(_with_replaced(lm, lm_repl), blocks[cut_layer], token_embedding.embedding_dim)
    return SplitCausalLM(client, server, model, cut_layer, num_layers, head_copied)
