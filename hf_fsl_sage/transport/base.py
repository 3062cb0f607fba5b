"""Everything that crosses the client-server boundary goes through a transport, which counts its bytes.

An algorithm never touches another party's tensors directly: it sends them
with :meth:`Transport.to_server` / :meth:`Transport.to_client` and works on
what arrives. :class:`~hf_fsl_sage.transport.local.LocalTransport` runs both parties in one
process; :class:`~hf_fsl_sage.transport.distributed.DistributedTransport`
carries the same messages between processes, without any change to the algorithms.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from ..splitting.split import Smashed
from ..timing import StepTimer
from .codecs import ActivationCoder, MalformedUpload


T = TypeVar("T")

UP, DOWN = "up", "down"


class FederationCommError(RuntimeError):
    """A message between the server and a client did not get through, or was not what the protocol expects."""


Layout = list[tuple[tuple[int, ...], torch.dtype]]


def flatten(obj: Any) -> tuple[tuple[Any, Layout], list[torch.Tensor]]:
    """``((structure, layout), tensors)`` of a payload: tensors, Smashed, None, and dicts/lists/tuples of them.

    ``layout`` holds the shape and dtype of each tensor, in order: with the structure it is all a receiver
    needs to rebuild the payload from the tensors (:func:`unflatten`).
    """
    tensors: list[torch.Tensor] = []

    def walk(o: Any) -> Any:
        if o is None:
            return ("none",)
        if isinstance(o, torch.Tensor):
            tensors.append(o)
            return ("tensor",)
        if isinstance(o, Smashed):
            return ("smashed", walk(o.hidden_states), walk(o.attention_mask), walk(o.position_ids), walk(o.carried))
        if isinstance(o, dict):
            if not all(isinstance(k, str) for k in o):
                raise TypeError("cannot send a dict with non-string keys: payload dict keys are strings")
            return ("dict", [(k, walk(v)) for k, v in o.items()])
        if isinstance(o, (list, tuple)):
            return ("list" if isinstance(o, list) else "tuple", [walk(v) for v in o])
        raise TypeError(f"cannot send a {type(o).__name__}: payloads are tensors, Smashed, or dicts/lists of them")

    structure = walk(obj)
    return (structure, [(tuple(t.shape), t.dtype) for t in tensors]), tensors


def unflatten(spec: tuple[Any, Layout], tensors: list[torch.Tensor]) -> Any:
    """The payload described by ``spec`` (from :func:`flatten`), with ``tensors`` in its places."""
    it = iter(tensors)

    def build(s: Any) -> Any:
        tag = s[0]
        if tag == "none":
            return None
        if tag == "tensor":
            return next(it)
        if tag == "smashed":
            return Smashed(*(build(part) for part in s[1:]))
        if tag == "dict":
            return {k: build(v) for k, v in s[1]}
        items = [build(v) for v in s[1]]
        return items if tag == "list" else tuple(items)

    return build(spec[0])


def payload_nbytes(obj: Any) -> int:
    """Bytes of every tensor inside ``obj`` (tensors, Smashed, dicts, lists, tuples), in the dtype sent."""
    return sum(t.numel() * t.element_size() for t in flatten(obj)[1])


def deliver(obj: Any, device: torch.device | None) -> Any:
    """What the receiver gets: detached from the sender's graph and on the receiver's device."""
    spec, tensors = flatten(obj)
    return unflatten(spec, [t.detach() if device is None else t.detach().to(device) for t in tensors])


@dataclass(frozen=True)
class TensorSpec:
    """What a received tensor must look like, where the receiver cannot know it exactly.

    Each entry of ``shape`` is an ``int`` (that size), a name (the same size wherever the name recurs in the
    message, and at most ``limits[name]`` when :func:`conforms` is given a limit) or ``None`` (any size).
    ``optional`` accepts ``None`` in the tensor's place.
    """

    shape: tuple[int | str | None, ...]
    dtypes: tuple[torch.dtype, ...]
    optional: bool = False


Expected = Any  # a payload whose tensors give exact shapes and dtypes, TensorSpecs in place of tensors, or None


def conforms(received: Any, expected: Expected, limits: dict[str, int] | None = None) -> str | None:
    """``None`` if ``received`` has the structure, shapes and dtypes of ``expected``; else what differs, and where."""
    sizes: dict[str, int] = {}
    limits = limits or {}

    def tensor(path: str, got: Any, shape: tuple, dtypes: tuple[torch.dtype, ...]) -> str | None:
        if not isinstance(got, torch.Tensor):
            return f"{path}: a {type(got).__name__} where a tensor belongs"
        if got.dtype not in dtypes:
            return f"{path}: dtype {got.dtype}, expected {' or '.join(map(str, dtypes))}"
        wanted = tuple(d if d is not None else "*" for d in shape)
        if got.dim() != len(shape):
            return f"{path}: shape {tuple(got.shape)}, expected {wanted}"
        for size, want in zip(got.shape, shape):
            if isinstance(want, str):
                bound = sizes.setdefault(want, size)
                if size != bound or size > limits.get(want, size):
                    limit = f" <= {limits[want]}" if want in limits else ""
                    return f"{path}: shape {tuple(got.shape)}, expected {wanted} with {want} = {bound}{limit}"
            elif want is not None and size != want:
                return f"{path}: shape {tuple(got.shape)}, expected {wanted}"
        return None

    def walk(path: str, got: Any, want: Any) -> str | None:
        if isinstance(want, TensorSpec):
            return None if got is None and want.optional else tensor(path, got, want.shape, want.dtypes)
        if isinstance(want, torch.Tensor):
            return tensor(path, got, tuple(want.shape), (want.dtype,))
        if want is None:
            return None if got is None else f"{path}: a {type(got).__name__} where nothing belongs"
        if type(got) is not type(want):
            return f"{path}: a {type(got).__name__} where a {type(want).__name__} belongs"
        if isinstance(want, Smashed):
            pairs = [(f"{path}.{name}", getattr(got, name), getattr(want, name))
                     for name in ("hidden_states", "attention_mask", "position_ids", "carried")]
        elif isinstance(want, dict):
            if got.keys() != want.keys():
                missing, extra = sorted(want.keys() - got.keys()), sorted(got.keys() - want.keys())
                return f"{path}: keys differ (missing {missing[:3]}, unexpected {extra[:3]})"
            pairs = [(f"{path}[{k!r}]", got[k], want[k]) for k in want]
        else:
            if len(got) != len(want):
                return f"{path}: {len(got)} items, expected {len(want)}"
            pairs = [(f"{path}[{i}]", g, w) for i, (g, w) in enumerate(zip(got, want))]
        return next((problem for p, g, w in pairs if (problem := walk(p, g, w))), None)

    return walk("payload", received, expected)


@dataclass
class CommLedger:
    """Cumulative bytes by direction and by kind of message (``smashed``, ``gradient``, ``client_model``, ...)."""

    up: int = 0
    down: int = 0
    by_kind: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    messages: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def record(self, direction: str, kind: str, nbytes: int) -> None:
        if direction == UP:
            self.up += nbytes
        else:
            self.down += nbytes
        self.by_kind[f"{kind}_{direction}"] += nbytes
        self.messages[f"{kind}_{direction}"] += 1

    @property
    def total(self) -> int:
        return self.up + self.down

    def metrics(self) -> dict[str, int]:
        return {"comm_bytes_up": self.up, "comm_bytes_down": self.down, "comm_bytes": self.total}

    def state_dict(self) -> dict[str, Any]:
        return {"up": self.up, "down": self.down, "by_kind": dict(self.by_kind), "messages": dict(self.messages)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.up, self.down = state["up"], state["down"]
        self.by_kind = defaultdict(int, state["by_kind"])
        self.messages = defaultdict(int, state["messages"])


class Transport(ABC):
    """The one narrow interface between clients and the server.

    Every process calls :meth:`to_server` / :meth:`to_client` for every
    message, in the same order: the sending process passes the payload, the
    receiving process gets the delivery, and any other process gets ``None``.
    In one process (:class:`~hf_fsl_sage.transport.local.LocalTransport`) sender and receiver are the same.
    The ledger counts each message once, where the server lives, as encoded by
    ``coder`` (:class:`~hf_fsl_sage.transport.codecs.ActivationCoder`): the
    sender encodes the activations in a message, the receiver decodes them.
    """

    def __init__(self) -> None:
        self.ledger = CommLedger()
        self.context = ""  # where the run is ("round 3, global step 31"), for error messages
        self.coder = ActivationCoder("none")
        self.timer = StepTimer()  # the run's timer: the trainer replaces it, the federation shares it

    def to_server(self, client_id: int, kind: str, payload: T | None = None, expect: Expected = None,
                  limits: dict[str, int] | None = None) -> T | None:
        """Send ``payload`` from client ``client_id`` to the server; returns what the server receives.

        ``expect`` (given by the receiving process; see :func:`conforms`) is what the message must look like
        when it comes from another process, once decoded; a message that differs raises
        :class:`FederationCommError`.
        """
        return self._checked(client_id, UP, kind, self._coded(client_id, UP, kind, payload, limits), expect, limits)

    def to_client(self, client_id: int, kind: str, payload: T | None = None, expect: Expected = None,
                  limits: dict[str, int] | None = None) -> T | None:
        """Send ``payload`` from the server to client ``client_id``; returns what the client receives."""
        return self._checked(client_id, DOWN, kind, self._coded(client_id, DOWN, kind, payload, limits), expect,
                             limits)

    def _coded(self, client_id: int, direction: str, kind: str, payload: T | None,
               limits: dict[str, int] | None) -> T | None:
        with self.timer("transport_encode"):
            sent = self.coder.encode(client_id, kind, payload)
        with self.timer("transport_wait"):
            received = self._move(client_id, direction, kind, sent)
        try:
            with self.timer("transport_encode"):
                return self.coder.decode(client_id, kind, received, limits)
        except (IndexError, KeyError, RuntimeError, TypeError, ValueError) as error:
            sender = self._from_peer(client_id, direction)
            if sender is None:
                raise
            where = f"the {kind} message of client {client_id} from {sender} at {self.context or 'set-up'}"
            if isinstance(error, MalformedUpload):
                raise FederationCommError(f"rejected {where}: {error}. The sender runs other code, another model "
                                          "or other settings (smashed_codec) than this process; launch every "
                                          "process with the same script, arguments and seed.") from None
            raise FederationCommError(
                f"could not decode {where} ({type(error).__name__}: {error}). Launch every process with the same "
                "smashed_codec, script, arguments and seed."
            ) from error

    @abstractmethod
    def _move(self, client_id: int, direction: str, kind: str, payload: T | None) -> T | None: ...

    # ------------------------------------------------------------ processes without a process group
    # A transport whose processes share no torch.distributed group (Flower) brings back what the other processes
    # computed with their messages; the trainer asks for it where it would otherwise use a collective.
    def step_done(self, step: int) -> dict[int, dict[str, float]]:
        """End of global ``step`` on this process: what other processes' parties reported for it, by client (their
        :class:`~hf_fsl_sage.algorithms.base.StepResult` items), when the trainer cannot gather them itself."""
        return {}

    def peer_sums(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """What the other processes add to this process's ``like`` (the ``"log"`` sums or ``"time"`` seconds
        of the trainer) since the last call, when the trainer cannot all-reduce them itself; zeros here."""
        return torch.zeros_like(like)

    def sum_over_processes(self, name: str, values: torch.Tensor) -> torch.Tensor:
        """``values`` summed over every process of the run (``name``: which of the trainer's sums, for a transport
        that brings them back from its peers)."""
        return values + self.peer_sums(name, values)

    def save_peers(self, directory: str) -> None:
        """Write the other processes' share of a checkpoint into ``directory``, when they cannot write it."""

    def load_peers(self, directory: str) -> None:
        """Read what :meth:`save_peers` wrote, to hand it back to the other processes."""

    def _from_peer(self, client_id: int, direction: str) -> str | None:
        """Who sent the message this process just received, if it came from another process; else ``None``."""
        return None

    def _checked(self, client_id: int, direction: str, kind: str, received: Any, expect: Expected,
                 limits: dict[str, int] | None) -> Any:
        sender = self._from_peer(client_id, direction)
        if expect is None or sender is None or received is None:  # None: the sender dropped or skipped the step
            return received
        problem = conforms(received, expect, limits)
        if problem:
            raise FederationCommError(
                f"rejected the {kind} message of client {client_id} from {sender} at {self.context or 'set-up'}: "
                f"{problem}. The sender runs other code, another model or other settings than this process; "
                "launch every process with the same script, arguments and seed."
            )
        return received

