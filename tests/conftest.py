"""Shared test set-up: quiet transformers, deterministic seeds, few threads, no silent skips in CI."""

import gc
import os

import pytest
import torch
import transformers


def pytest_configure(config: pytest.Config) -> None:
    transformers.logging.set_verbosity_error()
    # Tiny models: one thread avoids oversubscription, which slows them down 10x or more on 2 cores.
    torch.set_num_threads(1)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``deadlines`` check what happens when a process or node stops answering, against deadlines of
    a few seconds: under pytest-xdist (``-n 3 --dist loadgroup``, the CI command) those of one kind (the mark's
    argument: process groups by default, ``"flower"`` for Flower nodes, ``"smoke"`` for the smoke script) share
    an xdist group, so two of a kind never run at once.

    Tests marked ``slow`` go first: xdist hands out work in this order (groups of several tests before single
    tests), and on 2 cores the suite ends sooner when the long tests start early and the short ones fill in."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
    for item in items:
        mark = item.get_closest_marker("deadlines")
        if mark:
            item.add_marker(pytest.mark.xdist_group(f"deadlines-{mark.args[0] if mark.args else 'processes'}"))


def pytest_collection_finish(session: pytest.Session) -> None:
    # Trainer.train() runs a full garbage collection; over the ~500k objects torch and transformers leave after
    # import that costs ~0.5 s of CPU per run. Frozen objects are skipped by the collector (they are never garbage).
    gc.collect()
    gc.freeze()


@pytest.fixture(autouse=True, scope="module")
def _freeze_survivors():
    """What a test module leaves alive (lazily imported model modules, cached data) is frozen too."""
    yield
    gc.collect()
    gc.freeze()


@pytest.fixture(scope="session")
def equal_runs(tmp_path_factory: pytest.TempPathFactory):
    """The runs several tests compare between one process and three (:data:`tests.launches.EQUAL_RUNS`), made
    once: in one process, then in one launch of three. Its tests share the xdist group ``EQUAL_GROUP``."""
    from tests.launches import launch_equal_runs

    return launch_equal_runs(tmp_path_factory.mktemp("equal_runs"))


@pytest.fixture(scope="session")
def dropped_in_one_process(tmp_path_factory: pytest.TempPathFactory):
    """The one-process run that stands for losing process 2 of three at global step 3 (its clients 1 and 3 fail
    from then on, client_failures="drop"), made once for the tests that compare a stalled process with it (all of
    the ``deadlines`` group, so on one worker)."""
    from tests.launches import check, run_one

    out = tmp_path_factory.mktemp("dropped") / "one"
    check(run_one(out, "--client_failures", "drop", "--fail_clients", "1", "3", "--fail_from_step", "3"))
    return out


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Under ``CI=true`` a skipped test fails: CI must run every test (Java on PATH, ../shared/data beside the
    clone)."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("CI", "").lower() == "true" and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, where every test must run: {reason}"


def pytest_terminal_summary(terminalreporter) -> None:
    """List the documentation blocks that are not run (they need the network or a GPU), by name and reason."""
    from tests.doc_blocks import pages, python_blocks, runs

    skipped = [b for p in pages() for b in python_blocks(p) if not runs(b)]
    if skipped:
        terminalreporter.write_line("documentation blocks not run: " + ", ".join(f"{b.name} ({b.skip})"
                                                                                 for b in skipped))
