"""Federated split learning (FSL-SAGE and baselines) for Hugging Face causal language models."""

from .split import Smashed, SplitCausalLM, SplitClient, SplitServer, split_causal_lm

__all__ = ["Smashed", "SplitCausalLM", "SplitClient", "SplitServer", "split_causal_lm"]
__version__ = "0.1.0"
