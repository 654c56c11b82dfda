"""On-disk cache of finished evaluation runs: a killed sweep resumes where it stopped.

The cache is one SQLite database (``runs.sqlite`` in ``--cache-dir``), one row per finished
run, keyed by :func:`run_key` over everything that decides the run's result (see
:mod:`abfp.evaluate.fingerprint`: the model's weights and structure, the data, the metric,
the device config, the numerics version, ...). Properties:

* **Concurrent writers lose nothing**: every ``put`` is its own transaction (WAL journal,
  a busy timeout of :data:`BUSY_TIMEOUT_S`), so several ``abfp eval`` processes may share
  one folder; each row is written whole or not at all.
* **kill -9 at any point** leaves every committed row (SQLite's journal is replayed on the
  next open) and loses at most the run in flight.
* **Damage is never served.** Each row carries a sha256 of its key and value; a row whose
  digest, JSON or fields do not check out is reported (a :class:`CacheWarning` naming the
  file and the entry), deleted and recomputed. A file that is not an abfp cache database
  (garbage bytes, truncated, another schema) is reported naming the file, moved aside to
  ``<name>.damaged-N`` and replaced by an empty cache.

Old JSON cache files (``<task>.json``, abfp before the SQLite cache) are not read: they are
simply ignored.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import sqlite3
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping

from ..numerics import NUMERICS_VERSION

try:  # POSIX advisory locks serialise the open-check-repair of one cache file between processes
    import fcntl
except ImportError:  # pragma: no cover - Windows: SQLite's own locking only
    fcntl = None  # type: ignore[assignment]

__all__ = ["CACHE_FILE", "SCHEMA_VERSION", "CacheWarning", "RunCache", "run_key", "write_json_atomic"]

#: The database's file name inside ``--cache-dir``.
CACHE_FILE = "runs.sqlite"
#: Version of the table layout below (``PRAGMA user_version``); another value is "wrong schema".
SCHEMA_VERSION = 1
#: ``PRAGMA application_id`` of an abfp cache ("ABFP" in ASCII).
APPLICATION_ID = 0x41424650
#: Seconds a writer waits for another process's transaction before giving up.
BUSY_TIMEOUT_S = 60.0

_COLUMNS = ("key", "value", "digest", "info", "written")
_CREATE = ("CREATE TABLE runs (key TEXT PRIMARY KEY NOT NULL, value TEXT NOT NULL, digest TEXT NOT NULL, "
           "info TEXT NOT NULL DEFAULT '', written REAL NOT NULL)")


class CacheWarning(UserWarning):
    """A damaged cache file or entry was found; it is not used and its runs are recomputed."""


def _warn(message: str) -> None:
    """Emit a :class:`CacheWarning`. It is attributed to "abfp cache" rather than to a line of
    code, so the command line shows one line (no source excerpt) and every damaged entry is
    reported, not just the first."""
    warnings.warn_explicit(message, CacheWarning, filename="abfp cache", lineno=0, module="abfp.evaluate.cache")


def run_key(parts: Mapping[str, Any]) -> str:
    """The key of one run: sha256 of ``parts`` (JSON, sorted keys) and :data:`NUMERICS_VERSION`.

    ``parts`` must be JSON-serialisable; the caller puts in it everything that decides the
    run's result (see :func:`abfp.evaluate.fingerprint.context`).
    """
    blob = json.dumps({"parts": dict(parts), "numerics": NUMERICS_VERSION}, sort_keys=True, allow_nan=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _digest(key: str, value: str) -> str:
    return hashlib.sha256(f"{key}\0{value}".encode()).hexdigest()


def _entry_problem(entry: Any) -> str | None:
    """Why a decoded cache value is not a usable run result (``None`` when it is)."""
    if not isinstance(entry, dict):
        return f"a {type(entry).__name__}, not an object"
    v, s = entry.get("value"), entry.get("seconds")
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        return f"its value is {v!r}"
    if not isinstance(s, (int, float)) or isinstance(s, bool):
        return f"its seconds are {s!r}"
    if not isinstance(entry.get("extra", {}), dict):
        return "its extra metrics are not an object"
    return None


class RunCache:
    """Finished runs by key, in the SQLite database ``path`` (in memory only when ``path`` is None).

    ``get`` returns a checked entry (a dict with a finite ``value`` and ``seconds``) or None;
    ``put`` commits one entry at once. Usable as a context manager (closes the connection).
    """

    def __init__(self, path: str | os.PathLike | None) -> None:
        self.path = Path(path) if path is not None else None
        self._lock = threading.Lock()
        self._memory: dict[str, Any] = {}
        self._conn: sqlite3.Connection | None = None
        if self.path is not None:
            if self.path.is_dir():
                raise ValueError(f"cache file {str(self.path)!r} is a folder; give a file name")
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._conn = self._open()
            except (OSError, sqlite3.OperationalError) as e:  # an unusable folder, no permission, ...
                raise ValueError(f"cache file {str(self.path)!r} cannot be opened: {e}") from None

    # ------------------------------------------------------------------ opening and repair
    @contextlib.contextmanager
    def _file_lock(self) -> Iterator[None]:
        assert self.path is not None
        if fcntl is None:
            yield
            return
        with open(self.path.with_name(self.path.name + ".lock"), "a") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(str(self.path), timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        return conn

    def _check(self, conn: sqlite3.Connection) -> str | None:
        """Why the open database is not a usable abfp cache (``None`` when it is); creates the
        table in an empty database."""
        ok = conn.execute("PRAGMA quick_check").fetchall()
        if ok != [("ok",)]:
            return "integrity check failed: " + "; ".join(str(r[0]) for r in ok[:3])
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        app = conn.execute("PRAGMA application_id").fetchone()[0]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if not tables and app == 0:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("BEGIN IMMEDIATE")
            try:
                # another process may have created it meanwhile (no lock file on this system)
                if not conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'runs'").fetchone():
                    conn.execute(_CREATE)
                    conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            return self._check(conn)
        if app != APPLICATION_ID:
            return f"not an abfp cache (application id {app:#x}, tables {', '.join(tables) or 'none'})"
        if version != SCHEMA_VERSION:
            return f"cache schema version {version}, this abfp reads version {SCHEMA_VERSION}"
        cols = tuple(r[1] for r in conn.execute("PRAGMA table_info(runs)"))
        if cols != _COLUMNS:
            return f"table 'runs' has columns {cols}, expected {_COLUMNS}"
        return None

    def _open(self) -> sqlite3.Connection:
        assert self.path is not None
        with self._file_lock():
            conn = self._connect()
            try:
                problem = self._check(conn)
            except sqlite3.DatabaseError as e:  # garbage bytes, a truncated file, ...
                problem = str(e)
            if problem is None:
                self._tune(conn)
                return conn
            conn.close()
            aside = self._move_aside()
            _warn(f"cache file {self.path} is damaged ({problem}); moved it to {aside} and recomputing its runs")
            conn = self._connect()
            problem = self._check(conn)
            if problem is not None:  # pragma: no cover - a fresh file we just created
                raise ValueError(f"cache file {self.path}: cannot create a cache database ({problem})")
            self._tune(conn)
            return conn

    @staticmethod
    def _tune(conn: sqlite3.Connection) -> None:
        # WAL: readers never block the writer; FULL: a commit is on disk before put() returns
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")

    def _move_aside(self) -> Path:
        assert self.path is not None
        n = 1
        while (aside := self.path.with_name(f"{self.path.name}.damaged-{n}")).exists():
            n += 1
        os.replace(self.path, aside)
        for suffix in ("-wal", "-shm", "-journal"):  # journals of the damaged file belong to it
            side = self.path.with_name(self.path.name + suffix)
            if side.exists():
                os.replace(side, aside.with_name(aside.name + suffix))
        return aside

    # ------------------------------------------------------------------ entries
    def _damaged_entry(self, key: str, why: str) -> None:
        _warn(f"cache file {self.path}: entry {key[:16]} is damaged ({why}); recomputing it")
        assert self._conn is not None
        with self._lock, contextlib.suppress(sqlite3.DatabaseError):  # put() will overwrite it anyway
            self._conn.execute("DELETE FROM runs WHERE key = ?", (key,))

    def get(self, key: str) -> dict[str, Any] | None:
        """The checked entry stored under ``key``, or None (missing or damaged: recompute)."""
        if self._conn is None:
            return self._memory.get(key)
        try:
            with self._lock:
                row = self._conn.execute("SELECT value, digest FROM runs WHERE key = ?", (key,)).fetchone()
        except sqlite3.DatabaseError as e:
            _warn(f"cache file {self.path}: cannot read entry {key[:16]} ({e}); recomputing it")
            return None
        if row is None:
            return None
        value, digest = row
        if not isinstance(value, str) or digest != _digest(key, value):
            self._damaged_entry(key, "checksum mismatch")
            return None
        try:
            entry = json.loads(value)
        except ValueError as e:
            self._damaged_entry(key, f"invalid JSON: {e}")
            return None
        problem = _entry_problem(entry)
        if problem is not None:
            self._damaged_entry(key, problem)
            return None
        return entry

    def __contains__(self, key: str) -> bool:
        return self.get(key) is not None

    def put(self, key: str, value: dict[str, Any], info: str = "") -> None:
        """Store ``value`` (a JSON-serialisable run result) under ``key``, committed at once."""
        problem = _entry_problem(value)
        if problem is not None:
            raise ValueError(f"cannot cache run {key[:16]}: {problem}")
        if self._conn is None:
            self._memory[key] = value
            return
        text = json.dumps(value, sort_keys=True)
        try:
            with self._lock:
                self._conn.execute("INSERT OR REPLACE INTO runs (key, value, digest, info, written) "
                                   "VALUES (?, ?, ?, ?, ?)", (key, text, _digest(key, text), info, time.time()))
        except sqlite3.DatabaseError as e:  # the run itself is fine: report, keep going uncached
            _warn(f"cache file {self.path}: cannot store run {key[:16]} ({e}); it is not cached")

    def keys(self) -> list[str]:
        """Every stored key (damaged entries included; :meth:`get` checks them)."""
        if self._conn is None:
            return list(self._memory)
        with self._lock:
            return [r[0] for r in self._conn.execute("SELECT key FROM runs ORDER BY key")]

    def __len__(self) -> int:
        return len(self.keys())

    def close(self) -> None:
        """Close the database, first folding the write-ahead log into the main file (so that a
        finished run leaves one self-contained file; another process still using it keeps it)."""
        with self._lock:
            if self._conn is not None:
                try:
                    self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                except sqlite3.Error:  # busy or damaged: the log stays, SQLite replays it on open
                    pass
                self._conn.close()
                self._conn = None

    def __enter__(self) -> "RunCache":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


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
