"""Two processes over gloo: process 1 sends crafted messages, process 0 receives them (used by test_wire).

    python tests/wire_peer.py --rank R --store FILE --marker FILE --out FILE

Process 0 (the server) receives every scenario of :data:`SCENARIOS` from client 0 on process 1 through
:class:`DistributedTransport` and writes what each gave (the error, or the received values) to ``--out``.
Process 1 writes the raw transfers itself, bypassing the transport's sender: the header's length and bytes on
the control group, the payload on the data group. The pickle scenario's header would
create ``--marker`` if anything unpickled it.
"""

from __future__ import annotations

import argparse
import json
import pickle
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from hf_fsl_sage.splitting.split import Smashed
from hf_fsl_sage.transport.base import TensorSpec, flatten
from hf_fsl_sage.transport.codecs import ActivationCoder
from hf_fsl_sage.transport.distributed import (
    DistributedTransport,
    FederationCommError,
    encode_header,
    pack,
)
from hf_fsl_sage.transport.groups import ProcessGroups
from hf_fsl_sage.transport.placement import Placement


HIDDEN, BATCH, SEQ, VOCAB = 8, 2, 5, 1000
CODEC = "int8"  # per-token codes and scales: more fields to get wrong than a plain cast
EXPECTED = (Smashed(TensorSpec(("batch", "seq", HIDDEN), (torch.float32,)),
                    TensorSpec(("batch", "seq"), (torch.bool,), optional=True), None),
            TensorSpec(("batch", "seq"), (torch.int64,)))


def coder() -> ActivationCoder:
    return ActivationCoder(CODEC, hidden_size=HIDDEN, vocab_size=VOCAB)


class Payload:
    """Unpickling this creates the marker file: proof that a header was unpickled."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (Path(self.marker),)


def _plain(hidden: int = HIDDEN, batch: int = BATCH) -> tuple[Smashed, torch.Tensor]:
    """An upload as a client computes it: activations, the mask (the second row right-padded) and labels."""
    torch.manual_seed(0)
    mask = torch.ones(batch, SEQ, dtype=torch.bool)
    mask[1, 3:] = False
    labels = torch.arange(batch * SEQ).reshape(batch, SEQ).masked_fill(~mask, -100)
    return Smashed(torch.randn(batch, SEQ, hidden), mask), labels


def _upload(hidden: int = HIDDEN, batch: int = BATCH, change=None) -> dict:
    """An upload as a client sends it: encoded by the activation coder; ``change(message)`` alters it after."""
    message = ActivationCoder(CODEC, hidden_size=hidden, vocab_size=VOCAB).encode(0, "smashed", _plain(hidden, batch))
    if change is not None:
        change(message)
    return message


def _lengths_disagree(message: dict) -> None:
    message["lengths"] = message["lengths"] + 1


def _label_outside_vocabulary(message: dict) -> None:
    message["labels"][0] = VOCAB - 32768  # int16 code of token id VOCAB


def _header(kind="smashed", client=0, payload=None, **override) -> bytes:
    spec, _ = flatten(_upload() if payload is None else payload)
    header = json.loads(encode_header(kind, client, spec))
    header.update(override)
    return json.dumps(header).encode()


def _layout() -> list:
    """The header's layout of a valid upload: int8 codes and bf16 scales of the 8 kept positions, 2 row lengths,
    8 labels."""
    return json.loads(_header())["layout"]


def _raw(header: bytes, payload=None) -> list[bytes | torch.Tensor]:
    """The transfers of one message: the header's length, the header, and (if given) the payload's buffer."""
    parts = [torch.tensor([len(header)], dtype=torch.int64), torch.frombuffer(bytearray(header), dtype=torch.uint8)]
    if payload is not None:
        parts.append(pack(flatten(payload)[1], torch.device("cpu")))
    return parts


def scenarios(marker: str) -> dict[str, list[torch.Tensor]]:
    """Name -> the raw transfers process 1 sends (each followed on the receiving side by one ``to_server``)."""
    return {
        "pickle_header": _raw(pickle.dumps(("smashed", 0, Payload(marker)))),
        "unknown_dtype": _raw(_header(layout=[[[8, HIDDEN], "object"], *_layout()[1:]])),
        "fewer_shapes_than_tensors": _raw(_header(layout=_layout()[:1])),
        "unknown_structure_tag": _raw(_header(structure=["object", "os.system"])),
        "extra_header_field": _raw(_header(reduce="os.system")),
        "huge_allocation": _raw(_header(layout=[[[1 << 30, 1 << 30, HIDDEN], "int8"], *_layout()[1:]])),
        "other_kind": _raw(_header(kind="gradient")),
        "other_client": _raw(_header(client=3)),
        "wrong_hidden_size": _raw(_header(payload=_upload(hidden=HIDDEN + 1)), _upload(hidden=HIDDEN + 1)),
        "batch_over_limit": _raw(_header(payload=_upload(batch=BATCH + 1)), _upload(batch=BATCH + 1)),
        "lengths_disagree_with_rows": _raw(_header(), _upload(change=_lengths_disagree)),
        "label_outside_vocabulary": _raw(_header(), _upload(change=_label_outside_vocabulary)),
        "not_encoded": _raw(_header(payload=_plain()), _plain()),
        "valid": _raw(_header(), _upload()),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--store", required=True)
    parser.add_argument("--marker", required=True)
    parser.add_argument("--out", required=True)
    cli = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{cli.store}", rank=cli.rank, world_size=2,
                            timeout=timedelta(seconds=60))
    try:
        plan = scenarios(cli.marker)
        groups = ProcessGroups(torch.device("cpu"), timedelta(seconds=60))
        groups.form()
        if cli.rank == 1:
            for parts in plan.values():
                for i, part in enumerate(parts):
                    dist.send(part, dst=0, group=groups.control if i < 2 else groups.data)
        else:
            transport = DistributedTransport(Placement.build(0, 2, 1), torch.device("cpu"), timedelta(seconds=30),
                                             groups=groups)
            transport.coder = coder()
            local = coder()  # what the valid message must decode to: the same coder's round trip in one process
            want, want_labels = local.decode(0, "smashed", local.encode(0, "smashed", _plain()))
            outcome = {}
            for name in plan:
                transport.context = f"scenario {name}"
                try:
                    got = transport.to_server(0, "smashed", None, EXPECTED, {"batch": BATCH})
                    outcome[name] = {"ok": torch.equal(got[0].hidden_states, want.hidden_states)
                                     and torch.equal(got[0].attention_mask, want.attention_mask)
                                     and torch.equal(got[1], want_labels) and torch.equal(want_labels, _plain()[1])}
                except FederationCommError as error:
                    outcome[name] = {"error": str(error)}
            Path(cli.out).write_text(json.dumps(outcome, indent=1))
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
