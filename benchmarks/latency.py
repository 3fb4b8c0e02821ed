"""Section 1: inference latency of every implementation on every runtime.

Keras models (this package, kimm, kecam, the MobileNets) are timed eager,
in graph mode (`tf.function`, the compiled path of `predict_on_batch`), with
XLA (`tf.function(jit_compile=True)`), and as float and int8 TFLite models in
the default TFLite CPU runtime (XNNPACK); this package's model also as QAT
int8 (see `tflite_export.py`). timm runs in PyTorch eager under
`inference_mode`. One row per (implementation, width, batch, runtime); a
failure (import, build, conversion) becomes a row with status "n/a" and its
reason instead of stopping the run.

TFLite models are exported first and timed last, all models of one width and
batch size in turn (`time_pending_tflite`): the TFLite comparisons between
implementations are the closest, closer than the machine's drift over a run.
This package's graph mode, kimm's, kecam's and timm are also timed in turn,
each in its own process (`in_turn.py`; rows "graph_in_turn" and
"torch_in_turn").

Also a worker for the implementations that need their own process:

    python -m benchmarks.latency --implementation timm --settings JSON --output rows.json
"""

import argparse
import collections
import dataclasses
import gc
import json
import os
import sys
import tempfile

from benchmarks import competitors
from benchmarks import in_turn
from benchmarks.console import log
from benchmarks.console import short_reason
from benchmarks.latency_common import SEED
from benchmarks.latency_common import latency_row
from benchmarks.latency_common import prepare_worker_process
from benchmarks.latency_common import random_images
from benchmarks.settings import Settings
from benchmarks.tflite_export import TFLiteExporter
from benchmarks.timing import time_callable
from benchmarks.timing import time_interleaved


def _failed_rows(implementation, settings, reason, widths=None):
    image_size = implementation.image_size(settings)
    return [
        latency_row(implementation, width, batch, image_size, runtime, "n/a", reason)
        for width in (widths or implementation.widths(settings))
        for batch in settings.batch_sizes
        for runtime in implementation.runtimes
    ]


def _time(run, settings):
    return time_callable(run, settings.warmup, settings.repeats, settings.max_seconds)


def _skip_reason(implementation, runtime, settings):
    if not implementation.ours and settings.competitor_runtimes and runtime not in settings.competitor_runtimes:
        return "skipped: not measured for other implementations in this configuration"
    if runtime == "tflite_int8_qat" and not settings.qat:
        return "skipped: QAT export off in this configuration"
    return None


def _measure_keras_runtime(implementation, model, exporter, width, runtime, images, settings):
    """(timing, tflite info); the timing is None for a TFLite model left in
    `settings.tflite_dir` to be timed with the others."""
    from benchmarks.runtimes import keras_runner
    from benchmarks.runtimes import tflite_runner
    from benchmarks.tflite_export import float_tensors_inside

    if runtime in ("eager", "graph", "xla"):
        return _time(keras_runner(model, images, runtime), settings), None
    flatbuffer, route = exporter.export(runtime, len(images))
    tflite = {"bytes": len(flatbuffer), "float_tensors_inside": float_tensors_inside(flatbuffer), "route": route}
    if settings.tflite_dir:
        path = os.path.join(settings.tflite_dir, f"{implementation.key}_w{width:g}_b{len(images)}_{runtime}.tflite")
        with open(path, "wb") as f:
            f.write(flatbuffer)
        return None, dict(tflite, path=path)
    return _time(tflite_runner(flatbuffer, images, settings.threads), settings), tflite


def _measure_keras(implementation, settings, width):
    from benchmarks.random_weights import randomize_keras_weights

    image_size = implementation.image_size(settings)
    try:
        model = randomize_keras_weights(implementation.build(width, image_size), seed=SEED)
    except Exception as error:  # import or build failure: every row of this width
        return _failed_rows(implementation, settings, short_reason(error), widths=(width,))
    calibration = random_images(implementation, settings.calibration_images, image_size, seed=1)
    exporter = TFLiteExporter(implementation, model, calibration)
    rows = []
    for batch in settings.batch_sizes:
        images = random_images(implementation, batch, image_size, seed=2)
        for runtime in implementation.runtimes:
            skipped = _skip_reason(implementation, runtime, settings)
            if skipped:
                rows.append(latency_row(implementation, width, batch, image_size, runtime, "skipped", skipped))
                continue
            log(f"{implementation.key} width {width} batch {batch} {image_size}x{image_size}: {runtime}")
            try:
                timing, tflite = _measure_keras_runtime(
                    implementation, model, exporter, width, runtime, images, settings
                )
                status = "ok" if timing is not None else "pending"
                rows.append(
                    latency_row(implementation, width, batch, image_size, runtime, status, timing=timing, tflite=tflite)
                )
                if timing is None:
                    log("  exported; timed at the end with the other TFLite models")
                else:
                    log(f"  median {timing.median_ms:.2f} ms over {timing.runs} runs")
            except Exception as error:
                log(f"  n/a: {short_reason(error)}")
                rows.append(latency_row(implementation, width, batch, image_size, runtime, "n/a", short_reason(error)))
    return rows


def _measure_torch(implementation, settings, width):
    from benchmarks.random_weights import randomize_torch_weights
    from benchmarks.runtimes import torch_runner

    image_size = implementation.image_size(settings)
    try:
        model = randomize_torch_weights(implementation.build(width, image_size), seed=SEED)
    except Exception as error:
        return _failed_rows(implementation, settings, short_reason(error), widths=(width,))
    rows = []
    for batch in settings.batch_sizes:
        images = random_images(implementation, batch, image_size, seed=2, channels_first=True)
        log(f"{implementation.key} width {width} batch {batch} {image_size}x{image_size}: torch")
        try:
            timing = _time(torch_runner(model, images), settings)
            rows.append(latency_row(implementation, width, batch, image_size, "torch", timing=timing))
            log(f"  median {timing.median_ms:.2f} ms over {timing.runs} runs")
        except Exception as error:
            rows.append(latency_row(implementation, width, batch, image_size, "torch", "n/a", short_reason(error)))
    return rows


def measure_implementation(implementation, settings):
    """All rows of one implementation, measured in this process."""
    measure = _measure_torch if implementation.framework == "torch" else _measure_keras
    rows = []
    for width in implementation.widths(settings):
        rows += measure(implementation, settings, width)
        gc.collect()  # the previous width's model and compiled functions
    return rows


def measure_in_worker(implementation, settings):
    """Rows of an implementation measured in its own process (see isolation.py)."""
    from benchmarks.isolation import WorkerError
    from benchmarks.isolation import run_module

    environment = {"TF_USE_LEGACY_KERAS": "1"} if implementation.framework == "tf_keras" else {}
    try:
        return run_module(
            "benchmarks.latency",
            ["--implementation", implementation.key, "--settings", settings.to_json()],
            environment=environment,
        )
    except WorkerError as error:
        return _failed_rows(implementation, settings, short_reason(str(error)))


def _pending_runner(row, settings):
    """The TFLite runner of a pending row, checked by one call: (run, seconds
    that call took)."""
    import time

    from benchmarks.runtimes import tflite_runner

    implementation = competitors.BY_KEY[row["implementation"]]
    images = random_images(implementation, row["batch"], row["image_size"], seed=2)
    with open(row["tflite"]["path"], "rb") as f:
        run = tflite_runner(f.read(), images, settings.threads)
    start = time.perf_counter()
    run()
    return run, time.perf_counter() - start


def time_pending_tflite(rows, settings):
    """Times every pending TFLite row: per (width, batch), all implementations'
    float and int8 models in turn (`timing.time_interleaved`), so the ratios
    between them are not skewed by the machine's drift. A model that fails
    to load or run becomes "n/a" with its reason; the others are timed."""
    groups = collections.defaultdict(list)
    for row in rows:
        if row["status"] == "pending":
            groups[(row["width"], row["batch"])].append(row)
    for (width, batch), group in sorted(groups.items()):
        log(f"TFLite width {width:g} batch {batch}: {len(group)} models in turn")
        runs, first_call_s = {}, {}
        for index, row in enumerate(group):
            try:
                runs[index], first_call_s[index] = _pending_runner(row, settings)
            except Exception as error:
                row.update(status="n/a", reason=short_reason(error))
        try:
            timings = time_interleaved(runs, settings.warmup, settings.repeats, settings.max_seconds)
        except Exception as error:
            timings = {}
            for index in runs:
                group[index].update(status="n/a", reason=short_reason(error))
        for index, timing in timings.items():
            # The first call of `time_interleaved` was a second call: report
            # the first, which includes the interpreter's one-off work.
            timing = dataclasses.replace(timing, first_call_s=first_call_s[index])
            group[index].update(status="ok", timing=timing.to_dict())
            log(f"  {group[index]['implementation']} {group[index]['runtime']}: median {timing.median_ms:.2f} ms")
        del runs
        gc.collect()
    for row in rows:
        if row.get("tflite"):
            row["tflite"].pop("path", None)  # a temporary file
    return rows


def run_section(settings):
    with tempfile.TemporaryDirectory(prefix="benchmark_tflite_") as directory:
        settings = dataclasses.replace(settings, tflite_dir=directory)
        rows = []
        selected = competitors.selected(settings)
        for implementation in selected:
            if implementation.isolated:
                rows += measure_in_worker(implementation, settings)
            else:
                rows += measure_implementation(implementation, settings)
        rows = time_pending_tflite(rows, settings)
    timed_in_turn = in_turn.participants({implementation.key for implementation in selected})
    if timed_in_turn:
        rows += in_turn.time_in_turn(settings, timed_in_turn)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description="Latency worker: one implementation, every width and batch.")
    parser.add_argument("--implementation", required=True, choices=sorted(competitors.BY_KEY))
    parser.add_argument("--settings", required=True, help="Settings as JSON (Settings.to_json).")
    parser.add_argument("--output", required=True, help="Where to write the rows (JSON).")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    implementation = competitors.BY_KEY[args.implementation]
    settings = Settings.from_json(args.settings)
    prepare_worker_process(implementation, settings.threads)
    rows = measure_implementation(implementation, settings)
    with open(args.output, "w") as f:
        json.dump(rows, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
