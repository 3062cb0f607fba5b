"""The Flower benchmark in its --quick form (CI): Flower's messages against the ledger."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


pytest.importorskip("flwr", reason='the Flower path needs the flower extra: pip install -e ".[flower]"')

from tests.helpers import load_script  # noqa: E402


ROOT = Path(__file__).resolve().parents[1]


def test_flower_benchmark_quick_writes_the_message_bytes_within_1_10x_of_the_ledger(tmp_path):
    benchmark = load_script(ROOT / "benchmarks" / "flower.py", "flower_benchmark")
    benchmark.main(["--quick", "--output", str(tmp_path / "flower_quick.json")])
    results = json.loads((tmp_path / "flower_quick.json").read_text())
    assert sorted(results["algorithms"]) == ["fsl_sage", "splitfed_v2"] and results["settings"]["max-steps"] == 4
    for row in results["algorithms"].values():
        # every message carries the ledger's bytes (padded to 16 bytes per tensor) plus its headers and records
        assert row["ledger_bytes"] < row["protobuf_bytes"] <= 1.10 * row["ledger_bytes"]
        assert row["protobuf_to_ledger"] == row["protobuf_bytes"] / row["ledger_bytes"]
    # SplitFed-V2 waits for the server's gradient every step, FSL-SAGE only for the alignment and the round's model
    assert results["algorithms"]["splitfed_v2"]["exchanges"] > results["algorithms"]["fsl_sage"]["exchanges"]
