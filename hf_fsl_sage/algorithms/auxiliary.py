"""Auxiliary models: the local loss that lets a client step without waiting for the server (CSE-FSL, FSL-SAGE).

:func:`build_aux_model` builds one from the split; :class:`AuxiliaryLossAlgorithm` is the base of the
algorithms whose clients hold one each and upload their activations every ``server_update_interval`` steps.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..federation.federation import Client, Federation, load_trainable_state, trainable_state
from ..splitting.loss import ChunkedLMLoss
from ..splitting.materialise import release_unneeded
from ..splitting.per_layer import slice_per_layer
from ..splitting.split import Smashed, SplitCausalLM, SplitServer
from ..splitting.stand_ins import SkippedBlock, block_owner_paths, deepcopy_module, has_params, path_of, with_replaced
from ..transport.placement import party_seed
from .base import Algorithm, StepResult
from .gradients import heldout_cosine


class TiedHead(nn.Module):
    """LM head that reads a weight the client already holds (its input embedding); never trained through here."""

    def __init__(self, embedding: nn.Module):
        super().__init__()
        self._embedding = [embedding]  # not a submodule: the client owns it

    @property
    def weight(self) -> torch.Tensor:
        """The tied matrix, detached (some families read ``lm_head.weight``, e.g. Mamba for its dtype)."""
        return self._embedding[0].weight.detach()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.weight)


def build_aux_model(split: SplitCausalLM, num_layers: int, init: str, embedding: nn.Module,
                    trainable: str = "adapters") -> SplitServer:
    """Auxiliary model: ``num_layers`` decoder blocks, a final norm and a head tied to ``embedding``.

    Blocks and norm are deep copies of the server's first blocks and final norm
    (LoRA adapters, if any, come along); with ``init="random"`` every weight is
    its own, re-initialised by the model's own initialiser. ``trainable="adapters"``
    keeps the server's trainable flags (with PEFT only the adapters train) and
    shares the frozen tensors with the server, so each auxiliary model costs only
    its trainable weights; ``trainable="all"`` makes every weight of the blocks and
    the norm trainable and its own (the head has no weight of its own). The copy
    runs with eager attention, which supports the double backward that
    gradient matching needs on every device.
    """
    server_lm, blocks_path = split.rest.lm, split.rest.blocks_path
    blocks = split.rest.blocks
    cut = split.cut_layer
    available = len(blocks) - cut
    if num_layers > available:
        raise ValueError(
            f"aux_num_layers={num_layers} exceeds the {available} blocks the server holds after cut_layer={cut}; "
            f"choose aux_num_layers <= {available}."
        )
    owner_paths = block_owner_paths(blocks_path)
    head_path = path_of(server_lm, server_lm.get_output_embeddings())

    # With init="server_blocks" and only adapters training, frozen weights equal the server's for ever: every copy
    # reads the same tensors. With trainable="all" each copy needs its own (they train).
    share = init == "server_blocks" and trainable == "adapters"
    memo = {id(p): p for p in server_lm.parameters() if not p.requires_grad} if share else {}
    aux_blocks = deepcopy_module(blocks[cut : cut + num_layers], dict(memo))
    replacements: dict[str, nn.Module] = {
        blocks_path: nn.ModuleList([SkippedBlock(b) for b in blocks[:cut]] + list(aux_blocks)),
        head_path: TiedHead(embedding),
    }
    for own in owner_paths:
        for name, child in server_lm.get_submodule(own).named_children():
            path = ".".join(p for p in (own, name) if p)
            if child is not blocks and path not in owner_paths and path != head_path and has_params(child):
                replacements[path] = deepcopy_module(child, dict(memo))  # final norm (and any other post-block module)
    aux_lm = with_replaced(server_lm, replacements)

    configs: dict[int, Any] = {}  # deepcopy memo: each module keeps its own config (blocks read a sub-config)
    described = cut + num_layers if split.config_counts_blocks else None
    for path in ["", *(p for p in owner_paths if p)]:
        _set_config(aux_lm.get_submodule(path), configs, described)
    for path, module in replacements.items():
        if path != head_path:
            for sub in module.modules():
                _set_config(sub, configs, described)
    if init == "random":
        base = split.model.get_base_model() if hasattr(split.model, "get_base_model") else split.model
        for path, module in replacements.items():
            if path != head_path:
                _reinitialise(module, base)
    if trainable == "all":
        for path, module in replacements.items():
            if path != head_path:
                module.requires_grad_(True)
    server = split.rest
    return SplitServer(aux_lm, blocks_path, cut, server.embed_dim, server.base_path, server.carried)


def _set_config(module: nn.Module, memo: dict[int, Any], num_blocks: int | None) -> None:
    """Give ``module`` an eager-attention copy of its own config that describes the first ``num_blocks`` blocks
    (the auxiliary model's stand-ins and blocks; ``None``: as it is); ``memo`` (a deepcopy memo shared by all
    modules) makes modules that shared a config, or a composite config and its sub-configs, share the copies."""
    config = vars(module).get("config")
    if config is not None:
        module.config = memo[id(config)] if id(config) in memo else copy.deepcopy(config, memo)
        module.config._attn_implementation = "eager"
        if num_blocks is not None:
            slice_per_layer(module.config, num_blocks)


def _reinitialise(module: nn.Module, base: nn.Module) -> None:
    init = getattr(base, "_init_weights")
    lora = []
    for sub in module.modules():
        if hasattr(sub, "reset_lora_parameters"):
            lora.append(sub)
        elif not any(True for _ in sub.children()):
            with torch.no_grad():
                init(sub)
    for layer in lora:  # the model's init also hit the adapters' Linear layers: restore LoRA's own init
        for adapter in getattr(layer, "active_adapters", ["default"]):
            layer.reset_lora_parameters(adapter, init_lora_weights=True)


@dataclass
class AuxModel:
    """An auxiliary model with its loss."""

    module: SplitServer
    loss: ChunkedLMLoss


class AuxiliaryLossAlgorithm(Algorithm):
    """Each client holds an auxiliary model and steps on its loss; it uploads every ``server_update_interval`` steps.

    The upload is the smashed activations and labels of that step, on which the server steps. Client ``i``'s
    auxiliary model is drawn from a seed that depends on ``i`` only (:meth:`build_aux`), on every process.
    """

    def __init__(self, federation: Federation, *, server_update_interval: int = 5, aux_num_layers: int = 3,
                 aux_init: str = "server_blocks", aux_trainable: str = "adapters", aux_heldout_cosine: bool = True):
        super().__init__(federation)
        self.server_update_interval = server_update_interval
        self.aux_num_layers, self.aux_init, self.aux_trainable = aux_num_layers, aux_init, aux_trainable
        self.aux_heldout_cosine = aux_heldout_cosine
        self._heldout: list[float] = []  # held-out cosines measured since the last log
        self.heldout_seconds = 0.0  # time spent measuring them, over the run
        #: The auxiliary model of each client this process holds, by client index.
        self.aux: dict[int, AuxModel] = {c: self.build_aux(c, federation.clients[c].model.module.input_embeddings())
                                         for c in federation.held_clients}
        if aux_init == "random" and not federation.placement.is_server:
            # Each copy has weights of its own: the server blocks they were shaped after are not needed here.
            release_unneeded(federation.split.model, federation.split.cut_layer, 0, federation.private_labels)

    own_settings = ("server_update_interval", "aux_num_layers", "aux_init", "aux_trainable", "aux_heldout_cosine")

    @staticmethod
    def aux_settings(args: Any) -> dict[str, Any]:
        """The keyword arguments of :meth:`__init__` read from an ``FSLSageConfig``."""
        return {name: getattr(args, name) for name in AuxiliaryLossAlgorithm.own_settings}

    @classmethod
    def from_config(cls, args: Any, federation: Federation) -> AuxiliaryLossAlgorithm:
        return cls(federation, **cls.aux_settings(args))

    @classmethod
    def server_blocks_on_clients(cls, args: Any) -> int | None:
        return args.aux_num_layers  # the auxiliary model's blocks start as copies of these

    def build_aux(self, index: int, embedding: nn.Module) -> AuxModel:
        """Client ``index``'s auxiliary model, its head reading ``embedding``; its random draws depend on the index
        only, not on the process."""
        fed = self.fed
        device = embedding.weight.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(party_seed(fed.seed, -1, 0, index, "aux_init"))
            module = build_aux_model(fed.split, self.aux_num_layers, self.aux_init, embedding, self.aux_trainable)
        return AuxModel(module, ChunkedLMLoss(module, fed.loss_chunk_tokens))

    def uploads_at(self, round_index: int, local_step: int) -> bool:
        return local_step % self.server_update_interval == 0

    def aux_forward(self, client: Client, batch: dict[str, torch.Tensor]) -> tuple[Smashed, torch.Tensor]:
        """The client's smashed activations and its auxiliary loss on them."""
        smashed = self.fed.client_forward(client, batch)
        with self.fed.timer("aux_forward"):
            return smashed, self.aux[client.index].loss(smashed, batch["labels"], self.fed.label_smoothing)

    def serve(self, client: Client, upload, round_index: int, local_step: int):
        self.measure_heldout(client, *upload)
        return StepResult(server_loss=self.fed.server_step(*upload)), None

    # ------------------------------------------------------------ held-out fidelity of the gradient estimate
    def aux_as_client_uses_it(self, client: Client) -> AuxModel | None:
        """The auxiliary model ``client`` is stepping with, if the server's process has it (here: only when the
        client lives in the same process; FSL-SAGE overrides this with the copy the server last sent)."""
        return self.aux.get(client.index)

    def measure_heldout(self, client: Client, smashed: Smashed, labels: torch.Tensor) -> None:
        """On the server, before the server steps on an upload: cosine of the auxiliary and the true gradient."""
        # (with private labels the server has no labels to compute either gradient with)
        aux = self.aux_as_client_uses_it(client) if self.aux_heldout_cosine and not self.fed.private_labels else None
        if aux is not None:
            fed, start = self.fed, time.perf_counter()
            with fed.timer("heldout_cosine"):
                self._heldout.append(heldout_cosine(aux.loss, fed.server_loss, (aux.module, fed.server.module),
                                                    smashed, labels, fed.label_smoothing))
            self.heldout_seconds += time.perf_counter() - start

    def log_sums(self) -> dict[str, tuple[float, int]]:
        if not self.aux_heldout_cosine:
            return {}
        sums = {"aux_grad_cosine_heldout": (sum(self._heldout), len(self._heldout))}
        self._heldout = []
        return sums

    def train(self, mode: bool = True) -> None:
        super().train(mode)
        for aux in self.aux.values():
            aux.module.train(mode)

    def state_dict(self) -> dict[str, Any]:
        return {"aux": {c: trainable_state(aux.module) for c, aux in self.aux.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for c, aux in self.aux.items():
            load_trainable_state(aux.module, state["aux"][c])

    def model_card_rows(self) -> list[tuple[str, Any]]:
        blocks = f"{self.aux_num_layers} (init: {self.aux_init}, trainable: {self.aux_trainable})"
        return [("auxiliary decoder blocks", blocks),
                ("server update interval (local steps)", self.server_update_interval)]
