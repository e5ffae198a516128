"""The benchmark suite's smoke run (tiny sizes), so bench/ never rots. No timing is asserted.

One test per benchmark (``run_all.py --quick --only NAME``), so the workers share them out:
run as one process, the suite was the longest test by far (34 s idle, 200 s on a loaded
2-CPU machine). The benchmarks are read from bench/run_all.py, so a new one is smoke-tested
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
@pytest.mark.parametrize("name", MODULES)
def test_bench_quick_runs_and_reports(repo_root, tmp_path, name):
    out = tmp_path / "RESULTS.md"
    result = subprocess.run(
        [sys.executable, str(repo_root / "bench" / "run_all.py"), "--quick", "--only", name, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=repo_root,
    )
    assert result.returncode == 0, result.stderr[-2000:]  # non-zero: the benchmark failed to run
    report = out.read_text()
    assert f"## {TITLES[name]}" in report and "failed to run" not in report
