"""Smoke runs of the benchmark scripts (their --quick variants): they run and print their tables.

They assert nothing about which architecture wins; the figures belong to the scripts' full runs.
"""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


@pytest.mark.parametrize(
    ("script", "args", "header"),
    [
        ("step_time.py", ["--quick", "--reps", "1"], "| d_in, F, k | architecture | step s |"),
        ("export_l0.py", ["--quick"], "| architecture | k | L0 / k: running estimate |"),
        ("synthetic.py", ["--quick", "--out", "{tmp}/synthetic.json"], "| variant | MCC | F1 |"),
        (
            "real_activations.py",
            ["--quick", "--out", "{tmp}/real.json"],
            "| variant | width | k | norm. MSE |",
        ),
    ],
)
def test_benchmark_runs(script, args, header, tmp_path):
    args = [arg.format(tmp=tmp_path) for arg in args]
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert header in done.stdout
