"""Where each process keeps its share of the federation in a checkpoint directory, without pickle.

One process writes ``federation.safetensors``; under several processes each writes
``federation-rank<r>-of-<P>.safetensors`` with the parties it holds, their optimizers and schedules. The format
(tensors plus a JSON structure and a checksum, nothing executable) is :mod:`.state_io`'s. A process that left the
run (``client_failures="drop"``) writes nothing; the server's process lists it in ``lost_processes.json``, so
that a restart from the checkpoint can bring it back. The random-number states (``rng_state.safetensors``, one
per process under several) and the training arguments (``training_args.json``) replace the files Trainer would
pickle.
"""

from __future__ import annotations

import json
import os
import random
from typing import Any

import numpy as np
import torch

from ..transport.placement import Placement
from .state_io import load_state, save_state


FEDERATION_STATE = "federation.safetensors"
LOST_PROCESSES = "lost_processes.json"
TRAINING_ARGS = "training_args.json"


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


def save_training_args(args: Any, directory: str) -> str:
    """Write the training arguments (a ``TrainingArguments``) as JSON; returns the file written."""
    path = os.path.join(directory, TRAINING_ARGS)
    with open(path, "w") as f:
        f.write(args.to_json_string())
    legacy = os.path.join(directory, "training_args.bin")  # what Trainer pickled just before
    if os.path.isfile(legacy):
        os.remove(legacy)
    return path


def rng_file(directory: str, placement: Placement) -> str:
    """The path of this process's random-number states in checkpoint ``directory``."""
    if not placement.is_distributed:
        return os.path.join(directory, "rng_state.safetensors")
    return os.path.join(directory, f"rng_state-rank{placement.rank}-of-{placement.world_size}.safetensors")


def save_rng_state(directory: str, placement: Placement) -> None:
    """The states of Python's, NumPy's and torch's generators (CPU and CUDA), as Trainer saves them."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    version, python_state, python_gauss = random.getstate()
    state = {"python": [version, torch.tensor(python_state, dtype=torch.int64), python_gauss],
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss],
             "cpu": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.random.get_rng_state_all()
    save_state(state, rng_file(directory, placement))


def load_rng_state(directory: str, placement: Placement) -> None:
    """Restore what :func:`save_rng_state` wrote, if it is there (as Trainer, it is not required)."""
    path = rng_file(directory, placement)
    if not os.path.isfile(path):
        return
    state = load_state(path)
    version, python_state, python_gauss = state["python"]
    random.setstate((version, tuple(int(x) for x in python_state.tolist()), python_gauss))
    kind, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    torch.random.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.random.set_rng_state_all(state["cuda"])
