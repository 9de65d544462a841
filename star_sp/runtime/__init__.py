"""The model-forward machinery shared by every framework adapter: the KV caches a host keeps, the passes
that run one model forward under Star Attention (prefill, query, decode step), the fixed-shape decode
step and its CUDA graph, and sampling. Framework-neutral: no transformers or Megatron import here."""
