"""Summaries of profiles: CPU by package, top gemframe functions (cumulative), top self time.

    python bench/_profiles.py PROFILE.pstats|PROFILE.pyisession [N]

Reads cProfile files (``.pstats``) and pyinstrument sessions (``.pyisession``).
"""

from __future__ import annotations

import collections
import sys
from typing import Any


def package(filename: str) -> str:
    if "/gemframe/" in filename:
        return "gemframe"
    if "site-packages/" in filename:
        return filename.split("site-packages/")[-1].split("/")[0]
    if filename.startswith("/"):
        return "stdlib " + filename.split("/")[-1]
    return "builtins / C"


def _label(filename: str, line: int, name: str) -> str:
    short = filename.split("site-packages/")[-1].replace("/work/main/", "")
    if "/lib/python3" in short:
        short = short.split("/lib/")[-1]
    return f"{short}:{line}({name})"


def _pstats(path: str) -> tuple[collections.Counter, dict[str, float], dict[str, float]]:
    import pstats

    stats = pstats.Stats(path)
    by_package: collections.Counter[str] = collections.Counter()
    cumulative: dict[str, float] = {}
    own: dict[str, float] = {}
    for (filename, line, name), (_, _, tottime, cumtime, _) in stats.stats.items():  # type: ignore[attr-defined]
        by_package[package(filename)] += tottime
        label = _label(filename, line, name)
        if "/gemframe/" in filename:
            cumulative[label] = cumtime
        own[label] = own.get(label, 0.0) + tottime
    return by_package, cumulative, own


def _pyinstrument(path: str) -> tuple[collections.Counter, dict[str, float], dict[str, float]]:
    from pyinstrument.session import Session

    root = Session.load(path).root_frame()
    by_package: collections.Counter[str] = collections.Counter()
    cumulative: dict[str, float] = collections.defaultdict(float)
    own: dict[str, float] = collections.defaultdict(float)

    def walk(frame: Any, active: frozenset[str]) -> None:
        filename = frame.file_path or ""
        label = _label(filename, frame.line_no or 0, frame.function or "?")
        self_time = frame.total_self_time
        by_package[package(filename) if filename else "builtins / C"] += self_time
        own[label] += self_time
        if "/gemframe/" in filename and label not in active:  # count recursion once
            cumulative[label] += frame.time
        for child in frame.children:
            if not child.is_synthetic:  # "[self]" children are already in total_self_time
                walk(child, active | {label})

    if root is not None:
        walk(root, frozenset())
    return by_package, cumulative, own


def summary(path: str, top: int = 25) -> dict[str, list[tuple[str, float]]]:
    """``by_package``: (package, self s); ``gemframe``: (function, cumulative s);
    ``self``: top functions by self time (any package); ``total``: [("total", s)]."""
    by_package, cumulative, own = (_pyinstrument if path.endswith(".pyisession") else _pstats)(path)
    return {
        "by_package": by_package.most_common(top),
        "gemframe": sorted(cumulative.items(), key=lambda x: -x[1])[:top],
        "self": sorted(own.items(), key=lambda x: -x[1])[:top],
        "total": [("total", sum(by_package.values()))],
    }


if __name__ == "__main__":
    result = summary(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 25)
    for section, rows in result.items():
        print(f"== {section}")
        for label, seconds in rows:
            print(f"  {seconds:8.3f}  {label}")
