"""Prompt-parallel generation: a prompt file dealt out over the ranks of a ``torchrun`` job
(``hrkernels generate --prompts FILE --out-dir DIR``).

The file holds one prompt per line, or a JSON object per line with ``prompt`` and optionally
``negative_prompt``, ``seed``, ``height`` and ``width`` (blank lines are skipped). Line ``n``
(1-based, as an editor counts) becomes ``DIR/line<n>.png``; rank ``r`` of ``W`` makes the lines
``r, r + W, ...`` of the non-blank ones, so every image is made by one rank and written once (to a
temporary name, then renamed: a file that exists is whole). A rerun skips the images that exist,
so a job that failed resumes where it stopped. No process group is needed: the ranks never talk.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["PromptJob", "image_path", "read_prompts", "share", "write_image"]

_KEYS = ("prompt", "negative_prompt", "seed", "height", "width")


@dataclass(frozen=True)
class PromptJob:
    """One line of a prompt file (None: the command line's value)."""

    line: int
    prompt: str
    negative_prompt: str | None = None
    seed: int | None = None
    height: int | None = None
    width: int | None = None


def _field(entry: dict[str, Any], key: str, kind: type, where: str) -> Any:
    value = entry.get(key)
    if value is None:
        return None
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"{where}: {key} must be {'an int' if kind is int else 'a string'}; got "
                         f"{value!r}")
    return value


def _parse_line(text: str, where: str) -> dict[str, Any]:
    if not text.startswith("{"):
        return {"prompt": text}
    try:
        entry = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where}: not a JSON object ({error.msg}); write a prompt, or "
                         f"{{\"prompt\": ...}} with {', '.join(_KEYS[1:])}") from None
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: a JSON line must be an object; got {type(entry).__name__}")
    unknown = sorted(set(entry) - set(_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; allowed: {', '.join(_KEYS)}")
    if not isinstance(entry.get("prompt"), str) or not entry["prompt"].strip():
        raise ValueError(f"{where}: a JSON line needs a non-empty \"prompt\" string")
    return entry


def read_prompts(path: str | os.PathLike) -> list[PromptJob]:
    """The jobs of a prompt file, in line order (every rank reads the whole file: each raises the
    same error before any work).

    Raises:
        ValueError: the file cannot be read, holds no prompt, or a line is not a prompt or a JSON
            object of the allowed keys (the message names ``FILE:LINE``).
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"--prompts {str(path)!r}: cannot read it ({error})") from None
    jobs = []
    for number, raw in enumerate(lines, start=1):
        text = raw.strip()
        if not text:
            continue
        where = f"{path}:{number}"
        entry = _parse_line(text, where)
        height, width = (_field(entry, key, int, where) for key in ("height", "width"))
        for key, value in (("height", height), ("width", width)):
            if value is not None and value < 1:
                raise ValueError(f"{where}: {key} must be >= 1; got {value}")
        jobs.append(PromptJob(number, entry["prompt"],
                              _field(entry, "negative_prompt", str, where),
                              _field(entry, "seed", int, where), height, width))
    if not jobs:
        raise ValueError(f"--prompts {str(path)!r} holds no prompt (one per line)")
    return jobs


def share(jobs: Sequence[PromptJob], rank: int, world_size: int) -> list[PromptJob]:
    """Rank ``rank``'s jobs: every ``world_size``-th, starting at its rank (a fixed deal, so a
    rerun with the same world size gives every rank the same lines)."""
    return list(jobs[rank::world_size])


def image_path(out_dir: Path, job: PromptJob) -> Path:
    """Where a job's image goes: ``out_dir / "line<n>.png"``."""
    return out_dir / f"line{job.line}.png"


def write_image(image: Any, path: Path) -> None:
    """Save a PIL image to ``path`` whole or not at all (a temporary file, then a rename)."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    image.save(partial, format="PNG")
    os.replace(partial, path)
