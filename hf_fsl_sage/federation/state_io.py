"""Nested training state in one safetensors file, without pickle.

A state (model and optimizer state dicts, ledgers, alignment buffers: dicts,
lists and tuples of tensors, numbers, strings, ``None`` and
:class:`~hf_fsl_sage.splitting.split.Smashed`) is written as a safetensors
file whose tensors are the state's tensors and whose metadata holds the rest
as JSON, with a SHA-256 of the tensor bytes. Reading it runs no code from the
file, whoever wrote it. The file is written under a temporary name in the same
directory and renamed, so a crash mid-write never leaves a partial file under
the real name; a truncated or altered file is refused with an error naming the
file and what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..splitting.split import Smashed


FORMAT = "hf_fsl_sage.state/1"


class CheckpointError(ValueError):
    """A state file that is missing, truncated, altered, or not written by :func:`save_state`."""


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors, key=lambda n: int(n)):
        t = tensors[name]
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _encode(obj: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, torch.Tensor):
        name = str(len(tensors))
        tensors[name] = obj.detach().cpu().contiguous()
        return {"tensor": name}
    if isinstance(obj, Smashed):
        return {"smashed": [_encode(t, tensors, f"{path}.{f}") for f, t in
                            (("hidden_states", obj.hidden_states), ("attention_mask", obj.attention_mask),
                             ("position_ids", obj.position_ids), ("carried", obj.carried))]}
    if isinstance(obj, dict):
        for k in obj:
            if type(k) not in (str, int):
                raise TypeError(f"cannot save {path}: key {k!r} is a {type(k).__name__} (keys are str or int)")
        return {"dict": [[k, _encode(v, tensors, f"{path}[{k!r}]")] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"list" if isinstance(obj, list) else "tuple": [_encode(v, tensors, f"{path}[{i}]")
                                                               for i, v in enumerate(obj)]}
    raise TypeError(f"cannot save {path}: a {type(obj).__name__} (states hold tensors, numbers, strings, None, "
                    "Smashed, and dicts, lists and tuples of them)")


def _decode(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    if not isinstance(node, dict) or len(node) != 1:
        raise ValueError(f"unexpected node {str(node)[:60]!r}")
    (tag, value), = node.items()
    if tag == "tensor":
        return tensors[value]
    if tag == "smashed":
        return Smashed(*(_decode(v, tensors) for v in value))
    if tag == "dict":
        return {k: _decode(v, tensors) for k, v in value}
    if tag in ("list", "tuple"):
        items = [_decode(v, tensors) for v in value]
        return items if tag == "list" else tuple(items)
    raise ValueError(f"unknown tag {tag!r}")


def encode_state(state: Any) -> tuple[str, dict[str, torch.Tensor]]:
    """``(skeleton, tensors)`` of ``state``: the structure as JSON text, the tensors by the names it gives them."""
    tensors: dict[str, torch.Tensor] = {}
    return json.dumps(_encode(state, tensors, "state")), tensors


def decode_state(skeleton: str, tensors: dict[str, torch.Tensor]) -> Any:
    """The state :func:`encode_state` described; :class:`CheckpointError` if the description is malformed."""
    try:
        return _decode(json.loads(skeleton), tensors)
    except (KeyError, ValueError, TypeError) as error:
        raise CheckpointError(f"malformed state structure ({error}).") from None


def save_state(state: Any, path: str) -> None:
    """Write ``state`` to ``path`` (a safetensors file), atomically."""
    skeleton, tensors = encode_state(state)
    storages = set()
    for name, t in tensors.items():  # safetensors refuses tensors that share memory: give repeats their own
        if t.numel() and (ptr := t.untyped_storage().data_ptr()) in storages:
            tensors[name] = t.clone()
        elif t.numel():
            storages.add(ptr)
    metadata = {"format": FORMAT, "skeleton": skeleton, "sha256": _digest(tensors)}
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    partial = os.path.join(directory, f".{os.path.basename(path)}.partial-{os.getpid()}")
    try:
        save_file(tensors, partial, metadata=metadata)
        with open(partial, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def load_state(path: str, device: torch.device | str = "cpu") -> Any:
    """The state saved in ``path`` by :func:`save_state`, its tensors on ``device``."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} does not exist.")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (a safetensors handle)
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"{path} ({os.path.getsize(path)} bytes) is truncated or not a safetensors state "
                              f"file ({error}); resume from an earlier checkpoint.") from None
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a state file of this version (format {metadata.get('format')!r}, "
                              f"expected {FORMAT!r}).")
    if _digest(tensors) != metadata.get("sha256"):
        raise CheckpointError(f"{path} is corrupted: its tensors do not match the checksum written with them; "
                              "resume from an earlier checkpoint.")
    device = torch.device(device)
    if device.type != "cpu":
        tensors = {name: t.to(device) for name, t in tensors.items()}
    if "skeleton" not in metadata:
        raise CheckpointError(f"{path} has no structure.")
    try:
        return decode_state(metadata["skeleton"], tensors)
    except CheckpointError as error:
        raise CheckpointError(f"{path} has a {error}") from None
