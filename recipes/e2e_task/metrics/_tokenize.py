"""Tokenization applied by the MS-COCO caption evaluation before METEOR, ROUGE-L and CIDEr.

The COCO code runs Stanford CoreNLP 3.4.1's ``PTBTokenizer -preserveLines -lowerCase``
on every caption and then drops tokens found in a fixed punctuation list. Note that
the list holds the upper-case bracket tokens (``-LRB-``) while the tokenizer emits
lower-case ones (``-lrb-``), so brackets survive; the tokenizer also maps ``£`` to ``#``
and ``€`` to ``$``. Running the real jar is the only way to reproduce this exactly.

When java is missing, :func:`simple_tokenize` gives a close pure-Python approximation
(it agrees on ordinary E2E sentences but not on every edge case); callers report which
tokenizer was used.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from e2e_task.metrics._common import LINE_BREAKS
from e2e_task.metrics._java import PTB_JAR, JavaToolUnavailable, require, stderr_tail


COCO_PUNCTUATION = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
     ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)  # fmt: skip
TOKENIZERS = ("ptb", "simple", "none")


def _drop_punctuation(line: str) -> str:
    return " ".join(w for w in line.rstrip().split(" ") if w not in COCO_PUNCTUATION)


def ptb_tokenize(texts: Sequence[str]) -> list[str]:
    """Tokenize with the PTB tokenizer jar and drop punctuation, as the COCO code does.

    Raises :class:`JavaToolUnavailable` if java or the jar is missing or the JVM fails.
    """
    java, (jar,) = require(PTB_JAR)
    if not texts:
        return []
    with tempfile.TemporaryDirectory(prefix="ptb-") as tmp:
        path = Path(tmp, "captions.txt")
        path.write_bytes("\n".join(LINE_BREAKS.sub(" ", t) for t in texts).encode("utf-8"))
        cmd = [java, "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer",
               "-preserveLines", "-lowerCase", str(path)]  # fmt: skip
        try:
            proc = subprocess.run(cmd, capture_output=True, check=False)
        except OSError as exc:
            raise JavaToolUnavailable(f"could not start java: {exc}") from exc
    if proc.returncode != 0:
        raise JavaToolUnavailable(
            f"PTBTokenizer exited with {proc.returncode}: {stderr_tail(proc.stderr)}"
        )
    lines = proc.stdout.decode("utf-8").split("\n")
    if len(lines) < len(texts):
        raise RuntimeError(f"PTBTokenizer returned {len(lines)} lines for {len(texts)} inputs")
    return [_drop_punctuation(line) for line in lines[: len(texts)]]


_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
# PTB maps pounds and euros to the old WSJ currency tokens and straight quotes to quote tokens.
_SYMBOLS = {"£": "#", "€": "$", '"': "''"}
_ABBREVIATIONS = frozenset(["mr.", "mrs.", "ms.", "dr.", "st.", "jr.", "sr.", "vs.", "etc."])
_SIMPLE_TOKEN = re.compile(
    r"""
      [^\W\d_](?:\.[^\W\d_])+\.?  # initialisms: u.s.a. i.e.
    | \d+(?:[.,:/]\d+)+           # numbers with separators: 3.5 1,000
    | [^\W_]+(?:['-][^\W_]+)*     # words, numbers, compounds, clitics: 20-25 isn't
    | \.\.\.|--|``|''|\S          # punctuation and symbols
    """,
    re.VERBOSE,
)
_CLITIC = re.compile(r"^(.+?)(n't|'s|'re|'ve|'ll|'d|'m)$")


def _simple_tokens(text: str) -> list[str]:
    tokens: list[str] = []
    for chunk in text.lower().split():
        if chunk in _ABBREVIATIONS:
            tokens.append(chunk)
            continue
        for token in _SIMPLE_TOKEN.findall(chunk):
            clitic = _CLITIC.match(token)
            if token == "cannot":
                tokens.extend(["can", "not"])
            elif clitic:
                tokens.extend(clitic.groups())
            else:
                tokens.append(_BRACKETS.get(token, _SYMBOLS.get(token, token)))
    return tokens


def simple_tokenize(texts: Sequence[str]) -> list[str]:
    """Pure-Python approximation of :func:`ptb_tokenize` (used only without java)."""
    return [" ".join(t for t in _simple_tokens(text) if t not in COCO_PUNCTUATION) for text in texts]


def coco_tokenize(texts: Sequence[str], tokenizer: str = "ptb") -> tuple[list[str], str, str | None]:
    """Tokenize for the COCO metrics.

    Returns ``(tokenized, tokenizer_used, fallback_reason)``. ``"ptb"`` falls back to
    ``"simple"`` (with the reason) when the jar cannot run; ``"none"`` returns the
    texts unchanged, for input that is already tokenized.
    """
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"tokenizer must be one of {TOKENIZERS}, got {tokenizer!r}")
    if tokenizer == "none":
        return list(texts), "none", None
    if tokenizer == "ptb":
        try:
            return ptb_tokenize(texts), "ptb", None
        except JavaToolUnavailable as exc:
            return simple_tokenize(texts), "simple", f"PTB tokenizer unavailable: {exc}"
    return simple_tokenize(texts), "simple", None


def coco_tokenize_pairs(
    predictions: Sequence[str], references: Sequence[Sequence[str]], tokenizer: str = "ptb"
) -> tuple[list[str], list[list[str]], str, str | None]:
    """:func:`coco_tokenize` for predictions and their reference lists in one JVM call.

    Returns ``(predictions, references, tokenizer_used, fallback_reason)``.
    """
    flat = list(predictions) + [ref for refs in references for ref in refs]
    tokens, used, fallback = coco_tokenize(flat, tokenizer)
    grouped, start = [], len(predictions)
    for refs in references:
        grouped.append(tokens[start : start + len(refs)])
        start += len(refs)
    return tokens[: len(predictions)], grouped, used, fallback
