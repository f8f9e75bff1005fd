"""The kernels' thread count while a run trains: measured as it goes, not assumed.

Every kernel divides its work so that each output element is computed the same way whatever the
thread count: the kernels give the same bits on 1 thread as on 16 (tests/test_kernels.py,
tests/test_train.py). A run can therefore change its thread count between any two steps without
changing a single number it computes, and ThreadTuner does that when it pays.

When another program keeps one of the cores busy (a browser, a second run, a neighbour on a shared
machine), every parallel kernel waits at its end for the thread whose core is shared, and a step on
fewer threads is faster: the README measures 2 threads at 128 ms a step against 80 ms on 1. The
tuner times each step's own work (forward, backward, update: not validation, logging or saving),
and every so often tries one thread fewer (or one more, up to the count the run started with) for
a few steps. It keeps the count that was at least 10% faster. A probe whose first step is no faster
ends there, and a probe that loses doubles the wait before the next one, so a quiet machine spends
a handful of slower steps in a long run probing; a step time that moves by a third at the current
count (load came or went) brings the next probe forward.

It runs only where the thread count is lmlab's own default: a count the user chose (--threads,
threads=, OMP_NUM_THREADS, lmlab.set_num_threads) is kept as given (ops.thread_count_chosen).
"""

from __future__ import annotations

import statistics
from typing import Callable, Optional

from . import ops

# Steps not timed after the tuner settles on a count (new threads start, caches refill), before
# that count's time is measured again.
SETTLE_STEPS = 1
# Steps at the current count whose median is its time.
WINDOW_STEPS = 5
# Steps timed at a candidate count; a trial ends after its first step if that step was no faster
# than the current count's median (so a probe on a quiet machine costs one slower step).
TRIAL_STEPS = 3
# Steps at a count before its first probe, and the longest wait a run of lost probes reaches.
FIRST_WAIT = 16
LONGEST_WAIT = 1024
# A candidate is taken when its median step is at most this fraction of the current count's.
GAIN = 0.9
# The current count's median moving by this factor from the one measured after the last probe
# brings the next probe forward.
DRIFT = 1.3


class ThreadTuner:
    """Chooses the thread count of the steps to come from the times of the steps gone.

    `most` is the count the run starts with and the most it uses; with adapt=False (a count the
    user chose) the tuner does nothing. Call record(seconds) after each step with the time of that
    step's work; the tuner sets the count for the next step itself (through `set_threads`) and
    calls report(old, new, old_time, new_time) when it settles on a new count. restore() puts back
    the count the run started with."""

    def __init__(self, most: int, *, adapt: bool = True,
                 set_threads: Callable[[int], None] = ops.set_default_num_threads,
                 report: Optional[Callable[[int, int, float, float], None]] = None) -> None:
        self.most = max(1, int(most))
        self.adapt = adapt
        self.count = self.most
        self._set = set_threads
        self._report = report
        self._skip = SETTLE_STEPS
        self._times: list = []            # recent step times at self.count, newest last
        self._settled: Optional[float] = None  # the count's median, first measured after a probe
        self._since_probe = 0
        self._wait = FIRST_WAIT
        self._trial: Optional[tuple] = None    # (candidate count, its step times)
        self._last_direction = 1

    @property
    def active(self) -> bool:
        return self.adapt and self.most > 1

    def record(self, seconds: float) -> None:
        if not self.active:
            return
        if self._skip > 0:
            self._skip -= 1
            return
        if self._trial is not None:
            self._record_trial(seconds)
            return
        self._times = (self._times + [seconds])[-WINDOW_STEPS:]
        self._since_probe += 1
        if len(self._times) < WINDOW_STEPS:
            return
        now = statistics.median(self._times)
        if self._settled is None:
            self._settled = now
        drifted = not self._settled / DRIFT <= now <= self._settled * DRIFT
        if drifted or self._since_probe >= self._wait:
            if drifted:
                self._wait = FIRST_WAIT
            self._start_trial()

    def restore(self) -> None:
        """Back to the count the run started with (the rest of the process expects it)."""
        if self.active:
            self._set(self.most)
            self.count = self.most

    def _candidate(self) -> int:
        if self.count == self.most:
            return self.count - 1
        if self.count == 1:
            return 2
        self._last_direction = -self._last_direction  # alternate down and up between the ends
        return self.count + self._last_direction

    def _start_trial(self) -> None:
        candidate = self._candidate()
        self._trial = (candidate, [])
        self._set(candidate)

    def _record_trial(self, seconds: float) -> None:
        candidate, times = self._trial
        times.append(seconds)
        current_time = statistics.median(self._times)
        lost_at_once = len(times) == 1 and seconds >= current_time
        if len(times) < TRIAL_STEPS and not lost_at_once:
            return
        trial_time = statistics.median(times)
        self._trial = None
        if trial_time <= GAIN * current_time:
            previous = self.count
            self.count, self._wait = candidate, FIRST_WAIT
            if self._report is not None:
                self._report(previous, candidate, current_time, trial_time)
        else:
            self._set(self.count)
            self._wait = min(2 * self._wait, LONGEST_WAIT)
        # Either way the count's time is measured afresh: conditions may have changed meanwhile.
        self._times, self._settled, self._since_probe = [], None, 0
        self._skip = SETTLE_STEPS


def describe_change(previous: int, count: int, previous_time: float, time: float) -> str:
    """The line a run prints when it changes its thread count (a busy core, or a model too small
    to share out, makes fewer threads faster; which one is not for this line to guess)."""
    subject = "1 thread trains" if count == 1 else f"{count} threads train"
    return (f"{subject} faster than {previous} now ({1e3 * time:.1f} against "
            f"{1e3 * previous_time:.1f} ms a step), so the run goes on with {count} "
            "(--threads N fixes the count)")
