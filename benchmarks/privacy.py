"""What an honest-but-curious server can read, per mode and defence, beside the eval-loss cost and the bytes.

    python benchmarks/privacy.py            # full grid (see docs/privacy.md for its time on 2 CPU cores)
    python benchmarks/privacy.py --quick    # smoke run of every part, under 2 min

Same data, base model and clients as ``budget_setup.py`` (its helpers and preset): the E2E dev set split by
``mr`` into a pretraining part, the clients' training part and an eval part; a small GPT-2 pretrained centrally
on the pretraining part's references. The pretraining part's rows (meaning representation and reference, as the
clients' rows) are also the attacker's public text: no client holds their ``mr`` values. Every run fine-tunes the
base with LoRA for the same number of global steps.

Per run (algorithm, cut layer, labels on the server or on the clients, defence) it reports the eval loss (and
its curve against bytes), the bytes by kind, and what the server reads from the uploads of the first local step
of the last round (sent from the global client model the server broadcast, with the dropout of training):

- label leakage: the share of the uploads' label tokens present in server-bound messages;
- with labels on the clients, the share of labels recovered from the returned gradients (the server knows the
  frozen final norm and head);
- token recovery (top-1) and exact-row recovery of the clients' text by a linear and an MLP inverter fitted on
  public text through both the public base and the global client model (with the run's defence, with and
  without the dropout of training), and by a white-box nearest-token search with the global client model.

Seeds: the comparisons of modes (equal steps, bytes to a target) run ``--seeds``; the defence grid runs the first.
Writes ``privacy[_quick].json`` and ``privacy[_quick].png`` (token recovery against eval-loss cost).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import budget_setup as bench
import privacy_attacks as attacks
import torch
from transformers import AutoModelForCausalLM, TrainerCallback, set_seed
from transformers.trainer_callback import PrinterCallback
from transformers.utils import logging as hf_logging

from e2e_task.data import E2E_SAMPLE_PATH, load_e2e_csv, offline_gpt2_tokenizer, split_by_mr, tokenize_e2e
from hf_fsl_sage import FSLSageTrainer, split_causal_lm
from hf_fsl_sage.federation.federation import load_trainable_state, trainable_state
from hf_fsl_sage.transport.defences import ActivationDefence


ALGORITHMS = ["splitfed_v2", "cse_fsl", "fsl_sage"]
FULL = {**bench.FULL, "max_steps": 40, "public_rows": 256, "attack_uploads": 4, "search_rows": 3,
        "search_tokens": 24, "inverter_steps": 300, "noise_multipliers": [0.05, 0.15, 0.5, 2.0],
        "dx_scales": [1.0, 4.0], "cuts": [1, 2, 3], "gap_target": 0.5, "defended_algorithms": ALGORITHMS,
        "deeper_algorithms": ALGORITHMS}
QUICK = {**bench.QUICK, "n_layer": 4, "max_steps": 4, "public_rows": 256, "attack_uploads": 2, "search_rows": 1,
         "search_tokens": 16,
         "inverter_steps": 100, "noise_multipliers": [1.0], "dx_scales": [1.0], "cuts": [1, 2], "gap_target": 0.5,
         "fsl_sage": {**bench.QUICK["fsl_sage"], "align_interval": 1}, "defended_algorithms": ["fsl_sage"],
         "deeper_algorithms": ["fsl_sage"]}


class Recorder:
    """Keeps the uploads of the first local step of the last rounds with their ground truth, what the server decoded
    of them, and the global client model the server broadcast at the start of that round (what it holds: at the
    first local step the clients upload from exactly that model)."""

    def __init__(self, trainer: FSLSageTrainer, keep: int):
        self.keep, self.entries, self._forward, self._step = keep, [], {}, 0
        self.round_model: dict[str, torch.Tensor] | None = None
        fed, algorithm, coder = trainer.federation, trainer.algorithm, trainer.federation.transport.coder
        forward, to_server, decode = fed.client_forward, fed.transport.to_server, coder.decode
        local_step, begin_round = algorithm.local_step, algorithm.begin_round

        def begin(round_index, participants):
            metrics = begin_round(round_index, participants)
            self.round_model = trainable_state(trainer.split.client)
            return metrics

        def step(client_index, batch, round_index, local):
            self._step = local
            return local_step(client_index, batch, round_index, local)

        def client_forward(client, batch):
            smashed = forward(client, batch)
            self._forward[client.index] = batch
            return smashed

        def sent(client_id, kind, payload=None, *args, **kwargs):
            if kind == "smashed" and payload is not None and self._step == 0:
                batch = self._forward[client_id]
                if not self.entries or self.entries[-1].get("model") is not self.round_model:
                    self.entries = [e for e in self.entries if e["model"] is self.round_model]  # the last round
                self.entries.append({"ids": batch["input_ids"], "mask": batch["attention_mask"],
                                     "labels": batch["labels"], "hidden": payload[0].hidden_states.detach(),
                                     "model": self.round_model})
                self.entries = self.entries[-keep:]
            return to_server(client_id, kind, payload, *args, **kwargs)

        def decoded(client_id, kind, payload, *args, **kwargs):
            out = decode(client_id, kind, payload, *args, **kwargs)
            if out is not None and self._step == 0 and self.entries and kind in ("smashed", "server_hidden",
                                                                                "head_gradient"):
                name = {"smashed": "server_labels", "server_hidden": "top", "head_gradient": "gradient"}[kind]
                self.entries[-1][name] = out[1] if kind == "smashed" else out
            return out

        algorithm.begin_round, algorithm.local_step = begin, step
        fed.client_forward, fed.transport.to_server, coder.decode = client_forward, sent, decoded

    def client_model(self, trainer: FSLSageTrainer):
        """The global client model as the server broadcast it at the start of the recorded round."""
        client = copy.deepcopy(trainer.split.client)
        load_trainable_state(client, self.entries[-1]["model"])
        return client

    def observed(self) -> attacks.Observed:
        ids, hidden, rows = [], [], []
        for e in self.entries:
            mask = e["mask"].bool()
            ids.append(e["ids"][mask])
            hidden.append(e["hidden"][mask].float())
            rows += mask.sum(1).tolist()
        return attacks.Observed(torch.cat(ids), torch.cat(hidden), rows)

    def label_leakage(self) -> float:
        """Share of the uploads' label tokens that the server received."""
        total = seen = 0
        for e in self.entries:
            labelled = e["labels"] != -100
            total += int(labelled.sum())
            received = e.get("server_labels")
            if received is not None:
                width = received.shape[1]
                seen += int((received == e["labels"][:, :width])[labelled[:, :width]].sum())
        return seen / max(1, total)


class Curve(TrainerCallback):
    def __init__(self, trainer: FSLSageTrainer):
        self.trainer, self.points = trainer, []

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        ledger = self.trainer.federation.transport.ledger
        self.points.append({"step": state.global_step, "bytes": ledger.total, "eval_loss": metrics["eval_loss"]})


def public_batches(data, cfg, collator, path: Path, seed: int) -> list[dict[str, torch.Tensor]]:
    """The attacker's public text: rows of the pretraining part (whose ``mr`` no client holds) formatted as the
    clients format theirs (``mr``, separator, reference), in the run's token ids; rows with a token outside the
    run's vocabulary are left out."""
    raw = load_e2e_csv(path)
    if cfg["rows"]:
        raw = raw.select(range(cfg["rows"]))
    public = split_by_mr(raw, eval_fraction=0.1, test_fraction=0.3, seed=seed)["test"]
    rows, index = tokenize_e2e(public, offline_gpt2_tokenizer(), max_length=cfg["max_length"]), data["token_index"]
    kept = [{"input_ids": [index[t] for t in r["input_ids"]], "attention_mask": r["attention_mask"],
             "labels": [t if t < 0 else index[t] for t in r["labels"]]}
            for r in rows if index is None or all(t in index for t in r["input_ids"])][:cfg["public_rows"]]
    return [collator(kept[s:s + 32]) for s in range(0, len(kept), 32)]


def attack(cfg, base, trainer: FSLSageTrainer, recorder: Recorder, public, defence: ActivationDefence,
           seed: int, search: bool) -> dict[str, Any]:
    """Every attack on the recorded uploads of one run (with ``search``, the nearest-token search too)."""
    vocab, cut = base.config.vocab_size, trainer.split.cut_layer
    observed = recorder.observed()
    holders = {"public base": split_causal_lm(copy.deepcopy(base), cut).client,
               "global client model": recorder.client_model(trainer)}
    out: dict[str, Any] = {"label_leakage": recorder.label_leakage(), "tokens_attacked": int(observed.ids.numel())}
    # (in evaluation and in training mode: the uploads carry the dropout of training, which the server knows)
    fitted_on = [attacks.client_activations(client, public, defence, training) for client in holders.values()
                 for training in (False, True)]
    for kind in ("linear", "mlp"):
        inverter = attacks.fit_inverter(fitted_on, vocab, kind, cfg["inverter_steps"], seed=seed)
        tokens, rows = attacks.recovery(attacks.invert(inverter, observed), observed.ids, observed.rows)
        out[kind] = {"tokens": tokens, "rows": rows}
    if search:
        found, truth, searched = attacks.nearest_token_search(holders["global client model"], observed, vocab,
                                                              cfg["search_rows"], cfg["search_tokens"],
                                                              defence.clip_norm)
        tokens, rows = attacks.recovery(found, truth, searched)
        out["nearest"] = {"tokens": tokens, "rows": rows}
    out["max_token_recovery"] = max(out[k]["tokens"] for k in ("linear", "mlp", "nearest") if k in out)
    if trainer.split.private_labels:  # labels from the returned gradients, with the frozen head the server knows
        hits = total = 0
        for e in recorder.entries:
            if "gradient" not in e:
                continue
            width = e["gradient"].shape[1]
            found, labelled = attacks.labels_from_gradients(base.transformer.ln_f, base.lm_head.weight,
                                                            e["top"][:, :width], e["gradient"],
                                                            trainer.args.label_smoothing_factor)
            truth = e["labels"][:, 1:width + 1]
            truth = torch.nn.functional.pad(truth, (0, width - truth.shape[1]), value=-100).reshape(-1)[labelled]
            hits, total = hits + int((found == truth).sum()), total + int(truth.numel())
        out["labels_from_gradients"] = hits / max(1, total)
    return out


def run_one(cfg, base, data, collator, public, algorithm: str, cut: int, private: bool, defence: ActivationDefence,
            seed: int, do_attack: bool, search: bool) -> dict[str, Any]:
    set_seed(seed)
    aux_layers = min(cfg.get(algorithm, {}).get("aux_num_layers", 1), cfg["n_layer"] - cut)  # blocks after the cut
    overrides = {"cut_layer": cut, "private_labels": private, "max_comm_bytes": None, "aux_num_layers": aux_layers,
                 "eval_steps": cfg["local_steps"], "smashed_clip_norm": defence.clip_norm,
                 "smashed_noise_multiplier": defence.noise_multiplier,
                 "embedding_dx_epsilon": defence.embedding_epsilon}
    with tempfile.TemporaryDirectory() as out_dir:
        args = bench.fed_args(cfg, algorithm, True, "iid", seed, out_dir, 1, overrides)
        trainer = FSLSageTrainer(model=copy.deepcopy(base).train(), args=args, train_dataset=data["train"],
                                 eval_dataset=data["eval"], data_collator=collator, peft_config=bench.lora_config())
        trainer.remove_callback(PrinterCallback)
        curve = Curve(trainer)
        trainer.add_callback(curve)
        recorder = Recorder(trainer, cfg["attack_uploads"])
        trainer.evaluate()
        start, cpu = time.time(), time.process_time()
        trainer.train()
        seconds, cpu_seconds = time.time() - start, time.process_time() - cpu
        if curve.points[-1]["step"] != trainer.state.global_step:
            trainer.evaluate()
        ledger = trainer.federation.transport.ledger
        row = {"algorithm": algorithm, "cut_layer": cut, "private_labels": private, "seed": seed,
               "defence": describe(defence), "final_eval_loss": curve.points[-1]["eval_loss"],
               "curve": curve.points, "total_bytes": ledger.total, "bytes_by_kind": dict(ledger.by_kind),
               "messages": dict(ledger.messages), "global_steps": trainer.state.global_step,
               "train_seconds": seconds, "cpu_seconds": cpu_seconds}
        if do_attack:
            start = time.process_time()
            row["attacks"] = attack(cfg, base, trainer, recorder, public, defence, seed, search)
            row["attack_cpu_seconds"] = time.process_time() - start
    return row


def describe(defence: ActivationDefence) -> str:
    if defence.embedding_epsilon is not None:
        return f"dx eps={defence.embedding_epsilon:.3g}"
    if defence.clip_norm is not None:
        return f"clip {defence.clip_norm:.3g} + noise x{defence.noise_multiplier:g}"
    return "none"


def defences(cfg, base, public, cut: int) -> list[tuple[str, float, ActivationDefence]]:
    """The defence grid at ``cut``: the clip at the median token norm of public activations there, noise in units
    of it; d_chi noise whose mean norm is a multiple of the median distance between a token's embedding and its
    nearest other one."""
    norms = attacks.client_activations(split_causal_lm(copy.deepcopy(base), cut).client, public).hidden.norm(dim=-1)
    clip = float(norms.median())
    table = base.get_input_embeddings().weight.detach()
    distances = torch.cdist(table, table)
    distances.fill_diagonal_(float("inf"))
    nearest = float(distances.min(1).values.median())
    width = table.shape[1]
    grid = [("gaussian", s, ActivationDefence(clip, s)) for s in cfg["noise_multipliers"]]
    grid += [("dx", k, ActivationDefence(embedding_epsilon=width / (k * nearest))) for k in cfg["dx_scales"]]
    return grid


def bytes_to(curve: list[dict[str, float]], target: float) -> float | None:
    """Bytes where the eval-loss curve first reaches ``target``, interpolated between the evaluations around it."""
    for before, after in zip(curve, curve[1:]):
        if after["eval_loss"] <= target < before["eval_loss"]:
            share = (before["eval_loss"] - target) / (before["eval_loss"] - after["eval_loss"])
            return before["bytes"] + share * (after["bytes"] - before["bytes"])
    return None


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bench.common_options(parser)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    opts = parser.parse_args(argv)
    hf_logging.set_verbosity_error()
    torch.set_num_threads(opts.threads)
    cfg = copy.deepcopy(QUICK if opts.quick else FULL)
    if opts.max_steps:
        cfg["max_steps"] = opts.max_steps
    start, cpu = time.time(), time.process_time()
    info, init_args, data = bench.prepare(opts, cfg)
    base = AutoModelForCausalLM.from_config(init_args[5])
    base.load_state_dict(init_args[6])
    base.eval()
    collator = bench.PadCollator(data["pad_id"])
    # Trainer.train() collects garbage over the ~500k long-lived objects of the imports, data and base (~0.5 CPU-s
    # a run); frozen, the collector skips them.
    gc.collect()
    gc.freeze()
    path = Path(opts.data) if opts.data else (bench.DEVSET if bench.DEVSET.is_file() else E2E_SAMPLE_PATH)
    public = public_batches(data, cfg, collator, path, opts.seed)
    central = bench.centralized(cfg, base, data, collator, True, opts.seed)
    base_loss = central["curve"][0]["eval_loss"]
    target = base_loss - cfg["gap_target"] * (base_loss - central["final_eval_loss"])
    results: dict[str, Any] = {"config": {**info["config"], **{k: cfg[k] for k in FULL if k not in bench.FULL}},
                               "base": info["base"], "centralized": central, "target_eval_loss": target, "runs": []}

    name = "privacy_quick" if opts.quick else "privacy"
    out = Path(opts.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    done = {}  # with --resume: the runs an interrupted run finished, by what they ran
    if opts.resume and (out / f"{name}.partial.json").is_file():
        saved = json.loads((out / f"{name}.partial.json").read_text())["runs"]
        done = {(r["algorithm"], r["cut_layer"], r["private_labels"], r["defence"], r["seed"]): r for r in saved}

    def run(cfg, base, data, collator, public, algorithm, cut, private, defence, seed, do_attack, search):
        key = (algorithm, cut, private, describe(defence), seed)
        return done[key] if key in done else run_one(cfg, base, data, collator, public, algorithm, cut, private,
                                                     defence, seed, do_attack, search)

    def add(row: dict[str, Any]) -> None:
        results["runs"].append(row)
        (out / f"{name}.partial.json").write_text(json.dumps(results))
        a = row.get("attacks", {})
        cpu_seconds = row["cpu_seconds"] + row.get("attack_cpu_seconds", 0)
        mode = "private" if row["private_labels"] else "labels up"
        seen = f"leak {a['label_leakage']:.2f} max token recovery {a['max_token_recovery']:.3f}" if a else ""
        print(f"{row['algorithm']:12s} cut {row['cut_layer']} {mode:9s} {row['defence']:26s} seed {row['seed']} "
              f"cpu {cpu_seconds:4.0f} s eval {row['final_eval_loss']:.4f} {row['total_bytes'] / 1e6:7.2f} MB "
              f"{seen}", flush=True)

    none = ActivationDefence()
    first, later = opts.seeds[0], opts.seeds[1:]
    # In order of what the conclusions rest on, so that a run cut short still has them:
    # 1. labels on the server or on the clients, cut 1, first seed, every attack
    for algorithm in ALGORITHMS:
        for private in (False, True):
            add(run(cfg, base, data, collator, public, algorithm, 1, private, none, first, True, True))
    # 2. deeper cuts, labels on the clients, every attack
    for cut in cfg["cuts"][1:]:
        for algorithm in cfg["deeper_algorithms"]:
            add(run(cfg, base, data, collator, public, algorithm, cut, True, none, first, True, True))
    # 3. the defences at cut 1
    for _, _, defence in defences(cfg, base, public, 1):
        for algorithm in cfg["defended_algorithms"]:
            add(run(cfg, base, data, collator, public, algorithm, 1, True, defence, first, True, True))
    # 4. the other seeds of the modes (eval loss and bytes: the equal-steps and bytes-to-target comparisons)
    for seed in later:
        for algorithm in ALGORITHMS:
            for private in (False, True):
                add(run(cfg, base, data, collator, public, algorithm, 1, private, none, seed, False, False))
    # 5. at deeper cuts, FSL-SAGE with the largest noise multiplier and with the smallest d_chi scale
    for cut in cfg["cuts"][1:]:
        grid = defences(cfg, base, public, cut)
        for kind, pick in (("gaussian", -1), ("dx", 0)):
            setting = [d for k, _, d in grid if k == kind][pick]
            add(run(cfg, base, data, collator, public, "fsl_sage", cut, True, setting, first, True, True))
    results["summary"] = summarize(results, opts.seeds)
    results["wall_seconds"], results["cpu_seconds"] = time.time() - start, time.process_time() - cpu
    results["machine"] = "2 shared CPU cores (other jobs running): CPU seconds are the comparable figure"
    (out / f"{name}.json").write_text(json.dumps(results, indent=1))
    (out / f"{name}.partial.json").unlink()
    plot(results, out / f"{name}.png")
    print(tables(results))
    return results


def summarize(results: dict[str, Any], seeds: list[int]) -> dict[str, Any]:
    """The goals: FSL-SAGE private vs labels up at equal steps; bytes to the target vs private SplitFed-V2; the
    defences' frontier (max token recovery against eval-loss cost, per algorithm and cut)."""
    runs, target = results["runs"], results["target_eval_loss"]

    def pick(algorithm, private, cut=1, defence="none"):
        return [r for r in runs if r["algorithm"] == algorithm and r["private_labels"] == private
                and r["cut_layer"] == cut and r["defence"] == defence]

    summary: dict[str, Any] = {"modes": {}}
    for algorithm in ALGORITHMS:
        up, private = pick(algorithm, False), pick(algorithm, True)
        ratios = [p["final_eval_loss"] / u["final_eval_loss"] - 1 for u, p in zip(up, private)]
        summary["modes"][algorithm] = {
            "eval_loss_labels_up": [r["final_eval_loss"] for r in up],
            "eval_loss_private": [r["final_eval_loss"] for r in private],
            "private_vs_up_relative": ratios, "mean_relative": statistics.mean(ratios) if ratios else None,
            "bytes_labels_up": [r["total_bytes"] for r in up], "bytes_private": [r["total_bytes"] for r in private],
            "bytes_to_target_private": [bytes_to(r["curve"], target) for r in private]}
    sage = summary["modes"]["fsl_sage"]["bytes_to_target_private"]
    splitfed = summary["modes"]["splitfed_v2"]["bytes_to_target_private"]
    summary["fsl_sage_vs_splitfed_v2_bytes_to_target"] = [
        None if a is None or b is None else a / b for a, b in zip(sage, splitfed)]
    frontier = []
    for r in runs:
        if "attacks" not in r or not r["private_labels"]:
            continue
        reference = pick(r["algorithm"], True, r["cut_layer"])
        undefended = reference[0]["final_eval_loss"] if reference else None
        frontier.append({"algorithm": r["algorithm"], "cut_layer": r["cut_layer"], "defence": r["defence"],
                         "eval_loss": r["final_eval_loss"],
                         "eval_loss_cost": None if undefended is None else r["final_eval_loss"] / undefended - 1,
                         "max_token_recovery": r["attacks"]["max_token_recovery"],
                         "by_attack": {k: r["attacks"][k]["tokens"] for k in ("linear", "mlp", "nearest")
                                       if k in r["attacks"]},
                         "labels_from_gradients": r["attacks"].get("labels_from_gradients")})
    summary["frontier"] = frontier
    summary["goal_met_by"] = [f for f in frontier if f["defence"] != "none" and f["eval_loss_cost"] is not None
                              and f["eval_loss_cost"] <= 0.05 and f["max_token_recovery"] <= 0.10]
    return summary


def _spread(values: list[float], fmt: str) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "not reached"
    mean = statistics.mean(values)
    return format(mean, fmt) + (f" ± {format((max(values) - min(values)) / 2, fmt)}" if len(values) > 1 else "")


def tables(results: dict[str, Any]) -> str:
    """The three tables of docs/privacy.md, in Markdown."""
    summary, lines = results["summary"], []
    lines += ["| algorithm | eval loss, labels up | eval loss, labels private | private vs up | MB, labels up | "
              "MB, private | MB to target, private |", "|---|---|---|---|---|---|---|"]
    for name, m in summary["modes"].items():
        relative = [100 * r for r in m["private_vs_up_relative"]]
        lines.append(f"| {name} | {_spread(m['eval_loss_labels_up'], '.4f')} | "
                     f"{_spread(m['eval_loss_private'], '.4f')} | {_spread(relative, '+.2f')} % | "
                     f"{_spread([b / 1e6 for b in m['bytes_labels_up']], '.2f')} | "
                     f"{_spread([b / 1e6 for b in m['bytes_private']], '.2f')} | "
                     f"{_spread([None if b is None else b / 1e6 for b in m['bytes_to_target_private']], '.2f')} |")
    lines += ["", "| algorithm | cut | labels | label tokens on the wire | labels from returned gradients | linear | "
              "MLP | nearest-token search | exact rows (search) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results["runs"]:
        a = r.get("attacks")
        if a and r["defence"] == "none":
            grads = a.get("labels_from_gradients")
            lines.append(f"| {r['algorithm']} | {r['cut_layer']} | {'client' if r['private_labels'] else 'server'} | "
                         f"{100 * a['label_leakage']:.0f} % | {'-' if grads is None else f'{100 * grads:.1f} %'} | "
                         f"{100 * a['linear']['tokens']:.1f} % | {100 * a['mlp']['tokens']:.1f} % | "
                         f"{100 * a['nearest']['tokens']:.1f} % | {100 * a['nearest']['rows']:.0f} % |")
    lines += ["", "| algorithm | cut | defence | eval loss | cost | linear | MLP | search | best attack |",
              "|---|---|---|---|---|---|---|---|---|"]
    for f in summary["frontier"]:
        cost = "-" if f["eval_loss_cost"] is None else f"{100 * f['eval_loss_cost']:+.2f} %"
        by = f["by_attack"]
        lines.append(f"| {f['algorithm']} | {f['cut_layer']} | {f['defence']} | {f['eval_loss']:.4f} | {cost} | "
                     f"{100 * by['linear']:.1f} % | {100 * by['mlp']:.1f} % | {100 * by.get('nearest', 0):.1f} % | "
                     f"{100 * f['max_token_recovery']:.1f} % |")
    ratio = summary["fsl_sage_vs_splitfed_v2_bytes_to_target"]
    lines += ["", f"target eval loss {results['target_eval_loss']:.4f}; FSL-SAGE / SplitFed-V2 bytes to it (labels "
              f"private): {_spread(ratio, '.3f')}; defences meeting both goals: {len(summary['goal_met_by'])}"]
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = {"splitfed_v2": "s", "cse_fsl": "^", "fsl_sage": "o"}
    colors = {"none": "black", "clip": "tab:blue", "dx": "tab:red"}
    for f in results["summary"]["frontier"]:
        if f["eval_loss_cost"] is None:
            continue
        color = colors[f["defence"].split(" ")[0]]
        ax.scatter(100 * f["eval_loss_cost"], 100 * f["max_token_recovery"], marker=markers[f["algorithm"]],
                   color=color, alpha=0.4 + 0.2 * f["cut_layer"])
    ax.axvline(5, color="grey", ls=":")
    ax.axhline(10, color="grey", ls=":")
    ax.set_xlabel("eval-loss cost vs the undefended run (%)")
    ax.set_ylabel("tokens recovered by the best attack (%)")
    ax.set_title("Privacy against utility (black: none, blue: clip + Gaussian, red: d_chi)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
