"""The benchmark suite's smoke run (tiny sizes), so bench/ never rots. No timing is asserted.

One run of ``run_all.py --quick``, every benchmark: in quick mode run_all imports polars and
gemframe once and forks every worker, server and CLI process from that (bench/_forkhost.py), so
the whole smoke run costs ~6 CPU-s and ~15 s; one process per benchmark paid that import ten
times (~12 CPU-s). The benchmarks are read from bench/run_all.py, so a new one is smoke-tested
without touching this file."""

import ast
import subprocess
import sys

import pytest

from .conftest import ROOT


def _run_all_constant(name: str):
    """A literal assigned at the top of bench/run_all.py (read, not imported: run_all puts
    bench/ on sys.path as it is imported)."""
    tree = ast.parse((ROOT / "bench" / "run_all.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise LookupError(f"bench/run_all.py has no {name}")


MODULES = _run_all_constant("MODULES")
TITLES = _run_all_constant("TITLES")


def test_every_benchmark_is_smoke_tested():
    assert len(MODULES) >= 7 and set(MODULES) == set(TITLES)


@pytest.mark.slow
def test_bench_quick_runs_and_reports(repo_root, tmp_path):
    out = tmp_path / "RESULTS.md"
    result = subprocess.run(
        [sys.executable, str(repo_root / "bench" / "run_all.py"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=repo_root,
    )
    report = out.read_text() if out.exists() else ""
    failed = [TITLES[name] for name in MODULES if f"| {TITLES[name]} | **failed to run**" in report]
    assert result.returncode == 0 and not failed, (failed, result.stderr[-4000:])  # which benchmark failed
    missing = [TITLES[name] for name in MODULES if f"## {TITLES[name]}" not in report]
    assert not missing, missing  # every benchmark wrote its section
