"""The privacy benchmark in its --quick form (CI): every attack runs, and the attacks are not broken."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


@pytest.mark.slow
def test_privacy_quick_reads_what_the_server_can_read(tmp_path):
    import privacy

    privacy.main(["--quick", "--output-dir", str(tmp_path), "--seeds", "0"])  # here: no start-up
    results = json.loads((tmp_path / "privacy_quick.json").read_text())
    assert (tmp_path / "privacy_quick.png").is_file() and not (tmp_path / "privacy_quick.partial.json").exists()
    runs = results["runs"]
    undefended = [r for r in runs if r["defence"] == "none" and r["cut_layer"] == 1]
    assert {(r["algorithm"], r["private_labels"]) for r in undefended} == {
        (a, p) for a in ("splitfed_v2", "cse_fsl", "fsl_sage") for p in (False, True)}
    for r in undefended:
        seen = r["attacks"]
        # every label token reaches the server with labels up, none with labels on the clients
        assert seen["label_leakage"] == (0.0 if r["private_labels"] else 1.0)
        # attack sanity: on an undefended upload the inverters and the search read most tokens
        assert seen["linear"]["tokens"] > 0.5 and seen["nearest"]["tokens"] > 0.9, seen
        if r["private_labels"]:
            assert seen["labels_from_gradients"] > 0.9  # the returned gradient gives the labels away
            assert r["messages"]["server_hidden_down"] == r["messages"]["smashed_up"] > 0
    noised = [r for r in runs if r["defence"].startswith("clip")]
    assert noised and all(r["attacks"]["max_token_recovery"] < 0.5 for r in noised)
    summary = results["summary"]
    assert set(summary["modes"]) == {"splitfed_v2", "cse_fsl", "fsl_sage"} and summary["frontier"]
