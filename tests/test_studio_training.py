"""Training started from the studio's Training page (lmlab.studio.trainer): a short pretrain run by
a child `python -m lmlab` whose metrics grow until it finishes, a stop request that checkpoints, a
resumed run stopped by the studio's own shutdown, and the refusals (a run not named with
--train-into, a path for a corpus, steps out of bounds, a second start while one runs). Tiny models,
a few dozen steps."""

from __future__ import annotations

import socket
import time

import pytest
from studio_fixtures import studio_runs  # noqa: F401  (a fixture)

httpx = pytest.importorskip("httpx", reason="the studio's server tests need httpx")
from starlette.testclient import TestClient  # noqa: E402

from lmlab.checkpoint import current_checkpoint, load_model, read_config  # noqa: E402
from lmlab.cli import main  # noqa: E402
from lmlab.metrics import read_metrics  # noqa: E402
from lmlab.rundir import REPLACED_DIR  # noqa: E402
from lmlab.studio import create_app  # noqa: E402
from lmlab.studio.app import running, stop_training  # noqa: E402
from lmlab.studio.trainer import MAX_STEPS, PRESETS  # noqa: E402

LOCAL = "http://127.0.0.1"
WAIT_S = 240


def wait_until(condition, what, timeout=WAIT_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _step(run_dir) -> int:
    return int(current_checkpoint(run_dir).name.split("_")[1])


def test_a_short_pretrain_started_from_the_page_grows_its_metrics_and_finishes(studio_runs, tmp_path):  # noqa: F811
    slot = tmp_path / "class"
    app = create_app([studio_runs[0]], train_into=[slot], rankings=tmp_path / "r.jsonl",
                     allowed_hosts={"127.0.0.1"})
    try:
        with TestClient(app, base_url=LOCAL) as c:
            runs = c.get("/api/training/options").json()["runs"]
            assert [(r["name"], r["trainable"], r["exists"]) for r in runs] == [
                ("base", False, True), ("class", True, False)]
            r = c.post("/api/training/start", json={"run": "class", "stage": "pretrain",
                                                    "corpus": "shakespeare", "preset": "tiny", "steps": 12})
            assert r.status_code == 200 and r.json()["state"] == "running"
            assert r.json()["command"].startswith("lmlab pretrain --corpus builtin:shakespeare --run ")
            counts = set()

            def done():
                counts.add(len(c.get("/api/training/metrics", params={"run": "class"}).json()["rows"]))
                return c.get("/api/training/job", params={"run": 1}).json()["state"] != "running"

            wait_until(done, "the run to finish")
            job = c.get("/api/training/job", params={"run": "class"}).json()
            assert job["state"] == "finished" and job["returncode"] == 0, job["log"]
            assert "finished: 12 steps" in job["log"][-1]
            rows = read_metrics(slot)
            assert [row["step"] for row in rows if "loss" in row] == list(range(1, 13))
            assert len(counts) >= 2 and max(counts) == len(rows)  # seen while it grew
            assert _step(slot) == 12
            config = read_config(slot)
            n_layer, n_head, n_embd, block, batch = PRESETS["tiny"]
            assert config["model"]["n_layer"] == n_layer and config["model"]["n_embd"] == n_embd
            assert config["train"]["settings"]["corpus"] == "builtin:shakespeare"
            load_model(slot)  # a complete checkpoint
            # the page never overwrites: a second fresh start into the filled slot is refused
            again = c.post("/api/training/start", json={"run": "class", "stage": "pretrain",
                                                        "corpus": "shakespeare", "steps": 12})
            assert again.status_code == 400 and "already holds a run" in again.json()["error"]
    finally:
        stop_training(app)


def test_stop_checkpoints_a_second_start_is_refused_and_the_studio_stops_its_children(studio_runs, tmp_path):  # noqa: F811
    slot = tmp_path / "tuned"
    app = create_app([studio_runs[0]], train_into=[slot], rankings=tmp_path / "r.jsonl")
    start = {"run": "tuned", "stage": "finetune", "parent": "base", "corpus": "shakespeare",
             "steps": MAX_STEPS}
    with running(app) as url:
        r = httpx.post(f"{url}/api/training/start", json=start, timeout=30)
        assert r.status_code == 200, r.text
        wait_until(lambda: read_metrics(slot), "the first metrics row")
        second = httpx.post(f"{url}/api/training/start", json=start, timeout=30)
        assert second.status_code == 409 and "being trained already" in second.json()["error"]
        assert httpx.post(f"{url}/api/training/stop", json={"run": 1}, timeout=30).json()["state"] in (
            "stopping", "stopped")
        job = wait_until(lambda: (lambda j: j if j["state"] not in ("running", "stopping") else None)(
            httpx.get(f"{url}/api/training/job?run=tuned", timeout=30).json()), "the stop")
        assert job["state"] == "stopped" and job["returncode"] == 0, job["log"]
        stopped_at = _step(slot)
        assert 0 < stopped_at < MAX_STEPS and read_config(slot)["train"]["stage"] == "finetune"
        assert 0 < max(row["step"] for row in read_metrics(slot)) <= stopped_at  # a row every 10 steps
        # resume it, then stop the studio while it trains: the studio stops the child, which saves
        r = httpx.post(f"{url}/api/training/start", json={**start, "resume": True}, timeout=30)
        assert r.status_code == 200, r.text
        wait_until(lambda: max(row["step"] for row in read_metrics(slot)) > stopped_at, "the resumed steps")
        child = app.app.state.trainer.job(app.app.state.runs.get("tuned")).process
    assert child.returncode == 0  # stopped and waited for when the studio stopped
    assert _step(slot) > stopped_at


def _train_12_steps_from_scratch(c, start, slot):
    """Start `start` (12 steps) in the slot, wait for it to finish, and check that it trained a
    fresh run: its metrics are steps 1-12 alone, and no earlier files are kept aside."""
    r = c.post("/api/training/start", json=start)
    assert r.status_code == 200, r.text
    wait_until(lambda: c.get("/api/training/job", params={"run": "class"}).json()["state"]
               != "running", "the new run to finish")
    job = c.get("/api/training/job", params={"run": "class"}).json()
    assert job["state"] == "finished", job["log"]
    assert [row["step"] for row in read_metrics(slot) if "loss" in row] == list(range(1, 13))
    assert not (slot / REPLACED_DIR).exists()


def test_a_slot_whose_child_was_killed_before_its_first_checkpoint_starts_again(studio_runs, tmp_path):  # noqa: F811
    """kill -9 (the studio's own after STOP_WAIT_S, the OOM killer) before the first save leaves
    the slot its metrics and no checkpoint: nothing to resume, and the page cannot pass
    --overwrite, so a new start must replace those files itself."""
    slot = tmp_path / "class"
    app = create_app([studio_runs[0]], train_into=[slot], rankings=tmp_path / "r.jsonl",
                     allowed_hosts={"127.0.0.1"})
    start = {"run": "class", "stage": "pretrain", "corpus": "shakespeare", "steps": MAX_STEPS}
    try:
        with TestClient(app, base_url=LOCAL) as c:
            # Twice: the second start replaces the first's files (as --overwrite), and is killed
            # while it keeps them aside.
            for attempt in range(2):
                r = c.post("/api/training/start", json=start)
                assert r.status_code == 200, r.text
                wait_until(lambda: read_metrics(slot) and (attempt == 0 or (slot / REPLACED_DIR).exists()),
                           "the first metrics row", timeout=120)
                child = app.app.state.trainer.job(app.app.state.runs.get("class")).process
                child.kill()  # a save comes every 1000 steps; the first row is step 10
                child.wait()
                assert (slot / "metrics.jsonl").exists() and not (slot / "current.json").exists()
            _train_12_steps_from_scratch(c, {**start, "steps": 12}, slot)
            assert _step(slot) == 12
    finally:
        stop_training(app)


def test_a_slot_whose_child_was_killed_just_after_setting_files_aside_starts_again(studio_runs, tmp_path):  # noqa: F811
    """A child killed between setting the slot's old files aside (--overwrite) and writing its own
    leaves nothing at the top: the start must still pass --overwrite, since the files come back."""
    slot = tmp_path / "class"
    (slot / REPLACED_DIR).mkdir(parents=True)
    (slot / REPLACED_DIR / "metrics.jsonl").write_text('{"step": 10, "loss": 4.0}\n')
    app = create_app([studio_runs[0]], train_into=[slot], rankings=tmp_path / "r.jsonl",
                     allowed_hosts={"127.0.0.1"})
    start = {"run": "class", "stage": "pretrain", "corpus": "shakespeare", "steps": 12}
    try:
        with TestClient(app, base_url=LOCAL) as c:
            _train_12_steps_from_scratch(c, start, slot)
    finally:
        stop_training(app)


@pytest.mark.parametrize("change, status, message", [
    ({"run": "base"}, 400, "not named with --train-into"),
    ({"run": "../slot"}, 404, "no run"),
    ({"corpus": "/etc/passwd"}, 400, "corpus must be one of"),
    ({"corpus": "../../secret.txt"}, 400, "corpus must be one of"),
    ({"steps": 0}, 400, "steps must be in"),
    ({"steps": MAX_STEPS + 1}, 400, "steps must be in"),
    ({"stage": "rlhf"}, 400, "stage must be one of"),
    ({"preset": "huge"}, 400, "preset must be one of"),
    ({"resume": True}, 400, "no checkpoint to resume"),
    ({"resume": "yes"}, 400, "resume must be true or false"),
    ({"stage": "finetune", "parent": "slot"}, 400, "cannot start from itself"),
    ({"stage": "instruct", "parent": "/tmp/x"}, 404, "no run"),
    ({"stage": "instruct", "parent": "base", "corpus": "shakespeare"}, 400, "corpus must be one of python-qa"),
])
def test_a_start_is_refused_in_one_line_and_starts_nothing(studio_runs, tmp_path, change, status, message):  # noqa: F811
    app = create_app([studio_runs[0]], train_into=[tmp_path / "slot"], rankings=tmp_path / "r.jsonl",
                     allowed_hosts={"127.0.0.1"})
    with TestClient(app, base_url=LOCAL) as c:
        body = {"run": "slot", "stage": "pretrain", "corpus": "shakespeare", "steps": 10, **change}
        r = c.post("/api/training/start", json=body)
        assert r.status_code == status and message in r.json()["error"]
        assert c.get("/api/training/job", params={"run": "slot"}).json()["state"] == "idle"
    assert not (tmp_path / "slot").exists()


def test_lmlab_studio_train_into_names_slots_and_refuses_a_file(studio_runs, tmp_path, monkeypatch, capsys):  # noqa: F811
    import uvicorn

    monkeypatch.setattr(uvicorn.Server, "run", lambda server, sockets=None: None)
    # Nothing is bound: the default port may be in use on the machine running the tests.
    monkeypatch.setattr("lmlab.studio.app.listen_socket", lambda host, port: socket.socket())
    assert main(["studio", str(studio_runs[0]), "--train-into", str(tmp_path / "new")]) == 0
    assert "the Training page may train into: new" in capsys.readouterr().out
    (tmp_path / "file").write_text("x")
    assert main(["studio", "--train-into", str(tmp_path / "file")]) == 2
    assert "lmlab studio: error: --train-into" in capsys.readouterr().err


def test_a_job_stopped_while_it_is_still_starting_ends_stopped_not_failed(tmp_path):
    """Stop pressed right after Start reaches the child before its training loop takes SIGINT
    (Python still starting, or the run loading): that is a stop too, and nothing was written."""
    import os

    from lmlab.studio.trainer import Job
    run = tmp_path / "run"
    job = Job(["pretrain", "--corpus", "builtin:shakespeare", "--run", str(run), "--steps", "50",
               "--no-progress"], env=dict(os.environ))
    job.stop()
    job.wait(120)
    described = job.describe()
    assert described["returncode"] != 0 and described["state"] == "stopped", described
    assert not (run / "current.json").exists()
