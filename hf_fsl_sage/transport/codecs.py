"""Activation codecs: fewer bytes for the smashed activations and the gradients that cross the wire.

A codec is a pair of pure functions over a float tensor whose last dimension is
the hidden size: ``encode(x)`` returns a dict of tensors (what travels) and
``decode(encoded, dtype)`` rebuilds ``x`` in ``dtype``. Registered codecs and
their error bounds (``u`` is the unit roundoff of the format):

========  =========================================  ================================================
name      sent per token of hidden size ``H``        error per element
========  =========================================  ================================================
``none``  ``H`` values in their own dtype            0
``bf16``  ``2 H`` bytes                              ``|e| <= 2^-8 |x|`` (8 significant bits)
``fp16``  ``2 H`` bytes                              ``|e| <= 2^-11 |x|`` for ``|x| >= 2^-14``, else
                                                     ``|e| <= 2^-25`` (subnormals); ``|x| > 65504``
                                                     is refused
``int8``  ``H`` bytes + one bf16 scale               ``|e| <= s / 2``, ``s`` the token's scale
                                                     (``absmax / 127`` rounded up: < 0.8 % above)
``int4``  ``H / 2`` bytes + one bf16 scale           ``|e| <= s / 2``, ``s >= absmax / 7``
========  =========================================  ================================================

``int8`` and ``int4`` quantise each token (each vector along the last
dimension) symmetrically with its own absmax scale, as per-token activation
quantisation does (LLM.int8(), ZeroQuant); the scale is rounded *up* to bf16
so that no value is clipped and the receiver uses exactly the scale the
sender used.

:class:`ActivationCoder` applies a codec to whole messages in the transport
(:mod:`hf_fsl_sage.transport.base`): the hidden states of each upload and the
gradient sent back for it. Only the positions the attention mask keeps travel,
and beside them only what the server needs, in the smallest integer dtype that
holds it: each row's length (right padding) and the labels of the kept
positions. The receiver puts zeros at the other positions. That is exact: a
masked position is never attended to, so the server's outputs at kept
positions do not depend on it, and it carries no label and predicts none
(checked on each upload), so the gradient the server sends back is exactly
zero there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..splitting.loss import IGNORE_INDEX
from ..splitting.split import Smashed


Encoded = dict[str, torch.Tensor]

FP16_MAX = 65504.0


@dataclass(frozen=True)
class Codec:
    """A named pair of pure functions: ``encode(x) -> dict of tensors`` and ``decode(encoded, dtype) -> x``."""

    name: str
    encode: Callable[[torch.Tensor], Encoded]
    decode: Callable[[Encoded, torch.dtype], torch.Tensor]


CODECS: dict[str, Codec] = {}


def register_codec(name: str, encode: Callable[[torch.Tensor], Encoded],
                   decode: Callable[[Encoded, torch.dtype], torch.Tensor]) -> Codec:
    """Make a codec available as ``FSLSageConfig(smashed_codec=name)``."""
    CODECS[name] = Codec(name, encode, decode)
    return CODECS[name]


# ---------------------------------------------------------------- casts
def _cast_codec(dtype: torch.dtype, limit: float | None = None):
    def encode(x: torch.Tensor) -> Encoded:
        if limit is not None and x.numel() and float(x.detach().abs().max()) > limit:
            raise ValueError(f"an activation of magnitude {float(x.abs().max()):.3g} exceeds the {dtype} range "
                             f"(+-{limit:g}); use smashed_codec='bf16', which has the range of float32.")
        return {"values": x.detach().to(dtype)}

    def decode(encoded: Encoded, out: torch.dtype) -> torch.Tensor:
        return encoded["values"].to(out)

    return encode, decode


def encode_none(x: torch.Tensor) -> Encoded:
    return {"values": x.detach()}


def decode_none(encoded: Encoded, dtype: torch.dtype) -> torch.Tensor:
    return encoded["values"]  # exactly what was sent, in the sender's dtype


# ---------------------------------------------------------------- per-token absmax quantisation
def absmax_scale(x: torch.Tensor, levels: int) -> torch.Tensor:
    """Per-token scale in bf16, ``absmax / levels`` rounded up (so ``|x / scale| <= levels``: nothing clips).

    Rounded up, it exceeds the exact scale by less than one bf16 step: a factor ``< 1 + 2^-7``.
    """
    exact = x.detach().float().abs().amax(dim=-1) / levels
    scale = exact.to(torch.bfloat16)
    return torch.where(scale.float() < exact, torch.nextafter(scale, torch.full_like(scale, float("inf"))), scale)


def quantise(x: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scale)`` with integer ``q`` in ``[-levels, levels]`` (int8) and ``x ~= q * scale``."""
    scale = absmax_scale(x, levels)
    s = scale.float().unsqueeze(-1)
    q = torch.where(s > 0, torch.round(x.detach().float() / torch.where(s > 0, s, 1.0)), 0.0)
    return q.clamp(-levels, levels).to(torch.int8), scale


def dequantise(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scale.float().unsqueeze(-1)).to(dtype)


def encode_int8(x: torch.Tensor) -> Encoded:
    q, scale = quantise(x, 127)
    return {"q": q, "scale": scale}


def decode_int8(encoded: Encoded, dtype: torch.dtype) -> torch.Tensor:
    return dequantise(encoded["q"], encoded["scale"], dtype)


def encode_int4(x: torch.Tensor) -> Encoded:
    """Two 4-bit codes per byte (``q + 8`` in 1..15), low nibble first; the hidden size must be even."""
    if x.shape[-1] % 2:
        raise ValueError(f"smashed_codec='int4' packs two values per byte and needs an even hidden size, "
                         f"got {x.shape[-1]}; use 'int8'.")
    q, scale = quantise(x, 7)
    nibbles = (q + 8).to(torch.uint8)
    return {"q": nibbles[..., 0::2] | (nibbles[..., 1::2] << 4), "scale": scale}


def decode_int4(encoded: Encoded, dtype: torch.dtype) -> torch.Tensor:
    packed = encoded["q"]
    q = torch.stack([packed & 0x0F, packed >> 4], dim=-1).flatten(-2).to(torch.int8) - 8
    return dequantise(q, encoded["scale"], dtype)


register_codec("none", encode_none, decode_none)
register_codec("bf16", *_cast_codec(torch.bfloat16))
register_codec("fp16", *_cast_codec(torch.float16, FP16_MAX))
register_codec("int8", encode_int8, decode_int8)
register_codec("int4", encode_int4, decode_int4)


# ---------------------------------------------------------------- what travels beside the activations
def length_dtype(longest: int) -> torch.dtype:
    """The smallest wire integer dtype that holds every row length up to ``longest``."""
    return torch.uint8 if longest <= 255 else torch.int16 if longest <= 32767 else torch.int32


def label_dtype(vocab_size: int | None) -> torch.dtype:
    """The smallest wire integer dtype whose codes hold ``vocab_size`` token ids and the ignore index.

    ``uint8``: ids 0..254, 255 = ignore (vocabularies up to 255); ``int16``: id - 32768, 32767 = ignore (up to
    65535, GPT-2's 50257 included); ``int32``: the ids and -100 as they are. ``None`` (vocabulary unknown): int64.
    """
    if vocab_size is None:
        return torch.int64
    return torch.uint8 if vocab_size <= 255 else torch.int16 if vocab_size <= 65535 else torch.int32


_LABEL_CODES = {torch.uint8: (0, 255), torch.int16: (-32768, 32767)}  # dtype -> (offset added to an id, ignore)


def encode_labels(labels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    offset, ignore = _LABEL_CODES.get(dtype, (0, IGNORE_INDEX))
    return torch.where(labels == IGNORE_INDEX, ignore, labels + offset).to(dtype)


def decode_labels(codes: torch.Tensor) -> torch.Tensor:
    offset, ignore = _LABEL_CODES.get(codes.dtype, (0, IGNORE_INDEX))
    codes = codes.long()
    return torch.where(codes == ignore, IGNORE_INDEX, codes - offset)


def check_padding_carries_no_loss(kept: torch.Tensor, labels: torch.Tensor) -> None:
    """Positions that do not travel must carry no label and must not predict a labelled token."""
    kept = kept.to(labels.device)
    if bool(((labels != IGNORE_INDEX) & ~kept).any()) or bool(
            ((labels[:, 1:] != IGNORE_INDEX) & ~kept[:, :-1]).any()):
        raise ValueError(
            "a padding position (attention_mask 0) has a label or predicts a labelled token, so the server would "
            "need its activations: set labels to -100 wherever attention_mask is 0 and pad on the right "
            "(hf_fsl_sage.federation.data.split_lm_collator does both)."
        )


def _right_padded_lengths(mask: torch.Tensor) -> torch.Tensor | None:
    """Each row's length if every row keeps a prefix of its positions (right padding), else ``None``."""
    lengths = mask.sum(dim=1)
    prefix = torch.arange(mask.shape[1], device=mask.device) < lengths.unsqueeze(1)
    return lengths if torch.equal(prefix, mask) else None


class MalformedUpload(ValueError):
    """An encoded message that is not what the codec, the model or the protocol allows."""


def _require(ok: bool, problem: str) -> None:
    if not ok:
        raise MalformedUpload(problem)


# ---------------------------------------------------------------- messages
class ActivationCoder:
    """Encodes the activations in a transport's messages on the sender; checks and decodes them on the receiver.

    An upload (a message of a kind in ``upload_kinds``) is ``(Smashed, labels)``; it travels as a dict:

    - ``rows``: the codec's fields for the hidden states of the positions the attention mask keeps, one row
      per kept position, batch-major (with no mask: every position, shaped ``(batch, seq, ...)``);
    - ``lengths``: with a right-padded mask, each row's length in :func:`length_dtype` (the receiver rebuilds
      the mask, and the batch up to its longest row: positions past it are padding in every row);
      ``mask``: with any other mask, the bool mask itself; both ``None`` without a mask;
    - ``labels``: the labels of the kept positions, coded in :func:`label_dtype` of the vocabulary;
    - ``position_ids``: as the caller gave them (up to the longest row), or ``None``;
    - ``carried`` (only for a family whose server blocks read inputs besides the hidden states, declared in
      ``carried``: name -> shape after the batch and sequence dimensions, and dtype): each such input at the
      kept positions, floating-point ones as the codec's fields, token ids coded like the labels.

    A reply of a kind in ``reply_kinds`` (the gradient w.r.t. the client's last upload) travels as the codec's
    fields at that upload's kept positions (a dict of them by name when the upload had carried activations).
    With the labels kept on the client (``labels_on_client``) an upload carries no labels (``(Smashed, None)``)
    and no token ids: the sender refuses them and the receiver refuses an upload that holds any. The server's
    loss is then a round trip that travels the same way, at the upload's kept positions and at the shape
    ``head_shape`` of the last block's output: the server's output down (a kind in ``head_kinds``, the first
    one) and the gradient w.r.t. it up (the second). A message of a kind in ``rows_kinds`` is a list of row
    tensors (positions, ...), or of dicts of them by activation name, each encoded as it is.

    On the receiver, :meth:`decode` checks the message before it allocates anything (fields, dtypes and shapes of
    the codec at ``hidden_size``; lengths, mask and rows that agree; at most ``limits["batch"]`` rows; labels and
    token ids inside the vocabulary) and raises :class:`MalformedUpload` naming the problem; it returns float
    tensors in ``dtype`` (``"none"``: as sent), zeros at the positions that did not travel and -100 labels there.
    """

    def __init__(self, codec: str = "none", dtype: torch.dtype = torch.float32, *, hidden_size: int | None = None,
                 vocab_size: int | None = None, upload_kinds: tuple[str, ...] = ("smashed",),
                 reply_kinds: tuple[str, ...] = ("gradient",), hidden_shape: tuple[int, ...] | None = None,
                 carried: dict[str, tuple[tuple[int, ...], torch.dtype]] | None = None,
                 head_kinds: tuple[str, str] = ("server_hidden", "head_gradient"),
                 rows_kinds: tuple[str, ...] = ("cut_gradient",), labels_on_client: bool = False,
                 head_shape: tuple[int, ...] | None = None):
        if codec not in CODECS:
            raise ValueError(f"unknown smashed_codec {codec!r}; choose one of {sorted(CODECS)}.")
        self.codec, self.dtype, self.hidden_size, self.vocab_size = CODECS[codec], dtype, hidden_size, vocab_size
        #: The hidden states' shape after the batch and sequence dimensions (``(hidden_size,)`` for most models).
        self.hidden_shape = hidden_shape or ((hidden_size,) if hidden_size is not None else None)
        self.carried = dict(carried or {})
        self.upload_kinds, self.reply_kinds = upload_kinds, reply_kinds
        self.head_kinds, self.rows_kinds, self.labels_on_client = head_kinds, rows_kinds, labels_on_client
        #: The shape of the last block's output after the batch and sequence dimensions (the round trip's).
        self.head_shape = head_shape or self.hidden_shape
        self.labels_dtype = label_dtype(vocab_size)
        # the kept positions of each client's last upload: as sent (client side), as received (server side)
        self._sent: dict[int, torch.Tensor | None] = {}
        self._received: dict[int, torch.Tensor | None] = {}

    # ------------------------------------------------------------ sender
    def encode(self, client_id: int, kind: str, payload: Any) -> Any:
        if payload is None:
            return None
        if kind in self.reply_kinds:
            kept = self._received.get(client_id)
            if isinstance(payload, dict):
                return {n: None if g is None else self.codec.encode(_rows(g.detach(), kept))
                        for n, g in payload.items()}
            return self.codec.encode(_rows(payload.detach(), kept))
        if kind in self.head_kinds:  # down: kept as the server received them; up: as the client sent them
            kept = (self._received if kind == self.head_kinds[0] else self._sent).get(client_id)
            return self.codec.encode(_rows(payload.detach(), kept))
        if kind in self.rows_kinds:
            return [{n: self.codec.encode(r.detach()) for n, r in rows.items()} if isinstance(rows, dict)
                    else self.codec.encode(rows.detach()) for rows in payload]
        if kind not in self.upload_kinds:
            return payload
        if not (isinstance(payload, (tuple, list)) and len(payload) == 2 and isinstance(payload[0], Smashed)):
            raise TypeError(f"an upload of kind {kind!r} is (Smashed, labels); send other payloads under another kind")
        smashed, labels = payload
        if self.labels_on_client and (labels is not None or any(not t.is_floating_point()
                                                                for t in smashed.carried.values())):
            raise ValueError("labels stay on the client (private_labels=True): an upload must carry neither labels "
                             "nor token ids")
        with torch.no_grad():
            return self._encode_upload(client_id, smashed, labels)

    def _encode_upload(self, client_id: int, smashed: Smashed, labels: torch.Tensor | None) -> Encoded:
        hidden, mask, positions = smashed.hidden_states.detach(), smashed.attention_mask, smashed.position_ids
        self._sent[client_id] = mask
        if labels is not None and self.vocab_size is not None:
            outside = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= self.vocab_size))
            if bool(outside.any()):
                raise ValueError(f"label {int(labels[outside][0])} is outside the vocabulary "
                                 f"(0..{self.vocab_size - 1}, or -100 for no loss)")
        lengths = None
        if mask is not None:
            mask = mask.to(torch.bool)
            if labels is not None:
                check_padding_carries_no_loss(mask, labels)
            lengths = _right_padded_lengths(mask)
            if lengths is not None:  # positions past the longest row are padding in every row: they need no room
                longest = int(lengths.max()) if lengths.numel() else 0
                if positions is not None and positions.shape[-1] == mask.shape[1]:
                    positions = positions[..., :longest]
                lengths = lengths.to(length_dtype(mask.shape[1]))
            if labels is not None:
                labels = labels[mask.to(labels.device)]
        message = {"rows": self.codec.encode(_rows(hidden, mask)), "lengths": lengths,
                   "mask": mask if lengths is None else None, "position_ids": positions,
                   "labels": None if labels is None else encode_labels(labels, self.labels_dtype)}
        if self.carried or smashed.carried:
            message["carried"] = {n: self.codec.encode(_rows(t.detach(), mask)) if t.is_floating_point()
                                  else encode_labels(_rows(t, mask), self.labels_dtype)
                                  for n, t in smashed.carried.items()}
        return message

    # ------------------------------------------------------------ receiver
    def decode(self, client_id: int, kind: str, payload: Any, limits: dict[str, int] | None = None) -> Any:
        if payload is None:
            return None
        if kind in self.reply_kinds:
            kept = self._sent.get(client_id)
            lead = (int(kept.sum()),) if kept is not None else None
            shapes = {"hidden_states": self.hidden_shape} | {n: s for n, (s, d) in self.carried.items()
                                                               if d.is_floating_point}
            if len(shapes) == 1:
                self._check_rows(payload, lead, "the reply", self.hidden_shape)
                return _restore(self.codec.decode(payload, self.dtype), kept)
            _require(isinstance(payload, dict) and payload.keys() == shapes.keys(),
                     f"the reply is not a dict of gradients for exactly {sorted(shapes)}")
            for name, rows in payload.items():
                if rows is not None:
                    self._check_rows(rows, lead, f"the reply's {name}", shapes[name])
            return {n: None if rows is None else _restore(self.codec.decode(rows, self._dtype_of(n)), kept)
                    for n, rows in payload.items()}
        if kind in self.head_kinds:
            kept = (self._sent if kind == self.head_kinds[0] else self._received).get(client_id)
            self._check_rows(payload, (int(kept.sum()),) if kept is not None else None, f"the {kind} message",
                             self.head_shape)
            return _restore(self.codec.decode(payload, self.dtype), kept)
        if kind in self.rows_kinds:
            return self._decode_rows_list(kind, payload)
        if kind not in self.upload_kinds:
            return payload
        return self._decode_upload(client_id, payload, (limits or {}).get("batch"))

    def _decode_rows_list(self, kind: str, payload: Any) -> list[torch.Tensor | dict[str, torch.Tensor]]:
        """A list of row tensors (positions, ...) of the hidden states, or dicts of them by activation name."""
        shapes = {"hidden_states": self.hidden_shape} | {n: s for n, (s, d) in self.carried.items()
                                                           if d.is_floating_point}
        _require(isinstance(payload, list), f"the {kind} message is not a list of rows")
        for item in payload:
            named = item if len(shapes) > 1 else {"hidden_states": item}
            _require(isinstance(named, dict) and named.keys() == shapes.keys(),
                     f"the {kind} message holds an entry that is not rows for exactly {sorted(shapes)}")
            for name, rows in named.items():
                _require(len(self._check_rows(rows, None, f"the {kind} message", shapes[name])) == 1,
                         f"the {kind} message holds {name} rows that are not (positions, ...)")
        if len(shapes) == 1:
            return [self.codec.decode(rows, self.dtype) for rows in payload]
        return [{n: self.codec.decode(r, self._dtype_of(n)) for n, r in item.items()} for item in payload]

    def _dtype_of(self, name: str) -> torch.dtype:
        """The dtype a received float tensor of the upload is decoded to: the model's, or a carried input's own."""
        if name == "hidden_states" or self.codec.name == "none":
            return self.dtype
        return self.carried[name][1]

    def _decode_upload(self, client_id: int, message: Any,
                       max_batch: int | None) -> tuple[Smashed, torch.Tensor | None]:
        fields = ["rows", "lengths", "mask", "position_ids", "labels"] + (["carried"] if self.carried else [])
        _require(isinstance(message, dict) and message.keys() == set(fields),
                 f"the upload is not a dict of exactly {', '.join(fields[:-1])} and {fields[-1]}")
        rows, lengths, mask, labels = message["rows"], message["lengths"], message["mask"], message["labels"]
        label_dtypes = (self.labels_dtype,) if self.vocab_size is not None else (*_LABEL_CODES, torch.int32,
                                                                                  torch.int64)
        if self.labels_on_client:
            _require(labels is None, "the upload carries labels, which stay on the client (private_labels=True)")
        else:
            _require(isinstance(labels, torch.Tensor) and labels.dtype in label_dtypes,
                     f"labels are not a tensor of {' or '.join(map(str, label_dtypes))}")
        if lengths is not None or mask is not None:
            _require(lengths is None or mask is None, "the upload carries both row lengths and a mask")
            if lengths is not None:
                _require(isinstance(lengths, torch.Tensor) and lengths.dim() == 1
                         and lengths.dtype in (torch.uint8, torch.int16, torch.int32),
                         "lengths are not a 1-d tensor of uint8, int16 or int32")
                lengths = lengths.long()
                _require(bool((lengths >= 0).all()), "a row length is negative")
                batch, kept = lengths.numel(), int(lengths.sum())
            else:
                _require(isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.dtype == torch.bool,
                         "the mask is not a 2-d bool tensor")
                batch, kept = mask.shape[0], int(mask.sum())
            _require(max_batch is None or batch <= max_batch, f"{batch} rows, more than a batch ({max_batch})")
            lead = self._check_rows(rows, (kept,), "the upload", self.hidden_shape)
            if labels is not None:
                _require(labels.shape == (kept,), f"labels of shape {tuple(labels.shape)} for {kept} kept positions")
        else:
            lead = self._check_rows(rows, None, "the upload", self.hidden_shape)
            _require(len(lead) == 2 and (max_batch is None or lead[0] <= max_batch),
                     f"rows of shape {tuple(lead)}: not (batch <= {max_batch}, seq)")
            if labels is not None:
                _require(labels.shape == lead, f"labels of shape {tuple(labels.shape)} for rows {tuple(lead)}")
        carried = self._check_carried(message.get("carried", {}), lead)
        if labels is not None:
            labels = decode_labels(labels)
            top = self.vocab_size or 2**62
            _require(bool(((labels == IGNORE_INDEX) | (labels >= 0) & (labels < top)).all()),
                     f"a label is outside the vocabulary (0..{top - 1}, or -100)")
        if lengths is not None:
            longest = int(lengths.max()) if batch else 0
            mask = torch.arange(longest, device=lengths.device) < lengths.unsqueeze(1)
        self._received[client_id] = mask
        hidden = _restore(self.codec.decode(rows, self.dtype), mask)
        if mask is not None and labels is not None:
            labels = _restore(labels, mask, IGNORE_INDEX)
        carried = {n: _restore(self.codec.decode(t, self._dtype_of(n)) if isinstance(t, dict) else decode_labels(t),
                               mask) for n, t in carried.items()}
        return Smashed(hidden, mask, message["position_ids"], carried), labels

    def _check_carried(self, carried: Any, lead: tuple[int, ...]) -> dict[str, Any]:
        """The carried inputs of an upload whose hidden-state rows have leading sizes ``lead``, checked against
        the declared names, shapes and dtypes (token ids inside the vocabulary)."""
        _require(isinstance(carried, dict) and carried.keys() == self.carried.keys(),
                 f"the upload carries {sorted(carried) if isinstance(carried, dict) else carried!r} besides the "
                 f"hidden states, expected {sorted(self.carried)}")
        for name, (shape, dtype) in self.carried.items():
            got = carried[name]
            if dtype.is_floating_point:
                self._check_rows(got, lead, f"the upload's {name}", shape)
                continue
            _require(not self.labels_on_client, f"the upload carries {name}, token ids, which stay on the client "
                                                "(private_labels=True)")
            _require(isinstance(got, torch.Tensor) and got.dtype == self.labels_dtype and got.shape == (*lead, *shape),
                     f"the upload's {name} is not a {self.labels_dtype} tensor of shape {(*lead, *shape)}")
            ids = decode_labels(got)
            _require(bool(((ids >= 0) & (ids < (self.vocab_size or 2**62))).all()),
                     f"a value of the upload's {name} is outside the vocabulary")
        return carried

    def _check_rows(self, rows: Any, lead: tuple[int, ...] | None, what: str,
                    shape: tuple[int, ...] | None) -> tuple[int, ...]:
        """``rows`` has the codec's fields, dtypes and per-row shapes (``shape``: the shape of one row, if known;
        ``lead``: the leading sizes, if known); returns the leading sizes."""
        reference = self.codec.encode(torch.zeros(1, *(shape or (2,)), dtype=self.dtype))
        _require(isinstance(rows, dict) and rows.keys() == reference.keys()
                 and all(isinstance(t, torch.Tensor) for t in rows.values()),
                 f"{what} does not hold the fields {sorted(reference)} of smashed_codec={self.codec.name!r}")
        firsts = {tuple(t.shape[:t.dim() - ref.dim() + 1]) for t, ref in zip(rows.values(), reference.values())}
        _require(len(firsts) == 1 and (lead is None or firsts == {lead}),
                 f"{what}'s fields have leading sizes {sorted(firsts)}, expected {lead or 'the same'}")
        for name, ref in reference.items():
            got = rows[name]
            same_dtype = got.dtype == ref.dtype or self.codec.name == "none" and got.is_floating_point()
            tail = tuple(got.shape[got.dim() - ref.dim() + 1:]) if got.dim() >= ref.dim() else None
            size = shape[-1] if shape else None
            _require(same_dtype and tail is not None and (shape is None or tail == tuple(ref.shape[1:])),
                     f"{what}'s {name} is {got.dtype} of shape {tuple(got.shape)}; smashed_codec="
                     f"{self.codec.name!r} at hidden size {size} sends {ref.dtype} rows of shape "
                     f"{tuple(ref.shape[1:])}")
        return next(iter(firsts))


def _rows(x: torch.Tensor, kept: torch.Tensor | None) -> torch.Tensor:
    """The rows of ``x`` (batch, seq, ...) at the positions ``kept`` (batch, seq; bool) marks, or ``x``."""
    return x if kept is None else x[kept.to(x.device)]


def _restore(rows: torch.Tensor, kept: torch.Tensor | None, fill: float = 0) -> torch.Tensor:
    """Inverse of :func:`_rows`: ``fill`` at the positions that did not travel."""
    if kept is None:
        return rows
    out = torch.full((*kept.shape, *rows.shape[1:]), fill, dtype=rows.dtype, device=rows.device)
    out[kept.to(rows.device)] = rows
    return out


__all__ = ["CODECS", "ActivationCoder", "Codec", "MalformedUpload", "check_padding_carries_no_loss",
           "decode_labels", "encode_labels", "label_dtype", "length_dtype", "register_codec"]
