"""Where a study's cells run: here, in local processes (LocalExecutor), or as Slurm jobs through submitit
(SlurmExecutor). Both take the same Tasks and answer with the same TaskStates:

    ex.submit(tasks) -> [Handle]      start what is not running or done yet (dependencies: Task.after)
    ex.poll()        -> {key: TaskState}   refresh: pending | running | done | failed, job id, log, reason
    ex.status()      -> str           one line per task (what `kdprobe study status OUT` prints)
    ex.wait()        -> {key: TaskState}   poll until every task is done or failed
    ex.result(key)                    what a done task's callable returned
    ex.cancel(keys)                   stop tasks (local processes end; Slurm jobs are scancel'ed)

A Task's callable must be picklable (a module-level function, a functools.partial of one, or an
object with __call__) and must be safe to run again after an interruption: a cell resumes from its
own `.partial` (trainers.loop), so running it twice gives the same checkpoint as running it once.

Slurm (SlurmExecutor, submitit): tasks whose dependencies are met are submitted together as one job
array; a task that waits for another is in a later array with `--dependency=afterok:<its job ids>`
(tasks waiting for the same jobs share an array), so everything is submitted at once and the
submitter may exit (--detach). Each job runs the task's callable wrapped in `_Requeueable`, whose
checkpoint() is submitit's preemption hook: on SIGUSR2 (preemption, or `signal_delay_s` before the
time limit) submitit pickles the same call again and runs `scontrol requeue`; the requeued job runs
the callable again, which resumes from its `.partial`. The record FOLDER/submissions.json (one entry
per task: job id, array, attempt) is written before sbatch (with the array's unique job name) and
after it (with the job ids), so a submitter killed at any point loses nothing: the next submit() over
the same folder adopts the jobs it finds under that name (squeue/sacct) instead of submitting twice,
and does not resubmit done, pending or running tasks; failed ones are submitted again.

States come from submitit's result pickles (success / the error's traceback), `squeue` for jobs still
known to the controller and, for a job that ended without a result (cancelled, killed, out of
memory, node failure), `sacct` or else `scontrol show job` for its final Slurm state. A failed task
names its job id, Slurm state, the error's last line and its log file (stdout and stderr together).

A job runs this interpreter (sys.executable) with this checkout on PYTHONPATH, so both must be on a
filesystem the nodes share. tasks_per_cell=K starts K copies of the callable (srun tasks, ranks from
SLURM_PROCID); only rank 0's result counts and only rank 0 requeues. Slurm holds a requeued job back
for about two minutes (Reason=BeginTime) before it may start again; the tests skip that wait with
`scontrol update jobid=J StartTime=now`.
"""
from __future__ import annotations

import fcntl
import getpass
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import time
import traceback
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence


def _error(message: str) -> Exception:
    """A KdprobeError, imported on first use: every Slurm job imports this module (to unpickle _Requeueable)
    and `import kdprobe` loads torch, seconds that a task which does not need torch should not pay."""
    from kdprobe.errors import KdprobeError

    return KdprobeError(message)


STATES = ("pending", "running", "done", "failed")
RECORD = "submissions.json"
_ROOT = str(Path(__file__).resolve().parents[1])  # the checkout: jobs and local processes import trainers from it


@dataclass(frozen=True)
class Task:
    """One unit of work (a study cell): a stable key, a picklable callable, the keys it waits for."""

    key: str  # stable over reruns (a cell: its content-named path), so a rerun recognises its jobs
    fn: Callable[[], Any]
    after: tuple[str, ...] = ()  # keys that must be done first; keys not submitted here count as done
    label: str = ""  # for messages; default: the key

    @property
    def name(self) -> str:
        return self.label or self.key


@dataclass(frozen=True)
class Handle:
    """What submit() returns per task: where it runs and whether this call started it."""

    key: str
    job_id: str | None  # Slurm job id ("1234_5" in an array), or the local pid; None while waiting to start
    log: str | None
    new: bool  # False: it was already pending, running or done (adopted, not submitted again)


@dataclass(frozen=True)
class TaskState:
    key: str
    state: str  # pending | running | done | failed
    job_id: str | None = None
    slurm_state: str | None = None  # PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, TIMEOUT, OUT_OF_MEMORY, ...
    log: str | None = None  # the job's log (stdout and stderr), once it exists
    reason: str = ""  # pending: Slurm's reason; failed: the error's last line or how the job ended
    label: str = ""

    @property
    def finished(self) -> bool:
        return self.state in ("done", "failed")

    def line(self) -> str:
        """`<label>: failed (job 12_3, FAILED): ValueError: boom; log /x/12_3_0_log.out`"""
        where = ", ".join(x for x in (f"job {self.job_id}" if self.job_id else "", self.slurm_state or "") if x)
        text = f"{self.label or self.key}: {self.state}" + (f" ({where})" if where else "")
        if self.reason:
            text += f": {self.reason}"
        if self.log and self.state in ("failed", "running"):
            text += f"; log {self.log}"
        return text


def _check_tasks(tasks: Sequence[Task]) -> None:
    keys = [t.key for t in tasks]
    if len(set(keys)) != len(keys):
        raise _error(f"tasks with the same key: {sorted({k for k in keys if keys.count(k) > 1})}")
    for t in tasks:
        if not isinstance(t.key, str) or not t.key or not callable(t.fn):
            raise _error(f"a task needs a non-empty str key and a callable, got {t.key!r} and {t.fn!r}")
    # a cycle among the submitted tasks would never start
    order = _levels(tasks)
    if len(order) != len(tasks):
        raise _error(f"tasks wait for each other in a cycle: {sorted(set(keys) - set(order))}")


def _levels(tasks: Sequence[Task]) -> dict[str, int]:
    """key -> 0 for tasks that wait for no submitted task, else 1 + the deepest task they wait for."""
    by_key = {t.key: t for t in tasks}
    level: dict[str, int] = {}
    changed = True
    while changed:
        changed = False
        for t in tasks:
            if t.key in level:
                continue
            deps = [d for d in t.after if d in by_key]
            if all(d in level for d in deps):
                level[t.key] = 1 + max((level[d] for d in deps), default=-1)
                changed = True
    return level


def _tail_line(text: str) -> str:
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


def _read_result(path: Path) -> tuple[str, Any] | None:
    """submitit's (and LocalExecutor's) result pickle: ("success", value) or ("error", traceback text)."""
    try:
        with open(path, "rb") as f:
            out = pickle.load(f)
    except FileNotFoundError:
        return None
    except Exception as e:  # noqa: BLE001 - a result we cannot read is an error result, named
        return ("error", f"cannot read the result {path}: {type(e).__name__}: {e}")
    if isinstance(out, tuple) and len(out) == 2 and out[0] in ("success", "error"):
        return out
    return ("error", f"unexpected result in {path}")


# ---- options -------------------------------------------------------------------------------------------

_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


def parse_time(value: int | str, what: str = "time") -> int:
    """A Slurm time limit as whole minutes (seconds round up): 90, "90", "1:30:00", "2-00", "1-12:00"."""
    if isinstance(value, bool):
        raise _error(f"{what}: expected minutes or a Slurm time such as 1:30:00 or 2-00:00, got {value!r}")
    if isinstance(value, int):
        minutes = value
    elif isinstance(value, str) and (m := _TIME.match(value.strip())):
        days, a, b, c = (int(x) if x else None for x in m.groups())
        if days is not None:  # D-HH, D-HH:MM, D-HH:MM:SS
            seconds = days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
        elif b is None:  # MM
            seconds = a * 60
        elif c is None:  # MM:SS
            seconds = a * 60 + b
        else:  # HH:MM:SS
            seconds = a * 3600 + b * 60 + c
        minutes = -(-seconds // 60)
    else:
        raise _error(f"{what}: expected minutes or a Slurm time such as 1:30:00 or 2-00:00, got {value!r}")
    if minutes < 1:
        raise _error(f"{what}: a time limit must be at least 1 minute, got {value!r}")
    return minutes


_MEM = re.compile(r"^\d+(?:[KMGT]B?)?$", re.IGNORECASE)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.,:&|!@*+=/-]*$")  # partition, account, qos, constraint expressions
_KEY = re.compile(r"^[A-Za-z][A-Za-z0-9_-]+$")
# sbatch options the executor writes itself, and those that have their own SlurmOptions field
_OWNED = {"array", "output", "error", "open-mode", "signal", "job-name", "wrap", "parsable", "dependency",
          "requeue", "no-requeue"}
_FIELD_OF = {"partition": "partition", "account": "account", "qos": "qos", "time": "time",
             "constraint": "constraint", "cpus-per-task": "cpus_per_cell", "mem": "mem_per_cell",
             "gpus": "gpus_per_cell", "gpus-per-node": "gpus_per_cell", "gres": "gpus_per_cell",
             "ntasks-per-node": "tasks_per_cell", "ntasks": "tasks_per_cell"}


@dataclass(frozen=True)
class SlurmOptions:
    """How each cell is submitted. Every field is checked on construction (one-line KdprobeError)."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: int | str = 1440  # limit per cell: minutes or a Slurm time (1:30:00, 2-00:00); a cell past it requeues
    gpus_per_cell: int = 0
    cpus_per_cell: int = 1
    mem_per_cell: str | None = None  # 16G, 4000M; None: the cluster's default
    array_parallelism: int | None = None  # at most this many cells of one array at once (None: no limit of ours)
    constraint: str | None = None  # node features, e.g. "a100|h100"
    tasks_per_cell: int = 1  # --nproc-per-cell K: K tasks (one per GPU) in each cell's job
    max_requeues: int = 3  # requeues after a time limit (submitit's max_num_timeout); preemptions do not count
    signal_delay_s: int = 120  # SIGUSR2 this long before the time limit: the cell is requeued before it is killed
    extra: Mapping[str, str | bool] = field(default_factory=dict)  # --slurm KEY=VALUE: any other sbatch option
    setup: tuple[str, ...] = ()  # shell lines run in the job before the cell (module load ..., source a venv)

    def __post_init__(self):
        for name in ("partition", "account", "qos", "constraint"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not _NAME.match(v)):
                raise _error(f"slurm {name}: expected a name such as gpu or a100|h100, got {v!r}")
        object.__setattr__(self, "time", parse_time(self.time, "slurm time"))
        for name, low in (("gpus_per_cell", 0), ("cpus_per_cell", 1), ("tasks_per_cell", 1), ("max_requeues", 0),
                          ("signal_delay_s", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise _error(f"slurm {name}: expected an integer >= {low}, got {v!r}")
        if self.array_parallelism is not None and (isinstance(self.array_parallelism, bool) or
                                                   not isinstance(self.array_parallelism, int) or
                                                   self.array_parallelism < 1):
            raise _error(f"slurm array_parallelism: expected an integer >= 1, got {self.array_parallelism!r}")
        if self.mem_per_cell is not None and (not isinstance(self.mem_per_cell, str) or
                                              not _MEM.match(self.mem_per_cell)):
            raise _error(f"slurm mem_per_cell: expected a size such as 16G or 4000M, got {self.mem_per_cell!r}")
        if self.signal_delay_s >= self.time * 60:
            raise _error(f"slurm signal_delay_s: {self.signal_delay_s}s before the end must be shorter than "
                               f"the time limit ({self.time} min)")
        if not isinstance(self.extra, Mapping):
            raise _error(f"slurm extra: expected KEY=VALUE pairs, got {self.extra!r}")
        extra = {}
        for k, v in self.extra.items():
            key = str(k).replace("_", "-")
            if not _KEY.match(str(k)):
                raise _error(f"--slurm {k}: expected a long sbatch option name such as reservation or mail-type")
            if key in _OWNED:
                raise _error(f"--slurm {key}: kdprobe sets --{key} itself (job arrays, logs, requeue signal)")
            if key in _FIELD_OF:
                raise _error(f"--slurm {key}: use the slurm option {_FIELD_OF[key]} instead")
            if v is not True and (not isinstance(v, (str, int, float)) or isinstance(v, bool) or
                                  any(c in str(v) for c in "\n\r\0") or str(v) == ""):
                raise _error(f"--slurm {key}: expected a one-line value, got {v!r}")
            extra[key] = v if v is True else str(v)
        object.__setattr__(self, "extra", extra)
        if isinstance(self.setup, str) or not all(isinstance(s, str) and "\n" not in s for s in self.setup):
            raise _error(f"slurm setup: expected a list of one-line shell commands, got {self.setup!r}")
        object.__setattr__(self, "setup", tuple(self.setup))

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], where: str = "[slurm]") -> "SlurmOptions":
        """From a spec's [slurm] table or CLI flags: names with - or _; unknown names are refused."""
        if not isinstance(values, Mapping):
            raise _error(f"{where}: expected a table of slurm options, got {values!r}")
        known = {f.name for f in fields(cls)}
        kwargs = {}
        for k, v in values.items():
            name = str(k).replace("-", "_")
            if name not in known:
                raise _error(f"{where}: unknown slurm option {k!r}; known: {', '.join(sorted(known))} "
                                   f"(any other sbatch option goes in extra / --slurm KEY=VALUE)")
            kwargs[name] = tuple(v) if name == "setup" and isinstance(v, list) else v
        return cls(**kwargs)

    def sbatch_parameters(self) -> dict[str, Any]:
        """submitit.SlurmExecutor.update_parameters keywords (without job_name and dependency)."""
        p: dict[str, Any] = {"time": self.time, "cpus_per_task": self.cpus_per_cell,
                             "ntasks_per_node": self.tasks_per_cell, "signal_delay_s": self.signal_delay_s,
                             "stderr_to_stdout": True, "wckey": None}
        for name in ("partition", "account", "qos", "constraint"):
            if getattr(self, name) is not None:
                p[name] = getattr(self, name)
        if self.gpus_per_cell:
            p["gpus_per_node"] = self.gpus_per_cell
        if self.mem_per_cell is not None:
            p["mem"] = self.mem_per_cell.upper().removesuffix("B")
        if self.array_parallelism is not None:
            p["array_parallelism"] = self.array_parallelism
        if self.extra:
            p["additional_parameters"] = dict(self.extra)
        # the job imports trainers from this checkout; a CPU cell uses its allocated cores
        p["setup"] = [f"export PYTHONPATH={_ROOT}${{PYTHONPATH:+:$PYTHONPATH}}",
                      "export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}", *self.setup]
        return p


def parse_slurm_pairs(pairs: Iterable[str]) -> dict[str, str | bool]:
    """--slurm KEY=VALUE (repeatable; a bare KEY is a flag such as exclusive) -> SlurmOptions.extra."""
    out: dict[str, str | bool] = {}
    for item in pairs:
        key, eq, value = str(item).partition("=")
        key = key.strip()
        if not _KEY.match(key):
            raise _error(f"--slurm {item!r}: expected KEY=VALUE with a long sbatch option name, "
                               f"e.g. --slurm reservation=paper or --slurm exclusive")
        if eq and not value:
            raise _error(f"--slurm {item!r}: empty value (give KEY alone for a flag)")
        out[key.replace("_", "-")] = value if eq else True
    return out


# ---- Slurm ------------------------------------------------------------------------------------------------

class _Requeueable:
    """What each Slurm job runs: the task's callable, plus submitit's checkpoint() hook. On SIGUSR2 submitit
    calls checkpoint(): the same call is pickled again and the job requeued; the callable then resumes
    from what it saved (a cell: its .partial), so an interrupted cell ends with the same checkpoint."""

    def __init__(self, fn: Callable[[], Any]):
        self.fn = fn

    def __call__(self):
        return self.fn()

    def checkpoint(self, *args, **kwargs):
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self)


_QUEUED = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD", "CONFIGURING"}
_ACTIVE = {"RUNNING", "COMPLETING", "SUSPENDED", "STAGE_OUT", "SIGNALING", "RESIZING", "STOPPED"}
_GRACE_S = 60  # COMPLETED but no result pickle yet: shared filesystems may show it late


def _run(cmd: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


class SlurmExecutor:
    """Run tasks as Slurm jobs through submitit; everything (pickles, logs, the record) lives under `folder`,
    which must be on a filesystem the compute nodes share (the study's output folder is)."""

    def __init__(self, folder: str | os.PathLike, options: SlurmOptions | None = None, *, name: str = "kdprobe"):
        self.folder = Path(folder).resolve()
        self.options = options or SlurmOptions()
        if not isinstance(self.options, SlurmOptions):
            raise _error(f"expected SlurmOptions, got {type(self.options).__name__}")
        if not re.match(r"^[A-Za-z0-9_.-]+$", name):
            raise _error(f"a Slurm job name prefix must be letters, digits, _ . -, got {name!r}")
        self.name = name
        self.last_error = ""  # why the last poll could not ask Slurm (states kept as they were)
        self._tasks: dict[str, Task] = {}

    # ---- the record ----
    @property
    def record_path(self) -> Path:
        return self.folder / RECORD

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """One reader-writer of the record at a time (a submitter, `study status`, a poll): a submitter is never
        seen half-way, and an unrecorded batch found under the lock was left by a submitter that died."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / ".submissions.lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _load(self) -> dict:
        try:
            rec = json.loads(self.record_path.read_text())
        except FileNotFoundError:
            return {"version": 1, "tasks": {}, "batches": {}}
        except (OSError, ValueError) as e:
            raise _error(f"{self.record_path} is unreadable ({e}); delete it to submit every cell again "
                               f"(scancel the jobs it listed first)") from None
        if not isinstance(rec, dict) or rec.get("version") != 1:
            raise _error(f"{self.record_path} is not a kdprobe submission record (version 1)")
        return rec

    def _save(self, rec: dict) -> None:
        from kdprobe.files.io import atomic_write_text

        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.record_path, json.dumps(rec, indent=1, sort_keys=True))

    def _log(self, job_id: str) -> str:
        return str(self.folder / f"{job_id}_0_log.out")

    def _result_path(self, job_id: str) -> Path:
        return self.folder / f"{job_id}_0_result.pkl"

    def _pickle_path(self, job_id: str) -> Path:
        return self.folder / f"{job_id}_submitted.pkl"

    # ---- asking Slurm ----
    def _squeue(self) -> dict[str, tuple[str, str]] | None:
        """job id -> (state, reason) of this user's jobs the controller knows (finished ones for MinJobAge)."""
        try:
            r = _run(["squeue", "-h", "-r", "-t", "all", "-u", getpass.getuser(), "-o", "%i|%T|%r"])
        except (OSError, subprocess.TimeoutExpired) as e:
            self.last_error = f"squeue: {e}"
            return None
        if r.returncode != 0:
            self.last_error = f"squeue: {_tail_line(r.stderr) or 'exit ' + str(r.returncode)}"
            return None
        out = {}
        for line in r.stdout.splitlines():
            parts = line.strip().split("|")
            if len(parts) == 3:
                out[parts[0]] = (parts[1].split()[0] if parts[1] else "UNKNOWN", parts[2])
        return out

    def _final_state(self, job_id: str) -> str:
        """How a job that left the queue without a result ended: sacct, else scontrol, else UNKNOWN."""
        try:
            r = _run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "JobID,State"])
            if r.returncode == 0:
                for line in r.stdout.splitlines():
                    jid, _, state = line.partition("|")
                    if jid == job_id and state:
                        return state.split()[0]
            r = _run(["scontrol", "-o", "show", "job", job_id])
            m = re.search(r"\bJobState=(\S+)", r.stdout) if r.returncode == 0 else None
            if m:
                return m.group(1)
        except (OSError, subprocess.TimeoutExpired):
            pass
        return "UNKNOWN"

    def _find_by_name(self, job_name: str) -> str | None:
        """The (array) job id sbatch gave a job named `job_name`, for a submitter killed before it wrote it."""
        for cmd in (["squeue", "-h", "-t", "all", "-u", getpass.getuser(), "-n", job_name, "-o", "%F"],
                    ["sacct", "-n", "-X", "-P", "--name", job_name, "-o", "JobID", "-S", "now-30days"]):
            try:
                r = _run(cmd)
            except (OSError, subprocess.TimeoutExpired):
                continue
            lines = r.stdout.splitlines() if r.returncode == 0 else []
            ids = {ln.strip().split("_")[0] for ln in lines if ln.strip()}
            if ids:
                return max(ids, key=int)
        return None

    def _adopt(self, rec: dict) -> None:
        """Batches written before sbatch but without job ids: find their jobs by name, or forget them."""
        for token, batch in list(rec["batches"].items()):
            if batch.get("job_id"):
                continue
            array = self._find_by_name(batch["job_name"])
            keys = batch["keys"]
            for i, key in enumerate(keys):
                entry = rec["tasks"].get(key)
                if entry is None or entry.get("batch") != token:
                    continue
                if array is None:
                    del rec["tasks"][key]  # never submitted: it will be submitted again
                else:
                    entry["job_id"] = f"{array}_{i}" if batch.get("array") else array
            if array is None:
                del rec["batches"][token]
            else:
                batch["job_id"] = array
            self._save(rec)

    def _refresh(self, rec: dict) -> dict[str, TaskState]:
        """Update every unfinished entry from result pickles and Slurm; cache finished states in the record."""
        open_keys = [k for k, e in rec["tasks"].items() if e.get("state") not in ("done", "failed") and e.get("job_id")]
        queue = self._squeue() if open_keys else {}
        changed = False
        blocked = []
        for key in open_keys:
            e = rec["tasks"][key]
            jid = e["job_id"]
            res = _read_result(self._result_path(jid))
            if res is None and queue is None:
                continue  # Slurm unreachable: keep what we knew
            state, reason = (queue or {}).get(jid, (None, ""))
            if res is None and state is None:
                res = _read_result(self._result_path(jid))  # it may have finished between the two looks
            if res is not None:
                ok = res[0] == "success"
                ended = state if state and state not in _QUEUED | _ACTIVE else ("COMPLETED" if ok else "FAILED")
                e.update(state="done" if ok else "failed", slurm_state=ended, reason="" if ok else _tail_line(res[1]))
            elif state in _QUEUED:
                if reason == "DependencyNeverSatisfied":
                    blocked.append(jid)
                    e.update(state="failed", slurm_state="CANCELLED", reason="a task it waits for failed")
                else:
                    e.update(state="pending", slurm_state=state, reason="" if reason in ("None", "") else reason)
            elif state in _ACTIVE:
                e.update(state="running", slurm_state=state, reason="")
            else:  # ended without a result (or unknown to the controller by now)
                final = state or self._final_state(jid)
                if final == "COMPLETED" and time.time() - e.setdefault("ended_at", time.time()) < _GRACE_S:
                    e.update(state="running", slurm_state="COMPLETING", reason="waiting for its result file")
                else:
                    why = {"CANCELLED": "cancelled", "TIMEOUT": "hit its time limit and was not requeued",
                           "OUT_OF_MEMORY": "ran out of memory", "NODE_FAIL": "its node failed",
                           "PREEMPTED": "preempted and not requeued"}.get(final, "ended without a result")
                    e.update(state="failed", slurm_state=final, reason=why)
            changed = True
        if blocked:
            try:
                _run(["scancel", *blocked])
            except (OSError, subprocess.TimeoutExpired):
                pass
        if changed:
            self._save(rec)
        return {k: self._state_of(k, e) for k, e in rec["tasks"].items()}

    def _state_of(self, key: str, e: dict) -> TaskState:
        jid = e.get("job_id")
        log = self._log(jid) if jid else None
        return TaskState(key=key, state=e.get("state") or "pending", job_id=jid, slurm_state=e.get("slurm_state"),
                         log=log if log and Path(log).exists() else None, label=e.get("label", ""),
                         reason=e.get("reason", "") if jid else "submitting")

    # ---- the interface ----
    def submit(self, tasks: Sequence[Task]) -> list[Handle]:
        """Submit the tasks that are not pending, running or done in the record; returns one Handle per task."""
        tasks = list(tasks)
        _check_tasks(tasks)
        self._tasks.update({t.key: t for t in tasks})
        with self._locked():
            rec = self._load()
            self._adopt(rec)
            states = self._refresh(rec)
            self._repair_pickles(rec)
            keep = {t.key for t in tasks if t.key in states and states[t.key].state != "failed"}
            todo = [t for t in tasks if t.key not in keep]
            if todo:
                self._submit_new(rec, todo)
        out = []
        for t in tasks:
            e = rec["tasks"][t.key]
            out.append(Handle(t.key, e.get("job_id"), self._log(e["job_id"]) if e.get("job_id") else None,
                              new=t.key not in keep))
        return out

    def _repair_pickles(self, rec: dict) -> None:
        """An adopted job whose pickle the killed submitter had not moved into place yet: write it now (the job
        waits 60 s for it), from the task this submit() was given."""
        for key, e in rec["tasks"].items():
            jid = e.get("job_id")
            if jid and e.get("state") in (None, "pending", "running") and key in self._tasks:
                p = self._pickle_path(jid)
                if not p.exists():
                    self._dump(self._tasks[key], p)

    def _dump(self, task: Task, path: Path) -> None:
        from submitit.core.utils import DelayedSubmission

        d = DelayedSubmission(_Requeueable(task.fn))
        d.set_timeout(self.options.time, self.options.max_requeues)
        tmp = path.with_suffix(".pkl.tmp")
        d.dump(tmp)
        os.replace(tmp, path)

    def _submitit(self):
        try:
            import submitit
        except ImportError:
            raise _error("the Slurm executor needs submitit: pip install 'kdprobe[slurm]'") from None
        if shutil.which("sbatch") is None or shutil.which("srun") is None:
            raise _error("no sbatch/srun on PATH: run on a Slurm login node (or set SLURM_CONF), "
                               "or use the local executor")
        return submitit

    def _submit_new(self, rec: dict, todo: list[Task]) -> None:
        submitit = self._submitit()
        level = _levels(todo)
        by_key = {t.key: t for t in todo}
        new_ids: dict[str, str] = {}
        groups: dict[tuple[int, tuple[str, ...]], list[Task]] = {}
        for t in sorted(todo, key=lambda t: level[t.key]):
            deps = []
            for d in t.after:
                if d in by_key:
                    deps.append(("new", d))
                    continue
                e = rec["tasks"].get(d)
                if e is None or e.get("state") == "done":
                    continue  # not ours to run, or finished: nothing to wait for
                if e.get("state") == "failed":
                    raise _error(f"cannot submit {t.name}: it waits for {e.get('label') or d}, which failed "
                                       f"(job {e.get('job_id')}); submit that one again too")
                deps.append(("job", e["job_id"]))
            groups.setdefault((level[t.key], tuple(sorted(set(deps)))), []).append(t)
        for (lvl, deps), group in sorted(groups.items(), key=lambda kv: kv[0][0]):
            after = sorted({new_ids[v] if kind == "new" else v for kind, v in deps})
            self._submit_array(submitit, rec, group, after, new_ids)

    def _submit_array(self, submitit, rec: dict, group: list[Task], after: list[str], new_ids: dict) -> None:
        token = uuid.uuid4().hex[:12]
        job_name = f"{self.name}-{token}"
        # written before sbatch: a submitter killed during sbatch leaves a name the next run finds the jobs by
        rec["batches"][token] = {"job_name": job_name, "keys": [t.key for t in group], "job_id": None,
                                 "array": len(group) > 1, "after": after, "submitted_at": time.time()}
        for t in group:
            old = rec["tasks"].get(t.key, {})
            history = old.get("history", []) + ([{k: old.get(k) for k in ("job_id", "slurm_state", "reason")}]
                                                if old.get("job_id") else [])
            rec["tasks"][t.key] = {"batch": token, "job_id": None, "state": None, "label": t.name,
                                   "attempt": old.get("attempt", 0) + 1, "history": history}
        self._save(rec)
        ex = submitit.SlurmExecutor(folder=self.folder, max_num_timeout=self.options.max_requeues)
        params = self.options.sbatch_parameters()
        params["job_name"] = job_name
        if after:
            params["dependency"] = "afterok:" + ":".join(after)
        try:
            ex.update_parameters(**params)
            with ex.batch():
                jobs = [ex.submit(_Requeueable(t.fn)) for t in group]
        except Exception as e:  # noqa: BLE001 - sbatch's refusal, in one line
            for t in group:
                rec["tasks"].pop(t.key, None)
            rec["batches"].pop(token, None)
            self._save(rec)
            msg = _tail_line(getattr(e, "args", [""])[0] if getattr(e, "args", None) else e) or type(e).__name__
            raise _error(f"sbatch refused {len(group)} cell(s) ({group[0].name}, ...): {msg}") from None
        array = jobs[0].job_id.split("_")[0]
        rec["batches"][token]["job_id"] = array
        for t, job in zip(group, jobs):
            rec["tasks"][t.key].update(job_id=job.job_id, state="pending", slurm_state="PENDING", reason="")
            new_ids[t.key] = job.job_id
        self._save(rec)

    def poll(self) -> dict[str, TaskState]:
        """Refresh every task's state (adopting jobs a killed submitter left); key -> TaskState."""
        if not self.record_path.exists():
            return {}
        with self._locked():
            rec = self._load()
            self._adopt(rec)
            return self._refresh(rec)

    def status(self) -> str:
        states = self.poll()
        counts = {s: sum(1 for t in states.values() if t.state == s) for s in STATES}
        head = ", ".join(f"{n} {s}" for s, n in counts.items() if n) or "no tasks"
        note = f" (Slurm did not answer: {self.last_error})" if self.last_error else ""
        return "\n".join([f"{len(states)} cell(s): {head}{note}", *(t.line() for t in states.values())])

    def wait(self, poll_s: float = 10.0, on_change: Callable[[TaskState], None] | None = None,
             timeout_s: float | None = None) -> dict[str, TaskState]:
        """Poll until every task is done or failed (on_change gets each new state); returns the states."""
        seen: dict[str, tuple] = {}
        end = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            states = self.poll()
            for k, s in states.items():
                sig = (s.state, s.job_id, s.slurm_state)
                if seen.get(k) != sig:
                    seen[k] = sig
                    if on_change:
                        on_change(s)
            if all(s.finished for s in states.values()):
                return states
            if end is not None and time.monotonic() > end:
                raise _error(f"cells still running after {timeout_s:.0f}s: "
                                   f"{[s.label or k for k, s in states.items() if not s.finished]}")
            time.sleep(poll_s)

    def result(self, key: str) -> Any:
        e = self._load()["tasks"].get(key)
        res = _read_result(self._result_path(e["job_id"])) if e and e.get("job_id") else None
        if res is None or res[0] != "success":
            raise _error(f"task {key} has no result (state {e.get('state') if e else 'unknown'})")
        return res[1]

    def cancel(self, keys: Iterable[str] | None = None) -> None:
        rec = self._load()
        want = set(rec["tasks"]) if keys is None else set(keys)
        ids = [e["job_id"] for k, e in rec["tasks"].items()
               if k in want and e.get("job_id") and e.get("state") not in ("done", "failed")]
        if ids:
            _run(["scancel", *ids])

    def forget(self, keys: Iterable[str]) -> None:
        """Drop done tasks from the record, so the next submit() runs them again (a done cell whose file was
        deleted since). Others stay: a failed one is submitted again anyway (its history kept), and a pending
        or running one still has its job, which forgetting would run twice."""
        keys = set(keys)
        with self._locked():
            rec = self._load()
            gone = [k for k, e in rec["tasks"].items() if k in keys and e.get("state") == "done"]
            for k in gone:
                del rec["tasks"][k]
            if gone:
                self._save(rec)

    def close(self) -> None:
        """Nothing to stop: the jobs go on without the submitter."""


# ---- local ------------------------------------------------------------------------------------------------

def _run_task(task_file: str, result_file: str) -> int:
    """A local task's process: run the pickled callable, write ("success", value) or ("error", traceback)."""
    try:
        with open(task_file, "rb") as f:
            fn = pickle.load(f)
        out = ("success", fn())
        code = 0
    except Exception:  # noqa: BLE001 - the traceback is the result
        out, code = ("error", traceback.format_exc()), 1
        print(out[1], file=sys.stderr, flush=True)
    tmp = result_file + ".tmp"
    with open(tmp, "wb") as f:
        pickle.dump(out, f)
    os.replace(tmp, result_file)
    return code


def _safe(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", key)[-120:]


class LocalExecutor:
    """Run tasks on this machine: up to `jobs` at once, each in its own process (`python -m trainers.executors
    TASK.pkl RESULT.pkl`, log FOLDER/<key>.log), or in this process when inline=True (one after another).
    slot_env(slot) gives extra environment for the process in slot 0..jobs-1 (CUDA_VISIBLE_DEVICES, threads).
    Nothing outlives this object: close() stops what still runs (a cell keeps its .partial)."""

    def __init__(self, folder: str | os.PathLike, jobs: int = 1, *, inline: bool = False,
                 slot_env: Callable[[int], Mapping[str, str]] | None = None):
        if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
            raise _error(f"expected jobs >= 1, got {jobs!r}")
        self.folder, self.jobs, self.inline, self.slot_env = Path(folder).resolve(), jobs, inline, slot_env
        self._tasks: dict[str, Task] = {}
        self._states: dict[str, TaskState] = {}
        self._procs: dict[str, tuple[subprocess.Popen, int, Any]] = {}
        self._results: dict[str, tuple[str, Any]] = {}

    def _files(self, key: str) -> tuple[Path, Path, Path]:
        b = self.folder / _safe(key)
        return b.with_suffix(".task.pkl"), b.with_suffix(".result.pkl"), b.with_suffix(".log")

    def submit(self, tasks: Sequence[Task]) -> list[Handle]:
        tasks = list(tasks)
        _check_tasks(tasks)
        new = []
        for t in tasks:
            s = self._states.get(t.key)
            if s is not None and s.state != "failed":
                continue
            self._tasks[t.key] = t
            self._states[t.key] = TaskState(t.key, "pending", label=t.name, log=str(self._files(t.key)[2]))
            new.append(t.key)
        self.poll()
        return [Handle(t.key, self._states[t.key].job_id, self._states[t.key].log, t.key in new) for t in tasks]

    def _ready(self) -> list[str]:
        out = []
        for k, s in self._states.items():
            if s.state != "pending":
                continue
            deps = [self._states.get(d) for d in self._tasks[k].after]
            if any(d is not None and d.state == "failed" for d in deps):
                self._states[k] = TaskState(k, "failed", label=s.label, reason="a task it waits for failed")
            elif all(d is None or d.state == "done" for d in deps):
                out.append(k)
        return out

    def poll(self) -> dict[str, TaskState]:
        for k, (proc, slot, log) in list(self._procs.items()):
            if proc.poll() is None:
                continue
            log.close()
            del self._procs[k]
            res = _read_result(self._files(k)[1]) or ("error", f"exit code {proc.returncode} without a result")
            self._finish(k, res, job_id=f"pid {proc.pid}")
        while True:
            ready = self._ready()
            if not ready:
                break
            if self.inline:
                k = ready[0]
                self._states[k] = TaskState(k, "running", label=self._states[k].label)
                try:
                    res = ("success", self._tasks[k].fn())
                except Exception:  # noqa: BLE001 - reported as the task's failure
                    res = ("error", traceback.format_exc())
                self._finish(k, res)
                continue
            free = sorted(set(range(self.jobs)) - {slot for _, slot, _ in self._procs.values()})
            if not free:
                break
            self._start(ready[0], free[0])
        return dict(self._states)

    def _finish(self, k: str, res: tuple[str, Any], job_id: str | None = None) -> None:
        s = self._states[k]
        self._results[k] = res
        ok = res[0] == "success"
        self._states[k] = TaskState(k, "done" if ok else "failed", job_id=job_id, log=s.log, label=s.label,
                                    reason="" if ok else _tail_line(res[1]))

    def _start(self, k: str, slot: int) -> None:
        task_file, result_file, log_file = self._files(k)
        self.folder.mkdir(parents=True, exist_ok=True)
        result_file.unlink(missing_ok=True)
        with open(task_file, "wb") as f:
            pickle.dump(self._tasks[k].fn, f)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [_ROOT, os.environ.get("PYTHONPATH")])))
        if self.slot_env is not None:
            env.update(self.slot_env(slot))
        log = open(log_file, "a")
        proc = subprocess.Popen([sys.executable, "-m", "trainers.executors", str(task_file), str(result_file)],
                                env=env, stdout=log, stderr=subprocess.STDOUT)
        self._procs[k] = (proc, slot, log)
        self._states[k] = TaskState(k, "running", job_id=f"pid {proc.pid}", log=str(log_file),
                                    label=self._states[k].label)

    def status(self) -> str:
        states = self.poll()
        counts = {s: sum(1 for t in states.values() if t.state == s) for s in STATES}
        head = ", ".join(f"{n} {s}" for s, n in counts.items() if n) or "no tasks"
        return "\n".join([f"{len(states)} cell(s): {head}", *(t.line() for t in states.values())])

    def wait(self, poll_s: float = 0.5, on_change: Callable[[TaskState], None] | None = None,
             timeout_s: float | None = None) -> dict[str, TaskState]:
        seen: dict[str, str] = {}
        end = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            states = self.poll()
            for k, s in states.items():
                if seen.get(k) != s.state:
                    seen[k] = s.state
                    if on_change:
                        on_change(s)
            if all(s.finished for s in states.values()):
                return states
            if end is not None and time.monotonic() > end:
                raise _error(f"tasks still running after {timeout_s:.0f}s")
            time.sleep(poll_s)

    def result(self, key: str) -> Any:
        res = self._results.get(key)
        if res is None or res[0] != "success":
            raise _error(f"task {key} has no result (state {self._states.get(key, TaskState(key, '?')).state})")
        return res[1]

    def cancel(self, keys: Iterable[str] | None = None) -> None:
        want = set(self._states) if keys is None else set(keys)
        for k in want:
            if k in self._procs:
                proc, _, log = self._procs.pop(k)
                proc.terminate()
                proc.wait()
                log.close()
                self._states[k] = TaskState(k, "failed", job_id=f"pid {proc.pid}", label=self._states[k].label,
                                            log=self._states[k].log, reason="cancelled")
            elif k in self._states and self._states[k].state == "pending":
                self._states[k] = TaskState(k, "failed", label=self._states[k].label, reason="cancelled")

    def close(self) -> None:
        self.cancel()


if __name__ == "__main__":
    if len(sys.argv) == 3:
        sys.exit(_run_task(sys.argv[1], sys.argv[2]))
    sys.exit("usage: python -m trainers.executors TASK.pkl RESULT.pkl  (LocalExecutor runs this)")
