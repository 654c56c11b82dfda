"""JSON round trip of the flat parameter dataclasses (ABFPConfig, EnergyParams)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def dump(d: dict[str, Any], path: str | Path | None = None, *, indent: int | None = 2) -> str:
    """``d`` as sorted JSON; also written to ``path`` when given."""
    text = json.dumps(d, indent=indent, sort_keys=True)
    if path is not None:
        Path(path).write_text(text + "\n")
    return text


def load(text_or_path: str | Path, what: str) -> Any:
    """Parse a JSON string, or read a file when given a path that exists; ValueError names ``what``."""
    s = str(text_or_path)
    if not s.lstrip().startswith("{") and Path(s).exists():
        s = Path(s).read_text()
    try:
        return json.loads(s)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON for {what}: {e}") from None
