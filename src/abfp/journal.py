"""Journals: what a long command has finished, so that a killed run loses at most its last unit.

A :class:`Journal` is one JSON file of named records (a finished stage, a measured point),
written atomically after each :meth:`Journal.put`, plus optional *sidecar* files beside it
(``<stem>.<name>``: tensors, checkpoints). It carries an *identity*: fingerprints of everything
that decides its records (model, data, metric, settings, numerics version). A run with
``resume=True`` continues a journal of the same identity and is refused, naming the fields that
differ, for another run's (:class:`JournalMismatch`); without ``resume`` the journal and its
sidecars are replaced. Users: ``abfp tune`` (:mod:`abfp.tune.journal`) and ``abfp precision``
(:mod:`abfp.precision.experiment`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

from .outputs import atomic_write_text

__all__ = ["JournalMismatch", "Journal", "remove_journal"]


class JournalMismatch(ValueError):
    """``resume=True`` with a journal written by another run (fields named in the message), or a
    damaged one."""


def _sidecar(path: Path, name: str) -> Path:
    return path.with_name(f"{path.stem}.{name}")


def remove_journal(path: str | Path, sidecars: Sequence[str] = ()) -> None:
    """Remove a journal and its sidecar files (after the run's outputs are written)."""
    p = Path(path)
    for f in (p, *(_sidecar(p, n) for n in sidecars)):
        f.unlink(missing_ok=True)


#: How to start afresh, said by every refusal to resume (the API's ``resume=False``; the command
#: lines refuse an unfinished journal without ``--resume`` unless ``--force`` is given).
AFRESH = "start afresh without resume (on the command line: --force instead of --resume)"


def _describe(field: str, was: Any, now: Any) -> str:
    """``field``, and where both values are JSON objects (a run's options, its config) the keys
    that differ with their values in the journal and now: ``options (steps: 200 -> 300)``."""
    try:
        a, b = json.loads(was), json.loads(now)
    except (TypeError, ValueError):
        return field
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return field
    keys = sorted(k for k in set(a) | set(b) if a.get(k, _ABSENT) != b.get(k, _ABSENT))
    if not keys:
        return field
    shown = "; ".join(f"{k}: {_value(a, k)} -> {_value(b, k)}" for k in keys[:6])
    return f"{field} ({shown}{'; ...' if len(keys) > 6 else ''})"


_ABSENT = object()


def _value(d: dict, key: str) -> str:
    return "(absent)" if key not in d else json.dumps(d[key], default=str)[:60]


class Journal:
    """One journal file (see the module). ``kind`` names it in messages and in its format tag;
    ``sidecars``: the names of its sidecar files (removed with it)."""

    def __init__(self, path: str | Path, identity: Mapping[str, str], resume: bool, *, kind: str,
                 sidecars: Sequence[str] = ()) -> None:
        self.path = Path(path)
        self.identity = dict(identity)
        self.kind = kind
        self.sidecars = tuple(sidecars)
        self.records: dict[str, Any] = {}
        self.resumed = False
        fmt = self.format
        if resume and self.path.is_file():
            try:
                blob = json.loads(self.path.read_text())
                if blob.get("format") != fmt:
                    raise ValueError(f"format {blob.get('format')!r}, not {fmt!r}")
                old = dict(blob["identity"])
                records = dict(blob["records"])
            except (ValueError, KeyError, TypeError) as e:
                raise JournalMismatch(f"{kind} journal {self.path} is damaged ({e}); {AFRESH}") \
                    from None
            differ = sorted(k for k in set(old) | set(self.identity) if old.get(k) != self.identity.get(k))
            if differ:
                said = ", ".join(_describe(k, old.get(k), self.identity.get(k)) for k in differ)
                raise JournalMismatch(f"{kind} journal {self.path} was written by another run: its {said} "
                                      f"differ from this one's; {AFRESH}")
            self.records, self.resumed = records, True
        else:
            remove_journal(self.path, self.sidecars)
            self._write()

    @property
    def format(self) -> str:
        return f"abfp-{self.kind}-journal/1"

    def sidecar(self, name: str) -> Path:
        """The path of sidecar ``name`` (one of ``sidecars``)."""
        if name not in self.sidecars:
            raise KeyError(f"{name!r} is not a sidecar of this journal")
        return _sidecar(self.path, name)

    def get(self, name: str) -> Any:
        """Record ``name``, or None."""
        return self.records.get(name)

    def put(self, name: str, record: Any) -> None:
        """Record ``name`` (JSON round trip: tuples become lists), written before this returns."""
        self.records[name] = json.loads(json.dumps(record, default=_jsonable, allow_nan=True))
        self._write()

    def finish(self) -> None:
        """Remove the journal and its sidecars (the run's outputs are written)."""
        remove_journal(self.path, self.sidecars)

    def _write(self) -> None:
        atomic_write_text(self.path, json.dumps({"format": self.format, "identity": self.identity,
                                                 "records": self.records}, indent=1, sort_keys=True,
                                                allow_nan=True) + "\n")


def _jsonable(v: Any) -> Any:
    if isinstance(v, (set, frozenset)):
        return sorted(v)
    if hasattr(v, "item"):
        return v.item()
    return str(v)
