"""Federated split learning (FSL-SAGE and baselines) for Hugging Face causal language models."""

from .config import FSLSageConfig
from .federation.data import split_lm_collator, tokenize_text
from .splitting.split import Smashed, SplitCausalLM, SplitClient, SplitServer, split_causal_lm
from .trainer import FSLSageTrainer


__all__ = ["FSLSageConfig", "FSLSageTrainer", "Smashed", "SplitCausalLM", "SplitClient", "SplitServer",
           "split_causal_lm", "split_lm_collator", "tokenize_text"]
__version__ = "0.1.0"
