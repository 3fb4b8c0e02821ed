"""Running one benchmark module in a fresh worker process.

Used for what must not share the main (Keras 3) process: PyTorch (torchvision
crashes when imported after TensorFlow here, and PyTorch's idle OpenMP
threads would spin during TensorFlow timings) and kecam (it switches a
process to tf_keras). The worker writes its result as JSON to the path given
by `--output`; its `[bench]` progress lines are passed through.
"""

import collections
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading

from benchmarks.console import PREFIX

REPOSITORY_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cpu_name():
    """The processor's model name (what a timing or a trained model depends on)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class WorkerError(RuntimeError):
    """The worker failed; the message is a one-line reason for the table."""


def _failure_reason(returncode, tail):
    # The last traceback line names the exception; a signal leaves none.
    for line in reversed(tail):
        text = line.strip()
        if text and not text.startswith(PREFIX) and ("Error" in text or "Exception" in text):
            return text
    if returncode < 0:
        return f"worker killed by signal {-returncode}"
    return f"worker exited with status {returncode}"


def worker_environment(tf_log_level="3"):
    """This process's environment for a worker `python -m benchmarks...`: the
    repository first on PYTHONPATH (the worker may run from another folder),
    TensorFlow's C++ logging quieted unless the caller chose a level."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPOSITORY_ROOT, env.get("PYTHONPATH")]))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", tf_log_level)
    return env


def run_module(module, args, timeout_s=3600, environment=None, output_flag="--output"):
    """Runs `python -m module *args --output FILE`; returns the parsed FILE."""
    env = worker_environment()
    env.update(environment or {})
    with tempfile.TemporaryDirectory() as directory:
        output = os.path.join(directory, "result.json")
        command = [sys.executable, "-m", module, *args, output_flag, output]
        tail = collections.deque(maxlen=40)
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        # Reading stderr blocks until the worker ends, so a timer enforces the limit.
        expired = threading.Event()

        def stop():
            expired.set()
            process.kill()

        watchdog = threading.Timer(timeout_s, stop)
        watchdog.start()
        try:
            for line in process.stderr:
                tail.append(line)
                if line.startswith(PREFIX):
                    sys.stderr.write("  " + line)
                    sys.stderr.flush()
            returncode = process.wait()
        finally:
            watchdog.cancel()
            if process.poll() is None:  # interrupted: do not leave the worker behind
                process.kill()
                process.wait()
        if expired.is_set():
            raise WorkerError(f"worker timed out after {timeout_s} s")
        if returncode != 0 or not os.path.exists(output):
            raise WorkerError(_failure_reason(returncode, list(tail)))
        with open(output) as f:
            return json.load(f)
