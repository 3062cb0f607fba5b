"""Cut a Hugging Face causal LM at a block boundary into a client part and a server part.

One generic mechanism serves every decoder-only family: both halves run the
model's *own* forward code on a shallow copy of the model in which the modules
the half does not hold are replaced by weightless stand-ins.

* The client runs the base model with its decoder-block list truncated to
  ``[0, cut_layer)`` and a stand-in for block ``cut_layer`` that records what
  the model hands it and stops the pass, so embedding-stage work (token and
  position embeddings, scaling, dropout) is done exactly as in the unsplit model
  and nothing after the blocks runs. Its config describes the blocks it holds
  (:mod:`~hf_fsl_sage.splitting.per_layer`).
* The server runs the causal-LM forward with a zero ``inputs_embeds`` of the
  right shape, so that everything the model computes at model level from the
  shapes, the attention mask and the position ids (causal / sliding-window /
  ALiBi masks, rotary embeddings, per-layer attention types) is computed exactly
  as in the unsplit model. Blocks ``[0, cut_layer)`` are weightless stand-ins
  that keep their plain attributes (``attention_type``, ``layer_idx``), output
  structure and list positions; the stand-in of block ``cut_layer - 1`` returns
  the smashed activations (:mod:`~hf_fsl_sage.splitting.carried`).

Nothing is guessed from names: at split time one forward pass on a two-token
input (:mod:`~hf_fsl_sage.splitting.observe`) observes which modules run before
the blocks (the embedding stage) and what each block returns, and checks the
cut: the blocks before it run before the blocks after it, block ``cut_layer``
reads exactly what block ``cut_layer - 1`` returned, and no other input of a
server block depends on client-held weights, except the inputs a family
declares the client sends besides the hidden states (a router state, a stack of
earlier blocks' inputs, token ids: :data:`~hf_fsl_sage.splitting.families.CARRIED_INPUTS`).
Families that fail this (recurrent depth across the cut, extra streams) get a
ValueError. Family-specific knowledge is confined to :mod:`~hf_fsl_sage.splitting.families`.

Tied input/output embeddings: the client owns the input embedding, the server
owns the LM head. When the tied matrix is frozen (the usual LoRA set-up) both
halves read the same tensor, which costs no memory and stays identical. When it
is trainable the server gets its own copy of the head at split time, so the
client's embedding and the server's head train independently, as they would on
two machines; :meth:`SplitCausalLM.untied_after_training` then reports whether
exported weights must be saved untied.

Labels on the client (``split_causal_lm(..., private_labels=True)``): the client also
holds everything after the blocks (final norm, LM head, logit scaling) as
``client.head``, a :class:`SplitHead` whose blocks are all stand-ins; the server is a
:class:`SplitBody` that stops after its last block and returns that block's output.
A tied head then stays the client's embedding tensor, never copied.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from .carried import CaptureBlock, injected
from .families import (
    SERVER_RUNS,
    UNSUPPORTED_FEATURES,
    UNSUPPORTED_MODEL_TYPES,
    CarriedInput,
    carried_inputs,
    private_labels_problem,
)
from .observe import observe_cut
from .per_layer import config_for_blocks
from .smashed import Smashed
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


__all__ = ["Smashed", "SplitBody", "SplitCausalLM", "SplitClient", "SplitHead", "SplitServer", "split_causal_lm"]


# ---------------------------------------------------------------- halves
class SplitClient(nn.Module):
    """Embeddings and blocks ``[0, cut_layer)``: ``client(input_ids, attention_mask, position_ids) -> Smashed``.

    Its block list ends with a :class:`~hf_fsl_sage.splitting.carried.CaptureBlock` in place of block
    ``cut_layer``: the forward pass stops there, and what the model hands to that block is what the server needs.
    With labels kept on the client it also holds ``head``, the final norm and LM head (a :class:`SplitHead`),
    which computes the loss on the server's output. Both are in one module, so a copy of the client keeps a tied
    embedding and LM head tied.
    """

    def __init__(self, base: nn.Module, blocks_path: str, cut_layer: int, embedding_path: str,
                 carried: tuple[CarriedInput, ...] = (), head: SplitHead | None = None):
        super().__init__()
        self.base = base
        self.blocks_path, self.cut_layer = blocks_path, cut_layer
        self.embedding_path = embedding_path
        self.carried = carried
        self.head = head

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
        capture: CaptureBlock = self.base.get_submodule(self.blocks_path)[self.cut_layer]
        capture.call = None
        try:
            self.base(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      inputs_embeds=inputs_embeds, use_cache=False)
        except StopForward:
            pass
        taken = capture.take(self.carried)
        if taken is None:
            raise RuntimeError(f"the model did not reach block {self.cut_layer}, where the client's half ends")
        hidden, carried = taken
        mask = None if attention_mask is None else attention_mask.to(torch.bool)
        return Smashed(hidden, mask, position_ids, carried)


class SplitServer(nn.Module):
    """Blocks ``[cut_layer, L)``, final norm and LM head: ``server(smashed, labels=None) -> CausalLMOutput``.

    ``lm`` holds weightless stand-ins for blocks ``[0, cut_layer)`` at ``blocks_path``; the received values
    are put in place for each forward (:func:`~hf_fsl_sage.splitting.carried.injected`).
    """

    def __init__(self, lm: nn.Module, blocks_path: str, cut_layer: int, embed_dim: int, base_path: str = "",
                 carried: tuple[CarriedInput, ...] = ()):
        super().__init__()
        self.lm = lm
        self.blocks_path, self.cut_layer, self.base_path = blocks_path, cut_layer, base_path
        self.embed_dim = embed_dim
        self.carried = carried

    @property
    def blocks(self) -> nn.ModuleList:
        return self.lm.get_submodule(self.blocks_path)

    @property
    def first_block(self) -> nn.Module:
        """The first decoder block this half runs: the smashed activations enter there."""
        return self.blocks[self.cut_layer]

    def forward(self, smashed: Smashed, labels: torch.Tensor | None = None, **kwargs):
        hidden = smashed.hidden_states
        zeros = hidden.new_zeros(*hidden.shape[:2], self.embed_dim)
        mask = None if smashed.attention_mask is None else smashed.attention_mask.long()
        with injected(self.lm, self.blocks, self.cut_layer, self.base_path, self.carried, hidden, smashed.carried):
            return self.lm(inputs_embeds=zeros, attention_mask=mask, position_ids=smashed.position_ids, labels=labels,
                           use_cache=False, **kwargs)


class SplitBody(SplitServer):
    """Blocks ``[cut_layer, L)`` without what follows them: ``body(smashed) -> hidden states``.

    The server's half when the labels stay on the client: it returns what its last block returns (before the
    final norm), and the client's :class:`SplitHead` goes on from there.
    """

    def forward(self, smashed: Smashed, labels: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        captured: list[torch.Tensor] = []

        def stop(module, args, output):  # the final norm and the head belong to the client
            captured.append(first_output(output))
            raise StopForward

        handle = self.blocks[-1].register_forward_hook(stop)
        try:
            super().forward(smashed, **kwargs)
        except StopForward:
            pass
        finally:
            handle.remove()
        return captured[-1]


class SplitHead(SplitServer):
    """What follows the blocks (final norm, LM head, logit scaling): ``head(Smashed(body_output, mask), labels)``.

    Every block is a weightless stand-in and the server's output enters as the last one's, so the model's own
    code runs whatever follows the blocks.
    """


class SplitCausalLM(nn.Module):
    """A causal LM cut after block ``cut_layer - 1``; ``forward`` composes ``server(client(x))`` (with private
    labels ``client.head(server(client(x)))``)."""

    def __init__(self, client: SplitClient, server: SplitServer, model: nn.Module, cut_layer: int, num_layers: int,
                 head_copied: bool, cut_shape: tuple[int, ...],
                 carried_shapes: dict[str, tuple[tuple[int, ...], torch.dtype]] | None = None,
                 rest: SplitServer | None = None, head_shape: tuple[int, ...] | None = None):
        super().__init__()
        #: Shape of the last block's output after the batch and sequence dimensions (what the server returns when
        #: the labels are private).
        self.head_shape = head_shape or cut_shape
        # Everything after the cut as one half (blocks, final norm, head): the server itself unless the labels are
        # private, where it only serves to shape auxiliary models (it shares the client's norm and head).
        self._rest = [rest if rest is not None else server]
        # Shape of the smashed activations after the batch and sequence dimensions: the residual stream at the cut
        # (the embedding's width unless a family widens it, or keeps several streams, in its blocks).
        self.cut_shape = cut_shape
        self.cut_width = cut_shape[-1]
        #: Shape (after batch and sequence) and dtype of each carried input of the upload, by name.
        self.carried_shapes = carried_shapes or {}
        self.client = client
        self.server = server
        self.cut_layer = cut_layer
        self.num_layers = num_layers
        self.head_copied = head_copied
        self._model = [model]  # the model that was split (PeftModel if one was given); shares all weights

    @property
    def model(self) -> nn.Module:
        return self._model[0]

    @property
    def config_counts_blocks(self) -> bool:
        """Whether the model's config describes its decoder blocks one by one (``num_hidden_layers`` of them): then
        a part holding fewer blocks gets a config cut down to them (:mod:`~hf_fsl_sage.splitting.per_layer`)."""
        return _counts_blocks(_unwrap(self.model), self.num_layers)

    @property
    def private_labels(self) -> bool:
        """Whether the client holds the final norm, the LM head and the labels (the server returns hidden states)."""
        return self.client.head is not None

    @property
    def rest(self) -> SplitServer:
        """Blocks ``[cut_layer, L)``, final norm and LM head as one module (the server half of the usual split)."""
        return self._rest[0]

    @property
    def carried(self) -> tuple[CarriedInput, ...]:
        """What the server's blocks read besides the hidden states, as the family declares it."""
        return self.server.carried

    @property
    def text_revealing_inputs(self) -> list[str]:
        """Names of the carried inputs that give the server the text (a label-private split refuses them)."""
        return [c.name for c in self.carried if c.reveals_text]

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, labels=None, **kwargs):
        smashed = self.client(input_ids, attention_mask, position_ids)
        if not self.private_labels:
            return self.server(smashed, labels=labels, **kwargs)
        top = Smashed(self.server(smashed), smashed.attention_mask, smashed.position_ids)
        return self.client.head(top, labels=labels, **kwargs)

    def untied_after_training(self) -> bool:
        """True when the server's head copy no longer equals the client's input embedding."""
        if not self.head_copied:
            return False
        emb = _unwrap(self.model).get_input_embeddings().weight  # the very tensor the client holds
        head = self.rest.lm.get_output_embeddings().weight
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
        lm.get_output_embeddings().weight = self.rest.lm.get_output_embeddings().weight


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


def _counts_blocks(lm: PreTrainedModel, num_layers: int) -> bool:
    return getattr(lm.config.get_text_config(), "num_hidden_layers", None) == num_layers


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


def split_causal_lm(model: nn.Module, cut_layer: int, private_labels: bool = False) -> SplitCausalLM:
    """Split ``model`` (a causal LM, optionally a ``peft.PeftModel``) after block ``cut_layer - 1``.

    The client gets the embedding stage and blocks ``[0, cut_layer)``, the server
    blocks ``[cut_layer, L)``, the final norm and the LM head. No weights are
    copied except a trainable tied LM head (see the module docstring); LoRA
    adapters stay in place and trainable. ``server(client(x))`` reproduces the
    unsplit model's logits and loss.

    With ``private_labels`` what follows the blocks (final norm, LM head) stays on the client as ``client.head``
    (tied to its embedding where the model ties them, never copied); the server is a :class:`SplitBody` that
    returns its last block's output, and ``client.head(Smashed(server(client(x)), mask, positions), labels)``
    reproduces the unsplit model. Families whose server blocks read the text besides the hidden states are
    refused (:func:`~hf_fsl_sage.splitting.families.private_labels_problem`).
    """
    lm = _unwrap(model)
    model_type = _check_causal_lm(lm)
    problem = private_labels_problem(model_type) if private_labels else None
    if problem:
        raise ValueError(f"model_type {model_type!r} cannot keep the labels on the client: {problem}. "
                         "Train it with private_labels=False, or use another family.")
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
    carried = carried_inputs(model_type)
    seen = observe_cut(base, owners, blocks, cut_layer, token_embedding, server_runs, carried, model_type)
    pre = set(seen.embedding_stage)
    capture = CaptureBlock(blocks[cut_layer])
    client_repl: dict[str, nn.Module] = {blocks_path: nn.ModuleList([*blocks[:cut_layer], capture])}
    skipped = [SkippedBlock(b, n) for b, n in zip(blocks[:cut_layer], seen.outputs)]
    server_repl: dict[str, nn.Module] = {blocks_path: nn.ModuleList(skipped + list(blocks[cut_layer:]))}
    post: list[str] = []  # the weighted modules after the blocks (final norm): the server's, or the client's head's
    for own in owners:
        for name, child in base.get_submodule(own).named_children():
            path = join_path(own, name)
            if child is blocks or path in owners or not has_params(child) or path in server_runs:
                continue  # (modules in ``server_runs`` are fixed tables both sides run)
            if child is token_embedding or path in pre:
                server_repl.update(server_stand_ins(path, child, token_embedding))
            else:
                client_repl[path] = NotHeld(f"{path!r}", "server")
                post.append(path)

    head = lm.get_output_embeddings()
    head_path = path_of(lm, head)
    head_copied = head.weight is token_embedding.weight and head.weight.requires_grad and not private_labels
    lm_repl = {join_path(base_path, p): m for p, m in server_repl.items()}
    if head_copied:
        own_head = copy.copy(head)
        own_head._parameters = dict(head._parameters)
        own_head.weight = nn.Parameter(head.weight.detach().clone())
        lm_repl[head_path] = own_head

    embedding_path = path_of(base, token_embedding)
    client_base = with_replaced(base, client_repl)
    if _counts_blocks(lm, num_layers):  # its config describes the blocks it holds
        configs: dict[int, object] = {}
        for own in owners:
            module = client_base.get_submodule(own)
            if "config" in vars(module):
                module.config = configs.setdefault(id(module.config), config_for_blocks(module.config, cut_layer + 1))
    full_blocks_path, embed_dim = join_path(base_path, blocks_path), token_embedding.embedding_dim
    rest = SplitServer(with_replaced(lm, lm_repl), full_blocks_path, cut_layer, embed_dim, base_path, carried)
    if not private_labels:
        client = SplitClient(client_base, blocks_path, cut_layer, embedding_path, carried)
        return SplitCausalLM(client, rest, model, cut_layer, num_layers, head_copied, seen.cut_shape, seen.carried)

    body_repl = {**lm_repl, **{join_path(base_path, p): NotHeld(f"{p!r}", "client") for p in post},
                 head_path: NotHeld("the LM head", "client")}
    body = SplitBody(with_replaced(lm, body_repl), full_blocks_path, cut_layer, embed_dim, base_path, carried)
    # The head keeps the embedding stage the client holds anyway (some families read its parameters' dtype); it
    # computes nothing that reaches the output, since the server's output enters as the last block's.
    all_skipped = nn.ModuleList([SkippedBlock(b, n) for b, n in zip(blocks, seen.outputs)])
    head_lm = with_replaced(lm, {full_blocks_path: all_skipped})
    top = SplitHead(head_lm, full_blocks_path, num_layers, embed_dim, base_path)
    client = SplitClient(client_base, blocks_path, cut_layer, embedding_path, carried, head=top)
    return SplitCausalLM(client, body, model, cut_layer, num_layers, False, seen.cut_shape, seen.carried, rest,
                         seen.head_shape)
