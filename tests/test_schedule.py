"""RoundSchedule on its own, and the partition the trainer really trains on."""

from __future__ import annotations

from collections import Counter

import datasets
import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, default_data_collator

from hf_fsl_sage import FSLSageConfig, FSLSageTrainer
from hf_fsl_sage.federation.partition import partition
from hf_fsl_sage.federation.schedule import RoundSchedule


SIZES = [7, 5, 9, 6, 8, 4, 7, 5, 6, 3]  # ten clients, none a multiple of the batch size
PARTS = [list(range(sum(SIZES[:c]), sum(SIZES[: c + 1]))) for c in range(len(SIZES))]
LOCAL, BATCH, ROUNDS, K = 3, 2, 60, 3


def schedule(seed: int = 0, k: int = K) -> RoundSchedule:
    return RoundSchedule(PARTS, k, LOCAL, BATCH, max_steps=ROUNDS * LOCAL, seed=seed)


def participation(s: RoundSchedule) -> list[list[int]]:
    return [s.participants(r) for r in range(ROUNDS)]


# ---------------------------------------------------------------- who takes part
def test_k_distinct_sorted_participants_per_round():
    for clients in participation(schedule()):
        assert clients == sorted(clients) and len(set(clients)) == K
        assert all(0 <= c < len(SIZES) for c in clients)


def test_participants_vary_by_round_and_by_seed():
    rounds = participation(schedule(seed=0))
    assert len({tuple(c) for c in rounds}) > ROUNDS // 2  # C(10, 3) = 120 possible sets
    counts = Counter(c for clients in rounds for c in clients)
    # each client is drawn in a round with probability 3/10: 18 of 60 rounds expected, sd 3.5
    assert sorted(counts) == list(range(10)) and all(6 <= n <= 30 for n in counts.values()), counts
    assert participation(schedule(seed=1)) != rounds
    assert participation(schedule(seed=0)) == rounds  # a pure function of the seed


def test_all_clients_when_k_is_the_number_of_clients():
    assert participation(schedule(k=len(SIZES))) == [list(range(len(SIZES)))] * ROUNDS


# ---------------------------------------------------------------- which rows
def rows_seen(s: RoundSchedule, client: int) -> list[int]:
    """Row indices ``client`` trains on, in order, over the steps of the rounds it takes part in."""
    return [i for r in range(ROUNDS) if client in s.participants(r)
            for step in range(r * LOCAL, (r + 1) * LOCAL) for i in s.indices(client, step)]


@pytest.mark.parametrize("client", range(len(SIZES)))
def test_each_row_once_per_epoch_in_a_new_order(client):
    """Positions advance only in the client's own rounds, so its steps walk whole epochs with no row skipped."""
    s = schedule()
    assert any(client not in s.participants(r) for r in range(ROUNDS))
    seen, part = rows_seen(s, client), PARTS[client]
    epochs = [seen[i : i + len(part)] for i in range(0, len(seen) - len(part) + 1, len(part))]
    assert len(epochs) >= 3
    for epoch in epochs:
        assert sorted(epoch) == part
    assert len({tuple(e) for e in epochs}) > 1  # reshuffled between epochs


def test_positions_advance_only_in_rounds_the_client_takes_part_in():
    """A client walks the same row sequence whether it takes part in every round or in some: sitting out a round
    neither skips rows nor repeats them."""
    sometimes, always = schedule(k=K), schedule(k=len(SIZES))
    for client in range(len(SIZES)):
        rounds = [r for r in range(ROUNDS) if client in sometimes.participants(r)]
        assert rounds[-1] - rounds[0] + 1 > len(rounds)  # it sat out rounds in between
        walk = rows_seen(sometimes, client)
        assert walk == rows_seen(always, client)[: len(walk)]


# ---------------------------------------------------------------- the partition the trainer uses
def rows_trained_by_client(trainer: FSLSageTrainer) -> dict[int, set[int]]:
    """Rows each client's batches hold over the run, read back from the row id stored as each row's first token."""
    seen: dict[int, set[int]] = {}
    for step in trainer.get_train_dataloader():
        for client, batch in step["clients"].items():
            seen.setdefault(client, set()).update(batch["input_ids"][:, 0].tolist())
    return seen


@pytest.mark.parametrize("scheme", ["dirichlet", "iid"])
def test_trainer_trains_each_client_on_its_partition(tmp_path, scheme):
    n, clients = 60, 4
    groups = ["a", "b", "c"] * (n // 3)
    ids = [[row, 3, 4, 5] for row in range(n)]  # the first token is the row's index
    ds = datasets.Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * 4] * n, "labels": ids,
                                     "group": groups})
    args = FSLSageConfig(output_dir=str(tmp_path), num_clients=clients, local_steps=5, max_steps=40,
                         per_device_train_batch_size=4, partition=scheme, partition_column="group",
                         dirichlet_alpha=0.3, seed=3, aux_num_layers=1, report_to="none", save_strategy="no",
                         disable_tqdm=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(GPT2Config(n_layer=2, n_embd=16, n_head=2, n_positions=8, vocab_size=64))
    trainer = FSLSageTrainer(model=model, args=args, train_dataset=ds, data_collator=default_data_collator)

    direct = {s: partition(ds, clients, s, seed=3, alpha=0.3, group_by="group") for s in ("dirichlet", "iid")}
    assert direct["dirichlet"] != direct["iid"]
    seen = rows_trained_by_client(trainer)
    # 40 steps of 4 rows: every client has gone through its whole partition at least once
    assert seen == {c: set(rows) for c, rows in enumerate(direct[scheme])}
    if scheme == "dirichlet":  # non-IID: some client holds a group share far from the overall third
        shares = [Counter(groups[i] for i in rows) for rows in direct["dirichlet"]]
        assert max(abs(s[g] / sum(s.values()) - 1 / 3) for s in shares for g in "abc") > 0.25, shares
