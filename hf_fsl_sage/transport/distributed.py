"""The transport between processes: torch.distributed point-to-point messages (gloo on CPU, NCCL on GPU).

A message is three point-to-point transfers on the sender's device: the
header's length, the header (what the message is, its structure, shapes and
dtypes; pickled), and one flat byte buffer holding every tensor. Each message
is counted once, on the server's process, with the same
:func:`payload_nbytes` as in one process.

Every wait is bounded by ``ddp_timeout`` (seconds, a
:class:`~transformers.TrainingArguments` field), applied to each transfer
rather than left to the process group, whose timeout Trainer does not set on
CPU. When a peer dies or stays silent,
the waiting process raises :class:`FederationCommError` naming itself, the
peer, the message and the round; ``accelerate launch`` then stops the others.
"""

from __future__ import annotations

import pickle
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from .base import DOWN, UP, Layout, Transport, deliver, flatten, payload_nbytes, unflatten
from .placement import SERVER_RANK, Placement

T = TypeVar("T")
_ALIGN = 16  # bytes; every tensor starts at an aligned offset of the buffer, so it can be viewed in place


class FederationCommError(RuntimeError):
    """A message between the server's and a client's process did not get through."""


def _padded(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


def pack(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """All tensors as one uint8 buffer on ``device`` (each at an aligned offset)."""
    chunks = []
    for t in tensors:
        raw = t.detach().contiguous().reshape(-1).view(torch.uint8).to(device)
        pad = _padded(raw.numel()) - raw.numel()
        chunks += [raw, torch.zeros(pad, dtype=torch.uint8, device=device)] if pad else [raw]
    return torch.cat(chunks) if chunks else torch.zeros(0, dtype=torch.uint8, device=device)


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return torch.Size(shape).numel() * dtype.itemsize


def unpack(buffer: torch.Tensor, layout: Layout) -> list[torch.Tensor]:
    """The tensors of ``layout`` (shapes and dtypes, in order) out of a buffer made by :func:`pack`."""
    out, offset = [], 0
    for shape, dtype in layout:
        nbytes = _nbytes(shape, dtype)
        # A copy per tensor: views of one buffer as different dtypes could not be saved in a checkpoint.
        out.append(buffer[offset:offset + nbytes].view(dtype).view(shape).clone())
        offset += _padded(nbytes)
    return out


class DistributedTransport(Transport):
    """Messages between the server's process and the clients' processes (see :mod:`hf_fsl_sage.placement`)."""

    def __init__(self, placement: Placement, device: torch.device, timeout: timedelta = timedelta(minutes=30)):
        super().__init__()
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("DistributedTransport needs an initialised torch.distributed process group; run the "
                               "script with `accelerate launch --num_processes P`.")
        self.placement = placement
        self.device = torch.device("cpu") if device.type == "cpu" else device  # not "cpu:0"
        self.timeout = timeout

    def _move(self, client_id: int, direction: str, kind: str, payload: T | None) -> T | None:
        client_rank = self.placement.rank_of(client_id)
        src, dst = (client_rank, SERVER_RANK) if direction == UP else (SERVER_RANK, client_rank)
        rank = self.placement.rank
        if rank not in (src, dst):
            return None
        if src == dst:
            out, nbytes = deliver(payload, self.device), payload_nbytes(payload)
        elif rank == src:
            out, nbytes = None, payload_nbytes(payload)
            self._guarded(lambda: self._send(payload, dst, kind, client_id), "send", kind, client_id, dst)
        else:
            out = self._guarded(lambda: self._recv(src, kind, client_id), "receive", kind, client_id, src)
            nbytes = payload_nbytes(out)
        if self.placement.is_server:
            self.ledger.record(direction, kind, nbytes)
        return out

    def _send(self, payload: Any, dst: int, kind: str, client_id: int) -> None:
        spec, tensors = flatten(payload)
        header = torch.frombuffer(bytearray(pickle.dumps((kind, client_id, spec))), dtype=torch.uint8)
        for part in (torch.tensor([header.numel()], dtype=torch.int64), header, pack(tensors, self.device)):
            dist.isend(part.to(self.device), dst=dst).wait(self.timeout)

    def _receive(self, shape: int, dtype: torch.dtype, src: int) -> torch.Tensor:
        buffer = torch.empty(shape, dtype=dtype, device=self.device)
        dist.irecv(buffer, src=src).wait(self.timeout)
        return buffer

    def _recv(self, src: int, kind: str, client_id: int) -> Any:
        length = int(self._receive(1, torch.int64, src)[0])
        got_kind, got_client, spec = pickle.loads(self._receive(length, torch.uint8, src).cpu().numpy().tobytes())
        if (got_kind, got_client) != (kind, client_id):
            raise FederationCommError(
                f"process {self.placement.rank} expected {kind} of client {client_id} from process {src} but got "
                f"{got_kind} of client {got_client} ({self.context}): the processes are not running the same "
                "schedule; launch every process with the same script, arguments and seed."
            )
        layout = spec[1]
        size = sum(_padded(_nbytes(shape, dtype)) for shape, dtype in layout)
        return unflatten(spec, unpack(self._receive(size, torch.uint8, src), layout))

    def _guarded(self, fn, action: str, kind: str, client_id: int, peer: int):
        try:
            return fn()
        except FederationCommError:
            raise
        except Exception as error:  # gloo / NCCL raise RuntimeError subclasses with transport details
            me = "the server's process" if self.placement.is_server else f"process {self.placement.rank}"
            whose = "the server's process 0" if peer == SERVER_RANK else f"process {peer} (client {client_id})"
            limit = f" within the {int(self.timeout.total_seconds())} s timeout (ddp_timeout)"
            raise FederationCommError(
                f"{me} could not {action} the {kind} message of client {client_id} "
                f"{'to' if action == 'send' else 'from'} {whose} at {self.context or 'set-up'}: that process stopped, "
                f"died, or did not answer{limit}. Stopping this process; resume from the last checkpoint. "
                f"[{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}]"
            ) from error


__all__ = ["DOWN", "UP", "DistributedTransport", "FederationCommError", "flatten", "pack", "unflatten", "unpack"]
