"""E2E NLG Challenge CIDEr: the MS-COCO caption evaluation's CIDEr (CIDEr-D variant)."""

import evaluate

from hf_fsl_sage.metrics._coco import cider
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
CIDEr as the MS-COCO caption evaluation code computes it for the E2E NLG Challenge:
tf-idf vectors of 1..4-grams with document frequencies taken from the references of
the evaluated corpus, clipped cosine similarity to each reference, a Gaussian length
penalty (sigma = 6), averaged over n-gram orders and references and multiplied by 10;
the score is the mean over predictions. Texts are first PTB-tokenized, lowercased and
stripped of punctuation. Because idf comes from the corpus itself, a corpus of a
single prediction always scores 0.
"""

_KWARGS_DESCRIPTION = (
    INPUTS_DESCRIPTION
    + COCO_TOKENIZER_ARG
    + """
Returns:
    cider (`float`), tokenizer (`str`, the tokenizer used),
    tokenizer_fallback_reason (`str`, only when "ptb" fell back to "simple").
"""
)

_CITATION = (
    """\
@inproceedings{vedantam2015cider,
  title     = {{CIDEr}: Consensus-based Image Description Evaluation},
  author    = {Vedantam, Ramakrishna and Zitnick, C. Lawrence and Parikh, Devi},
  booktitle = {Proceedings of CVPR},
  pages     = {4566--4575},
  year      = {2015}
}
"""
    + E2E_CITATION
)


class E2ECider(evaluate.Metric):
    """COCO CIDEr."""

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
        score, _ = cider(hyps, refs)
        result: dict = {"cider": score, "tokenizer": used}
        if fallback is not None:
            result["tokenizer_fallback_reason"] = fallback
        return result
