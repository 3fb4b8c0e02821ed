"""Section 3: model size per width, and the share of the machine's peak it reaches.

Per width of this package's MobileViTv2 at the benchmark image size:
parameters, MACs counted from the TensorFlow graph (`macs.py`), timm's MACs
from PyTorch's FLOP counter as a cross-check, float and int8 TFLite bytes,
and the MAC rate achieved at batch 1 in graph mode and in float TFLite,
against the machine's peak: a 2048 x 2048 float32 matrix product in
TensorFlow graph mode on the same threads.

Figures measured by the latency section (same width, batch 1, same image
size) are reused, not measured twice.

Worker for timm's MACs (PyTorch runs in its own process):

    python -m benchmarks.model_size --timm_macs --widths 0.5 1.0 --image_size 256 --output macs.json
"""

import argparse
import gc
import json
import os
import sys

import numpy as np

from benchmarks.console import log
from benchmarks.console import short_reason
from benchmarks.timing import time_callable

PEAK_MATMUL_SIZE = 2048


def matmul_peak(settings, size=PEAK_MATMUL_SIZE):
    """{"size", "timing", "gmacs_per_s"} of a size x size float32 matmul, graph mode."""
    import tensorflow as tf

    rng = np.random.default_rng(0)
    a = tf.constant(rng.standard_normal((size, size), np.float32))
    b = tf.constant(rng.standard_normal((size, size), np.float32))
    product = tf.function(tf.linalg.matmul)
    timing = time_callable(lambda: np.asarray(product(a, b)), settings.warmup, settings.repeats, settings.max_seconds)
    return {"size": size, "timing": timing.to_dict(), "gmacs_per_s": size**3 / (timing.median_ms / 1e3) / 1e9}


def timm_macs(widths, image_size):
    """{width: MACs} of timm's models, computed in a PyTorch worker process."""
    from benchmarks.isolation import run_module

    result = run_module(
        "benchmarks.model_size",
        ["--timm_macs", "--widths", *map(str, widths), "--image_size", str(image_size)],
    )
    return {float(width): macs for width, macs in result.items()}


def _latency_lookup(latency_rows, width, image_size):
    """{runtime: row} of our batch-1 latency rows for this width and size."""
    return {
        row["runtime"]: row
        for row in latency_rows or []
        if row["implementation"] == "keras_mobilevitv2"
        and row["width"] == width
        and row["batch"] == 1
        and row["image_size"] == image_size
        and row["status"] == "ok"
    }


def _time(run, settings):
    return time_callable(run, settings.warmup, settings.repeats, settings.max_seconds)


def _width_row(width, settings, measured):
    from benchmarks.competitors import BY_KEY
    from benchmarks.macs import count_keras_macs
    from benchmarks.random_weights import randomize_keras_weights
    from benchmarks.runtimes import keras_runner
    from benchmarks.runtimes import tflite_runner
    from benchmarks.tflite_export import TFLiteExporter
    from benchmarks.tflite_export import float_tensors_inside

    ours = BY_KEY["keras_mobilevitv2"]
    size = settings.image_size
    row = {"width": width, "image_size": size, "notes": []}
    model = randomize_keras_weights(ours.build(width, size))
    row["params"] = int(model.count_params())
    counted = count_keras_macs(model)
    row.update(
        macs=counted["macs"], elementwise_multiplies=counted["elementwise_multiplies"], macs_by_op=counted["by_op"]
    )
    low, high = ours.input_range
    image = np.random.default_rng(2).uniform(low, high, (1, size, size, 3)).astype(np.float32)
    calibration = np.random.default_rng(1).uniform(low, high, (settings.calibration_images, size, size, 3))
    exporter = TFLiteExporter(ours, model, calibration.astype(np.float32))

    if "graph" in measured:
        row["graph_timing"] = measured["graph"]["timing"]
    else:
        log(f"size: width {width} graph mode, batch 1")
        row["graph_timing"] = _time(keras_runner(model, image, "graph"), settings).to_dict()

    for runtime, key in (("tflite_float", "tflite_float_bytes"), ("tflite_int8", "tflite_int8_bytes")):
        if runtime in measured:
            row[key] = measured[runtime]["tflite"]["bytes"]
            if runtime == "tflite_float":
                row["tflite_float_timing"] = measured[runtime]["timing"]
            else:
                row["int8_float_tensors_inside"] = measured[runtime]["tflite"]["float_tensors_inside"]
            continue
        if not settings.size_tflite:
            row["notes"].append(f"{runtime}: skipped in this configuration")
            continue
        log(f"size: width {width} {runtime} export")
        try:
            flatbuffer, _ = exporter.export(runtime, 1)
            if runtime == "tflite_float":
                row["tflite_float_timing"] = _time(
                    tflite_runner(flatbuffer, image, settings.threads), settings
                ).to_dict()
            else:
                row["int8_float_tensors_inside"] = float_tensors_inside(flatbuffer)
            row[key] = len(flatbuffer)
        except Exception as error:
            row["notes"].append(f"{runtime}: n/a ({short_reason(error)})")

    for runtime in ("graph", "tflite_float"):
        timing = row.get(f"{runtime}_timing")
        if timing:
            row[f"{runtime}_gmacs_per_s"] = row["macs"] / (timing["median_ms"] / 1e3) / 1e9
    return row


def run_section(settings, latency_rows=None):
    log("size: matmul peak")
    peak = matmul_peak(settings)
    try:
        reference = timm_macs(settings.size_widths, settings.image_size)
        reference_reason = ""
    except Exception as error:  # timm/torch missing, or the worker failed
        reference, reference_reason = {}, short_reason(error)
    rows = []
    for width in settings.size_widths:
        log(f"size: width {width}")
        try:
            row = _width_row(width, settings, _latency_lookup(latency_rows, width, settings.image_size))
        except Exception as error:
            row = {"width": width, "image_size": settings.image_size, "notes": [f"n/a ({short_reason(error)})"]}
        row["timm_macs"] = reference.get(width)
        if row["timm_macs"] is None:
            row["notes"].append(f"timm MACs: n/a ({reference_reason or 'not computed'})")
        rows.append(row)
        gc.collect()
    return {"peak": peak, "rows": rows}


def _timm_macs_worker(widths, image_size):
    from benchmarks.competitors import BY_KEY
    from benchmarks.macs import count_torch_macs

    timm = BY_KEY["timm"]
    return {str(width): count_torch_macs(timm.build(width, image_size).eval(), image_size) for width in widths}


def main(argv=None):
    parser = argparse.ArgumentParser(description="Worker: MACs of timm's MobileViTv2 per width (PyTorch).")
    parser.add_argument("--timm_macs", action="store_true", required=True)
    parser.add_argument("--widths", type=float, nargs="+", required=True)
    parser.add_argument("--image_size", type=int, required=True)
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    result = _timm_macs_worker(args.widths, args.image_size)
    with open(args.output, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.exit(main())
