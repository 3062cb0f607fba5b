"""Per-client auxiliary models and their alignment to the server by gradient matching (FSL-SAGE)."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ..splitting.loss import ChunkedLMLoss
from ..splitting.split import Smashed, SplitCausalLM, SplitServer
from ..splitting.stand_ins import _has_params, _owner_paths, _path_of, _SkippedBlock, _with_replaced


class TiedHead(nn.Module):
    """LM head that reads a weight the client already holds (its input embedding); never trained through here."""

    def __init__(self, embedding: nn.Module):
        super().__init__()
        self._embedding = [embedding]  # not a submodule: the client owns it

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self._embedding[0].weight.detach())


def build_aux_model(split: SplitCausalLM, num_layers: int, init: str, embedding: nn.Module) -> SplitServer:
    """Auxiliary model: ``num_layers`` decoder blocks, a final norm and a head tied to ``embedding``.

    Blocks and norm are deep copies of the server's first blocks and final norm
    (LoRA adapters, if any, come along and are what trains); with ``init="random"``
    their weights are re-initialised by the model's own initialiser. The copy
    runs with eager attention, which supports the double backward that
    gradient matching needs on every device.
    """
    server_lm = split.server.lm
    first = split.server._first_block[0]
    blocks_path, blocks = next(
        (n, m) for n, m in server_lm.named_modules() if isinstance(m, nn.ModuleList) and any(b is first for b in m)
    )
    cut = split.cut_layer
    available = len(blocks) - cut
    if num_layers > available:
        raise ValueError(
            f"aux_num_layers={num_layers} exceeds the {available} blocks the server holds after cut_layer={cut}; "
            f"choose aux_num_layers <= {available}."
        )
    owner_paths = _owner_paths(blocks_path)
    head_path = _path_of(server_lm, server_lm.get_output_embeddings())

    aux_blocks = copy.deepcopy(blocks[cut : cut + num_layers])
    replacements: dict[str, nn.Module] = {
        blocks_path: nn.ModuleList([_SkippedBlock(b) for b in blocks[:cut]] + list(aux_blocks)),
        head_path: TiedHead(embedding),
    }
    for own in owner_paths:
        for name, child in server_lm.get_submodule(own).named_children():
            path = ".".join(p for p in (own, name) if p)
            if child is not blocks and path not in owner_paths and path != head_path and _has_params(child):
                replacements[path] = copy.deepcopy(child)  # final norm (and any other post-block module)
    aux_lm = _with_replaced(server_lm, replacements)

    config = copy.deepcopy(server_lm.config)
    config._attn_implementation = "eager"
    for path in ["", *(p for p in owner_paths if p)]:
        _set_config(aux_lm.get_submodule(path), config)
    for path, module in replacements.items():
        if path != head_path:
            for sub in module.modules():
                _set_config(sub, config)
    if init == "random":
        base = split.model.get_base_model() if hasattr(split.model, "get_base_model") else split.model
        for path, module in replacements.items():
            if path != head_path:
                _reinitialise(module, base)
    return SplitServer(aux_lm, aux_blocks[0], split.server.embed_dim)


def _set_config(module: nn.Module, config) -> None:
    if "config" in vars(module):
        module.config = config


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


def trainable_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in module.named_parameters() if p.requires_grad}


def gradient_wrt_hidden(
    loss_fn: ChunkedLMLoss, smashed: Smashed, labels: torch.Tensor, label_smoothing: float, create_graph: bool = False
) -> torch.Tensor:
    """d loss(model(h), y) / d h for the smashed batch (h detached from any client graph)."""
    hidden = smashed.hidden_states.detach().requires_grad_(True)
    loss = loss_fn(Smashed(hidden, smashed.attention_mask, smashed.position_ids), labels, label_smoothing,
                   checkpoint=not create_graph)
    (grad,) = torch.autograd.grad(loss, hidden, create_graph=create_graph)
    return grad


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean over sequences of the cosine similarity of two (batch, seq, hidden) gradients."""
    return F.cosine_similarity(a.flatten(1).float(), b.flatten(1).float(), dim=1, eps=1e-12).mean()


def align(
    aux: SplitServer,
    aux_loss: ChunkedLMLoss,
    server_loss: ChunkedLMLoss,
    server: nn.Module,
    buffer: list[tuple[Smashed, torch.Tensor]],
    epochs: int,
    optimizer: torch.optim.Optimizer,
    label_smoothing: float,
) -> tuple[float, float]:
    """Train ``aux`` so that its gradient w.r.t. the smashed activations matches the server's.

    The targets are the current server's true gradients on the buffered uploads.
    The objective per buffered batch is ``||g_aux - g||^2 / ||g||^2``: the
    paper's squared error, made scale-free so that Adam's epsilon cannot swamp
    the tiny per-token gradients of a mean loss. Both models run in eval mode
    (no dropout) so targets and estimates are deterministic. Returns the mean
    cosine similarity between estimate and target before and after.
    """
    was_training = (aux.training, server.training)
    aux.eval()
    server.eval()
    targets = [gradient_wrt_hidden(server_loss, s, y, label_smoothing) for s, y in buffer]

    def cosine() -> float:
        sims = [mean_cosine(gradient_wrt_hidden(aux_loss, s, y, label_smoothing), g) for (s, y), g in zip(buffer, targets)]
        weights = [g.shape[0] for g in targets]
        return float(sum(c * w for c, w in zip(sims, weights)) / sum(weights))

    before = cosine()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for _ in range(epochs):
        for (smashed, labels), target in zip(buffer, targets):
            estimate = gradient_wrt_hidden(aux_loss, smashed, labels, label_smoothing, create_graph=True)
            objective = (estimate - target).pow(2).sum() / target.pow(2).sum().clamp_min(1e-30)
            grads = torch.autograd.grad(objective, params, allow_unused=True)
            for p, g in zip(params, grads):
                p.grad = g
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    after = cosine()
    aux.train(was_training[0])
    server.train(was_training[1])
    return before, after
