"""The control path of a multi-process run, whatever carries the tensors: control on gloo, payloads on the data
group, every wait bounded by this package (NCCL's semantics mocked over gloo by :mod:`tests.nccl_like`), process 0
waited for without a collective deadline, and re-formed groups bound to each process's own GPU."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from hf_fsl_sage.transport.base import FederationCommError
from hf_fsl_sage.transport.groups import ProcessGroups
from hf_fsl_sage.transport.membership import Membership
from hf_fsl_sage.transport.waiting import ProcessZero
from tests.launches import adapter, check, detection_seconds, result, run_three
from tests.processes import free_port


pytestmark = pytest.mark.deadlines


# ---------------------------------------------------------------- re-formed groups (no processes)
@pytest.mark.parametrize("device, backend, bound", [
    (torch.device("cuda", 3), "nccl", torch.device("cuda", 3)),
    (torch.device("cpu"), "gloo", None),
])
def test_a_reformed_group_binds_each_process_to_its_own_device(monkeypatch, device, backend, bound):
    """Process 3 of 4, after process 1 left: its rank in the new group is 2, its GPU is still 3 (NCCL would pick GPU
    2 from the rank, another process's)."""
    joined = {}
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kwargs: joined.update(backend=backend, **kwargs))
    groups = ProcessGroups(device, timedelta(seconds=5), backend=backend)
    monkeypatch.setattr(groups, "form", lambda: joined.update(formed=True))
    membership = Membership(3, 4, timedelta(seconds=5), store=dist.HashStore(), groups=groups)
    membership.backend, membership.members = backend, [0, 2, 3]
    assert membership._join("step1/group0")
    assert (joined["rank"], joined["world_size"], joined["device_id"], joined["formed"]) == (2, 3, bound, True)


# ---------------------------------------------------------------- waiting for process 0 (threads, a real store)
def _processes(world: int, store_timeout: float = 1.0) -> list[ProcessZero]:
    port = free_port()
    master = dist.TCPStore("127.0.0.1", port, world, is_master=True, wait_for_workers=False,
                           timeout=timedelta(seconds=store_timeout))
    stores = [master] + [dist.TCPStore("127.0.0.1", port, world, is_master=False,
                                       timeout=timedelta(seconds=store_timeout)) for _ in range(world - 1)]
    return [ProcessZero(stores[r], r, world) for r in range(world)]


def _in_threads(fn, ranks) -> tuple[dict[int, object], list[threading.Thread]]:
    out: dict[int, object] = {}

    def one(rank):
        try:
            out[rank] = fn(rank)
        except BaseException as error:  # noqa: BLE001 -- recorded for the test
            out[rank] = error

    threads = [threading.Thread(target=one, args=(r,), daemon=True) for r in ranks]
    for t in threads:
        t.start()
    return out, threads


def test_the_others_wait_for_process_zero_longer_than_any_store_deadline():
    """Process 0 takes 3 s where the store's own timeout is 1 s: the others wait, get its JSON, and the key goes."""
    zero = _processes(3)
    started = time.monotonic()
    out, threads = _in_threads(lambda r: zero[r].share(None, "evaluation"), [1, 2])
    time.sleep(3)
    assert out == {}
    zero[0].share({"eval_loss": 2.5}, "evaluation")
    for t in threads:
        t.join(10)
    assert out == {1: {"eval_loss": 2.5}, 2: {"eval_loss": 2.5}} and time.monotonic() - started >= 3
    assert not zero[0].store.check(["hf_fsl_sage/main/evaluation/1"])  # the last reader deleted it
    out, threads = _in_threads(lambda r: zero[r].share(None, "evaluation"), [1, 2])  # the next call, the next key
    zero[0].share([1, 2], "evaluation")
    for t in threads:
        t.join(10)
    assert out == {1: [1, 2], 2: [1, 2]}


def test_process_zero_failing_in_its_phase_stops_the_others_with_its_error():
    zero = _processes(2)

    def waiting(rank):
        with zero[rank].first("central pre-training"):
            return "ran"

    out, threads = _in_threads(waiting, [1])
    with pytest.raises(ValueError, match="no data"), zero[0].first("central pre-training"):
        raise ValueError("no data")
    threads[0].join(10)
    assert isinstance(out[1], FederationCommError)
    assert "process 0 failed during central pre-training, so process 1 stops too: ValueError: no data" in str(out[1])


def test_a_waiting_process_stops_when_process_zeros_store_goes():
    port = free_port()
    host = subprocess.Popen([sys.executable, "-c", "import time, torch.distributed as d; "
                             f"s = d.TCPStore('127.0.0.1', {port}, 2, True, wait_for_workers=False); time.sleep(2)"])
    try:
        for _ in range(100):  # until the store is up
            try:
                store = dist.TCPStore("127.0.0.1", port, 2, is_master=False, timeout=timedelta(seconds=1))
                break
            except Exception:  # noqa: BLE001 -- not yet
                time.sleep(0.1)
        with pytest.raises(FederationCommError, match="process 1 lost the launch's store while waiting for process 0 "
                                                      r"\(evaluation\): process 0 or its machine stopped"):
            ProcessZero(store, 1, 2).share(None, "evaluation")
    finally:
        host.kill()
        host.wait()


# ---------------------------------------------------------------- NCCL's semantics, mocked (real processes)
NCCL_LIKE = ("--data_backend", "nccl_like", "--stall_payload_rank", "2", "--stall_payload_step", "3",
             "--ddp_timeout", "10")


@pytest.mark.slow
def test_nccl_semantics_a_stall_between_header_and_payload_is_reported_before_the_watchdog(tmp_path):
    """Payloads on a backend whose ``wait()`` returns at once and whose watchdog stops the process at the group's
    timeout: process 2 stops after the header of its upload at global step 3. The server's process reports it
    after ddp_timeout (10 s), by name, and the watchdog never acts."""
    done = run_three(tmp_path / "raise", *NCCL_LIKE, "--stall_seconds", "3600", timeout=300)
    assert done.returncode != 0
    assert "FederationCommError: the server's process could not receive the smashed message of client 1 from " \
           "process 2 (client 1) at round 1, global step 3: that process stopped, died, or did not answer within " \
           "the 10 s timeout (ddp_timeout)" in done.stderr
    assert 10 <= detection_seconds(tmp_path / "raise") < 40 and "watchdog" not in done.stderr


@pytest.mark.slow
def test_nccl_semantics_a_stalled_process_is_dropped_and_the_rest_trains_exactly_like_one_process(tmp_path,
                                                                                               dropped_in_one_process):
    """The same stall with client_failures="drop": the server's process gives up on the payload, aborts the data group
    that still holds the transfer when the group is formed again, and the run equals the one-process run in which
    clients 1 and 3 fail from global step 3 on. Every payload before and after crossed on the mocked backend, read
    only once complete (relying on ``wait()`` would read stale bytes)."""
    done = run_three(tmp_path / "three", *NCCL_LIKE, "--client_failures", "drop", "--stall_seconds", "25", timeout=600)
    check(done)
    assert "process 2 is out of the run: the smashed message of client 1 could not be received from it at round 1, " \
           "global step 3" in done.stderr
    assert "[rank 0] nccl_like: aborted with 1 pending transfer(s)" in done.stderr and "watchdog" not in done.stderr
    a, b = adapter(dropped_in_one_process), adapter(tmp_path / "three")
    assert a.keys() == b.keys() and max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5
    assert result(tmp_path / "three")["ledger"]["up"] == result(dropped_in_one_process)["ledger"]["up"] > 0
