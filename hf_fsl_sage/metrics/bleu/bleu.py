"""E2E NLG Challenge BLEU: corpus BLEU-4 of NIST mteval-v13a over multiple references."""

import evaluate

from hf_fsl_sage.metrics._common import E2E_CITATION, E2E_METRICS_URL, INPUTS_DESCRIPTION, check_inputs, features
from hf_fsl_sage.metrics._mteval import bleu_from_stats, corpus_stats

_DESCRIPTION = """
Corpus-level BLEU (n-grams up to 4) exactly as the E2E NLG Challenge computes it with
NIST mteval-v13a: mteval's tokenization with ASCII lowercasing, n-gram counts clipped by
the maximum count in any reference, brevity penalty against the reference length
closest to each prediction (ties to the shorter one), and mteval's smoothing of
precisions without any match. The score is in [0, 1].
"""

_KWARGS_DESCRIPTION = (
    INPUTS_DESCRIPTION
    + """    preserve_case (`bool`, default `False`): mteval's `-c` flag (no lowercasing).

Returns:
    bleu (`float`), precisions (`list[float]`, mteval's individual 1..4-gram scores),
    brevity_penalty (`float`), hyp_length (`int`), ref_length (`int`).
"""
)

_CITATION = (
    """\
@inproceedings{papineni2002bleu,
  title     = {{BLEU}: a Method for Automatic Evaluation of Machine Translation},
  author    = {Papineni, Kishore and Roukos, Salim and Ward, Todd and Zhu, Wei-Jing},
  booktitle = {Proceedings of ACL},
  pages     = {311--318},
  year      = {2002}
}
"""
    + E2E_CITATION
)


class E2EBleu(evaluate.Metric):
    """mteval-v13a corpus BLEU."""

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
        result = bleu_from_stats(corpus_stats(predictions, references, preserve_case))
        return {
            "bleu": result.bleu,
            "precisions": result.precisions,
            "brevity_penalty": result.brevity_penalty,
            "hyp_length": result.hyp_length,
            "ref_length": result.ref_length,
        }
