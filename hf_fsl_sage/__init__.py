"""Federated split learning (FSL-SAGE and baselines) for Hugging Face causal language models."""

from .config import FSLSageConfig
from .splitting.split import Smashed, SplitCausalLM, SplitClient, SplitServer, split_causal_lm
from .trainer import FSLSageTrainer


__all__ = ["FSLSageConfig", "FSLSageTrainer", "Smashed", "SplitCausalLM", "SplitClient", "SplitServer",
           "split_causal_lm"]
__version__ = "0.1.0"
