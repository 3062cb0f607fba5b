"""The ``ServerApp`` and ``ClientApp`` of a federated split run on Flower.

Both apps build the run's :class:`~hf_fsl_sage.trainer.FSLSageTrainer` with the same function, as every process
of an ``accelerate launch`` runs the same script: the server's trains it (evaluation, logs, checkpoints,
export, model card and Hub push happen there, on the global model), each node's runs its clients' share of
every global step.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, NamedTuple

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from transformers.utils import logging

from ..transport.base import Transport
from .node import handle
from .transport import MESSAGE_TYPE, FlowerServerTransport


logger = logging.get_logger(__name__)

#: ``make_trainer(context, transport)``: the run's trainer, built with ``FSLSageTrainer(..., transport=transport)``.
TrainerFactory = Callable[[Context, Transport], Any]
#: ``after_training(trainer, context)``: what the server does with the trained model (default: save it).
AfterTraining = Callable[[Any, Context], None]


def _save(trainer: Any, context: Context) -> None:
    trainer.save_model()


def wait_for_nodes(grid: Grid, count: int, seconds: float) -> list[int]:
    """The IDs of the first ``count`` SuperNodes connected to the SuperLink (by ID), waiting at most ``seconds``."""
    deadline = time.monotonic() + seconds
    while len(nodes := sorted(grid.get_node_ids())) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(nodes)} of the {count} SuperNodes this run needs connected within "
                               f"{seconds:.0f} s: start more with `flower-supernode --superlink <address>`, or "
                               "lower num-supernodes.")
        time.sleep(0.5)
    return nodes[:count]


class FlowerApps(NamedTuple):
    """The two apps of a run. Give each its own module-level name (``server_app = apps.server_app``): Flower finds
    the apps named in ``pyproject.toml`` by reading the module's top-level assignments."""

    server_app: ServerApp
    client_app: ClientApp


def flower_apps(make_trainer: TrainerFactory, num_nodes: int = 2, after_training: AfterTraining = _save,
                wait_seconds: float = 300.0) -> FlowerApps:
    """The ``ServerApp`` and ``ClientApp`` of a run whose trainer ``make_trainer(context, transport)`` builds.

    Args:
        make_trainer: builds the run's trainer, passing ``transport`` to ``FSLSageTrainer``; the same on every
            process (read settings from ``context.run_config``, the same everywhere, rather than from the node).
        num_nodes: SuperNodes the run places its clients on (run config ``num-supernodes`` overrides it); the
            first ones connected, by node ID. A SuperNode that connects later is not used by this run.
        after_training: what the ServerApp does after ``trainer.train()`` (evaluate, ``push_to_hub``...); by
            default ``trainer.save_model()``.
        wait_seconds: how long the ServerApp waits for the SuperNodes to connect.

    Run config keys read: ``num-supernodes`` and ``resume-from-checkpoint`` (a checkpoint directory, or ``""``).
    """
    server_app, client_app = ServerApp(), ClientApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        count = int(context.run_config.get("num-supernodes", num_nodes))
        nodes = wait_for_nodes(grid, count, wait_seconds)
        transport = FlowerServerTransport(grid, nodes, timeout=float("inf"))
        trainer = make_trainer(context, transport)
        transport.timeout = float(trainer.args.ddp_timeout)
        transport.attach(trainer)
        logger.info(f"Federated split learning on Flower: SuperNodes {nodes} ({trainer.placement.describe()})")
        trainer.train(resume_from_checkpoint=context.run_config.get("resume-from-checkpoint") or None)
        if transport.lost:
            logger.warning("The run finished without " + "; ".join(
                f"{transport.node_of(r)}: {why}" for r, why in sorted(transport.lost.items())))
        late = sorted(set(grid.get_node_ids()) - set(nodes))
        if late:
            logger.warning(f"SuperNodes {late} connected after the run started and took no part in it.")
        after_training(trainer, context)

    @client_app.train(MESSAGE_TYPE.split(".", 1)[1])
    def step(message: Message, context: Context) -> Message:
        return handle(message, context, make_trainer)

    return FlowerApps(server_app, client_app)
