"""The transport between processes: torch.distributed point-to-point messages (gloo on CPU, NCCL on GPU).

A message is a header and a payload. The header travels on the control group (gloo, CPU; see
:mod:`~hf_fsl_sage.transport.groups`) as two transfers, its length and its bytes: plain JSON (never pickle:
nothing a peer sends is ever run) giving the message's kind, the client, the payload's structure and each
tensor's shape and dtype (from :data:`WIRE_DTYPES`). The payload follows on the data group (NCCL on GPUs) as
one flat byte buffer on the sender's device. The receiver checks the header against what it expects at that
point of the protocol (kind, client, sender, a well-formed structure with as many tensors as shapes, sizes
within bounds) before it allocates anything, then the payload against the caller's expectation
(:func:`~hf_fsl_sage.transport.base.conforms`), and raises :class:`FederationCommError` naming the sender on
any mismatch. Each message is counted once, on the server's process, with the same :func:`payload_nbytes` as
in one process.

Every wait is bounded by ``ddp_timeout`` (seconds, a :class:`~transformers.TrainingArguments` field), applied
to each transfer by this package rather than left to the process group (whose timeout Trainer does not set
on CPU, and whose NCCL watchdog would take the process down). When a peer dies or stays silent, the waiting
process raises :class:`FederationCommError` naming itself, the peer, the message and the round;
``accelerate launch`` then stops the others. With a :class:`~hf_fsl_sage.transport.membership.Membership`
(``client_failures="drop"``) the server's process instead declares a silent or dead client process lost and
goes on without it, and client processes wait longer for the server's header (it may spend a timeout on each
process that stalls).
"""

from __future__ import annotations

import atexit
import json
import math
import queue
import threading
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from .base import DOWN, UP, FederationCommError, Layout, Transport, deliver, flatten, payload_nbytes, unflatten
from .groups import ProcessGroups, complete
from .membership import Membership
from .placement import SERVER_RANK, Placement


T = TypeVar("T")
_ALIGN = 16  # bytes; every tensor starts at an aligned offset of the buffer, so it can be viewed in place
#: The dtypes a tensor may have on the wire, by the name the header gives them.
WIRE_DTYPES: dict[str, torch.dtype] = {str(d).removeprefix("torch."): d for d in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16, torch.int8,
    torch.uint8, torch.bool)}
_LOST = object()  # what a transfer with a process declared lost returns
MAX_HEADER_BYTES = 1 << 24
MAX_MESSAGE_BYTES = 1 << 34  # 16 GiB: a header may not make the receiver allocate more than this
_MAX_DEPTH = 16
_LEAVES = {"none": 1, "tensor": 1}  # tag -> number of entries
_NODES = {"smashed": 5, "dict": 2, "list": 2, "tuple": 2}


class MalformedMessage(ValueError):
    """A header that is not a well-formed description of a payload."""


def encode_header(kind: str, client_id: int, spec: tuple[Any, Layout]) -> bytes:
    """The JSON header of a message (structure as nested lists, each dtype by its wire name)."""
    structure, layout = spec
    names = {d: n for n, d in WIRE_DTYPES.items()}
    for _, dtype in layout:
        if dtype not in names:
            raise TypeError(f"cannot send a {dtype} tensor: the wire carries {sorted(WIRE_DTYPES)}")
    wire_layout = [[list(shape), names[dtype]] for shape, dtype in layout]
    return json.dumps({"kind": kind, "client": client_id, "structure": structure, "layout": wire_layout},
                      separators=(",", ":")).encode()


def _check_structure(node: Any, depth: int = 0) -> int:
    """The number of tensors in a well-formed structure; raises :class:`MalformedMessage` otherwise."""
    if depth > _MAX_DEPTH:
        raise MalformedMessage(f"structure nested deeper than {_MAX_DEPTH}")
    if not isinstance(node, list) or not node or not isinstance(node[0], str):
        raise MalformedMessage(f"structure node {str(node)[:60]!r} is not a tagged list")
    tag = node[0]
    arity = _LEAVES.get(tag) or _NODES.get(tag)
    if arity is None or len(node) != arity:
        raise MalformedMessage(f"structure node {str(node)[:60]!r} has an unknown tag or the wrong length")
    if tag in _LEAVES:
        return int(tag == "tensor")
    if tag == "smashed":
        if not (isinstance(node[4], list) and node[4][:1] == ["dict"]):
            raise MalformedMessage("a smashed node's carried inputs are not a dict node")
        return sum(_check_structure(child, depth + 1) for child in node[1:])
    if not isinstance(node[1], list):
        raise MalformedMessage(f"{tag} node does not hold a list")
    if tag != "dict":
        return sum(_check_structure(child, depth + 1) for child in node[1])
    count = 0
    for entry in node[1]:
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)):
            raise MalformedMessage(f"dict entry {str(entry)[:60]!r} is not a [string key, node] pair")
        count += _check_structure(entry[1], depth + 1)
    return count


def decode_header(raw: bytes) -> tuple[str, int, tuple[Any, Layout]]:
    """``(kind, client, spec)`` of a header made by :func:`encode_header`; :class:`MalformedMessage` otherwise."""
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise MalformedMessage(f"the header is not JSON ({error})") from None
    if not isinstance(header, dict) or set(header) != {"kind", "client", "structure", "layout"}:
        raise MalformedMessage("the header is not an object with exactly kind, client, structure and layout")
    kind, client, structure, wire_layout = (header[k] for k in ("kind", "client", "structure", "layout"))
    if not isinstance(kind, str) or type(client) is not int:
        raise MalformedMessage("the header's kind is not a string or its client not an integer")
    count = _check_structure(structure)
    if not isinstance(wire_layout, list) or len(wire_layout) != count:
        raise MalformedMessage(f"the structure holds {count} tensors but the layout describes "
                               f"{len(wire_layout) if isinstance(wire_layout, list) else 'no list of'} tensors")
    layout, total = [], 0
    for entry in wire_layout:
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], list)
                and all(type(d) is int and 0 <= d < MAX_MESSAGE_BYTES for d in entry[0])):
            raise MalformedMessage(f"layout entry {str(entry)[:60]!r} is not [shape of sizes, dtype]")
        if entry[1] not in WIRE_DTYPES:
            raise MalformedMessage(f"dtype {str(entry[1])[:30]!r} is not one of {sorted(WIRE_DTYPES)}")
        shape, dtype = tuple(entry[0]), WIRE_DTYPES[entry[1]]
        total += _padded(_nbytes(shape, dtype))
        if total > MAX_MESSAGE_BYTES:
            raise MalformedMessage(f"the payload would exceed {MAX_MESSAGE_BYTES} bytes")
        layout.append((shape, dtype))
    return kind, client, (structure, layout)


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
    return math.prod(shape) * dtype.itemsize


def unpack(buffer: torch.Tensor, layout: Layout) -> list[torch.Tensor]:
    """The tensors of ``layout`` (shapes and dtypes, in order) out of a buffer made by :func:`pack`."""
    out, offset = [], 0
    for shape, dtype in layout:
        nbytes = _nbytes(shape, dtype)
        # A copy per tensor: views of one buffer as different dtypes could not be saved in a checkpoint.
        out.append(buffer[offset:offset + nbytes].view(dtype).view(shape).clone())
        offset += _padded(nbytes)
    return out


def _tear_down() -> None:
    """Destroy the process group while the interpreter is whole: left to interpreter shutdown, gloo's worker
    threads may free tensors after Python is gone and abort the process (SIGABRT) after a successful run."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class _Waiter:
    """Waits for transfers on a daemon thread, so that the caller can give up on one without a backend timeout.

    A transfer given up on keeps its thread blocked; the next transfer gets a new thread.
    """

    def __init__(self) -> None:
        self._start()

    def _start(self) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._serve, args=(self._jobs,), daemon=True, name="hf_fsl_sage-wait").start()

    @staticmethod
    def _serve(jobs: queue.SimpleQueue) -> None:
        while True:
            work, outcome, done = jobs.get()
            try:
                work.wait()  # releases the GIL while it blocks
                outcome.append(None)
            except BaseException as error:  # noqa: BLE001 -- handed to the caller
                outcome.append(error)
            done.set()

    def wait(self, work: dist.Work, seconds: float) -> bool:
        """Whether ``work`` completed within ``seconds``; raises what it raised."""
        outcome: list[BaseException | None] = []
        done = threading.Event()
        self._jobs.put((work, outcome, done))
        if not done.wait(seconds):
            self._start()
            return False
        if outcome[0] is not None:
            raise outcome[0]
        return True


class DistributedTransport(Transport):
    """Messages between the server's process and the clients' processes (:mod:`hf_fsl_sage.transport.placement`)."""

    def __init__(self, placement: Placement, device: torch.device, timeout: timedelta = timedelta(minutes=30),
                 membership: Membership | None = None, groups: ProcessGroups | None = None):
        super().__init__()
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("DistributedTransport needs an initialised torch.distributed process group; run the "
                               "script with `accelerate launch --num_processes P`.")
        self.placement = placement
        self.device = torch.device("cpu") if device.type == "cpu" else device  # not "cpu:0"
        self.timeout = timeout
        self.membership = membership
        if groups is None:  # every process builds its transport at the same point: the groups form there
            groups = ProcessGroups(self.device, timeout)
            groups.form()
        self.groups = groups
        # Only the server's process gives up on peers (with a membership); it waits on a helper thread.
        self._waiter = _Waiter() if membership is not None and placement.is_server else None
        if membership is not None and not placement.is_server:  # the server may spend a timeout per stalled process
            self.timeout = timeout * (placement.world_size + 1)
        atexit.unregister(_tear_down)  # once, however many transports are built
        atexit.register(_tear_down)

    # ------------------------------------------------------------ control collectives (small, host memory)
    def all_reduce(self, values: torch.Tensor) -> torch.Tensor:
        """The sum of ``values`` over the processes, in host memory, on the control group."""
        out = values.detach().to("cpu", copy=True)
        dist.all_reduce(out, group=self.groups.control, async_op=True).wait(self.timeout)
        return out

    def sum_over_processes(self, name: str, values: torch.Tensor) -> torch.Tensor:
        return self.all_reduce(values)

    def broadcast(self, values: torch.Tensor) -> torch.Tensor:
        """The server's process's ``values`` on every process, in host memory, on the control group."""
        out = values.detach().to("cpu", copy=True)
        dist.broadcast(out, src=SERVER_RANK, group=self.groups.control, async_op=True).wait(self.timeout)
        return out

    def barrier(self) -> None:
        """Every process reached this point (on the control group)."""
        dist.barrier(group=self.groups.control, async_op=True).wait(self.timeout)

    def _ends(self, client_id: int, direction: str) -> tuple[int, int]:
        """The sending and the receiving process of a message."""
        client_rank = self.placement.rank_of(client_id)
        return (client_rank, SERVER_RANK) if direction == UP else (SERVER_RANK, client_rank)

    def _move(self, client_id: int, direction: str, kind: str, payload: T | None) -> T | None:
        src, dst = self._ends(client_id, direction)
        rank = self.placement.rank
        if rank not in (src, dst):
            return None
        if self.membership is not None and self.membership.is_lost(self.placement.rank_of(client_id)):
            return None  # its process is out of the run: nothing is sent to or expected from it
        if src == dst:
            out, nbytes = deliver(payload, self.device), payload_nbytes(payload)
        elif rank == src:
            out, nbytes = None, payload_nbytes(payload)
            if self._guarded(lambda: self._send(payload, dst, kind, client_id), "send", kind, client_id, dst) is _LOST:
                return None  # not sent: that client's process is out of the run
        else:
            out = self._guarded(lambda: self._recv(src, kind, client_id), "receive", kind, client_id, src)
            if out is _LOST:
                return None
            nbytes = payload_nbytes(out)
        if self.placement.is_server:
            self.ledger.record(direction, kind, nbytes)
        return out

    def _from_peer(self, client_id: int, direction: str) -> str | None:
        src, dst = self._ends(client_id, direction)
        if src == dst or self.placement.rank != dst:
            return None
        return self._describe(src, client_id)

    @staticmethod
    def _describe(rank: int, client_id: int) -> str:
        return "the server's process 0" if rank == SERVER_RANK else f"process {rank} (client {client_id})"

    def _send(self, payload: Any, dst: int, kind: str, client_id: int) -> None:
        spec, tensors = flatten(payload)
        header = torch.frombuffer(bytearray(encode_header(kind, client_id, spec)), dtype=torch.uint8)
        for part in (torch.tensor([header.numel()], dtype=torch.int64), header):
            self._wait(dist.isend(part, dst=self._wire(dst), group=self.groups.control), part)
        self._send_payload(pack(tensors, self.device), dst)

    def _send_payload(self, buffer: torch.Tensor, dst: int) -> None:
        """The payload's buffer, right after its header was sent to ``dst`` (on the data group)."""
        self._wait(dist.isend(buffer, dst=self._wire(dst), group=self.groups.data), buffer, data=True)

    def _receive(self, shape: int, dtype: torch.dtype, src: int, data: bool = False) -> torch.Tensor:
        """A header part (on the control group, in host memory) or, with ``data``, the payload (on the device)."""
        buffer = torch.empty(shape, dtype=dtype, device=self.device if data else "cpu")
        group = self.groups.data if data else self.groups.control
        self._wait(dist.irecv(buffer, src=self._wire(src), group=group), buffer, data=data)
        return buffer

    def _wait(self, work: dist.Work, tensor: torch.Tensor, data: bool = False) -> None:
        """Wait for a transfer, at most the timeout.

        A payload on a backend whose ``wait()`` does not block (NCCL) is polled until it completes
        (:func:`~hf_fsl_sage.transport.groups.complete`). Otherwise, with a membership, the server's process waits
        on a helper thread instead of handing the timeout to the backend: gloo closes every connection of the
        group when a transfer times out, which would cut off the other clients too. A transfer given up on stays
        posted, so its tensor is kept until the group is formed again.
        """
        seconds = self.timeout.total_seconds()
        if data and not self.groups.data_waits_block:
            done = complete(work, seconds)
        elif self._waiter is None:
            work.wait(self.timeout)
            return
        else:
            done = self._waiter.wait(work, seconds)
        if not done:
            if self.membership is not None:
                self.membership.abandon(work, tensor)
            raise TimeoutError(f"no answer within {seconds:.0f} s")

    def _recv(self, src: int, kind: str, client_id: int) -> Any:
        length = int(self._receive(1, torch.int64, src)[0])
        sender = self._describe(src, client_id)
        if not 0 < length <= MAX_HEADER_BYTES:
            raise FederationCommError(f"rejected a message from {sender} at {self.context or 'set-up'}: its header "
                                      f"would be {length} bytes (at most {MAX_HEADER_BYTES}).")
        try:
            got_kind, got_client, spec = decode_header(self._receive(length, torch.uint8, src).cpu().numpy().tobytes())
        except MalformedMessage as error:
            raise FederationCommError(f"rejected a malformed message from {sender} at {self.context or 'set-up'} "
                                      f"(expected {kind} of client {client_id}): {error}.") from None
        if (got_kind, got_client) != (kind, client_id):
            raise FederationCommError(
                f"process {self.placement.rank} expected {kind} of client {client_id} from {sender} but got "
                f"{got_kind[:40]} of client {got_client} ({self.context}): the processes are not running the same "
                "schedule; launch every process with the same script, arguments and seed."
            )
        layout = spec[1]
        size = sum(_padded(_nbytes(shape, dtype)) for shape, dtype in layout)
        return unflatten(spec, unpack(self._receive(size, torch.uint8, src, data=True), layout))

    def _wire(self, rank: int) -> int:
        """The rank of launch rank ``rank`` in the current process group (they differ once a process is lost)."""
        return rank if self.membership is None else self.membership.wire_rank(rank)

    def _guarded(self, fn, action: str, kind: str, client_id: int, peer: int):
        """``fn()``; on a transport failure raise :class:`FederationCommError`, or with a membership (on the
        server's process) declare the peer's process lost and return :data:`_LOST`."""
        try:
            return fn()
        except FederationCommError:
            raise
        except Exception as error:  # gloo / NCCL raise RuntimeError subclasses with transport details
            me = "the server's process" if self.placement.is_server else f"process {self.placement.rank}"
            whose = self._describe(peer, client_id)
            limit = f" within the {int(self.timeout.total_seconds())} s timeout (ddp_timeout)"
            detail = f"[{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}]"
            if self.membership is not None and self.placement.is_server:
                done = "sent to" if action == "send" else "received from"
                self.membership.lose(peer, f"the {kind} message of client {client_id} could not be {done} it at "
                                           f"{self.context}: it stopped, died, or did not answer{limit} {detail}",
                                     died=not isinstance(error, TimeoutError))
                return _LOST
            if self.membership is not None and self.membership.excluded():
                self.membership.leave(self.context or "set-up")
            raise FederationCommError(
                f"{me} could not {action} the {kind} message of client {client_id} "
                f"{'to' if action == 'send' else 'from'} {whose} at {self.context or 'set-up'}: that process stopped, "
                f"died, or did not answer{limit}. Stopping this process; resume from the last checkpoint. {detail}"
            ) from error


__all__ = ["DOWN", "UP", "WIRE_DTYPES", "DistributedTransport", "FederationCommError", "decode_header",
           "encode_header", "flatten", "pack", "unflatten", "unpack"]
