"""Split a small GPT-2 (built from a config, no download) and check that the split is exact.

    python recipes/split_demo.py --cut_layer 1
"""

import argparse

import torch
from transformers import AutoModelForCausalLM, GPT2Config

from hf_fsl_sage import split_causal_lm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cut_layer", type=int, default=1)
    parser.add_argument("--n_layer", type=int, default=4)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(GPT2Config(n_layer=args.n_layer, n_embd=128, n_head=4)).eval()
    split = split_causal_lm(model, cut_layer=args.cut_layer)
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0  # right padding on the second row

    smashed = split.client(ids, attention_mask=mask)
    out = split.server(smashed, labels=ids)
    ref = model(input_ids=ids, attention_mask=mask, labels=ids)
    n_client = sum(p.numel() for p in split.client.parameters())
    n_server = sum(p.numel() for p in split.server.parameters())
    print(f"GPT-2 with {args.n_layer} blocks cut after block {args.cut_layer - 1}")
    print(f"client parameters: {n_client:,}   server parameters: {n_server:,}")
    print(f"smashed message: {tuple(smashed.hidden_states.shape)} hidden states, {smashed.nbytes:,} bytes")
    print(f"max |logit difference| split vs unsplit: {(out.logits - ref.logits).abs().max().item():.2e}")
    print(f"loss split {out.loss.item():.6f}  unsplit {ref.loss.item():.6f}")


if __name__ == "__main__":
    main()
