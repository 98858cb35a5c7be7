"""mismatch: measure the training-inference log-prob mismatch of LLMs used in RL.

The CLI (`mismatch`) is a thin shell over this library:
prompts -> rollout (vLLM) -> rescore (transformers) -> runs (Parquet on disk)
-> analysis / sweep / plots. Nothing downstream of `runs` imports vllm or transformers.
"""

__version__ = "0.1.0"
