"""The vLLM plugin that lets vLLM's CPU build load its cached compiled model
(mismatch_cli/vllm_plugin.py): it acts only when asked, only where the attribute is missing,
and only once. The end-to-end effect (an engine start that loads instead of compiling) is
measured in docs/diagnose.md; here, the wrapping itself on stand-in loaded functions."""

from __future__ import annotations

import types
from importlib.metadata import entry_points

import pytest
import torch.compiler

from mismatch_cli import vllm_plugin


@pytest.fixture
def restore_loader(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(
        torch.compiler, "load_compiled_function", torch.compiler.load_compiled_function
    )
    return monkeypatch


def _loaded(compiled: object) -> types.SimpleNamespace:
    return types.SimpleNamespace(_artifacts=types.SimpleNamespace(compiled_fn=compiled))


def test_the_plugin_is_registered_with_vllm() -> None:
    names = {ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert "mismatch_cli.vllm_plugin:enable_cached_compile_load" in names


def test_without_the_variable_nothing_is_wrapped(restore_loader: pytest.MonkeyPatch) -> None:
    restore_loader.delenv(vllm_plugin.ENV, raising=False)
    before = torch.compiler.load_compiled_function
    vllm_plugin.enable_cached_compile_load()
    assert torch.compiler.load_compiled_function is before
    restore_loader.setenv(vllm_plugin.ENV, "0")
    vllm_plugin.enable_cached_compile_load()
    assert torch.compiler.load_compiled_function is before


def test_a_callable_without_finalize_loading_gets_a_noop_one(
    restore_loader: pytest.MonkeyPatch,
) -> None:
    def inductor_fn(*args: object) -> str:  # what vLLM's CPU path deserialises to
        return "ran"

    class VllmLike:  # vLLM's own serialisable function: keeps its method
        def finalize_loading(self, cfg: object) -> str:
            return "own"

    results = iter([_loaded(inductor_fn), _loaded(VllmLike())])
    restore_loader.setattr(torch.compiler, "load_compiled_function", lambda *a, **k: next(results))
    restore_loader.setenv(vllm_plugin.ENV, "1")
    vllm_plugin.enable_cached_compile_load()
    wrapped = torch.compiler.load_compiled_function
    vllm_plugin.enable_cached_compile_load()  # idempotent: vLLM loads plugins in each process, maybe twice
    assert torch.compiler.load_compiled_function is wrapped

    first = wrapped("file")._artifacts.compiled_fn
    assert first is inductor_fn and first.finalize_loading(object()) is None
    assert first() == "ran"  # the compiled callable itself is untouched
    second = wrapped("file")._artifacts.compiled_fn
    assert second.finalize_loading(object()) == "own"
