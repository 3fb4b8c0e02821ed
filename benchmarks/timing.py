"""Timing one callable: warm-up, repeated runs, median and spread.

Framework-free: the callable must return only once its result is computed
(the runners in `runtimes.py` copy the output to host memory).
"""

import dataclasses
import os
import time

import numpy as np


@dataclasses.dataclass(frozen=True)
class Timing:
    """Milliseconds per call over the timed runs (the first call never counts)."""

    median_ms: float
    p25_ms: float
    p75_ms: float
    min_ms: float
    max_ms: float
    runs: int
    first_call_s: float  # tracing, XLA compilation or interpreter set-up included
    # The 1-minute load average, the higher of its values before and after
    # the timed runs: above the CPU count, other processes shared the CPUs.
    load_average: float = None

    @classmethod
    def from_samples(cls, samples_ms, first_call_s, load_average=None):
        samples = np.asarray(samples_ms, np.float64)
        p25, median, p75 = np.percentile(samples, [25, 50, 75])
        return cls(
            median_ms=float(median),
            p25_ms=float(p25),
            p75_ms=float(p75),
            min_ms=float(samples.min()),
            max_ms=float(samples.max()),
            runs=int(samples.size),
            first_call_s=float(first_call_s),
            load_average=load_average,
        )

    def to_dict(self):
        return dataclasses.asdict(self)


def time_callable(run, warmup, repeats, max_seconds, min_runs=3):
    """Times `run()`; returns a `Timing`.

    The first call is timed apart (it traces, compiles or allocates). Further
    warm-up calls, up to `warmup` calls in all, stop early after a quarter of
    `max_seconds`: a 10 s XLA call does not need three warm-ups. Timed runs
    stop at `repeats`, or once they took `max_seconds` in all and at least
    `min_runs` were made, so slow configurations keep the run time bounded.
    """
    start = time.perf_counter()
    run()
    first_call_s = time.perf_counter() - start

    warm_spent = 0.0
    for _ in range(max(warmup, 1) - 1):
        if warm_spent > max_seconds / 4:
            break
        start = time.perf_counter()
        run()
        warm_spent += time.perf_counter() - start

    load_before = os.getloadavg()[0]
    samples_ms = []
    spent = 0.0
    min_runs = min(min_runs, repeats)
    while len(samples_ms) < max(repeats, 1):
        start = time.perf_counter()
        run()
        elapsed = time.perf_counter() - start
        samples_ms.append(elapsed * 1000.0)
        spent += elapsed
        if spent > max_seconds and len(samples_ms) >= min_runs:
            break
    return Timing.from_samples(samples_ms, first_call_s, max(load_before, os.getloadavg()[0]))


def time_interleaved(runs, warmup, repeats, max_seconds, min_runs=3, turn_seconds=0.05, settle_calls=0):
    """Times several callables in turn; returns `{name: Timing}`.

    `runs` maps a name to a zero-argument callable, as `time_callable` takes.
    Each round gives every callable one turn, in an order rotated by one
    place per round, so a slow drift of the machine's speed falls on all of
    them alike. Why: timed one after the other, the same TFLite model
    measured 2-5% apart over a benchmark run on these machines, as much as
    the differences between implementations that the tables compare.

    A turn calls its callable repeatedly for `turn_seconds` (at least once)
    and contributes one sample, the median time of its calls: a short call
    right after another runtime's is slowed by that runtime's worker
    threads, which keep spinning for a while (a 0.3 ms int8 model measured
    2.4 ms when its turns were single calls between other interpreters).
    `settle_calls` untimed calls open each turn: a call longer than
    `turn_seconds` is otherwise the turn's only sample, and always the
    first after the switch (timm at 256x256 measured 16% slower in turn with
    this package's graph mode than alone, this package 3.5%).

    First calls are timed apart, warm-up rounds stop early after a quarter
    of the budget, and rounds stop at `repeats`, or once they took
    `max_seconds` per callable and at least `min_runs` were made.
    """
    if not runs:
        return {}
    names = list(runs)
    budget = max_seconds * len(names)
    first_call_s = {}
    for name in names:
        start = time.perf_counter()
        runs[name]()
        first_call_s[name] = time.perf_counter() - start

    def turn(run):
        calls_ms = []
        turn_start = time.perf_counter()
        for _ in range(settle_calls):
            run()
        timed_start = time.perf_counter()
        while True:
            start = time.perf_counter()
            run()
            end = time.perf_counter()
            calls_ms.append((end - start) * 1000.0)
            if end - timed_start >= turn_seconds:
                return float(np.median(calls_ms)), end - turn_start

    warm_spent = 0.0
    for _ in range(max(warmup, 1) - 1):
        if warm_spent > budget / 4:
            break
        for name in names:
            warm_spent += turn(runs[name])[1]

    load_before = os.getloadavg()[0]
    samples_ms = {name: [] for name in names}
    spent = 0.0
    min_runs = min(min_runs, repeats)
    rounds = 0
    while rounds < max(repeats, 1):
        shift = rounds % len(names)
        for name in names[shift:] + names[:shift]:
            sample_ms, elapsed = turn(runs[name])
            samples_ms[name].append(sample_ms)
            spent += elapsed
        rounds += 1
        if spent > budget and rounds >= min_runs:
            break
    load = max(load_before, os.getloadavg()[0])
    return {name: Timing.from_samples(samples_ms[name], first_call_s[name], load) for name in names}
