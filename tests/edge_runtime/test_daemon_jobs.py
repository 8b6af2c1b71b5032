"""The daemon's job store, result folders and runner: stage changes, resume semantics, and the checks on job arguments."""
from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from edge_runtime.daemon import DataWatcher, job_arguments, resolve_data
from edge_runtime.daemon_config import DaemonConfig, BrokerConfig, JobDefaults
from edge_runtime.daemon_jobs import JobRunner, JobStore, ResultFolders, arguments_digest
from edge_runtime.power import UnavailableMeter
from models.errors import EdgeNasError

TINY = {
    "data": "sklearn-digits", "space": "nb201", "budget": 2, "finalists": 1, "search": "random", "seed": 0,
    "batch_size": 8, "constraints": {},
}


@pytest.fixture
def store(tmp_path):
    opened = JobStore(tmp_path / "jobs.sqlite")
    yield opened
    opened.close()


def runs_of(store, job_id):
    return [(run.stage, run.attempt, run.outcome) for run in store.stage_runs(job_id)]


def make_runner(store, tmp_path, on_update=None):
    return JobRunner(
        store, ResultFolders(tmp_path / "results"), cache_path=tmp_path / "scores.sqlite",
        power_meter=UnavailableMeter("no meter in the tests"), on_update=on_update,
    )


# Store -----------------------------------------------------------------------------------


def test_same_job_id_is_stored_once(store):
    first, added = store.add("job-1", TINY, "digest-a")
    again, added_again = store.add("job-1", dict(TINY, budget=9), "digest-b")
    assert added is True
    assert added_again is False
    assert again.digest == "digest-a"
    assert again.arguments["budget"] == 2
    assert first.stage == "queued"


def test_next_pending_is_oldest_unfinished(store):
    store.add("job-a", TINY, "a")
    store.add("job-b", TINY, "b")
    assert store.next_pending().job_id == "job-a"
    store.begin_stage("job-a", "scoring")
    store.finish("job-a", "failed", error="broken data")
    assert store.next_pending().job_id == "job-b"
    assert store.pending_count() == 1
    store.finish("job-b", "cancelled")
    assert store.next_pending() is None


def test_stage_changes_are_logged_per_attempt(store):
    store.add("job-1", TINY, "a")
    store.begin_stage("job-1", "scoring")
    store.interrupt("job-1")
    store.begin_stage("job-1", "scoring")
    store.advance("job-1", "scoring", "measuring")
    store.advance("job-1", "measuring", "exporting", result={"architecture": "x", "score": float("nan")})
    store.finish("job-1", "done")
    assert runs_of(store, "job-1") == [
        ("scoring", 1, "interrupted"), ("scoring", 2, "done"), ("measuring", 1, "done"), ("exporting", 1, "done"),
    ]
    job = store.get("job-1")
    assert job.stage == "done"
    assert job.result == {"architecture": "x", "score": None}  # NaN is stored as null


def test_open_attempts_are_marked_lost_after_reopen(tmp_path):
    first = JobStore(tmp_path / "jobs.sqlite")
    first.add("job-1", TINY, "a")
    first.begin_stage("job-1", "scoring")
    first.close()  # as if the process died: the attempt stays open
    second = JobStore(tmp_path / "jobs.sqlite")
    assert second.close_lost_runs() == ["job-1"]
    assert runs_of(second, "job-1") == [("scoring", 1, "lost")]
    assert second.get("job-1").stage == "scoring"
    assert second.close_lost_runs() == []
    second.close()


def test_final_status_awaits_publish(store):
    store.add("job-1", TINY, "a")
    store.finish("job-1", "cancelled")
    assert [job.job_id for job in store.unpublished()] == ["job-1"]
    store.mark_published("job-1")
    assert store.unpublished() == []


def test_unknown_stage_is_rejected(store):
    store.add("job-1", TINY, "a")
    with pytest.raises(ValueError, match="unknown job stage"):
        store.begin_stage("job-1", "training")
    with pytest.raises(ValueError, match="not a final stage"):
        store.finish("job-1", "scoring")


def test_digest_ignores_key_order():
    assert arguments_digest({"a": 1, "b": 2}) == arguments_digest({"b": 2, "a": 1})
    assert arguments_digest({"a": 1}) != arguments_digest({"a": 2})


# Result folders --------------------------------------------------------------------------


def test_publish_moves_complete_folder_once(tmp_path):
    folders = ResultFolders(tmp_path / "results")
    partial = folders.prepare("job-1")
    (partial / "model.onnx").write_bytes(b"onnx")
    with pytest.raises(EdgeNasError, match="outputs of job job-1 are missing"):
        folders.publish("job-1")  # no subnet.json yet: the folder is incomplete
    (partial / "subnet.json").write_text("{}")
    final = folders.publish("job-1")
    assert sorted(path.name for path in final.iterdir()) == ["model.onnx", "subnet.json"]
    assert not partial.exists()
    # A crash after the rename and before the commit repeats publish: it keeps the folder.
    partial.mkdir()
    (partial / "stale").write_text("")
    assert folders.publish("job-1") == final
    assert not partial.exists()
    assert sorted(path.name for path in (tmp_path / "results").iterdir()) == ["job-1"]


def test_prepare_removes_earlier_attempt(tmp_path):
    folders = ResultFolders(tmp_path / "results")
    (folders.prepare("job-1") / "model.onnx").write_bytes(b"half")
    assert list(folders.prepare("job-1").iterdir()) == []


# Runner ----------------------------------------------------------------------------------


def test_runner_resumes_after_interrupt_without_rescoring(store, tmp_path, monkeypatch):
    stop, cancel = threading.Event(), threading.Event()

    def stop_when_measuring(job, running):
        if job.stage == "measuring":
            stop.set()

    store.add("job-1", TINY, "a")
    interrupted = make_runner(store, tmp_path, stop_when_measuring).run("job-1", stop, cancel)
    assert interrupted.stage == "measuring"
    assert interrupted.state(running=False) == "interrupted"
    assert runs_of(store, "job-1") == [("scoring", 1, "done"), ("measuring", 1, "interrupted")]

    def fail(*args, **kwargs):
        raise AssertionError("a resumed job must read every score from the cache")

    monkeypatch.setattr("edge_runtime.scoring.score_architecture", fail)
    done = make_runner(store, tmp_path).run("job-1", threading.Event(), threading.Event())
    assert done.stage == "done", done.error
    assert runs_of(store, "job-1") == [
        ("scoring", 1, "done"), ("measuring", 1, "interrupted"), ("measuring", 2, "done"), ("exporting", 1, "done"),
    ]
    final = tmp_path / "results" / "job-1"
    assert done.result["result_dir"] == str(final)
    assert done.result["files"]["subnet"] == str(final / "subnet.json")
    assert (final / "subnet.json").is_file()
    assert (final / "model.onnx").is_file()
    assert sorted(os.listdir(tmp_path / "results")) == ["job-1"]
    assert done.progress["candidates"] == {"done": 2, "total": 2}


def test_runner_at_exporting_only_renames(store, tmp_path, monkeypatch):
    folders = ResultFolders(tmp_path / "results")
    (folders.prepare("job-1") / "subnet.json").write_text("{}")
    store.add("job-1", TINY, "a")
    store.begin_stage("job-1", "scoring")
    store.advance("job-1", "scoring", "measuring")
    store.advance("job-1", "measuring", "exporting", result={"architecture": "x"})
    store.close_lost_runs()  # the process ended during exporting

    def fail(*args, **kwargs):
        raise AssertionError("a job at the exporting stage must not search again")

    monkeypatch.setattr("edge_runtime.personalize.personalize", fail)
    done = make_runner(store, tmp_path).run("job-1", threading.Event(), threading.Event())
    assert done.stage == "done"
    assert done.result == {"architecture": "x"}
    assert (tmp_path / "results" / "job-1" / "subnet.json").is_file()
    assert [run for run in runs_of(store, "job-1") if run[2] == "done"] == [
        ("scoring", 1, "done"), ("measuring", 1, "done"), ("exporting", 2, "done"),
    ]


def test_runner_cancel_ends_job(store, tmp_path):
    stop, cancel = threading.Event(), threading.Event()

    def cancel_on_first_candidate(job, running):
        if job.progress.get("candidates"):
            cancel.set()

    store.add("job-1", TINY, "a")
    job = make_runner(store, tmp_path, cancel_on_first_candidate).run("job-1", stop, cancel)
    assert job.stage == "cancelled"
    assert runs_of(store, "job-1") == [("scoring", 1, "cancelled")]
    assert not (tmp_path / "results" / ".job-1.partial").exists()


def test_cancel_request_survives_reopen(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    store.add("job-1", TINY, "a")
    store.begin_stage("job-1", "scoring")
    store.request_cancel("job-1")
    store.close()

    reopened = JobStore(tmp_path / "jobs.sqlite")
    assert reopened.cancel_requested("job-1")
    assert not reopened.cancel_requested("job-2")
    reopened.finish("job-1", "cancelled")
    assert not reopened.cancel_requested("job-1")
    reopened.close()


def test_partial_job_ids_lists_partial_folders(tmp_path):
    folders = ResultFolders(tmp_path / "results")
    assert folders.partial_job_ids() == []
    folders.prepare("job-1")
    folders.prepare("job.2")
    (tmp_path / "results" / "job-3").mkdir()
    assert sorted(folders.partial_job_ids()) == ["job-1", "job.2"]


def test_runner_records_failure(store, tmp_path):
    store.add("job-1", dict(TINY, data="no-such-sample"), "a")
    job = make_runner(store, tmp_path).run("job-1", threading.Event(), threading.Event())
    assert job.stage == "failed"
    assert "no-such-sample" in job.error
    assert runs_of(store, "job-1") == [("scoring", 1, "failed")]


# Job arguments ---------------------------------------------------------------------------


@pytest.fixture
def config(tmp_path):
    data = tmp_path / "data"
    (data / "cats").mkdir(parents=True)
    defaults = JobDefaults(budget=10, finalists=2, constraints={"max_params": 800_000, "max_latency_ms": 5.0})
    return DaemonConfig(path=None, device_id="dev-1", state_dir=tmp_path / "state", data_dir=data,
                        broker=BrokerConfig("mqtt://127.0.0.1:1883"), defaults=defaults)


def test_command_arguments_override_defaults(config):
    effective = job_arguments({"budget": 4, "constraints": {"max_latency_ms": 2.0}}, config)
    assert effective["budget"] == 4
    assert effective["finalists"] == 2
    assert effective["constraints"] == {"max_params": 800_000, "max_latency_ms": 2.0}
    assert effective["data"] == str(config.data_dir.resolve())


@pytest.mark.parametrize("arguments, fragment", [
    ({"finalists": 11}, "finalists (11) must not exceed budget (10)"),
    ({"search": "annealing"}, "unknown search strategy 'annealing'"),
    ({"space": "resnet"}, "resnet"),
    ({"space": "nb201", "width_mult": 0.5}, "no width multiplier"),
])
def test_invalid_job_arguments_are_named(config, arguments, fragment):
    with pytest.raises(EdgeNasError) as caught:
        job_arguments(arguments, config)
    assert fragment in str(caught.value)


def test_data_resolves_inside_data_folder(config, tmp_path):
    root = config.data_dir.resolve()
    assert resolve_data("sklearn-digits", config.data_dir) == "sklearn-digits"
    assert resolve_data(None, config.data_dir) == str(root)
    assert resolve_data("cats", config.data_dir) == str(root / "cats")
    assert resolve_data(str(root / "cats"), config.data_dir) == str(root / "cats")


def test_data_outside_folder_is_rejected(config, tmp_path):
    (tmp_path / "secret").mkdir()
    os.symlink(str(tmp_path / "secret"), str(config.data_dir / "link"))
    for data in ("../secret", str(tmp_path / "secret"), "link", "/etc"):
        with pytest.raises(EdgeNasError, match="lies outside the data folder"):
            resolve_data(data, config.data_dir)
    with pytest.raises(EdgeNasError, match="does not exist on device"):
        resolve_data("dogs", config.data_dir)


def test_unusable_data_path_is_rejected(config):
    os.symlink("loop-b", str(config.data_dir / "loop-a"))
    os.symlink("loop-a", str(config.data_dir / "loop-b"))
    for data in ("cats\x00dogs", "loop-a"):
        with pytest.raises(EdgeNasError, match="is not a usable path"):
            resolve_data(data, config.data_dir)


# Data folder watcher ---------------------------------------------------------------------


def test_watcher_reports_new_images_past_threshold(store, tmp_path):
    folder = tmp_path / "data" / "cats"
    folder.mkdir(parents=True)
    watcher = DataWatcher(tmp_path / "data", 3, store)

    def add(count, start):
        for index in range(start, start + count):
            (folder / f"{index}.png").write_bytes(b"")

    add(2, 0)
    assert watcher.new_images() is None  # the first count becomes the baseline
    add(2, 2)
    (folder / "notes.txt").write_text("")  # not an image
    (folder / ".hidden.png").write_bytes(b"")
    assert watcher.new_images() is None  # 2 new of 3 needed
    add(1, 4)
    assert watcher.new_images() == 3
    watcher.reset()
    assert watcher.new_images() is None
    assert DataWatcher(tmp_path / "data", 3, store).new_images() is None  # the baseline survives a restart
