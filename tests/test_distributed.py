"""Server and clients in separate processes: placement, the wire format, equality with one process, failures."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from hf_fsl_sage.splitting.split import Smashed
from hf_fsl_sage.transport.base import payload_nbytes
from hf_fsl_sage.transport.distributed import flatten, pack, unflatten, unpack
from hf_fsl_sage.transport.placement import Placement, party_seed
from tests.launches import (
    ALGORITHMS,
    EQUAL_GROUP,
    ROOT,
    RUN,
    adapter,
    check,
    detection_seconds,
    env,
    result,
    run_one,
    run_three,
)
from tests.processes import free_port, run_together


TWO_MACHINES = ROOT / "accelerate_configs" / "two_machines.yaml"


# ---------------------------------------------------------------- placement and wire format (no processes)
def test_round_robin_placement_puts_the_server_alone_on_process_0():
    p = Placement.build(rank=0, world_size=3, num_clients=5)
    assert p.client_ranks == (1, 2, 1, 2, 1) and p.is_server and not p.holds_client(0)
    assert p.describe() == "process 0: server; process 1: clients [0, 2, 4]; process 2: clients [1, 3]"
    assert Placement.build(rank=2, world_size=3, num_clients=5).clients_of(2) == [1, 3]
    single = Placement.build(rank=0, world_size=1, num_clients=4)
    assert single.is_server and all(single.holds_client(c) for c in range(4)) and not single.is_distributed
    explicit = Placement.build(rank=1, world_size=3, num_clients=3, client_ranks=[0, 1, 2])
    assert explicit.holds_client(1) and not explicit.is_server and explicit.clients_of(0) == [0]


@pytest.mark.parametrize("world, clients, ranks, message", [
    (4, 2, None, "processes [3] of 4 would run no client"),
    (3, 2, [1, 3], "must give one process in 0..2 to each of the 2 clients"),
    (3, 2, [1], "must give one process in 0..2 to each of the 2 clients"),
    (1, 2, [0, 1], "this run has a single process"),
])
def test_bad_placements_are_refused_with_the_fix(world, clients, ranks, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        Placement.build(rank=0, world_size=world, num_clients=clients, client_ranks=ranks)


def test_party_seed_depends_on_the_party_and_step_only():
    assert party_seed(0, 3, 1, 2, "client") == party_seed(0, 3, 1, 2, "client")
    seeds = {party_seed(0, r, s, c, role) for r in range(3) for s in range(3) for c in range(3)
             for role in ("client", "server")}
    assert len(seeds) == 54


def test_wire_format_round_trips_every_payload_exactly():
    torch.manual_seed(0)
    smashed = Smashed(torch.randn(2, 5, 8, dtype=torch.bfloat16),
                      torch.tensor([[1, 1, 1, 0, 0]] * 2, dtype=torch.bool), None)
    payload = {"act": (smashed, torch.randint(0, 50, (2, 5))), "w": [torch.randn(3, 3), torch.tensor(2.5)], "n": None}
    spec, tensors = flatten(payload)
    buffer = pack(tensors, torch.device("cpu"))
    assert buffer.dtype == torch.uint8 and buffer.numel() % 16 == 0 and buffer.numel() >= payload_nbytes(payload)
    back = unflatten(spec, unpack(buffer, [(tuple(t.shape), t.dtype) for t in tensors]))
    assert back["n"] is None and back["act"][0].position_ids is None and isinstance(back["act"], tuple)
    assert torch.equal(back["act"][0].hidden_states, smashed.hidden_states)
    assert back["act"][0].attention_mask.dtype == torch.bool and torch.equal(back["act"][0].attention_mask,
                                                                             smashed.attention_mask)
    assert torch.equal(back["act"][1], payload["act"][1]) and torch.equal(back["w"][0], payload["w"][0])
    assert back["w"][1].shape == () and float(back["w"][1]) == 2.5
    assert payload_nbytes(back) == payload_nbytes(payload) == 2 * 5 * 8 * 2 + 10 + 10 * 8 + 9 * 4 + 4


# ---------------------------------------------------------------- real processes
@pytest.mark.slow
@pytest.mark.xdist_group(EQUAL_GROUP)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_three_processes_train_exactly_like_one(equal_runs, algorithm):
    """Server on process 0, clients round-robin on 1 and 2: same adapters, same bytes, same losses."""
    one, three = result(equal_runs / "one" / algorithm), result(equal_runs / "three" / algorithm)
    assert three["world_size"] == 3 and three["placement"].startswith("process 0: server; process 1: clients [0, 2]")
    a, b = adapter(equal_runs / "one" / algorithm), adapter(equal_runs / "three" / algorithm)
    assert a.keys() == b.keys() and len(a) == 6
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5
    assert any(float(t.abs().max()) > 1e-3 for k, t in a.items() if "lora_B" in k)  # the adapters did train
    assert three["ledger"] == one["ledger"] and one["ledger"]["up"] > 0
    assert three["eval"]["eval_loss"] == pytest.approx(one["eval"]["eval_loss"], abs=1e-5)
    for key in ("loss", "server_loss"):
        logged = [[h[key] for h in r["log_history"] if "loss" in h] for r in (one, three)]
        assert len(logged[0]) == 4 and logged[0] == pytest.approx(logged[1], abs=1e-5)


@pytest.mark.slow
@pytest.mark.xdist_group(EQUAL_GROUP)
def test_three_processes_keep_labels_on_the_clients_exactly_like_one(equal_runs):
    """FSL-SAGE with private labels and noised activations: the round trip of every upload, the cut gradients
    sent down and the clients' own alignment cross real process boundaries; same adapters, bytes and losses."""
    one, three = result(equal_runs / "one" / "private_labels"), result(equal_runs / "three" / "private_labels")
    a, b = adapter(equal_runs / "one" / "private_labels"), adapter(equal_runs / "three" / "private_labels")
    assert a.keys() == b.keys() and max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5
    assert three["ledger"] == one["ledger"]
    kinds = one["ledger"]["messages"]
    assert kinds["smashed_up"] == kinds["server_hidden_down"] == kinds["head_gradient_up"] > 0
    assert kinds["cut_gradient_down"] > 0 and "aux_model_down" not in kinds
    assert three["eval"]["eval_loss"] == pytest.approx(one["eval"]["eval_loss"], abs=1e-5)
    for key in ("loss", "server_loss"):
        logged = [[h[key] for h in r["log_history"] if "loss" in h] for r in (one, three)]
        assert len(logged[0]) == 4 and logged[0] == pytest.approx(logged[1], abs=1e-5)


@pytest.mark.deadlines
@pytest.mark.slow
def test_killed_client_process_stops_the_job_with_a_clear_error_and_the_checkpoint_resumes(tmp_path):
    """Process 2 dies (SIGKILL) in round 1: the job exits non-zero well within the timeout, the server names
    the process and the round, and resuming the last checkpoint in three processes gives the uninterrupted result."""
    died = run_three(tmp_path / "killed", "--save_steps", "2", "--kill_rank", "2", "--kill_step", "3",
                     "--ddp_timeout", "60", monitor_interval=5)
    assert died.returncode != 0, died.stderr[-3000:]
    assert detection_seconds(tmp_path / "killed") < 30  # a dead peer is seen at once, not after the 60 s timeout
    assert "FederationCommError: the server's process could not receive the smashed message of client 1 from " \
           "process 2 (client 1) at round 1, global step 3" in died.stderr
    checkpoint = tmp_path / "killed" / "checkpoint-2"
    written = sorted(p.name for p in checkpoint.iterdir())
    expected = [f"federation-rank{r}-of-3.safetensors" for r in range(3)]
    assert expected == [n for n in written if n.startswith("federation")]
    assert "trainer_state.json" in written and "adapter_model.safetensors" in written
    assert [f"rng_state-rank{r}-of-3.safetensors" for r in range(3)] == [n for n in written if n.startswith("rng")]
    assert not [n for n in written if n.endswith((".pt", ".pth", ".bin"))]  # no pickle, Trainer's files included
    assert not (tmp_path / "killed" / "checkpoint-4").exists()

    check(run_three(tmp_path / "killed", "--save_steps", "2", "--resume", str(checkpoint)))
    # The uninterrupted run (in one process, equal to three), then a checkpoint written by three processes, which
    # cannot silently resume in one: both in one launch.
    wrong = run_one(tmp_path / "whole", "--and", "--output_dir", str(tmp_path / "one"), "--resume", str(checkpoint))
    a, b = adapter(tmp_path / "whole"), adapter(tmp_path / "killed")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    assert result(tmp_path / "killed")["ledger"] == result(tmp_path / "whole")["ledger"]
    assert wrong.returncode != 0
    assert "has no federation.safetensors (it holds ['federation-rank0-of-3.safetensors'" in wrong.stderr
    assert "resume with the number of processes that wrote it" in wrong.stderr


@pytest.mark.deadlines
@pytest.mark.slow
def test_silent_client_process_times_out_with_a_clear_error(tmp_path):
    """Process 2 hangs in round 1: the server gives up after ddp_timeout and the job exits non-zero."""
    hung = run_three(tmp_path / "hung", "--stall_rank", "2", "--kill_step", "3", "--ddp_timeout", "10", timeout=300)
    assert hung.returncode != 0, hung.stderr[-3000:]
    assert 10 <= detection_seconds(tmp_path / "hung") < 40  # the timeout, plus the rest of a step on 2 shared cores
    assert "could not receive the smashed message of client 1 from process 2 (client 1) at round 1, global step 3: " \
           "that process stopped, died, or did not answer within the 10 s timeout (ddp_timeout)" in hung.stderr


@pytest.mark.deadlines
@pytest.mark.slow
def test_a_stalled_client_process_is_dropped_and_the_others_train_on(tmp_path, dropped_in_one_process):
    """client_failures="drop": process 2 (clients 1 and 3) hangs for 30 s after global step 3. The server gives up
    on it after ddp_timeout (10 s) in round 1, the others go on in a re-formed group and finish, and process 2,
    waking up, learns it was left out and exits with status 0. The result is exactly that of one process in
    which clients 1 and 3 fail at every step from global step index 3 on; only the client models no longer sent
    to them (rounds 2 and 3) are missing from the bytes. Restarted from a checkpoint written without it, process 2
    rejoins and its clients train again from the next round."""
    done = run_three(tmp_path / "three", "--client_failures", "drop", "--stall_rank", "2", "--kill_step", "3",
                     "--stall_seconds", "30", "--ddp_timeout", "10", "--save_steps", "2", timeout=600)
    check(done)
    assert "process 2 is out of the run: the smashed message of client 1 could not be received from it at " \
           "round 1, global step 3: it stopped, died, or did not answer within the 10 s timeout" in done.stderr
    assert "Going on without process 2 and its clients [1, 3] from round 1, global step 3" in done.stderr
    assert "process 2 was dropped from the run at" in done.stderr and "exits with status 0" in done.stderr
    a, b = adapter(dropped_in_one_process), adapter(tmp_path / "three")
    assert a.keys() == b.keys() and max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5
    one, three = result(dropped_in_one_process)["ledger"], result(tmp_path / "three")["ledger"]
    model_bytes = one["by_kind"]["client_model_down"] // one["messages"]["client_model_down"]
    assert three["up"] == one["up"] > 0 and three["down"] == one["down"] - 2 * 2 * model_bytes
    logged = [h["dropped_clients"] for h in result(tmp_path / "three")["log_history"] if "dropped_clients" in h]
    assert logged == [0, 2, 2, 2]

    checkpoint = tmp_path / "three" / "checkpoint-6"  # written without process 2, at the end of round 2
    assert sorted(p.name for p in checkpoint.glob("federation*")) == [f"federation-rank{r}-of-3.safetensors"
                                                                     for r in (0, 1)]
    lost = json.loads((checkpoint / "lost_processes.json").read_text())
    assert list(lost) == ["2"] and "could not be received from it at round 1, global step 3" in lost["2"]
    resumed = run_three(tmp_path / "resumed", "--client_failures", "drop", "--resume", str(checkpoint))
    check(resumed)
    assert "Process 2 had left the run before this checkpoint" in resumed.stderr
    back = result(tmp_path / "resumed")["ledger"]["messages"]
    gone = result(tmp_path / "three")["ledger"]["messages"]
    # Round 3 (two local steps) with clients 1 and 3 back: their uploads, models sent and received.
    assert back["smashed_up"] - gone["smashed_up"] == 4
    assert back["client_model_down"] - gone["client_model_down"] == 2
    assert back["client_model_up"] - gone["client_model_up"] == 2


@pytest.mark.slow
@pytest.mark.xdist_group(EQUAL_GROUP)
def test_two_machines_on_one_host_train_exactly_like_one(tmp_path, equal_runs):
    """The shipped two-machine config, as two launches on this host (machine ranks 0 and 1, two processes each):
    the server and client 0's process on "machine" 0, the other clients on "machine" 1; same result as one process."""
    for attempt in range(3):  # another port if the chosen one was taken before machine 0's launcher bound it
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(TWO_MACHINES),
                  "--num_processes", "4", "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port())]
        script = [str(RUN), "--output_dir", str(tmp_path / "two")]
        done = run_together([[*launch, "--machine_rank", str(r), *script] for r in (0, 1)], env(), timeout=900)
        if all(d.returncode == 0 for d in done) or "already in use" not in done[0].stderr + done[1].stderr:
            break
    for machine in done:
        check(machine)
    one, two = result(equal_runs / "one" / "fsl_sage"), result(tmp_path / "two")
    assert two["world_size"] == 4 and two["placement"] == "process 0: server; process 1: clients [0, 3]; " \
                                                          "process 2: clients [1]; process 3: clients [2]"
    a, b = adapter(equal_runs / "one" / "fsl_sage"), adapter(tmp_path / "two")
    assert a.keys() == b.keys() and max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5
    assert two["ledger"] == one["ledger"] and one["ledger"]["up"] > 0
