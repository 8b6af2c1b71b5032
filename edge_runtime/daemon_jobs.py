"""The daemon's personalisation jobs: a SQLite store of jobs and their stages, and the runner that resumes them.

A job moves through the stages queued -> scoring -> measuring -> exporting -> done, or ends
in failed or cancelled. Every stage change is one committed SQLite transaction, and each
attempt at a stage is a row of `stage_runs`, so a test (or an operator) can check that no
stage was completed twice.

Resume rule, after a shutdown, a crash or a power cut: a job whose stage is not final runs
again from the stage it had reached.

- scoring: `personalize` runs again; every candidate scored before the stop is read from the
  score cache, so only the rest is computed.
- measuring: the search and the gradient proxies come from the score cache without a new
  `scoring` attempt, and the finalists are measured again, because measurements are not
  cached.
- exporting: the result folder was complete when the stage began, so only the rename into
  place and the final commit are repeated.

The result folder is written to `results/.<job id>.partial/` and renamed to
`results/<job id>/` in one step, so a folder under its job id is always complete. The job id
is the command id, so a command that the broker delivers twice creates one job.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from cloud_sync.protocol import FINAL_JOB_STAGES, JOB_STAGES
from models.errors import EdgeNasError

logger = logging.getLogger(__name__)

_STAGE_ORDER = {stage: position for position, stage in enumerate(JOB_STAGES)}

# The daemon stage that each stage of `personalize` belongs to.
_PERSONALIZE_STAGES = {
    "load": "scoring",
    "search": "scoring",
    "forward_ranking": "scoring",
    "gradient_proxies": "scoring",
    "aggregation": "scoring",
    "measurement": "measuring",
    "choice": "measuring",
    "write": "measuring",
}

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS jobs (
        job_id TEXT PRIMARY KEY,
        digest TEXT NOT NULL,
        origin TEXT NOT NULL,
        arguments TEXT NOT NULL,
        stage TEXT NOT NULL,
        created REAL NOT NULL,
        updated REAL NOT NULL,
        progress TEXT NOT NULL DEFAULT '{}',
        result TEXT,
        error TEXT,
        published INTEGER NOT NULL DEFAULT 0
    )""",
    """CREATE TABLE IF NOT EXISTS stage_runs (
        run_id INTEGER PRIMARY KEY AUTOINCREMENT,
        job_id TEXT NOT NULL,
        stage TEXT NOT NULL,
        attempt INTEGER NOT NULL,
        started REAL NOT NULL,
        finished REAL,
        outcome TEXT
    )""",
    "CREATE INDEX IF NOT EXISTS stage_runs_job ON stage_runs (job_id)",
    "CREATE TABLE IF NOT EXISTS settings (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
)


class JobStopped(Exception):
    """Base of the exceptions that stop a running job, which the runner catches."""


class JobInterrupted(JobStopped):
    """The daemon is shutting down: the job keeps its stage and resumes at the next start."""


class JobCancelled(JobStopped):
    """A cancel command stopped the job: it ends in the stage `cancelled`."""


def arguments_digest(arguments: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of a command's arguments, to tell a re-delivered command from a reused command id."""
    text = json.dumps(arguments, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass
class Job:
    """One personalisation job as stored: its arguments, stage, progress and outcome."""

    job_id: str
    digest: str
    origin: str
    arguments: Dict[str, Any]
    stage: str
    created: float
    updated: float
    progress: Dict[str, Any] = field(default_factory=dict)
    result: Optional[Dict[str, Any]] = None
    error: Optional[str] = None
    published: bool = False

    @property
    def final(self) -> bool:
        return self.stage in FINAL_JOB_STAGES

    def state(self, running: bool) -> str:
        """Return the protocol's job state: the final stage, or queued, running or interrupted."""
        if self.final:
            return self.stage
        if running:
            return "running"
        return "queued" if self.stage == "queued" else "interrupted"

    def describe(self, running: bool = False) -> Dict[str, Any]:
        """Return the job object of the protocol (job_status messages, replies, device status)."""
        described: Dict[str, Any] = {
            "job_id": self.job_id,
            "origin": self.origin,
            "stage": self.stage,
            "state": self.state(running),
            "created": self.created,
            "updated": self.updated,
            "arguments": dict(self.arguments),
            "progress": dict(self.progress),
        }
        if self.result is not None:
            described["result"] = dict(self.result)
        if self.error is not None:
            described["error"] = self.error
        return described


@dataclass(frozen=True)
class StageRun:
    """One attempt at one stage of a job.

    `outcome` is None while the attempt runs, then done, interrupted (a shutdown stopped it),
    lost (the process ended during it), failed or cancelled.
    """

    job_id: str
    stage: str
    attempt: int
    started: float
    finished: Optional[float]
    outcome: Optional[str]


class JobStore:
    """Jobs, their stage attempts and the daemon's settings in one SQLite file.

    The daemon's main thread and its worker thread share one connection behind a lock. Every
    method is one transaction, committed with synchronous=FULL before it returns, so a power
    cut loses no committed stage change.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=30)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            for statement in _SCHEMA:
                self._db.execute(statement)
        except (OSError, sqlite3.Error) as error:
            raise EdgeNasError(
                f"cannot open the job store {self.path}: {error}; check that state_dir is writable by the daemon's user"
            ) from None

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # Jobs

    def add(self, job_id: str, arguments: Mapping[str, Any], digest: str, origin: str = "command") -> Tuple[Job, bool]:
        """Store a new queued job; return (job, True), or (the stored job, False) when the id exists."""
        now = time.time()
        text = json.dumps(dict(arguments), sort_keys=True, allow_nan=False)
        with self._transaction() as db:
            cursor = db.execute(
                "INSERT OR IGNORE INTO jobs (job_id, digest, origin, arguments, stage, created, updated) "
                "VALUES (?, ?, ?, ?, 'queued', ?, ?)",
                (job_id, digest, origin, text, now, now),
            )
            added = cursor.rowcount == 1
        job = self.get(job_id)
        assert job is not None
        return job, added

    def get(self, job_id: str) -> Optional[Job]:
        with self._lock:
            row = self._db.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        return _job_from_row(row) if row else None

    def next_pending(self) -> Optional[Job]:
        """Return the oldest job whose stage is not final, or None."""
        with self._lock:
            row = self._db.execute(
                f"SELECT {_JOB_COLUMNS} FROM jobs WHERE stage NOT IN ({_FINAL_LIST}) ORDER BY created, rowid LIMIT 1"
            ).fetchone()
        return _job_from_row(row) if row else None

    def pending_count(self) -> int:
        with self._lock:
            row = self._db.execute(f"SELECT COUNT(*) FROM jobs WHERE stage NOT IN ({_FINAL_LIST})").fetchone()
        return int(row[0])

    def recent(self, limit: int) -> List[Job]:
        """Return up to `limit` jobs, the newest first."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_JOB_COLUMNS} FROM jobs ORDER BY created DESC, rowid DESC LIMIT ?", (int(limit),)
            ).fetchall()
        return [_job_from_row(row) for row in rows]

    def unpublished(self) -> List[Job]:
        """Return the jobs that ended but whose final status may not have reached the broker."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_JOB_COLUMNS} FROM jobs WHERE stage IN ({_FINAL_LIST}) AND published = 0 ORDER BY updated"
            ).fetchall()
        return [_job_from_row(row) for row in rows]

    def mark_published(self, job_id: str) -> None:
        with self._transaction() as db:
            db.execute("UPDATE jobs SET published = 1 WHERE job_id = ?", (job_id,))

    def set_progress(self, job_id: str, progress: Mapping[str, Any]) -> None:
        with self._transaction() as db:
            db.execute(
                "UPDATE jobs SET progress = ?, updated = ? WHERE job_id = ?",
                (json.dumps(dict(progress), sort_keys=True), time.time(), job_id),
            )

    # Stages

    def close_lost_runs(self) -> List[str]:
        """Mark every attempt still open as lost (its process ended without a checkpoint); return their job ids."""
        with self._transaction() as db:
            rows = db.execute("SELECT DISTINCT job_id FROM stage_runs WHERE outcome IS NULL").fetchall()
            db.execute("UPDATE stage_runs SET outcome = 'lost' WHERE outcome IS NULL")
        return [row[0] for row in rows]

    def begin_stage(self, job_id: str, stage: str) -> None:
        """Start an attempt at `stage` and move the job there; an attempt left open is marked lost."""
        _check_stage(stage)
        with self._transaction() as db:
            now = time.time()
            db.execute("UPDATE stage_runs SET outcome = 'lost' WHERE job_id = ? AND outcome IS NULL", (job_id,))
            self._insert_run(db, job_id, stage, now)
            db.execute("UPDATE jobs SET stage = ?, updated = ? WHERE job_id = ?", (stage, now, job_id))

    def advance(self, job_id: str, done_stage: str, next_stage: str, result: Optional[Mapping[str, Any]] = None) -> None:
        """Mark the open attempt at `done_stage` done and start `next_stage`, with an optional result, in one commit."""
        _check_stage(next_stage)
        with self._transaction() as db:
            now = time.time()
            db.execute(
                "UPDATE stage_runs SET finished = ?, outcome = 'done' WHERE job_id = ? AND stage = ? AND outcome IS NULL",
                (now, job_id, done_stage),
            )
            self._insert_run(db, job_id, next_stage, now)
            if result is not None:
                db.execute("UPDATE jobs SET result = ? WHERE job_id = ?", (_json_text(result), job_id))
            db.execute("UPDATE jobs SET stage = ?, updated = ? WHERE job_id = ?", (next_stage, now, job_id))

    def finish(self, job_id: str, stage: str, error: Optional[str] = None) -> None:
        """End the job in a final stage; its open attempt gets that outcome, and its status is to be published."""
        if stage not in FINAL_JOB_STAGES:
            raise ValueError(f"{stage!r} is not a final stage; expected one of {', '.join(FINAL_JOB_STAGES)}")
        with self._transaction() as db:
            now = time.time()
            db.execute(
                "UPDATE stage_runs SET finished = ?, outcome = ? WHERE job_id = ? AND outcome IS NULL",
                (now, stage, job_id),
            )
            db.execute(
                "UPDATE jobs SET stage = ?, error = ?, updated = ?, published = 0 WHERE job_id = ?",
                (stage, error, now, job_id),
            )
            db.execute("DELETE FROM settings WHERE name = ?", (_cancel_setting(job_id),))

    def request_cancel(self, job_id: str) -> None:
        """Record that the running job is to end cancelled, so that the request survives a stop or a crash."""
        self.set_setting(_cancel_setting(job_id), "requested")

    def cancel_requested(self, job_id: str) -> bool:
        return self.get_setting(_cancel_setting(job_id)) is not None

    def interrupt(self, job_id: str) -> None:
        """Close the open attempt as interrupted; the job keeps its stage, so it resumes at the next start."""
        with self._transaction() as db:
            db.execute(
                "UPDATE stage_runs SET finished = ?, outcome = 'interrupted' WHERE job_id = ? AND outcome IS NULL",
                (time.time(), job_id),
            )

    def stage_runs(self, job_id: str) -> List[StageRun]:
        with self._lock:
            rows = self._db.execute(
                "SELECT job_id, stage, attempt, started, finished, outcome FROM stage_runs WHERE job_id = ? ORDER BY run_id",
                (job_id,),
            ).fetchall()
        return [StageRun(*row) for row in rows]

    # Settings

    def get_setting(self, name: str) -> Optional[str]:
        with self._lock:
            row = self._db.execute("SELECT value FROM settings WHERE name = ?", (name,)).fetchone()
        return row[0] if row else None

    def set_setting(self, name: str, value: str) -> None:
        with self._transaction() as db:
            db.execute("INSERT OR REPLACE INTO settings (name, value) VALUES (?, ?)", (name, value))

    # Helpers

    def _insert_run(self, db: sqlite3.Connection, job_id: str, stage: str, now: float) -> None:
        row = db.execute("SELECT COUNT(*) FROM stage_runs WHERE job_id = ? AND stage = ?", (job_id, stage)).fetchone()
        db.execute(
            "INSERT INTO stage_runs (job_id, stage, attempt, started) VALUES (?, ?, ?, ?)",
            (job_id, stage, int(row[0]) + 1, now),
        )

    def _transaction(self) -> "_Transaction":
        return _Transaction(self._db, self._lock)


class _Transaction:
    """`with store._transaction() as db:` holds the lock and commits, or rolls back on an exception."""

    def __init__(self, db: sqlite3.Connection, lock: threading.Lock) -> None:
        self._db = db
        self._lock = lock

    def __enter__(self) -> sqlite3.Connection:
        self._lock.acquire()
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except BaseException:
            self._lock.release()
            raise
        return self._db

    def __exit__(self, kind: Any, error: Any, traceback: Any) -> None:
        try:
            self._db.execute("COMMIT" if kind is None else "ROLLBACK")
        finally:
            self._lock.release()


_JOB_COLUMNS = "job_id, digest, origin, arguments, stage, created, updated, progress, result, error, published"
_FINAL_LIST = ", ".join(f"'{stage}'" for stage in FINAL_JOB_STAGES)


def _job_from_row(row: Tuple[Any, ...]) -> Job:
    job_id, digest, origin, arguments, stage, created, updated, progress, result, error, published = row
    return Job(
        job_id=job_id,
        digest=digest,
        origin=origin,
        arguments=json.loads(arguments),
        stage=stage,
        created=created,
        updated=updated,
        progress=json.loads(progress),
        result=json.loads(result) if result else None,
        error=error,
        published=bool(published),
    )


def _cancel_setting(job_id: str) -> str:
    return f"cancel:{job_id}"


def _check_stage(stage: str) -> None:
    if stage not in _STAGE_ORDER:
        raise ValueError(f"unknown job stage {stage!r}; expected one of {', '.join(JOB_STAGES)}")


def _json_text(value: Mapping[str, Any]) -> str:
    return json.dumps(json_safe(value), sort_keys=True, allow_nan=False)


def json_safe(value: Any) -> Any:
    """Return `value` with every non-finite float replaced by None, as the protocol rejects NaN."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


# Result folders ------------------------------------------------------------------------


class ResultFolders:
    """Result folders: `<root>/<job id>/` contains a finished job's outputs, `<root>/.<job id>.partial/` those being written."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def final(self, job_id: str) -> Path:
        return self.root / job_id

    def partial(self, job_id: str) -> Path:
        return self.root / f".{job_id}.partial"

    def prepare(self, job_id: str) -> Path:
        """Return an empty partial folder for the job, removing what an earlier attempt left there."""
        folder = self.partial(job_id)
        self.discard(job_id)
        folder.mkdir(parents=True)
        return folder

    def discard(self, job_id: str) -> None:
        shutil.rmtree(str(self.partial(job_id)), ignore_errors=True)

    def partial_job_ids(self) -> List[str]:
        """Return the job ids that have a partial folder."""
        if not self.root.is_dir():
            return []
        names = [path.name for path in self.root.iterdir() if path.is_dir()]
        return [name[1:-len(".partial")] for name in names if name.startswith(".") and name.endswith(".partial")]

    def publish(self, job_id: str) -> Path:
        """Move the complete partial folder to its final name; repeating it after a crash is harmless.

        Raises EdgeNasError when neither folder exists, or the partial one lacks subnet.json,
        which `personalize` writes last.
        """
        final, partial = self.final(job_id), self.partial(job_id)
        if final.is_dir():
            self.discard(job_id)
            return final
        if not (partial / "subnet.json").is_file():
            raise EdgeNasError(
                f"the outputs of job {job_id} are missing from {partial}; submit the job again with a new command id"
            )
        _sync_folder(partial, with_files=True)
        os.replace(str(partial), str(final))
        _sync_folder(self.root)
        return final


def _sync_folder(folder: Path, with_files: bool = False) -> None:
    """fsync the files of `folder` and the folder itself, so a rename after it survives a power cut."""
    if with_files:
        for path in folder.iterdir():
            if path.is_file():
                with path.open("rb") as handle:
                    os.fsync(handle.fileno())
    descriptor = os.open(str(folder), os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


# Running jobs --------------------------------------------------------------------------


class JobRunner:
    """Run one job at a time through `personalize`, committing each stage change to the store.

    `on_update(job, running)` is called after every change of stage or progress, from the
    thread that runs the job. `step_delay_s` pauses after each stage change and each scored or
    measured candidate. It is a test hook, 0 in service: it makes the middle of a stage last
    long enough for a test to signal the daemon there.
    """

    def __init__(
        self,
        store: JobStore,
        folders: ResultFolders,
        *,
        cache_path: Path,
        power_meter: Any = None,
        threads: Optional[int] = None,
        on_update: Optional[Callable[[Job, bool], None]] = None,
        step_delay_s: float = 0.0,
    ) -> None:
        self.store = store
        self.folders = folders
        self.cache_path = Path(cache_path)
        self.power_meter = power_meter
        self.threads = threads
        self.on_update = on_update or (lambda job, running: None)
        self.step_delay_s = float(step_delay_s)

    def run(self, job_id: str, stop: threading.Event, cancel: threading.Event) -> Job:
        """Run or resume the job from its stored stage until it ends or `stop` is set; return it as stored."""
        job = self.store.get(job_id)
        if job is None:
            raise KeyError(job_id)
        if job.final:
            return job
        stage = self._begin(job)

        try:
            self._pause(stop, cancel)
            if stage in ("scoring", "measuring"):
                self._personalize(job_id, stage, stop, cancel)
            self.folders.publish(job_id)
        except JobInterrupted:
            self.store.interrupt(job_id)
            logger.info("job %s interrupted at stage %s; it resumes at the next start",
                        job_id, self._stored(job_id).stage)
            self._notify(job_id, running=False)
        except JobCancelled:
            self._end(job_id, "cancelled")
        except EdgeNasError as error:
            self._end(job_id, "failed", str(error))
        except Exception as error:  # A bug in one job must not stop the daemon, so the job records it.
            logger.exception("job %s failed with an internal error", job_id)
            self._end(job_id, "failed", f"internal error in the daemon: {type(error).__name__}: {error}")
        else:
            self._end(job_id, "done")
        return self._stored(job_id)

    def _begin(self, job: Job) -> str:
        """Start an attempt at the job's stage (scoring for a queued job) and return that stage."""
        stage = "scoring" if job.stage == "queued" else job.stage
        self.store.begin_stage(job.job_id, stage)
        if job.stage == "queued":
            logger.info("started job %s", job.job_id)
        else:
            logger.info("resuming job %s at stage %s", job.job_id, stage)
        self._notify(job.job_id)
        return stage

    def _end(self, job_id: str, stage: str, error: Optional[str] = None) -> None:
        self.store.finish(job_id, stage, error=error)
        if stage == "done":
            logger.info("job %s done; outputs in %s", job_id, self.folders.final(job_id))
        else:
            self.folders.discard(job_id)
            if error is not None:
                logger.warning("job %s failed: %s", job_id, error)
            else:
                logger.info("job %s %s", job_id, stage)
        self._notify(job_id)

    def _personalize(self, job_id: str, stage: str, stop: threading.Event, cancel: threading.Event) -> None:
        from edge_runtime.measure import MeasureSettings
        from edge_runtime.personalize import personalize

        arguments = self._stored(job_id).arguments
        constraints = arguments.get("constraints", {})
        observer = _JobObserver(self, job_id, stage, stop, cancel)
        result = personalize(
            arguments["data"],
            self.folders.prepare(job_id),
            space=arguments["space"],
            input_size=arguments.get("input_size"),
            width_mult=arguments.get("width_mult"),
            max_params=constraints.get("max_params"),
            max_flops=constraints.get("max_flops"),
            max_latency_ms=constraints.get("max_latency_ms"),
            max_power_w=constraints.get("max_power_w"),
            max_energy_mj=constraints.get("max_energy_mj"),
            budget=arguments["budget"],
            finalists=arguments["finalists"],
            search=arguments["search"],
            seed=arguments["seed"],
            batch_size=arguments["batch_size"],
            cache=self.cache_path,
            power_meter=self.power_meter,
            measure=MeasureSettings(threads=self.threads),
            progress=False,
            observer=observer,
        )
        summary = result.summary()
        final = self.folders.final(job_id)
        summary["files"] = {key: str(final / Path(path).name) for key, path in summary["files"].items()}
        summary["result_dir"] = str(final)
        # The result is stored with the move to exporting, so a restart from here repeats only the rename.
        self.store.advance(job_id, observer.stage, "exporting", result=summary)
        self._notify(job_id)

    def _pause(self, stop: threading.Event, cancel: threading.Event) -> None:
        if self.step_delay_s > 0:
            limit = time.monotonic() + self.step_delay_s
            while time.monotonic() < limit and not (stop.is_set() or cancel.is_set()):
                time.sleep(min(0.05, self.step_delay_s))
        check_stop(stop, cancel)

    def _stored(self, job_id: str) -> Job:
        job = self.store.get(job_id)
        assert job is not None
        return job

    def _notify(self, job_id: str, running: bool = True) -> None:
        job = self._stored(job_id)
        try:
            self.on_update(job, running and not job.final)
        except Exception:  # A failed publish of the progress must not fail the job.
            logger.exception("publishing the progress of job %s failed", job_id)


def check_stop(stop: threading.Event, cancel: threading.Event) -> None:
    """Raise JobCancelled or JobInterrupted when the matching event is set."""
    if cancel.is_set():
        raise JobCancelled()
    if stop.is_set():
        raise JobInterrupted()


class _JobObserver:
    """Follow `personalize` for the runner: commit stage changes, record progress, stop on request.

    It has the methods of `edge_runtime.personalize.RunObserver` without subclassing it, so
    this module loads without torch.
    """

    def __init__(self, runner: JobRunner, job_id: str, stage: str, stop: threading.Event, cancel: threading.Event) -> None:
        self.runner = runner
        self.job_id = job_id
        self.stage = stage
        self.stop = stop
        self.cancel = cancel
        self.progress: Dict[str, Any] = {}

    def stage_started(self, name: str) -> None:
        check_stop(self.stop, self.cancel)
        stage = _PERSONALIZE_STAGES.get(name, self.stage)
        # A resumed job runs the earlier steps of personalize again from the cache; its stage stays where it was.
        if _STAGE_ORDER[stage] > _STAGE_ORDER[self.stage]:
            self.runner.store.advance(self.job_id, self.stage, stage)
            self.stage = stage
            self.runner._notify(self.job_id)
            self.runner._pause(self.stop, self.cancel)
        self.progress["step"] = name
        self._record()

    def candidate_scored(self, done: int, budget: int) -> None:
        self.progress["candidates"] = {"done": done, "total": budget}
        self._record()
        self.runner._pause(self.stop, self.cancel)

    def finalist_measured(self, done: int, total: int) -> None:
        self.progress["finalists_measured"] = {"done": done, "total": total}
        self._record()
        self.runner._pause(self.stop, self.cancel)

    def _record(self) -> None:
        self.runner.store.set_progress(self.job_id, self.progress)
        self.runner._notify(self.job_id)
