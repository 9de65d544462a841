"""Framework adapters: ``hf`` (transformers causal LMs: ``StarEngine``) and ``megatron`` (Megatron-core GPT
models: the core-attention module, its spec, RoPE and flags). Each imports its framework lazily."""
