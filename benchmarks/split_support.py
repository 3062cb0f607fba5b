"""Which causal-LM families of the installed transformers split exactly and train: the support table.

For every family of the installed transformers (``AutoModelForCausalLM``'s registry) this runs
``tests.family_support.check_family``, the very check ``tests/test_split.py`` runs on each family: a tiny
random model split at every cut and compared with the unsplit model (no mask, right padding, left padding with
and without position ids), then one FSL-SAGE round (client step on the auxiliary estimate, server step,
alignment, FedAvg) that must end with finite losses and moved weights; an exact family is also split with the
labels on the client (``private_labels=True``) and compared the same way. Each family runs in a worker process
with a time limit, so a family that crashes or hangs costs only itself.

    python benchmarks/split_support.py                 # all families, updates the table in the docs
    python benchmarks/split_support.py llama gpt2      # some families, prints only
    python benchmarks/split_support.py bamba --update  # measure some again, update their rows and the table

Writes ``benchmarks/results/split_support.json`` and the table in ``docs/supported-families.md`` between
``<!-- support-table:start -->`` and ``<!-- support-table:end -->``. ``tests/test_split.py`` fails when the
saved table does not list exactly the installed version's families.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # for the tests/ helpers (tiny models of every family, the per-family check)
RESULTS = ROOT / "benchmarks" / "results" / "split_support.json"
TABLE_PAGE = ROOT / "docs" / "supported-families.md"
START, END = "<!-- support-table:start -->", "<!-- support-table:end -->"
PREFIX = "@@result "
QUICK = ["llama", "zaya", "inkling2_text", "deepseek_v4"]  # plain; router state; block stack; token ids


def worker() -> None:
    """Read family names from stdin, answer one JSON line per family on stdout."""
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import torch
    import transformers  # noqa: F401

    from tests.family_support import check_family

    torch.set_num_threads(1)
    gc.collect()
    gc.freeze()  # Trainer.train() collects garbage: skip the ~500k objects of the imports (halves the round's time)
    for line in sys.stdin:
        start, cpu = time.perf_counter(), time.process_time()
        row = check_family(line.strip())
        row["seconds"] = round(time.perf_counter() - start, 2)
        row["cpu_seconds"] = round(time.process_time() - cpu, 2)
        print(PREFIX + json.dumps(row), flush=True)


class _Worker:
    def __init__(self) -> None:
        env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, text=True, env=env, start_new_session=True,
        )
        self.family: str | None = None
        self.started = 0.0

    def send(self, family: str) -> None:
        self.family, self.started = family, time.monotonic()
        self.proc.stdin.write(family + "\n")
        self.proc.stdin.flush()

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


def run_all(families: list[str], workers: int, timeout: float) -> list[dict]:
    todo, done = list(families), []
    pool = [_Worker() for _ in range(min(workers, len(families)))]
    for w in pool:
        w.send(todo.pop(0))
    while any(w.family for w in pool):
        busy = {w.proc.stdout: w for w in pool if w.family}
        ready, _, _ = select.select(list(busy), [], [], 1.0)
        finished: list[tuple[_Worker, dict]] = []
        for stream in ready:
            w = busy[stream]
            line = stream.readline()
            if line.startswith(PREFIX):
                finished.append((w, json.loads(line[len(PREFIX):])))
            elif not line:  # the worker died
                finished.append((w, {"family": w.family, "status": "error", "reason": "worker process crashed"}))
        for w in pool:
            if w.family and time.monotonic() - w.started > timeout:
                row = {"family": w.family, "status": "error", "reason": f"timeout after {timeout:.0f} s"}
                finished.append((w, row))
        for w, row in finished:
            if row["status"] == "error" and row["reason"].startswith(("timeout", "worker")):
                w.kill()
                pool[pool.index(w)] = w = _Worker()
            done.append(row)
            print(f"[{len(done):3d}/{len(families)}] {row['family']:28s} {row['status']:12s} "
                  f"{row.get('max_logit_diff', row.get('reason', ''))} {row.get('train_reason', '')}", flush=True)
            w.family = None
            if todo:
                w.send(todo.pop(0))
    for w in pool:
        w.proc.stdin.close()
        w.proc.wait()
    return sorted(done, key=lambda r: r["family"])


def _status(row: dict) -> str:
    if row["status"] == "exact":
        status = "exact and trains" if row.get("trains") else f"exact, does not train: {row.get('train_reason', '')}"
    else:
        status = f"{row['status']}: {row.get('reason', '')}".rstrip(": ")
    notes = [row["note"]] if row.get("note") else []
    for name in row.get("carried", []):
        text = ", which give the server the text" if name in row.get("reveals_text", []) else ""
        notes.append(f"the upload also carries {name}{text}")
    return status + (f" ({'; '.join(notes)})" if notes else "")


def markdown(rows: list[dict], command: str, version: str) -> str:
    from tests.family_support import LOGIT_TOLERANCE, LOSS_TOLERANCE

    exact = sum(r["status"] == "exact" for r in rows)
    trains = sum(bool(r.get("trains")) for r in rows)
    counts = Counter(r["status"] for r in rows if r["status"] != "exact")
    others = "; ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    private = Counter(r["private_labels"] for r in rows if r.get("private_labels"))
    lines = [
        f"**{exact} of {len(rows)} causal-LM families split exactly** (tiny random models, fp32, every cut, "
        f"no mask / right padding / left padding with and without position ids; |Δlogit| ≤ {LOGIT_TOLERANCE:g}, "
        f"|Δloss| ≤ {LOSS_TOLERANCE:g}, NaN never equal)" + (f"; {others}." if others else ".")
        + f" **{trains} of these {exact} families train**: one FSL-SAGE round (client step on the auxiliary "
        "estimate, server step, alignment, FedAvg) ends with finite losses and changed client and server weights "
        "(status \"exact and trains\"). "
        f"**With the labels on the client** (`private_labels=True`, [privacy](privacy.md)) "
        f"{private['exact']} of them split exactly at every cut (same cases and tolerances), "
        f"{private['refused']} are refused by their declaration"
        + "".join(f", {n} {k}" for k, n in sorted(private.items()) if k not in ("exact", "refused")) + ".",
        f"Produced by `{command}` with transformers {version}; `tests/test_split.py` runs the same check on every "
        "family of the installed transformers.",
        "",
        "| family | model class | status | max \\|Δlogit\\| | labels on the client |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        diff = f"{r['max_logit_diff']:.1e}" if "max_logit_diff" in r else ""
        private = r.get("private_labels", "")
        if private and private != "exact":
            private += f": {r.get('private_labels_reason', '')}".rstrip(": ")
        lines.append(f"| {r['family']} | {r.get('model_class', '')} | {_status(r).replace('|', '/')} | {diff} | "
                     f"{private.replace('|', '/')} |")
    return "\n".join(lines)


def update_table(table: str) -> None:
    text = TABLE_PAGE.read_text()
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    TABLE_PAGE.write_text(f"{head}{START}\n{table}\n{END}{tail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("families", nargs="*", help="model types to check (default: every causal-LM family)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds per family")
    parser.add_argument("--update", action="store_true",
                        help="with family names: replace their rows in the saved results and the table")
    parser.add_argument("--quick", action="store_true",
                        help="check one family of each kind (plain, router state, block stack, token ids) and write "
                             "their rows to --output only (CI)")
    parser.add_argument("--output", type=Path, default=None, help="with --quick: where to write the rows (JSON)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker()

    import transformers

    from tests.family_support import installed_families

    families = QUICK if args.quick else args.families or installed_families()
    start = time.perf_counter()
    rows = run_all(families, args.workers, args.timeout)
    if args.quick:
        output = args.output or ROOT / "benchmarks" / "results" / "split_support_quick.json"
        output.write_text(json.dumps({"transformers": transformers.__version__, "families": rows}, indent=1) + "\n")
        print(markdown(rows, "python benchmarks/split_support.py --quick", transformers.__version__))
        return
    if args.families and not args.update:
        return
    if args.update:  # e.g. a family that timed out on a busy machine, measured again
        saved = {r["family"]: r for r in json.loads(RESULTS.read_text())["families"]}
        rows = sorted((saved | {r["family"]: r for r in rows}).values(), key=lambda r: r["family"])
    exact = sum(r["status"] == "exact" for r in rows)
    trains = sum(bool(r.get("trains")) for r in rows)
    print(f"{exact} of {len(rows)} families exact, {trains} of them train ({time.perf_counter() - start:.0f} s)")
    command = "python benchmarks/split_support.py"
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    from tests.family_support import LOGIT_TOLERANCE, LOSS_TOLERANCE

    RESULTS.write_text(json.dumps({"transformers": transformers.__version__, "command": command,
                                   "tolerance": LOGIT_TOLERANCE, "loss_tolerance": LOSS_TOLERANCE, "exact": exact,
                                   "trains": trains, "total": len(rows), "families": rows}, indent=1) + "\n")
    update_table(markdown(rows, command, transformers.__version__))


if __name__ == "__main__":
    main()
