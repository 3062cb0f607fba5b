"""E2E NLG Challenge BLEU: corpus BLEU-4 of NIST mteval-v13a over multiple references."""

from e2e_task.metrics import _base
from e2e_task.metrics._common import INPUTS_DESCRIPTION, PRESERVE_CASE_ARG
from e2e_task.metrics._mteval import BleuResult, MtevalStats, bleu_from_stats


_DESCRIPTION = """
Corpus-level BLEU (n-grams up to 4) exactly as the E2E NLG Challenge computes it with
NIST mteval-v13a: mteval's tokenization with ASCII lowercasing, n-gram counts clipped by
the maximum count in any reference, brevity penalty against the reference length
closest to each prediction (ties to the shorter one), and mteval's smoothing of
precisions without any match. The score is in [0, 1].
"""

_KWARGS_DESCRIPTION = (
    INPUTS_DESCRIPTION
    + PRESERVE_CASE_ARG
    + """
Returns:
    bleu (`float`), precisions (`list[float]`, mteval's individual 1..4-gram scores),
    brevity_penalty (`float`), hyp_length (`int`), ref_length (`int`).
"""
)

_CITATION = """\
@inproceedings{papineni2002bleu,
  title     = {{BLEU}: a Method for Automatic Evaluation of Machine Translation},
  author    = {Papineni, Kishore and Roukos, Salim and Ward, Todd and Zhu, Wei-Jing},
  booktitle = {Proceedings of ACL},
  pages     = {311--318},
  year      = {2002}
}
"""


class E2EBleu(_base.MtevalMetric):
    """mteval-v13a corpus BLEU."""

    DESCRIPTION = _DESCRIPTION
    CITATION = _CITATION
    INPUTS = _KWARGS_DESCRIPTION

    def _score(self, stats: MtevalStats) -> BleuResult:
        return bleu_from_stats(stats)
