"""This package's graph mode, the other Keras MobileViTv2s' and timm's
PyTorch model, timed in turn.

The latency section times each implementation in its own phase of the run,
and this machine's speed drifts between phases: the same graph-mode cell
measured 35.4 ms in one full run and 46.7 ms in the next, timm 53.7 and
37.7 ms (and this package's graph mode 1.21x kimm's in one run, 0.94x when
the two were timed in turn). The ratios the issue asks for (this package /
timm, this package / the other Keras implementations) are therefore also
measured with all models alive at once, each in its own worker process
(PyTorch and TensorFlow must not share one here, kecam switches its process
to tf_keras: see isolation.py), called in turn by `timing.time_interleaved`,
each turn opened by one untimed call. A call is a line sent to the worker
and a line back: the pipe adds about 0.1 ms to every model alike.

Worker (started by `RemoteRunner`):

    python -m benchmarks.in_turn --implementation timm --width 1.0 --batch 1 --settings JSON
"""

import argparse
import collections
import gc
import os
import subprocess
import sys
import threading

from benchmarks import competitors
from benchmarks.console import log
from benchmarks.console import short_reason
from benchmarks.isolation import WorkerError
from benchmarks.isolation import worker_environment
from benchmarks.latency_common import SEED
from benchmarks.latency_common import latency_row
from benchmarks.latency_common import prepare_worker_process
from benchmarks.latency_common import random_images
from benchmarks.settings import Settings
from benchmarks.timing import time_interleaved

OURS, REFERENCE = "keras_mobilevitv2", "timm"
# The runtime each implementation is timed on, and the row's runtime name,
# in the order the workers start.
RUNTIMES = {
    OURS: ("graph", "graph_in_turn"),
    "kimm": ("graph", "graph_in_turn"),
    "kecam": ("graph", "graph_in_turn"),
    REFERENCE: ("torch", "torch_in_turn"),
}
READY, CALL, DONE, STOP = "@ready", "@call", "@done", "@stop"


class RemoteRunner:
    """A model in a worker process; calling this runs it there once."""

    def __init__(self, implementation, width, batch, settings, start_timeout_s=600):
        env = worker_environment()
        command = [
            sys.executable,
            "-m",
            "benchmarks.in_turn",
            "--implementation",
            implementation,
            "--width",
            repr(width),
            "--batch",
            str(batch),
            "--settings",
            settings.to_json(),
        ]
        self._stderr_tail = collections.deque(maxlen=20)
        self._process = subprocess.Popen(
            command,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        threading.Thread(target=self._drain_stderr, daemon=True).start()
        watchdog = threading.Timer(start_timeout_s, self._process.kill)
        watchdog.start()
        try:
            self._expect(READY)
        finally:
            watchdog.cancel()

    def _drain_stderr(self):
        for line in self._process.stderr:
            self._stderr_tail.append(line.rstrip())

    def _expect(self, token):
        # Other output on stdout (a library's print) is skipped.
        for line in self._process.stdout:
            if line.strip() == token:
                return
        self._process.wait()
        errors = [line for line in self._stderr_tail if "Error" in line or "Exception" in line]
        reason = errors[-1] if errors else f"worker exited with status {self._process.returncode}"
        raise WorkerError(reason)

    def __call__(self):
        self._process.stdin.write(CALL + "\n")
        self._process.stdin.flush()
        self._expect(DONE)

    def close(self):
        if self._process.poll() is None:
            try:
                self._process.stdin.write(STOP + "\n")
                self._process.stdin.flush()
                self._process.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self._process.kill()
                self._process.wait()


def _row(key, width, batch, settings, status="ok", reason="", timing=None):
    implementation = competitors.BY_KEY[key]
    image_size = implementation.image_size(settings)
    return latency_row(implementation, width, batch, image_size, RUNTIMES[key][1], status, reason, timing)


def participants(selected_keys):
    """The implementations of `selected_keys` timed in turn (this package and
    at least one other), in worker start order; empty if there are none."""
    keys = [key for key in RUNTIMES if key in selected_keys]
    return keys if OURS in keys and len(keys) > 1 else []


def _start_runners(keys, width, batch, settings):
    """{key: runner} of the workers that started; {key: reason} of the others."""
    runners, failures = {}, {}
    for key in keys:
        try:
            runners[key] = RemoteRunner(key, width, batch, settings)
        except Exception as error:
            failures[key] = short_reason(error)
            log(f"  {key} n/a: {failures[key]}")
    return runners, failures


def time_in_turn(settings, keys):
    """Latency rows (runtimes "graph_in_turn" and "torch_in_turn") of `keys`
    (see `participants`), timed in turn per width and batch size. A worker
    that fails to start is n/a with its reason; the others are timed."""
    rows = []
    for width in settings.widths:
        for batch in settings.batch_sizes:
            log(f"width {width:g} batch {batch}: {', '.join(keys)} in turn (graph mode; timm in PyTorch)")
            runners, failures = _start_runners(keys, width, batch, settings)
            try:
                if OURS not in runners or len(runners) < 2:
                    raise WorkerError("fewer than two models started: nothing to time in turn")
                # One untimed call opens each turn: these models run longer
                # than a 50 ms turn, so the sample would else always be the
                # first call after the other process's.
                timings = time_interleaved(
                    runners, settings.warmup, settings.repeats, settings.max_seconds, settle_calls=1
                )
                for key, timing in timings.items():
                    rows.append(_row(key, width, batch, settings, timing=timing))
                    log(f"  {key}: median {timing.median_ms:.2f} ms")
            except Exception as error:
                log(f"  n/a: {short_reason(error)}")
                failures.update({key: short_reason(error) for key in runners})
            finally:
                for runner in runners.values():
                    runner.close()
            rows += [_row(key, width, batch, settings, "n/a", reason) for key, reason in failures.items()]
            gc.collect()
    return rows


def _serve(implementation, width, batch, settings):
    """Builds the model and its runner, then runs it once per CALL line."""
    prepare_worker_process(implementation, settings.threads)
    image_size = implementation.image_size(settings)
    if implementation.framework == "torch":
        from benchmarks.random_weights import randomize_torch_weights
        from benchmarks.runtimes import torch_runner

        model = randomize_torch_weights(implementation.build(width, image_size), seed=SEED)
        run = torch_runner(model, random_images(implementation, batch, image_size, seed=2, channels_first=True))
    else:
        from benchmarks.random_weights import randomize_keras_weights
        from benchmarks.runtimes import keras_runner

        model = randomize_keras_weights(implementation.build(width, image_size), seed=SEED)
        images = random_images(implementation, batch, image_size, seed=2)
        run = keras_runner(model, images, RUNTIMES[implementation.key][0])
    run()  # tracing, allocation
    print(READY, flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command == STOP:
            break
        if command != CALL:
            raise ValueError(f"unknown command {command!r}; expected {CALL} or {STOP}")
        run()
        print(DONE, flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description="In-turn timing worker: one model, run once per line on stdin.")
    parser.add_argument("--implementation", required=True, choices=sorted(RUNTIMES))
    parser.add_argument("--width", required=True, type=float)
    parser.add_argument("--batch", required=True, type=int)
    parser.add_argument("--settings", required=True, help="Settings as JSON (Settings.to_json).")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    _serve(competitors.BY_KEY[args.implementation], args.width, args.batch, Settings.from_json(args.settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
