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
(:mod:`hf_fsl_sage.transport.base`): the hidden states of every
:class:`~hf_fsl_sage.splitting.split.Smashed` in a payload, and the gradient
sent back for the client's last upload. Only the positions the attention mask
keeps travel; the receiver puts zeros at the others. That is exact: a masked
position is never attended to, so the server's outputs at kept positions do
not depend on it, and its own output carries no loss (checked on each upload),
so the gradient the server sends back is exactly zero there.
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


# ---------------------------------------------------------------- padding positions
def kept_positions(x: torch.Tensor, kept: torch.Tensor | None) -> torch.Tensor:
    """The rows of ``x`` (batch, seq, ...) at the positions ``kept`` (batch, seq; bool) marks, or ``x``."""
    return x if kept is None else x[kept]


def restore_positions(rows: torch.Tensor, kept: torch.Tensor | None, fill: float = 0) -> torch.Tensor:
    """Inverse of :func:`kept_positions`: ``fill`` at the positions that did not travel."""
    if kept is None:
        return rows
    out = torch.full((*kept.shape, *rows.shape[1:]), fill, dtype=rows.dtype, device=rows.device)
    out[kept.to(rows.device)] = rows
    return out


def check_padding_carries_no_loss(kept: torch.Tensor, labels: torch.Tensor) -> None:
    """A position that does not travel must not predict a labelled token (its output would carry loss)."""
    read = labels[:, 1:] != IGNORE_INDEX
    if bool((read & ~kept[:, :-1].to(read.device)).any()):
        raise ValueError(
            "a padding position (attention_mask 0) predicts a labelled token, so the server would need its "
            "activations: set labels to -100 wherever attention_mask is 0 and pad on the right "
            "(hf_fsl_sage.federation.data.split_lm_collator does both)."
        )


# ---------------------------------------------------------------- messages
class ActivationCoder:
    """Applies one codec to the activations in the messages of a transport.

    On the sender :meth:`encode` turns every :class:`Smashed` of a payload into
    ``Smashed({encoded hidden rows}, attention_mask, position_ids)``, and labels
    that travel beside it (an integer tensor of the mask's shape) into their kept
    positions when every dropped one is -100. A reply of a kind in
    ``reply_kinds`` (a gradient w.r.t. the client's last upload) is encoded at
    that upload's kept positions. :meth:`decode` on the receiver inverts both,
    returning float tensors in ``dtype`` (``"none"`` returns them as sent).
    Both sides remember the kept positions of each client's last upload.
    """

    def __init__(self, codec: str = "none", dtype: torch.dtype = torch.float32,
                 reply_kinds: tuple[str, ...] = ("gradient",)):
        if codec not in CODECS:
            raise ValueError(f"unknown smashed_codec {codec!r}; choose one of {sorted(CODECS)}.")
        self.codec, self.dtype, self.reply_kinds = CODECS[codec], dtype, reply_kinds
        self._kept: dict[int, torch.Tensor | None] = {}

    def encode(self, client_id: int, kind: str, payload: Any) -> Any:
        if payload is None:
            return None
        if kind in self.reply_kinds:
            return self.codec.encode(kept_positions(payload.detach(), self._kept.get(client_id)))
        with torch.no_grad():
            return self._walk(payload, lambda s, labels: self._encode_smashed(client_id, s, labels))

    def decode(self, client_id: int, kind: str, payload: Any) -> Any:
        if payload is None:
            return None
        if kind in self.reply_kinds:
            return restore_positions(self.codec.decode(payload, self.dtype), self._kept.get(client_id))
        return self._walk(payload, lambda s, labels: self._decode_smashed(client_id, s, labels))

    # Smashed, with the labels that travel beside it
    def _encode_smashed(self, client_id: int, smashed: Smashed, labels: torch.Tensor | None):
        kept = smashed.attention_mask
        self._kept[client_id] = kept
        hidden = self.codec.encode(kept_positions(smashed.hidden_states.detach(), kept))
        if labels is not None and kept is not None:
            check_padding_carries_no_loss(kept, labels)
            if bool((labels[~kept] == IGNORE_INDEX).all()):
                labels = labels[kept]
        return Smashed(hidden, smashed.attention_mask, smashed.position_ids), labels

    def _decode_smashed(self, client_id: int, smashed: Smashed, labels: torch.Tensor | None):
        kept = smashed.attention_mask
        self._kept[client_id] = kept
        hidden = restore_positions(self.codec.decode(smashed.hidden_states, self.dtype), kept)
        if labels is not None and kept is not None and labels.dim() == 1:
            labels = restore_positions(labels, kept, IGNORE_INDEX)
        return Smashed(hidden, smashed.attention_mask, smashed.position_ids), labels

    def _walk(self, obj: Any, fn: Callable[[Smashed, torch.Tensor | None], tuple[Smashed, torch.Tensor | None]]):
        if isinstance(obj, Smashed):
            return fn(obj, None)[0]
        if isinstance(obj, dict):
            return {k: self._walk(v, fn) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            items = list(obj)
            if len(items) == 2 and isinstance(items[0], Smashed) and _labels_beside(items[0], items[1]):
                items = list(fn(items[0], items[1]))
            else:
                items = [self._walk(v, fn) for v in items]
            return items if isinstance(obj, list) else tuple(items)
        return obj


def _labels_beside(smashed: Smashed, other: Any) -> bool:
    """``other`` is per-position labels of ``smashed``: integers laid out like its hidden states' positions."""
    if not isinstance(other, torch.Tensor) or other.is_floating_point() or other.dtype == torch.bool:
        return False
    mask = smashed.attention_mask
    return other.shape == (mask.shape if mask is not None else smashed.hidden_states.shape[:-1]) or (
        mask is not None and other.dim() == 1)


__all__ = ["CODECS", "ActivationCoder", "Codec", "check_padding_carries_no_loss", "kept_positions", "register_codec",
           "restore_positions"]
