"""E2E NLG Challenge NIST: corpus NIST-5 of NIST mteval-v13a over multiple references."""

import evaluate

from hf_fsl_sage.metrics._common import E2E_CITATION, E2E_METRICS_URL, INPUTS_DESCRIPTION, check_inputs, features
from hf_fsl_sage.metrics._mteval import corpus_stats, nist_from_stats

_DESCRIPTION = """
Corpus-level NIST (n-grams up to 5) exactly as the E2E NLG Challenge computes it with
NIST mteval-v13a: mteval's tokenization, information weights
info(w1..wn) = log2(count(w1..wn-1) / count(w1..wn)) estimated on all references of the
corpus, matched information summed per order and divided by the number of predicted
n-grams of that order, times NIST's brevity penalty (0.5 when the output is 2/3 of
the average reference length). As in the E2E scripts, the average reference length
divides by the largest number of references any prediction has.
"""

_KWARGS_DESCRIPTION = (
    INPUTS_DESCRIPTION
    + """    preserve_case (`bool`, default `False`): mteval's `-c` flag (no lowercasing).

Returns:
    nist (`float`), info_per_order (`list[float]`, before the penalty), brevity_penalty (`float`).
"""
)

_CITATION = (
    """\
@inproceedings{doddington2002nist,
  title     = {Automatic Evaluation of Machine Translation Quality Using N-gram
               Co-Occurrence Statistics},
  author    = {Doddington, George},
  booktitle = {Proceedings of HLT},
  pages     = {138--145},
  year      = {2002}
}
"""
    + E2E_CITATION
)


class E2ENist(evaluate.Metric):
    """mteval-v13a corpus NIST."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=features(),
            codebase_urls=[E2E_METRICS_URL],
        )

    def _compute(self, predictions: list[str], references: list[list[str]], preserve_case: bool = False) -> dict:
        check_inputs(predictions, references)
        result = nist_from_stats(corpus_stats(predictions, references, preserve_case))
        return {
            "nist": result.nist,
            "info_per_order": result.info_per_order,
            "brevity_penalty": result.brevity_penalty,
        }
