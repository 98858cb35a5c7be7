"""The run configuration: one dataclass, validated up front and saved in run.json."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import MismatchError

DTYPES = ("float32", "bfloat16", "float16")
# The training side may also run in float64 (rescore, diagnose's precise reference).
TRAIN_DTYPES = (*DTYPES, "float64")
INFER_ENGINES = ("vllm", "hf")
# Above this, vLLM builds one Python object per returned log-prob and per token: a
# 49k-vocabulary model then costs ~0.3 s per generated token. Top-K is the practical path.
MAX_TOP_LOGPROBS = 1000
MIN_TEMPERATURE = 0.01
MAX_TEMPERATURE = 2.0
# Engine settings `measure` owns: overriding them with --engine-arg would make run.json lie.
RESERVED_ENGINE_ARGS = frozenset(
    {"model", "tokenizer", "dtype", "seed", "max_logprobs", "logprobs_mode",
     "tensor_parallel_size", "enforce_eager", "kv_cache_dtype", "max_model_len",
     "pipeline_parallel_size"}
)  # fmt: skip


@dataclass
class MeasureConfig:
    """Every setting of a `measure` run. Sampling settings apply to BOTH sides: vLLM samples
    with them and the training side replays them (temperature, then min-p, top-k, top-p, in
    vLLM's order, with renormalisation)."""

    model: str = "default"
    prompts: str = "builtin"
    prompt_column: str = "prompt"
    num_prompts: int | None = None
    chat_template: bool = True
    samples_per_prompt: int = 4
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int = 0
    infer_engine: str = "vllm"
    infer_dtype: str = "bfloat16"
    train_dtype: str = "float32"
    top_logprobs: int = 20
    device: str | None = None
    attn_implementation: str = "eager"
    tensor_parallel_size: int = 1
    enforce_eager: bool = False
    kv_cache_dtype: str = "auto"
    max_model_len: int | None = None
    engine_args: dict[str, Any] = field(default_factory=dict)
    chunk_prompts: int = 64
    rescore_batch_tokens: int = 4096
    model_file: str | None = None
    pipeline_parallel_size: int = 1
    device_map: str | None = None
    max_memory: str | None = None
    rescore_memory: str | None = None
    data_parallel: int = 1  # vLLM engines over shards of the prompts (Ray actors when > 1)

    def validate(self) -> None:
        """Raise a one-line MismatchError for any impossible value."""

        def bad(msg: str) -> None:
            raise MismatchError(msg)

        if self.max_tokens < 1:
            bad(f"--max-tokens must be >= 1, got {self.max_tokens}")
        if not MIN_TEMPERATURE <= self.temperature <= MAX_TEMPERATURE:
            bad(
                f"--temperature must be in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}], got "
                f"{self.temperature} (vLLM raises smaller values to 0.01, which the training "
                "side could not replay, and refuses larger ones; greedy has no sampling "
                "distribution to compare)"
            )
        if not 0 < self.top_p <= 1:
            bad(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.top_k == 0 or self.top_k < -1:
            bad(f"--top-k must be -1 (off) or >= 1, got {self.top_k}")
        if not 0 <= self.min_p < 1:
            bad(f"--min-p must be in [0, 1), got {self.min_p}")
        if self.samples_per_prompt < 1:
            bad(f"--samples-per-prompt must be >= 1, got {self.samples_per_prompt}")
        if self.num_prompts is not None and self.num_prompts < 1:
            bad(f"--num-prompts must be >= 1, got {self.num_prompts}")
        if not 1 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            bad(
                f"--top-logprobs must be in [1, {MAX_TOP_LOGPROBS}], got {self.top_logprobs} "
                "(vLLM returns top-K log-probs as Python objects; full-vocabulary is impractical)"
            )
        for name in ("infer_dtype", "train_dtype"):
            if getattr(self, name) not in DTYPES:
                bad(f"--{name.replace('_', '-')} must be one of {', '.join(DTYPES)}")
        if self.infer_engine not in INFER_ENGINES:
            bad(f"--infer-engine must be one of {', '.join(INFER_ENGINES)}")
        if self.tensor_parallel_size < 1:
            bad(f"--tensor-parallel-size must be >= 1, got {self.tensor_parallel_size}")
        if self.max_model_len is not None and self.max_model_len < 2:
            bad(f"--max-model-len must be >= 2, got {self.max_model_len}")
        if self.chunk_prompts < 1:
            bad(f"--chunk-prompts must be >= 1, got {self.chunk_prompts}")
        if self.rescore_batch_tokens < 1:
            bad(f"--rescore-batch-tokens must be >= 1, got {self.rescore_batch_tokens}")
        if self.pipeline_parallel_size < 1:
            bad(f"--pipeline-parallel-size must be >= 1, got {self.pipeline_parallel_size}")
        if self.data_parallel < 1:
            bad(f"--data-parallel must be >= 1, got {self.data_parallel}")
        if self.data_parallel > 1 and self.infer_engine != "vllm":
            bad("--data-parallel runs vLLM engines: it needs --infer-engine vllm")
        if self.max_memory is not None and self.device_map is None:
            bad("--max-memory needs --device-map (e.g. --device-map auto)")
        parse_max_memory(self.max_memory)
        parse_size(self.rescore_memory, "--rescore-memory")

    def sampling(self) -> dict[str, Any]:
        """The sampling settings both sides use (recorded in run.json)."""
        return {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "max_tokens": self.max_tokens,
            "samples_per_prompt": self.samples_per_prompt,
            "seed": self.seed,
            "replay_order": "temperature -> min_p -> top_k -> top_p -> renormalise (vLLM's)",
        }

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MeasureConfig:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def parse_engine_args(items: list[str] | None) -> dict[str, Any]:
    """Parse repeated `key=value` engine arguments; values are read as JSON when they parse."""
    import json

    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise MismatchError(f"--engine-arg expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        key = key.strip().replace("-", "_")
        if not key:
            raise MismatchError(f"--engine-arg has an empty key: {item!r}")
        if key in RESERVED_ENGINE_ARGS:
            raise MismatchError(
                f"--engine-arg {key} is set by measure itself; use its own flag "
                "(e.g. --infer-dtype, --seed, --max-model-len) so run.json records it"
            )
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


_MEMORY_SIZE = r"\d+(\.\d+)?\s*([KMGT]i?B|B)"
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip


def parse_size(text: str | None, flag: str) -> int | None:
    """A byte size such as `2GiB`, `512MiB`, `1.5GB` (GiB = 2^30 bytes, GB = 10^9) as an int;
    None when not given. `flag` names the option in the one-line error."""
    import re

    if text is None or not str(text).strip():
        return None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)", str(text).strip(), flags=re.IGNORECASE)
    if not m or float(m.group(1)) <= 0:
        raise MismatchError(f"{flag} expects a size like 2GiB or 512MiB, got {text!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def parse_max_memory(text: str | None) -> dict[int | str, str] | None:
    """`--max-memory 0=70GiB,1=70GiB,cpu=200GiB` as accelerate's `max_memory` dict (GPU
    indices as ints, `cpu` / `mps` as names); None when not given."""
    import re

    if text is None or not text.strip():
        return None
    out: dict[int | str, str] = {}
    for item in text.split(","):
        key, sep, size = (x.strip() for x in item.partition("="))
        if not sep or not key or not re.fullmatch(_MEMORY_SIZE, size):
            raise MismatchError(
                f"--max-memory expects DEVICE=SIZE pairs like 0=70GiB,cpu=200GiB, got {item.strip()!r}"
            )
        if key.isdigit():
            out[int(key)] = size
        elif key in ("cpu", "mps"):
            out[key] = size
        else:
            raise MismatchError(
                f"--max-memory device {key!r} must be a GPU index (0, 1, ...) or cpu"
            )
    return out
