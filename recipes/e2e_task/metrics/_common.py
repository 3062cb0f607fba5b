"""Pieces shared by the metric scripts: input schema, validation and citations."""

from __future__ import annotations

import re
from collections.abc import Sequence

import datasets


# Characters that java programs may read as line ends (the Java tools read one text per line).
LINE_BREAKS = re.compile("[\r\n\u2028\u2029\x0b\x0c\x85]")

E2E_CITATION = """\
@article{dusek2020evaluating,
  title   = {Evaluating the state-of-the-art of End-to-End Natural Language Generation:
             The {E2E} {NLG} challenge},
  author  = {Du{\\v{s}}ek, Ond{\\v{r}}ej and Novikova, Jekaterina and Rieser, Verena},
  journal = {Computer Speech \\& Language},
  volume  = {59},
  pages   = {123--156},
  year    = {2020}
}
"""

E2E_METRICS_URL = "https://github.com/tuetschek/e2e-metrics"
COCO_CAPTION_URL = "https://github.com/tylin/coco-caption"

INPUTS_DESCRIPTION = """
Args:
    predictions (`list[str]`): one generated text per input (e.g. per meaning representation).
    references (`list[list[str]]`): for each prediction, all of its human references
        (at least one).
"""

PRESERVE_CASE_ARG = """    preserve_case (`bool`, default `False`): mteval's `-c` flag (no lowercasing).
"""

COCO_TOKENIZER_ARG = """
    tokenizer (`str`, default `"ptb"`): `"ptb"` runs the Stanford PTB tokenizer jar from
        `pycocoevalcap` and drops punctuation, as the official scoring does (falls back
        to `"simple"` when java is unavailable, and says so in the output); `"simple"` is
        a pure-Python approximation; `"none"` means the texts are already tokenized.
"""


def features() -> datasets.Features:
    """One string prediction against a list of string references."""
    return datasets.Features(
        {
            "predictions": datasets.Value("string"),
            "references": datasets.Sequence(datasets.Value("string")),
        }
    )


def check_inputs(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    """Raise ValueError unless there is >= 1 prediction and each has >= 1 reference."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    if not predictions:
        raise ValueError("at least one prediction is required")
    empty = [i for i, refs in enumerate(references) if len(refs) == 0]
    if empty:
        raise ValueError(f"predictions without references at positions {empty[:10]}")
