"""Where each process keeps its share of the federation in a checkpoint directory.

One process writes ``federation.safetensors``; under several processes each writes
``federation-rank<r>-of-<P>.safetensors`` with the parties it holds. The format (tensors plus a JSON
structure and a checksum, nothing executable) is :mod:`.state_io`'s. A process that left the run
(``client_failures="drop"``) writes nothing; the server's process lists it in ``lost_processes.json``, so
that a restart from the checkpoint can bring it back.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from ..transport.placement import Placement
from .state_io import load_state, save_state


FEDERATION_STATE = "federation.safetensors"
LOST_PROCESSES = "lost_processes.json"


def state_file(directory: str, placement: Placement) -> str:
    """The path of this process's federation state in checkpoint ``directory``."""
    if not placement.is_distributed:
        return os.path.join(directory, FEDERATION_STATE)
    return os.path.join(directory, f"federation-rank{placement.rank}-of-{placement.world_size}.safetensors")


def save_federation_state(state: dict[str, Any], directory: str, placement: Placement) -> str:
    """Write this process's federation ``state`` into checkpoint ``directory``; returns the file written."""
    os.makedirs(directory, exist_ok=True)
    path = state_file(directory, placement)
    save_state(state, path)
    return path


def load_federation_state(directory: str, placement: Placement, device: torch.device) -> dict[str, Any]:
    """Read what :func:`save_federation_state` wrote for this process, onto ``device``."""
    path = state_file(directory, placement)
    if not os.path.isfile(path):
        written = sorted(f for f in os.listdir(directory) if f.startswith("federation"))
        raise FileNotFoundError(
            f"{directory} has no {os.path.basename(path)}"
            + (f" (it holds {written}: resume with the number of processes that wrote it)." if written
               else ": it was not written by FSLSageTrainer.")
        )
    return load_state(path, "cpu" if device.type == "cpu" else device)  # plain data: nothing in it is run


def save_lost_processes(directory: str, lost: dict[int, str]) -> None:
    """List the processes that left the run (launch rank -> why) in checkpoint ``directory``."""
    path = os.path.join(directory, LOST_PROCESSES)
    partial = f"{path}.partial-{os.getpid()}"
    with open(partial, "w") as f:
        json.dump({str(rank): cause for rank, cause in sorted(lost.items())}, f, indent=1)
    os.replace(partial, path)


def load_lost_processes(directory: str) -> dict[int, str]:
    """What :func:`save_lost_processes` wrote in ``directory`` (empty if no process had left the run)."""
    path = os.path.join(directory, LOST_PROCESSES)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return {int(rank): str(cause) for rank, cause in json.load(f).items()}
