"""Prompt loading: the built-in set and every supported file format, and their errors."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from mismatch_cli.errors import MismatchError
from mismatch_cli.prompts import builtin_prompts, load_prompts


def test_builtin_set_has_at_least_200_prompts_of_four_kinds() -> None:
    ps = builtin_prompts()
    assert len(ps) >= 200
    assert {p.category for p in ps} == {"math", "code", "reasoning", "writing"}
    assert len({p.content for p in ps}) == len(ps)
    assert [p.prompt_id for p in ps] == list(range(len(ps)))
    # the first few already mix all kinds (what --num-prompts N takes)
    assert {p.category for p in ps[:8]} == {"math", "code", "reasoning", "writing"}


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet"])
def test_tables_with_a_prompt_column(tmp_path: Path, fmt: str) -> None:
    df = pd.DataFrame({"question": ["What is 2+2?", "Name a colour."], "x": [1, 2]})
    f = tmp_path / f"p.{fmt}"
    {
        "jsonl": lambda: df.to_json(f, orient="records", lines=True),
        "json": lambda: df.to_json(f, orient="records"),
        "csv": lambda: df.to_csv(f, index=False),
        "parquet": lambda: df.to_parquet(f),
    }[fmt]()
    ps = load_prompts(f, column="question")
    assert [p.content for p in ps] == ["What is 2+2?", "Name a colour."]
    with pytest.raises(MismatchError, match="no 'prompt' or 'messages' column"):
        load_prompts(f)


def test_text_file_one_prompt_per_line(tmp_path: Path) -> None:
    f = tmp_path / "p.txt"
    f.write_text("first prompt\n\n  second prompt  \n")
    assert [p.content for p in load_prompts(f)] == ["first prompt", "second prompt"]


def test_messages_column_of_chat_turns(tmp_path: Path) -> None:
    f = tmp_path / "p.jsonl"
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    f.write_text(json.dumps({"messages": turns}) + "\n")
    (p,) = load_prompts(f)
    assert p.messages() == turns


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.txt", "", "is empty"),
        ("bad.jsonl", '{"prompt": "a"}\n{not json\n', "cannot parse"),
        ("bad.json", "[1, 2", "cannot parse"),
        ("blank.csv", "prompt\n\n", "empty"),
        ("bad.messages.jsonl", '{"messages": "hello"}\n', "messages"),
        ("p.yaml", "prompt: a", "unsupported prompt file type"),
    ],
)
def test_bad_files_give_one_clear_error(
    tmp_path: Path, name: str, content: str, message: str
) -> None:
    f = tmp_path / name
    f.write_text(content)
    with pytest.raises(MismatchError, match=message):
        load_prompts(f)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(MismatchError, match="not found"):
        load_prompts(tmp_path / "nope.jsonl")
