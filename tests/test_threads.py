"""lmlab.threads: a training run adapts its thread count to how busy the cores are.

The tuner is driven with made-up step times (what it decides from them), then inside real training
runs: a run whose count changes mid-run ends bitwise identical to one on a fixed count, logs the
count it used, says when it changed, and a count the user chose is never changed.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from lmlab import metrics, ops, threads
from lmlab.pretrain import LanguageModelingStage
from lmlab.train import train

from test_train import quiet, tiny_setup


class Recorder:
    """Drives a ThreadTuner with step times that depend on the count it sets."""

    def __init__(self, most, time_at, adapt=True):
        self.counts, self.changes = [], []
        self.current = most
        self.time_at = time_at
        self.tuner = threads.ThreadTuner(most, adapt=adapt, set_threads=self._set,
                                         report=lambda *c: self.changes.append(c))

    def _set(self, n):
        self.current = n

    def run(self, steps, time_at=None):
        time_at = time_at or self.time_at
        for _ in range(steps):
            self.counts.append(self.current)
            self.tuner.record(time_at(self.current))


def test_fewer_threads_that_are_faster_are_kept():
    r = Recorder(2, {2: 0.140, 1: 0.071}.get)
    r.run(200)
    first_probe = threads.SETTLE_STEPS + max(threads.WINDOW_STEPS, threads.FIRST_WAIT)
    assert r.counts[:first_probe] == [2] * first_probe
    assert r.counts[-100:].count(1) >= 90  # on 1, apart from probes of 2 that lose
    assert r.changes == [(2, 1, 0.140, 0.071)]
    assert r.tuner.count == 1


def test_a_probe_that_loses_goes_back_and_waits_twice_as_long():
    r = Recorder(2, {2: 0.040, 1: 0.070}.get)
    r.run(3000)
    assert r.changes == []
    assert r.tuner.count == 2 and r.current == 2
    probes = [i for i in range(1, len(r.counts)) if r.counts[i] == 1 and r.counts[i - 1] == 2]
    gaps = np.diff(probes)
    assert len(probes) >= 4 and all(b > a for a, b in zip(gaps, gaps[1:]))  # ever longer waits
    # A probe whose first step is no faster ends there: one slower step per probe.
    assert all(r.counts[i + 1] == 2 for i in probes)
    assert r.counts.count(1) == len(probes) <= 0.01 * len(r.counts)
    assert max(gaps) <= threads.LONGEST_WAIT + 2 * (threads.WINDOW_STEPS + threads.TRIAL_STEPS)


def test_a_change_within_ten_percent_is_not_taken():
    r = Recorder(2, {2: 0.100, 1: 0.095}.get)
    r.run(500)
    assert r.changes == [] and r.tuner.count == 2


def test_load_that_comes_later_is_noticed_soon_and_more_threads_return_when_it_goes():
    quiet_cores, busy = {2: 0.040, 1: 0.070}.get, {2: 0.140, 1: 0.071}.get
    r = Recorder(2, quiet_cores)
    r.run(1500)  # probes have backed off to long waits by now
    assert r.changes == []
    before = len(r.counts)
    r.run(60, busy)  # the step time at 2 threads jumps: the next probe comes at once
    assert r.tuner.count == 1
    switched = next(i for i in range(before, len(r.counts)) if r.counts[i] == 1)
    assert switched - before <= threads.WINDOW_STEPS + threads.SETTLE_STEPS + 1
    r.run(3000, quiet_cores)  # probing up finds 2 threads faster again
    assert r.tuner.count == 2
    assert [c[:2] for c in r.changes] == [(2, 1), (1, 2)]


def test_between_the_ends_it_probes_both_ways():
    r = Recorder(8, lambda n: {8: 0.5, 7: 0.3, 6: 0.2, 5: 0.25}.get(n, 1.0))
    r.run(2000)
    assert r.tuner.count == 6
    assert {c[:2] for c in r.changes} == {(8, 7), (7, 6)}
    assert 5 in r.counts  # tried, and lost


def test_a_chosen_count_or_one_core_is_left_alone():
    for r in (Recorder(2, {2: 0.140, 1: 0.071}.get, adapt=False), Recorder(1, lambda n: 0.1)):
        r.run(300)
        assert set(r.counts) == {r.tuner.most} and r.changes == []
        r.tuner.restore()
        assert r.current == r.tuner.most


def test_restore_puts_back_the_starting_count():
    r = Recorder(2, {2: 0.140, 1: 0.071}.get)
    r.run(100)
    assert r.current == 1
    r.tuner.restore()
    assert r.current == 2 and r.tuner.count == 2


def test_describe_change_reads_as_a_sentence():
    assert threads.describe_change(2, 1, 0.1416, 0.0712) == (
        "1 thread trains faster than 2 now (71.2 against 141.6 ms a step), so the run goes on "
        "with 1 (--threads N fixes the count)")
    assert threads.describe_change(1, 2, 0.07, 0.04).startswith("2 threads train faster than 1")


# --- inside training runs ----------------------------------------------------------------------


@pytest.fixture
def default_threads():
    """lmlab's default count (not the user's choice), two threads, put back afterwards."""
    chosen, count = ops._thread_count_chosen, ops.get_num_threads()
    ops._thread_count_chosen = False
    ops.set_default_num_threads(2)
    yield
    ops._thread_count_chosen = chosen
    ops.set_default_num_threads(count)


def flip_every_probe(monkeypatch):
    """A tuner that probes every few steps and takes every candidate: it is told each trial step
    took half the time of a step at the current count."""
    monkeypatch.setattr(threads, "FIRST_WAIT", 2)
    record = threads.ThreadTuner.record
    monkeypatch.setattr(threads.ThreadTuner, "record",
                        lambda self, seconds: record(self, 1.0 if self._trial is None else 0.5))


def train_tiny(path, steps=40):
    tok, ids, model = tiny_setup()
    stage = LanguageModelingStage(ids[:1500], ids[1500:], 4, 16, seed=3)
    train(model, stage, quiet(steps=steps, log_every=1, eval_every=0), path, tokenizer=tok)
    return model.params.copy(), [row["threads"] for row in metrics.read_metrics(path)]


def test_a_run_whose_count_changes_is_bitwise_the_run_on_one_count(tmp_path, monkeypatch, capsys,
                                                                    default_threads):
    with ops.num_threads(1):
        fixed, counts = train_tiny(tmp_path / "fixed")
    assert set(counts) == {1}
    flip_every_probe(monkeypatch)
    adapted, counts = train_tiny(tmp_path / "adapted")
    assert {1, 2} <= set(counts)  # it did change, more than once
    assert np.array_equal(fixed, adapted)
    err = capsys.readouterr().err
    assert "lmlab: step " in err and "1 thread trains faster than 2 now" in err
    assert ops.get_num_threads() == 2  # the count it started with, after the run


def test_a_count_the_user_chose_is_kept(tmp_path, monkeypatch, capsys, default_threads):
    flip_every_probe(monkeypatch)
    ops.set_num_threads(2)  # lmlab.set_num_threads: the user's choice
    _, counts = train_tiny(tmp_path / "chosen")
    assert set(counts) == {2}
    err = capsys.readouterr().err
    assert "faster than" not in err and "--threads N fixes" not in err


def test_the_choice_is_known_from_the_environment_and_set_num_threads():
    script = ("from lmlab import ops; a = ops.thread_count_chosen(); "
              "ops.set_default_num_threads(2); b = ops.thread_count_chosen(); "
              "ops.set_num_threads(2); print(a, b, ops.thread_count_chosen())")
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    run = lambda e: subprocess.run([sys.executable, "-c", script], env=e, capture_output=True,
                                   text=True, check=True).stdout.split()
    assert run(env) == ["False", "False", "True"]
    assert run({**env, "OMP_NUM_THREADS": "1"}) == ["True", "True", "True"]


def test_num_threads_for_a_block_leaves_the_choice_as_it_was(default_threads):
    with ops.num_threads(1):
        assert ops.thread_count_chosen()
    assert not ops.thread_count_chosen()
