"""E2E NLG Challenge ROUGE-L: the MS-COCO caption evaluation's sentence-averaged ROUGE-L."""

import evaluate

from hf_fsl_sage.metrics._coco import rouge_l
from hf_fsl_sage.metrics._common import (
    COCO_CAPTION_URL,
    COCO_TOKENIZER_ARG,
    E2E_CITATION,
    INPUTS_DESCRIPTION,
    check_inputs,
    features,
)
from hf_fsl_sage.metrics._tokenize import coco_tokenize_pairs

_DESCRIPTION = """
ROUGE-L as the MS-COCO caption evaluation code computes it for the E2E NLG Challenge:
per prediction, the longest common subsequence with each reference gives a precision
and a recall; the best precision and the best recall over the references are combined
into an F-measure with beta = 1.2; the score is the mean over predictions, in [0, 1].
Texts are first PTB-tokenized, lowercased and stripped of punctuation.
"""

_KWARGS_DESCRIPTION = (
    INPUTS_DESCRIPTION
    + COCO_TOKENIZER_ARG
    + """
Returns:
    rouge_l (`float`), tokenizer (`str`, the tokenizer used),
    tokenizer_fallback_reason (`str`, only when "ptb" fell back to "simple").
"""
)

_CITATION = (
    """\
@inproceedings{lin2004rouge,
  title     = {{ROUGE}: A Package for Automatic Evaluation of Summaries},
  author    = {Lin, Chin-Yew},
  booktitle = {Text Summarization Branches Out},
  pages     = {74--81},
  year      = {2004}
}
"""
    + E2E_CITATION
)


class E2ERougeL(evaluate.Metric):
    """COCO ROUGE-L."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=features(),
            codebase_urls=[COCO_CAPTION_URL],
        )

    def _compute(self, predictions: list[str], references: list[list[str]], tokenizer: str = "ptb") -> dict:
        check_inputs(predictions, references)
        hyps, refs, used, fallback = coco_tokenize_pairs(predictions, references, tokenizer)
        score, _ = rouge_l(hyps, refs)
        result: dict = {"rouge_l": score, "tokenizer": used}
        if fallback is not None:
            result["tokenizer_fallback_reason"] = fallback
        return result
