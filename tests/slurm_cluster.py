"""The Slurm test cluster (scripts/slurm-test-cluster.sh) for tests, and the small callables they submit.

The callables live here, not in the test module, because a Slurm job unpickles them by module name:
the fixture puts this folder on PYTHONPATH, which sbatch passes to the jobs with the rest of the
environment.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "slurm-test-cluster.sh"
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "srun")
APT = "apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge slurmdbd mariadb-server"


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin")


def skip_reason() -> str | None:
    """Why the Slurm tests cannot run here (None: they can)."""
    missing = [d for d in DAEMONS if _which(d) is None]
    if missing:
        return f"Slurm is not installed (no {', '.join(missing)}); install it with: {APT}"
    try:
        import submitit  # noqa: F401
    except ImportError:
        return "submitit is not installed: pip install 'kdprobe[slurm]'"
    if os.geteuid() != 0:
        return "the test cluster runs slurmd as root (as CI does); run the Slurm tests as root"
    return None


class Cluster:
    """A running test cluster: start() reuses one already up (CI starts it first) or starts one; stop() stops it
    only when the tests started it and no other test process (pytest-xdist workers: each test file that needs
    the cluster may run in another process) still uses it. DIR.users lists the pids using it, DIR.ours says the
    tests started it (a cluster CI or a person started is never stopped here)."""

    def __init__(self, folder: str | None = None):
        self.folder = Path(folder or os.environ.get("KDPROBE_SLURM_DIR") or "/tmp/kdprobe-slurm")
        self.conf = self.folder / "etc" / "slurm.conf"
        self.started = False
        self._users = Path(f"{self.folder}.users")
        self._ours = Path(f"{self.folder}.ours")

    @contextmanager
    def _shared(self):
        """Under one lock with the other test processes: the pids that use the cluster (dead ones dropped)."""
        import fcntl

        self.folder.parent.mkdir(parents=True, exist_ok=True)
        with open(f"{self.folder}.users.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                pids = {int(x) for x in self._users.read_text().split()} if self._users.exists() else set()
            except ValueError:
                pids = set()
            pids = {p for p in pids if _alive(p)}
            yield pids
            self._users.write_text("".join(f"{p}\n" for p in sorted(pids)))

    def _script(self, cmd: str, timeout: float) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(SCRIPT), cmd, str(self.folder)], capture_output=True, text=True,
                              timeout=timeout)

    def running(self) -> bool:
        return self._script("status", 30).returncode == 0

    def start(self) -> None:
        with self._shared() as users:
            users.add(os.getpid())
            if self.running():
                return
            t0 = time.monotonic()
            r = self._script("start", 300)
            if r.returncode != 0:
                raise RuntimeError(f"slurm-test-cluster.sh start failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
            self._ours.touch()
            self.started = True
            self.start_seconds = time.monotonic() - t0

    def stop(self) -> None:
        with self._shared() as users:
            users.discard(os.getpid())
            if not users and self._ours.exists():
                self._script("stop", 120)
                self._ours.unlink()

    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.conf)}

    @property
    def accounting(self) -> bool:
        try:
            return "accounting_storage/slurmdbd" in self.conf.read_text()
        except OSError:
            return False


def running_cluster():
    """A fixture's body: a started Cluster, stopped after the tests that use it; skips (with the reason) where this
    machine cannot run one. `yield from running_cluster()` in a fixture of any scope."""
    import pytest

    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    c = Cluster()
    c.start()
    yield c
    c.stop()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def slurm(*args: str, check: bool = True) -> str:
    r = subprocess.run(list(args), capture_output=True, text=True, timeout=60)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {r.stderr.strip()}")
    return r.stdout


def release_requeued(job_id: str) -> None:
    """Let a requeued job start again now instead of after Slurm's ~2-minute BeginTime hold. Not within the
    second of its kill: slurmd revokes the killed instance's credential with a timestamp in whole seconds, and a
    relaunch in that same second is refused as 'Job credential revoked' (the job then fails, exit 1). Seen on a
    fast host where the test got there in under a second; Slurm's own hold exists to avoid exactly this."""
    time.sleep(1.1)
    slurm("scontrol", "update", f"jobid={job_id}", "StartTime=now")


def wait_until(pred, timeout: float = 60, every: float = 0.2, what: str = "condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


# ---- what the tests submit (module-level, so pickles name them) --------------------------------------------

def hello(x: int) -> dict:
    print(f"hello from job {os.environ.get('SLURM_JOB_ID')} on {os.uname().nodename}", flush=True)
    return {"value": 2 * x, "job": os.environ.get("SLURM_JOB_ID"), "array_task": os.environ.get("SLURM_ARRAY_TASK_ID"),
            "restarts": os.environ.get("SLURM_RESTART_COUNT")}


def fail(message: str) -> None:
    print("about to fail", flush=True)
    raise ValueError(message)


def wait_for_file(path: str, timeout: float = 120) -> str:
    """Runs until `path` exists (the test decides when this job may end)."""
    end = time.monotonic() + timeout
    while not Path(path).exists():
        if time.monotonic() > end:
            raise TimeoutError(path)
        time.sleep(0.1)
    return Path(path).read_text()


def count(state_file: str, n: int, step_s: float = 0.0) -> int:
    """A resumable computation, like a cell's epochs: after each step its whole state is saved (atomically) to
    `state_file`; started again it continues from there. Each start appends a line to state_file.starts."""
    state = Path(state_file)
    s = json.loads(state.read_text()) if state.exists() else {"i": 0, "acc": 1}
    with open(str(state) + ".starts", "a") as f:
        f.write(f"{s['i']} {os.environ.get('SLURM_RESTART_COUNT', '0')}\n")
    while s["i"] < n:
        s = {"i": s["i"] + 1, "acc": (s["acc"] * 48271 + s["i"]) % 2147483647}
        tmp = state.with_suffix(".tmp")
        tmp.write_text(json.dumps(s))
        os.replace(tmp, state)
        time.sleep(step_s)
    return s["acc"]
