"""The workflow through a real single-node SLURM (slurmctld + slurmd + munge on localhost) with
snakemake-executor-plugin-slurm and the repository's profile; results must equal a local run.

`.ci/slurm-up.sh` installs (Debian apt) and starts SLURM when it is not running; it needs root, as in CI.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
SNAKEFILE = REPO / "workflow" / "Snakefile"
SLURM_UP = REPO / ".ci" / "slurm-up.sh"
TEST_CONFIG = REPO / ".test" / "config" / "config.yaml"
# a cluster without an accounting database: status through squeue, no account; quick first status check for the test
SLURM_ARGS = [
    "--profile",
    str(REPO / "workflow" / "profiles" / "slurm"),
    "--slurm-status-command",
    "squeue",
    "--slurm-no-account",
    "--slurm-init-seconds-before-status-checks",
    "2",
    "--jobs",
    "4",
    "--retries",
    "0",
    "--latency-wait",
    "10",
]


def _env() -> dict:
    env = os.environ.copy()
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def _logs(workdir: Path) -> str:
    return "\n".join(
        f"--- {p.relative_to(workdir)}\n{p.read_text(errors='replace')[-2000:]}"
        for p in sorted(workdir.rglob("*.log"))
        if "logs" in p.parts or "slurm_logs" in p.parts
    )


def snakemake(workdir: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "--directory", str(workdir)]
    cmd += ["--configfile", str(workdir / "config" / "config.yaml"), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=workdir, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-8000:]}\n{_logs(workdir)}"
    return proc


def make_workdir(path: Path) -> Path:
    (path / "config").mkdir(parents=True)
    (path / "config" / "config.yaml").write_text(TEST_CONFIG.read_text())
    return path


@pytest.fixture(scope="session")
def slurm() -> None:
    proc = subprocess.run(["bash", str(SLURM_UP)], capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, f"{SLURM_UP} failed:\n{proc.stdout}\n{proc.stderr}"


def test_slurm_up_is_idempotent_and_fast(slurm):
    start = time.monotonic()
    proc = subprocess.run(["bash", str(SLURM_UP)], capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr
    assert "already up" in proc.stderr
    assert elapsed < 5, f"{elapsed:.1f} s"
    status = subprocess.run(["bash", str(SLURM_UP), "--status"], capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stdout
    state = subprocess.run(["sinfo", "-h", "-n", "localhost", "-o", "%T"], capture_output=True, text=True, check=True)
    assert state.stdout.strip() in {"idle", "mixed", "allocated", "completing"}


def test_workflow_through_slurm_equals_local_run(slurm, tmp_path):
    local = make_workdir(tmp_path / "local")
    snakemake(local, "--cores", "2")

    remote = make_workdir(tmp_path / "slurm")
    proc = snakemake(remote, *SLURM_ARGS, "--slurm-logdir", str(tmp_path / "slurm_logs"))
    log = proc.stdout + proc.stderr

    # every job except the target rule went through sbatch, and SLURM saw them finish
    expected = {"simulate_input": 1, "aggregate": 1, "fit_pseudobulk": 1, "split_shards": 1, "fit_glmm": 2}
    expected |= {"warmup": 1, "merge": 1, "plot": 2, "hierarchy": 1, "summary": 1, "report_html": 1}
    expected |= {"fit_abundance": 1}  # the differential abundance analysis of .test: one job, no plot job
    submitted = re.findall(r"Job \d+ has been submitted with SLURM jobid (\d+) \(log: \S*/rule_(\w+)/", log)
    assert sorted(rule for _, rule in submitted) == sorted(r for r, n in expected.items() for _ in range(n)), log
    ids = ",".join(job for job, _ in submitted)
    states = subprocess.run(
        ["squeue", "-h", "-t", "all", "-j", ids, "-o", "%i %T"], capture_output=True, text=True, check=True
    ).stdout.split()
    assert states[1::2] == ["COMPLETED"] * len(submitted), states
    # every job asked for the CPUs it uses: one per process, `threads` (1 in .test) workers per GLMM shard
    cpus = subprocess.run(
        ["squeue", "-h", "-t", "all", "-j", ids, "-o", "%i %C"], capture_output=True, text=True, check=True
    ).stdout.split()
    assert set(cpus[1::2]) == {"1"}, cpus

    for name in ("pb", "glmm"):
        a = pd.read_csv(local / "results" / name / "results.csv").sort_values(["group", "gene"], ignore_index=True)
        b = pd.read_csv(remote / "results" / name / "results.csv").sort_values(["group", "gene"], ignore_index=True)
        pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-6, atol=1e-10)
        assert sorted(p.name for p in (local / "results" / name / "plots").iterdir()) == sorted(
            p.name for p in (remote / "results" / name / "plots").iterdir()
        )
    pd.testing.assert_frame_equal(
        pd.read_csv(local / "results" / "summary.csv"), pd.read_csv(remote / "results" / "summary.csv")
    )
    hier = ("results", "glmm", "hierarchy", "variance_partition.csv")
    pd.testing.assert_frame_equal(
        pd.read_csv(local.joinpath(*hier)), pd.read_csv(remote.joinpath(*hier)), check_exact=False, rtol=1e-6
    )


def test_job_no_node_can_run_is_an_error_not_a_wait(slurm, tmp_path):
    """A GLMM shard asking more CPUs than any node has stops the run before submitting, naming rule and limit."""
    workdir = make_workdir(tmp_path / "big")
    cfg = (workdir / "config" / "config.yaml").read_text().replace("threads: 1", "threads: 64")
    (workdir / "config" / "config.yaml").write_text(cfg)
    nodes = subprocess.run(["sinfo", "-h", "-o", "%c"], capture_output=True, text=True, check=True).stdout.split()
    start = time.monotonic()
    cmd = [sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "--directory", str(workdir)]
    cmd += ["--configfile", str(workdir / "config" / "config.yaml"), *SLURM_ARGS]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=workdir, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0, log
    assert time.monotonic() - start < 120
    largest = max(int(n.rstrip("+")) for n in nodes)
    assert f"fit_glmm jobs ask for cpus=64 but the largest SLURM node offers {largest}" in log, log
    assert "Lower config.threads" in log
    assert "has been submitted with SLURM jobid" not in log, "a job was submitted although it could never run"
