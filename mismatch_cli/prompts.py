"""Prompt sets: the built-in set shipped with the package, and user files.

A prompt is either a plain string (a user message) or a list of chat turns
(`[{"role": ..., "content": ...}, ...]`). The chat template is applied later, in
`measure`, when the model has one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from .errors import MismatchError, first_line

BUILTIN = "builtin"
SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt")


@dataclass(frozen=True)
class Prompt:
    """One prompt: its index in the set, and a string or a list of chat messages."""

    prompt_id: int
    content: str | list[dict[str, str]]
    category: str | None = None

    def messages(self) -> list[dict[str, str]]:
        if isinstance(self.content, str):
            return [{"role": "user", "content": self.content}]
        return self.content


def builtin_prompts() -> list[Prompt]:
    """The 240 prompts shipped with the package (math, code, reasoning, writing)."""
    text = (Path(__file__).parent / "data" / "prompts.jsonl").read_text()
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return [Prompt(int(r["id"]), r["prompt"], r.get("category")) for r in rows]


def _read_frame(path: Path) -> pd.DataFrame:
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            return pd.read_json(path, lines=True)
        if suffix == ".json":
            data = json.loads(path.read_text())
            if isinstance(data, dict):
                data = [data]
            return pd.DataFrame(data)
        if suffix == ".csv":
            return pd.read_csv(path)
        if suffix == ".parquet":
            return pd.read_parquet(path)
    except (ValueError, json.JSONDecodeError, pd.errors.ParserError, OSError) as e:
        raise MismatchError(f"cannot parse prompt file {path}: {first_line(e)}") from e
    raise MismatchError(
        f"unsupported prompt file type {suffix!r}; use one of {', '.join(SUFFIXES)}"
    )


def _as_messages(value: Any, where: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise MismatchError(f"{where}: `messages` is not a JSON list of chat turns") from e
    if hasattr(value, "tolist"):
        value = value.tolist()
    ok = (
        isinstance(value, list)
        and value
        and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)
    )
    if not ok:
        raise MismatchError(
            f"{where}: `messages` must be a non-empty list of {{role, content}} turns"
        )
    return [{"role": str(m["role"]), "content": str(m["content"])} for m in value]


def load_prompts(source: str | Path, column: str = "prompt") -> list[Prompt]:
    """Load prompts from `builtin` or a JSONL/JSON/CSV/Parquet/text file.

    Tables need a `column` of strings (default `prompt`) or a `messages` column of chat turns.
    Text files hold one prompt per non-empty line.
    """
    if str(source) == BUILTIN:
        return builtin_prompts()
    path = Path(source).expanduser()
    if not path.exists():
        raise MismatchError(f"prompt file not found: {path}")
    if not path.is_file():
        raise MismatchError(f"prompt path is not a file: {path}")
    if path.suffix.lower() in (".txt", ""):
        try:
            lines = [ln.strip() for ln in path.read_text().splitlines()]
        except UnicodeDecodeError as e:
            raise MismatchError(f"cannot parse prompt file {path}: not UTF-8 text") from e
        prompts = [Prompt(i, ln) for i, ln in enumerate(x for x in lines if x)]
    else:
        df = _read_frame(path)
        if column in df.columns:
            vals = df[column]
            bad = [i for i, v in enumerate(vals) if not isinstance(v, str) or not v.strip()]
            if bad:
                raise MismatchError(
                    f"{path}: column {column!r} has {len(bad)} empty or non-text value(s), first at row {bad[0]}"
                )
            prompts = [Prompt(i, v) for i, v in enumerate(vals)]
        elif "messages" in df.columns:
            prompts = [
                Prompt(i, _as_messages(v, f"{path} row {i}")) for i, v in enumerate(df["messages"])
            ]
        else:
            cols = ", ".join(map(str, df.columns)) or "none"
            raise MismatchError(
                f"{path} has no {column!r} or 'messages' column (columns: {cols}); "
                "choose one with --prompt-column"
            )
    if not prompts:
        raise MismatchError(f"prompt file {path} is empty")
    return prompts


def encode_prompts(prompts: list[Prompt], tokenizer: Any, chat_template: bool) -> list[list[int]]:
    """Token ids of each prompt, with the chat template when the model has one."""
    use_template = chat_template and getattr(tokenizer, "chat_template", None)
    out = []
    for p in prompts:
        if use_template:
            ids = tokenizer.apply_chat_template(
                p.messages(), add_generation_prompt=True, tokenize=True
            )
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
        else:
            text = (
                p.content
                if isinstance(p.content, str)
                else "\n".join(m["content"] for m in p.content)
            )
            ids = tokenizer(text)["input_ids"]
        out.append([int(i) for i in ids])
    return out
