"""Several workers on one PostgreSQL study: a real server in a temporary directory.

Skipped, with the reason, where the PostgreSQL binaries (initdb, pg_ctl) are missing, or
where the tests run as root without ``runuser`` (initdb refuses to run as root).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from slimkit.search.study import driver_url

optuna = pytest.importorskip("optuna")
pytest.importorskip("psycopg2")

WORKER = Path(__file__).with_name("_worker.py")


def _as_postgres_user(cmd: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return cmd
    return ["runuser", "-u", "nobody", "--", *cmd]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL server in a temporary directory; its URL. Stopped and removed after."""
    for tool in ("initdb", "pg_ctl"):
        if shutil.which(tool) is None:
            pytest.skip(f"PostgreSQL's {tool} is not on PATH (install PostgreSQL to run the "
                        "shared-storage tests)")
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        pytest.skip("running as root without runuser: initdb refuses root")
    root = Path(tempfile.mkdtemp(prefix="slimkit-pg-"))
    root.chmod(0o777)  # the server runs as 'nobody' when the tests run as root
    data = root / "data"
    port = _free_port()
    initdb = subprocess.run(_as_postgres_user(
        ["initdb", "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync"]),
        capture_output=True, text=True, timeout=120)
    if initdb.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"initdb failed here: {initdb.stderr.strip().splitlines()[-1:]}")
    ctl = ["pg_ctl", "-D", str(data), "-l", str(root / "log"), "-w", "-t", "60"]
    started = subprocess.run(_as_postgres_user(
        [*ctl, "-o", f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off",
         "start"]), capture_output=True, text=True, timeout=120)
    if started.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(f"pg_ctl start failed: {started.stderr or started.stdout}")
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(_as_postgres_user([*ctl, "-m", "immediate", "stop"]),
                       capture_output=True, timeout=120)
        shutil.rmtree(root, ignore_errors=True)


def _worker(url: str, out: Path, trials: int, slow: bool = False) -> subprocess.Popen:
    env = {**os.environ, "SLIMKIT_TEST_SLOW": "1" if slow else "0", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(WORKER), url, str(out), str(trials)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _study(url: str):
    return optuna.load_study(study_name="slimkit-search", storage=driver_url(url))


def _drop(url: str) -> None:
    with contextlib.suppress(KeyError):
        optuna.delete_study(study_name="slimkit-search", storage=driver_url(url))


@pytest.mark.slow  # two worker processes importing torch: about 30 s on two cores
def test_two_workers_share_one_study_none_lost_none_duplicated(postgres, tmp_path: Path):
    _drop(postgres)
    procs = [_worker(postgres, tmp_path / f"w{i}", 8) for i in range(2)]
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (_stdout, stderr) in zip(procs, outs, strict=True):
        assert p.returncode == 0, stderr[-2000:]
    reports = [json.loads(stdout.strip().splitlines()[-1]) for stdout, _ in outs]
    trials = _study(postgres).get_trials()
    numbers = [t.number for t in trials]
    assert sorted(numbers) == list(range(len(trials)))  # none lost, none duplicated
    assert 8 <= len(trials) <= 9  # the budget, plus at most one race per extra worker
    assert sum(r["trials_run"] for r in reports) == len(trials)  # the union of both
    workers = {t.user_attrs["worker"] for t in trials}
    assert len(workers) == 2  # both took part
    assert all(t.state.name in ("COMPLETE", "PRUNED") for t in trials)


@pytest.mark.slow  # two worker processes one after the other: about 25 s
def test_a_worker_killed_mid_trial_leaves_the_study_usable(postgres, tmp_path: Path):
    _drop(postgres)
    victim = _worker(postgres, tmp_path / "v", 3, slow=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # wait until it is inside a trial
        line = victim.stdout.readline()
        if "TRIAL-STARTED" in line or not line:
            break
    running = [t for t in _study(postgres).get_trials() if t.state.name == "RUNNING"]
    assert len(running) == 1, victim.stderr.read()[-2000:] if victim.poll() else running
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(timeout=30)
    time.sleep(4)  # past the grace period (3 heartbeats of 1 s)
    rescuer = _worker(postgres, tmp_path / "r", 3)
    stdout, stderr = rescuer.communicate(timeout=240)
    assert rescuer.returncode == 0, stderr[-2000:]
    trials = {t.number: t for t in _study(postgres).get_trials()}
    killed = trials[running[0].number]
    assert killed.state.name == "FAIL"
    retried = [t for t in trials.values()
               if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retried) == 1 and retried[0].params == killed.params
    assert retried[0].state.name in ("COMPLETE", "PRUNED")
