"""Write a tiny random-weight causal LM with a word-level tokenizer, in the transformers layout.

    python tools/make_tiny_model.py OUT_DIR [--family llama|qwen2|qwen3|mistral] [--dtype float32]

For tests and examples that must run offline on a CPU: the model loads with
``AutoModelForCausalLM.from_pretrained(OUT_DIR)`` and ``AutoTokenizer.from_pretrained(OUT_DIR)``.
Awkward on purpose: GQA (4 query heads, 2 KV heads), head dim 12, 2 layers.
"""

from __future__ import annotations

import argparse

import torch

from star_sp.testing import save


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out")
    p.add_argument("--family", default="llama")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    print(save(args.out, args.family, args.seed, dtype=getattr(torch, args.dtype)))


if __name__ == "__main__":
    main()
