"""Messages and node states as Flower records, in the project's own wire format: nothing is unpickled.

A batch of messages travels as a ``ConfigRecord`` holding, for each message, its sequence number and the
JSON header of :mod:`hf_fsl_sage.transport.distributed` (kind, client, structure, shapes and dtypes), and an
``ArrayRecord`` holding each message's tensors packed into one byte buffer (an ``Array`` of ``uint8``
with the serialisation type :data:`STYPE`). The receiver checks every header as the torch.distributed transport
does and each buffer's length against its header before it reads a byte of it. A node's state (its parties,
optimizers and schedules) travels the same way: its structure as JSON and its tensors as a safetensors buffer.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from ..federation import state_io
from ..transport.base import FederationCommError, flatten, unflatten
from ..transport.distributed import MalformedMessage, _nbytes, _padded, decode_header, encode_header, pack, unpack


#: The serialisation type of the byte buffers this module puts in an ``Array``.
STYPE = "hf-fsl-sage-bytes"

EMPTY = torch.zeros(0, dtype=torch.uint8)
#: One message: ``(client, kind, sequence number, payload)``.
Item = tuple[int, str, int, Any]


def raw_array(data: bytes) -> Array:
    """``data`` as an ``Array`` of bytes."""
    return Array(dtype="uint8", shape=(len(data),), stype=STYPE, data=data)


def array_bytes(array: Any, what: str) -> bytes:
    """The bytes of an ``Array`` made by :func:`raw_array`; :class:`FederationCommError` for anything else."""
    if not isinstance(array, Array) or array.stype != STYPE or array.dtype != "uint8" or \
            tuple(array.shape) != (len(array.data),):
        raise FederationCommError(f"rejected {what}: not a byte buffer of serialisation type {STYPE}.")
    return array.data


def encode_items(items: list[Item]) -> tuple[ConfigRecord, ArrayRecord]:
    """Messages as ``(index, buffers)`` records."""
    index, buffers = [], {}
    for i, (client, kind, seq, payload) in enumerate(items):
        spec, tensors = flatten(payload)
        index.append([seq, encode_header(kind, client, spec).decode()])
        buffers[str(i)] = raw_array(pack(tensors, torch.device("cpu")).numpy().tobytes())
    return ConfigRecord({"index": json.dumps(index)}), ArrayRecord(array_dict=buffers)


def decode_items(index: ConfigRecord, buffers: ArrayRecord, sender: str) -> list[Item]:
    """The messages of :func:`encode_items`, each checked against its header; :class:`FederationCommError`
    naming ``sender`` if anything is malformed."""
    try:
        entries = json.loads(index["index"])
        if not isinstance(entries, list) or len(entries) != len(buffers):
            raise MalformedMessage(f"{len(buffers)} buffers for an index that is not a list of as many entries")
        items = []
        for i, entry in enumerate(entries):
            if not (isinstance(entry, list) and len(entry) == 2 and type(entry[0]) is int and entry[0] >= 0
                    and isinstance(entry[1], str)):
                raise MalformedMessage(f"index entry {str(entry)[:60]!r} is not [sequence number, header]")
            kind, client, spec = decode_header(entry[1].encode())
            data = array_bytes(buffers[str(i)], f"message {i} from {sender}")
            size = sum(_padded(_nbytes(shape, dtype)) for shape, dtype in spec[1])
            if len(data) != size:
                raise MalformedMessage(f"message {i} holds {len(data)} bytes, its header describes {size}")
            buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else EMPTY
            items.append((client, kind, entry[0], unflatten(spec, unpack(buffer, spec[1]))))
        return items
    except (MalformedMessage, KeyError, TypeError, ValueError) as error:
        raise FederationCommError(f"rejected a malformed message from {sender}: {error}.") from None


def state_records(state: Any) -> tuple[ConfigRecord, ArrayRecord]:
    """A process's state (see :meth:`~hf_fsl_sage.trainer.FSLSageTrainer.process_state`) as records."""
    skeleton, tensors = state_io.encode_state(state)
    tensors = {name: t.clone() for name, t in tensors.items()}  # safetensors refuses tensors that share memory
    return ConfigRecord({"skeleton": skeleton}), ArrayRecord(array_dict={"tensors": raw_array(
        save_safetensors(tensors))})


def state_from_records(skeleton: ConfigRecord, tensors: ArrayRecord, what: str) -> Any:
    """The state :func:`state_records` recorded; :class:`FederationCommError` if it is malformed."""
    try:
        loaded = load_safetensors(array_bytes(tensors["tensors"], what))
        return state_io.decode_state(str(skeleton["skeleton"]), loaded)
    except (state_io.CheckpointError, SafetensorError, KeyError, ValueError) as error:
        raise FederationCommError(f"rejected {what}: {error}") from None
