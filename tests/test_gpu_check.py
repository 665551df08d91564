"""scripts/gpu_check.sh's CPU-safe part (issue 16): argument checks, --dry-run, the skip without a GPU."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=120)


def test_dry_run_says_exactly_what_runs(tmp_path):
    r = run("--dry-run", "--python", sys.executable, "--out", str(tmp_path / "gpu"), "--device", "cuda:1")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "gpu_check (dry run): on a CUDA GPU this runs, each step under 'timeout':"
    tests, bench, append = (shlex.split(line) for line in lines[1:4])
    assert tests[:2] == ["timeout", "240"] and tests[2:] == [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-rs",
                                                             str(SCRIPT.parents[1] / "tests")]
    assert bench[:2] == ["timeout", "300"] and bench[2:4] == [sys.executable, "-c"] and bench[5] == "bench"
    options = bench[6:]
    for flag, value in [("--model", "random:cvvae-v1"), ("--device", "cuda:1"),
                        ("--targets", "torch:fp32,torch:fp16,torch:bf16"), ("--ops", "encode,decode"),
                        ("--frames", "17"), ("--frame-size", "256x256"), ("--sizes", "720x1280"),
                        ("--size-frames", "17"), ("-o", str(tmp_path / "gpu"))]:
        assert options[options.index(flag) + 1] == value
    assert append[1:] == [str(SCRIPT.parent / "append_gpu_bench.py"), str(tmp_path / "gpu" / "bench.md"),
                          str(SCRIPT.parents[1] / "docs" / "benchmarks.md")]
    assert len(lines) == 4


def test_the_bench_command_parses():
    """The exact bench options of the script are accepted by `cvvae bench` (without running it)."""
    from click.testing import CliRunner

    from cvvae.tools.bench_cli import bench

    r = CliRunner().invoke(bench, ["--help"])
    for flag in ("--model", "--device", "--targets", "--ops", "--frames", "--frame-size", "--sizes", "--size-frames",
                 "--reps", "--warmup", "--gemm-seconds", "--no-plots", "--force", "--out"):
        assert flag in r.output


@pytest.mark.parametrize("args, message", [
    (["--bogus"], "gpu_check: unknown argument '--bogus'"),
    (["--device", "cpu"], "gpu_check: --device must be cuda or cuda:N, not 'cpu'"),
    (["--device"], "gpu_check: --device needs a value"),
    (["--python", "/nonexistent/python"], "gpu_check: python '/nonexistent/python' not found; pass --python PATH"),
])
def test_bad_arguments_are_usage_errors(args, message):
    r = run(*args)
    assert r.returncode == 2
    assert r.stderr.splitlines()[0].startswith(message)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the real check would run")
def test_without_a_gpu_it_skips_and_runs_nothing(tmp_path):
    r = run("--python", sys.executable, "--out", str(tmp_path / "gpu"), "--docs", str(tmp_path / "benchmarks.md"))
    assert r.returncode == 0
    assert f"no CUDA GPU visible to torch {torch.__version__}" in r.stderr
    assert "gpu_check: skipped: see the line above; nothing was run" in r.stderr
    assert not (tmp_path / "gpu").exists() and not (tmp_path / "benchmarks.md").exists()
