"""Quality measures for quantized models (each module states its protocol).

- ``perplexity``: token perplexity of causal LMs on held-out documents (fixed context, non-overlapping windows).
- ``lm_eval_bridge``: the same through lm-evaluation-harness (``HFLM`` + a local task YAML; optional extra).
- ``embeddings``: cosine similarity of sentence embeddings against the float model (all-MiniLM-L6-v2).
- ``images``: PSNR against the float generator from the same noise, and a Frechet distance in a small
  digits classifier's feature space.
"""
