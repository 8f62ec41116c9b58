"""Prompt files in (architecture.md §6): JSONL or plain text, every problem an error naming the file and line."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from rshard_hpc.errors import InputError


@dataclass(frozen=True)
class Prompt:
    id: str | int  # as the file gives it (a JSON string or integer), else the line number
    text: str
    line: int  # 1-based line number in the prompt file


def read_prompts(path) -> list[Prompt]:
    """JSONL ({"text": ..., "id": ...} a line; blank lines skipped) or plain text (one prompt a line).

    Every problem is an InputError naming the file and line, found before any work starts."""
    path = Path(path)
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read prompt file {path}: {exc}") from exc
    lines = raw.splitlines()
    is_jsonl = path.suffix in (".jsonl", ".json") or next((l for l in lines if l.strip()), "").lstrip().startswith("{")
    prompts = _parse_jsonl(path, lines) if is_jsonl else _parse_text(path, lines)
    if not prompts:
        raise InputError(f"prompt file {path} holds no prompts")
    seen = {}
    for p in prompts:
        if p.id in seen:
            raise InputError(f"{path}:{p.line}: id {p.id!r} repeats the id of line {seen[p.id]}")
        seen[p.id] = p.line
    return prompts


def _parse_jsonl(path: Path, lines) -> list[Prompt]:
    out = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise InputError(f"{path}:{number}: not valid JSON ({exc.args[0] if exc.args else exc})") from exc
        if not isinstance(obj, dict):
            raise InputError(f"{path}:{number}: expected a JSON object with a \"text\" field")
        if "text" not in obj:
            raise InputError(f"{path}:{number}: no \"text\" field")
        text = obj["text"]
        if not isinstance(text, str):
            raise InputError(f"{path}:{number}: \"text\" must be a string")
        if not text.strip():
            raise InputError(f"{path}:{number}: empty prompt")
        pid = obj.get("id", number)
        if isinstance(pid, bool) or not isinstance(pid, (str, int)):
            raise InputError(f"{path}:{number}: \"id\" must be a string or an integer, not {json.dumps(pid)}")
        out.append(Prompt(pid, text, number))
    return out


def _parse_text(path: Path, lines) -> list[Prompt]:
    out = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            raise InputError(f"{path}:{number}: empty prompt (plain-text prompt files hold one prompt a line)")
        out.append(Prompt(number, line, number))
    return out


def id_key(pid: str | int) -> str:
    """A prompt id as a text key (JSON object keys, reports) that keeps 1 and "1" apart: an integer id is its
    digits; a string id that reads as an integer is quoted."""
    if isinstance(pid, int):
        return str(pid)
    return json.dumps(pid) if pid.lstrip("-").isdigit() else pid
