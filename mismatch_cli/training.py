"""Loading the training-side model (transformers) and choosing the device."""

from __future__ import annotations

from typing import Any

from .errors import MismatchError


def pick_device(device: str | None) -> Any:
    """`--device`: cuda when available, else cpu (explicit values are checked)."""
    import torch

    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MismatchError(f"--device {device}: CUDA is not available on this machine")
    try:
        return torch.device(device)
    except RuntimeError as e:
        raise MismatchError(f"--device {device}: {e}") from e


def torch_dtype(name: str) -> Any:
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_tokenizer(model_path: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError) as e:
        raise MismatchError(f"cannot load a tokenizer from {model_path}: {_first_line(e)}") from e


def load_model(
    model_path: str, dtype: str, device: Any, attn_implementation: str = "eager"
) -> tuple[Any, Any]:
    """Load (model, tokenizer) in `dtype` on `device`, eval mode.

    Default attention is `eager`: with it a batched, padded forward pass matches one sequence
    at a time to float32 rounding (bit-identical on the default model in our checks), so the
    results do not depend on batching; SDPA with a padding mask differed by ~1e-5 nats.
    """
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(model_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=torch_dtype(dtype), attn_implementation=attn_implementation
        )
    except (OSError, ValueError, KeyError) as e:
        raise MismatchError(f"cannot load {model_path} as a causal LM: {_first_line(e)}") from e
    model.to(device).eval()
    return model, tok


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__
