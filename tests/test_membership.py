"""Agreeing on the processes still in a run, over a real rendezvous store (the group itself is not re-formed here)."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
import torch.distributed as dist

from hf_fsl_sage.transport.membership import Membership, ProcessDropped
from tests.processes import free_port


pytestmark = pytest.mark.deadlines


TIMEOUT = timedelta(seconds=1)


def _memberships(world: int, machines: list[str] | None = None) -> list[Membership]:
    port = free_port()
    master = dist.TCPStore("127.0.0.1", port, world, is_master=True, wait_for_workers=False)
    stores = [master] + [dist.TCPStore("127.0.0.1", port, world, is_master=False) for _ in range(world - 1)]
    machines = machines or ["0"] * world
    memberships = [Membership(rank, world, TIMEOUT, store=stores[rank], machine=machines[rank])
                   for rank in range(world)]
    master.wait([f"hf_fsl_sage/membership/machine{rank}" for rank in range(world)])  # each set from its own client
    for m in memberships:
        m.joined = []  # (store prefix, world size) of each group joined; launches re-form real groups

        def join(prefix: str, m: Membership = m) -> bool:
            m.joined.append((prefix.removeprefix("hf_fsl_sage/membership/"), len(m.members)))
            return True

        m._join = join
    return memberships


def _sync_all(memberships: list[Membership], step: int, skip: tuple[int, ...] = ()) -> dict[int, object]:
    """Every process but ``skip`` syncs at ``step`` at once; what each returned or raised."""
    out: dict[int, object] = {}

    def one(m: Membership) -> None:
        try:
            out[m.rank] = m.sync(step, f"global step {step}")
        except BaseException as error:  # noqa: BLE001 -- recorded for the test
            out[m.rank] = error

    threads = [threading.Thread(target=one, args=(m,)) for m in memberships if m.rank not in skip]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return out


def test_every_process_checking_in_keeps_the_members_and_the_group():
    memberships = _memberships(3)
    for step in (1, 2, 3):
        assert _sync_all(memberships, step) == {0: [], 1: [], 2: []}
    assert all(m.members == [0, 1, 2] and m.joined == [] for m in memberships)
    assert memberships[0].wire_rank(2) == 2


def test_a_process_that_does_not_check_in_is_left_out_by_all_the_others():
    memberships = _memberships(4)
    assert _sync_all(memberships, 1) == {r: [] for r in range(4)}
    start = time.monotonic()
    results = _sync_all(memberships, 2, skip=(2,))  # process 2 stalls
    waited = time.monotonic() - start
    assert results == {0: [2], 1: [2], 3: [2]}
    assert TIMEOUT.total_seconds() <= waited < 10 * TIMEOUT.total_seconds()
    for rank in (0, 1, 3):
        m = memberships[rank]
        assert m.members == [0, 1, 3] and m.joined == [("step2/group0", 3)] and m.is_lost(2)
        assert [m.wire_rank(r) for r in (0, 1, 3)] == [0, 1, 2]  # ranks renumbered in the new group
    assert "did not reach the end of global step 2 within ddp_timeout (1 s)" in memberships[0].lost[2]
    # The next step goes on without it.
    assert _sync_all(memberships, 3, skip=(2,)) == {0: [], 1: [], 3: []}

    # Waking up later, it learns that it was left out and leaves with exit status 0.
    with pytest.raises(ProcessDropped) as left:
        memberships[2].sync(2, "global step 2")
    assert left.value.code == 0 and memberships[2].excluded()
    assert "process 2 was dropped from the run at global step 2" in str(left.value)
    assert "restart the run from its last checkpoint" in str(left.value)


def test_a_process_the_server_declared_lost_mid_step_is_not_waited_for():
    memberships = _memberships(3)
    memberships[0].lose(1, "the smashed message of client 0 could not be received from it")
    start = time.monotonic()
    results = _sync_all(memberships, 1, skip=(1,))
    assert results == {0: [1], 2: [1]} and time.monotonic() - start < TIMEOUT.total_seconds()
    assert memberships[1].excluded() and not memberships[2].excluded()
    with pytest.raises(ProcessDropped):
        memberships[1].sync(1, "global step 1")


def test_the_server_is_never_declared_lost():
    memberships = _memberships(2)
    memberships[0].lose(0, "a mistaken report")
    assert not memberships[0].lost and _sync_all(memberships, 1) == {0: [], 1: []}


def test_a_process_that_dies_before_the_new_group_forms_is_left_out_of_it_too():
    """Process 2 stalls; process 3 checks in and then dies before it is ready to join: the group is formed at the
    second attempt, among 0 and 1."""
    memberships = _memberships(4)
    memberships[3]._regroup = lambda key, where: None  # it returns (dies) without saying it is ready
    results = _sync_all(memberships, 1, skip=(2,))
    assert results[0] == results[1] == [2, 3]
    for rank in (0, 1):
        m = memberships[rank]
        assert m.members == [0, 1] and m.joined == [("step1/group1", 2)]
    assert "did not join the process group formed at the end of global step 1" in memberships[0].lost[3]


def test_a_failed_join_is_tried_again_with_whoever_is_still_ready():
    memberships = _memberships(3)
    for m in memberships:  # every join of the first attempt times out (a member died after the go)
        join = m._join
        m._join = lambda prefix, join=join: join(prefix) and "group0" not in prefix
    results = _sync_all(memberships, 1, skip=(2,))
    assert results == {0: [2], 1: [2]}
    assert [p for p, _ in memberships[0].joined] == [p for p, _ in memberships[1].joined] == ["step1/group0",
                                                                                             "step1/group1"]


def test_a_process_that_died_takes_the_others_of_its_launch_with_it():
    """Processes 2 and 3 were started by the second launch: when 3's connection breaks, its launcher stops 2 as
    well, so both leave at once. A timeout (a stall) takes only the silent process; the server's own launch is
    never dropped that way."""
    memberships = _memberships(5, machines=["0", "0", "1", "1", "2"])
    server = memberships[0]
    server.lose(3, "its connection broke", died=True)
    assert sorted(server.lost) == [2, 3]
    assert "process 3, started by the same launch (machine 1), died" in server.lost[2]
    server.lose(4, "it did not answer within the timeout")
    server.lose(1, "its connection broke", died=True)  # on the server's machine: that launcher stops the server too
    assert sorted(server.lost) == [1, 2, 3, 4]
    results = _sync_all(memberships, 1, skip=(1, 2, 3, 4))
    assert results == {0: [1, 2, 3, 4]} and server.joined == [("step1/group0", 1)]
