"""A vLLM general plugin (entry point `vllm.general_plugins`) that lets vLLM's CPU build load
the compiled model it cached on an earlier start, instead of compiling it again.

Why: vLLM 0.32 saves the torch.compile'd model to ~/.cache/vllm on every start and tries to
load it on the next. On the CPU platform the compiled function is Inductor's own callable
(vLLM's CPU mode compiles with `backend="inductor"`, not with vLLM's piecewise backend), and
the loader then calls `compiled_fn.finalize_loading(...)`, a method only vLLM's
`VllmSerializableFunction` has. The load fails ("'function' object has no attribute
'finalize_loading'"), vLLM logs a warning and compiles the model again: 35-55 s of every
engine start on a 2-core CPU, paid by every `measure`, `diagnose` row and integration test.

What: wrap `torch.compiler.load_compiled_function` so that, when the loaded function's
compiled callable lacks `finalize_loading`, it gets a no-op one. There is nothing to finalize
for such a callable (vLLM's own mega-artifact path returns early from `finalize_loading` for
the same reason): the loaded function runs the same Inductor kernels the compile produced.
Where the attribute exists (vLLM's GPU path) nothing changes.

The plugin is loaded by vLLM in every process of every vLLM program in this environment, so it
acts only where `MISMATCH_VLLM_AOT_LOAD=1`, which `mismatch`'s vLLM engine sets for its own
engine processes (set `MISMATCH_VLLM_AOT_LOAD=0` to turn it off)."""

from __future__ import annotations

import os
from typing import Any

ENV = "MISMATCH_VLLM_AOT_LOAD"


def _noop_finalize(*args: Any, **kwargs: Any) -> None:
    """Stands in for `VllmSerializableFunction.finalize_loading` on an Inductor callable."""


def enable_cached_compile_load() -> None:
    """vLLM calls this in each of its processes; idempotent."""
    if os.environ.get(ENV) != "1":
        return
    try:
        import torch.compiler
    except ImportError:  # pragma: no cover - vLLM always has torch
        return
    original = torch.compiler.load_compiled_function
    if getattr(original, "_mismatch_wrapped", False):
        return

    def load_compiled_function(*args: Any, **kwargs: Any) -> Any:
        loaded = original(*args, **kwargs)
        artifacts = getattr(loaded, "_artifacts", None)
        compiled = getattr(artifacts, "compiled_fn", None)
        if compiled is not None and not hasattr(compiled, "finalize_loading"):
            try:
                compiled.finalize_loading = _noop_finalize
            except (AttributeError, TypeError):  # an object that refuses attributes
                pass
        return loaded

    load_compiled_function._mismatch_wrapped = True  # type: ignore[attr-defined]
    load_compiled_function.__doc__ = original.__doc__
    torch.compiler.load_compiled_function = load_compiled_function
