"""On-disk cache of finished evaluation runs: a sweep that is killed resumes where it stopped.

One JSON file per sweep directory (``results.json`` by default) maps a key (task, samples,
device config, run index) to the measured values. Every update rewrites the file through a
temporary file and ``os.replace``, so a crash leaves the old or the new file, never half of
one, and loses at most the run in flight.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

from ..numerics import NUMERICS_VERSION


def run_key(task: str, samples: int | None, fmt: str, config: dict[str, Any] | None, run: int, extra: str = "") -> str:
    """A stable key for one run of one point (and of the numerics version that computed it)."""
    blob = json.dumps({"task": task, "samples": samples, "format": fmt, "config": config, "run": run, "extra": extra,
                       "numerics": NUMERICS_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


class RunCache:
    """A JSON dictionary on disk, written atomically after every ``put``."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path is not None else None
        self._lock = threading.Lock()
        self._data: dict[str, Any] = {}
        if self.path is not None and self.path.exists():
            try:
                self._data = json.loads(self.path.read_text())
            except json.JSONDecodeError:
                raise ValueError(f"cache file {self.path} is not valid JSON; delete it or pick another --cache-dir") from None

    def get(self, key: str) -> Any | None:
        return self._data.get(key)

    def __contains__(self, key: str) -> bool:
        return key in self._data

    def put(self, key: str, value: Any) -> None:
        with self._lock:
            self._data[key] = value
            if self.path is not None:
                write_json_atomic(self.path, self._data)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
