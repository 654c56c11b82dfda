"""Write ``src/abfp/zoo/data/sentences_calibration.txt``: calibration / finetuning sentences of
the ``minilm-l6`` task, disjoint from its evaluation sentences (``sentences.txt``).

Sentences are taken verbatim from docstrings of Python standard-library modules, classes and
functions (other modules than most of ``sentences.txt``'s), 7 to 32 words, plain prose only,
picked round-robin across modules; any sentence already in ``sentences.txt`` is skipped.
Run once with the Python that ships the docstrings (the file is frozen in the repository).

    python3 scripts/make_calibration_sentences.py [N]    (default N = 256)
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "src" / "abfp" / "zoo" / "data"
MODULES = (
    "collections", "functools", "itertools", "pathlib", "shutil", "subprocess", "threading", "zipfile",
    "datetime", "decimal", "fractions", "heapq", "inspect", "pickle", "queue", "string", "textwrap",
    "typing", "unittest", "uuid", "difflib", "contextlib", "dataclasses", "enum", "glob", "gzip", "hashlib",
    "ipaddress", "locale", "mimetypes", "operator", "pprint", "sched", "selectors", "shlex", "smtplib",
    "sqlite3", "tempfile", "timeit", "traceback", "urllib.parse", "warnings", "weakref", "zlib", "bisect",
    "codecs", "configparser", "copy", "fnmatch", "getopt", "html.parser", "imaplib", "io", "numbers",
)  # fmt: skip
BAD = re.compile(r"[`<>{}\[\]|=_#*\\$@~]|\(\)|\.\.\.|>>>|::|\bself\b|\bcls\b|https?:")


def _sentences(module_name: str) -> list[str]:
    mod = importlib.import_module(module_name)
    docs = [inspect.getdoc(mod) or ""]
    for _, obj in sorted(vars(mod).items()):
        if getattr(obj, "__module__", None) == mod.__name__ and (inspect.isclass(obj) or inspect.isfunction(obj)):
            docs.append(inspect.getdoc(obj) or "")
            if inspect.isclass(obj):
                docs += [inspect.getdoc(v) or "" for _, v in sorted(vars(obj).items()) if inspect.isfunction(v)]
    out = []
    for doc in docs:
        for para in re.split(r"\n\s*\n", doc):
            text = " ".join(para.split())
            for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", text):
                words = s.split()
                if 7 <= len(words) <= 32 and s[0].isupper() and s.endswith(".") and not BAD.search(s):
                    out.append(s)
    return list(dict.fromkeys(out))


def main(n: int = 256) -> None:
    evaluation = set((DATA / "sentences.txt").read_text(encoding="utf-8").splitlines())
    pools = [[s for s in _sentences(m) if s not in evaluation] for m in MODULES]
    chosen: list[str] = []
    seen: set[str] = set()
    i = 0
    while len(chosen) < n and any(pools):
        pool = pools[i % len(pools)]
        if pool:
            s = pool.pop(0)
            if s not in seen:
                seen.add(s)
                chosen.append(s)
        i += 1
    if len(chosen) < n:
        raise SystemExit(f"only {len(chosen)} sentences found, {n} wanted")
    (DATA / "sentences_calibration.txt").write_text("\n".join(chosen) + "\n", encoding="utf-8")
    print(f"wrote {len(chosen)} sentences from {sum(1 for p in MODULES)} modules (Python {sys.version.split()[0]})")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 256)
