"""E2E NLG Challenge NIST: corpus NIST-5 of NIST mteval-v13a over multiple references."""

from e2e_task.metrics import _base
from e2e_task.metrics._common import INPUTS_DESCRIPTION, PRESERVE_CASE_ARG
from e2e_task.metrics._mteval import MtevalStats, NistResult, nist_from_stats


_DESCRIPTION = """
Corpus-level NIST (n-grams up to 5) exactly as the E2E NLG Challenge computes it with
NIST mteval-v13a: mteval's tokenization, information weights
info(w1..wn) = log2(count(w1..wn-1) / count(w1..wn)) estimated on all references of the
corpus, matched information summed per order and divided by the number of predicted
n-grams of that order, times NIST's brevity penalty (0.5 when the output is 2/3 of
the average reference length). As in the E2E scripts, the average reference length
is the total number of reference words divided by the mean number of non-empty
references per prediction.
"""

_KWARGS_DESCRIPTION = (
    INPUTS_DESCRIPTION
    + PRESERVE_CASE_ARG
    + """
Returns:
    nist (`float`), info_per_order (`list[float]`, before the penalty), brevity_penalty (`float`).
"""
)

_CITATION = """\
@inproceedings{doddington2002nist,
  title     = {Automatic Evaluation of Machine Translation Quality Using N-gram
               Co-Occurrence Statistics},
  author    = {Doddington, George},
  booktitle = {Proceedings of HLT},
  pages     = {138--145},
  year      = {2002}
}
"""


class E2ENist(_base.MtevalMetric):
    """mteval-v13a corpus NIST."""

    DESCRIPTION = _DESCRIPTION
    CITATION = _CITATION
    INPUTS = _KWARGS_DESCRIPTION

    def _score(self, stats: MtevalStats) -> NistResult:
        return nist_from_stats(stats)
