"""The benchmark suite's smoke run (tiny sizes), so bench/ never rots. No timing is asserted."""

import subprocess
import sys

import pytest


@pytest.mark.slow
@pytest.mark.xdist_group("machine")  # the benchmarks use every CPU (tests/conftest.py)
def test_bench_quick_runs_and_reports(repo_root, tmp_path):
    out = tmp_path / "RESULTS.md"
    result = subprocess.run(
        [sys.executable, str(repo_root / "bench" / "run_all.py"), "--quick", "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=repo_root,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = out.read_text()
    for section in ("Client overhead", "Latency-bound throughput", "Cached rerun", "Streaming memory", "Images"):
        assert section in report
