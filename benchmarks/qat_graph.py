"""The QAT int8 graph against post-training int8 and float TFLite, timed in turn.

    python -m benchmarks.qat_graph [--widths 0.5 1.0] [--batch_sizes 1 16] [--image_size 256]
        [--threads 2] [--repeats 20] [--output benchmarks/results/qat_graph]

For each width and batch: float32 TFLite, post-training int8 (PTQ), the QAT
int8 model as `quantize_model` builds it (calibrated, not trained: speed does
not depend on the weights) and the same QAT model with
`merge_pointwise=False`, all four timed in turn in one process
(`timing.time_interleaved`), so the machine's drift falls on all of them
alike. Random weights; nothing is downloaded. Shows whether the int8 model
users ship (QAT) is the fast one, and what the merged projections give.
"""

import argparse
import os
import sys

import numpy as np

from benchmarks.console import log
from benchmarks.isolation import cpu_name
from benchmarks.report import machine_text
from benchmarks.report import print_and_write
from benchmarks.report import table

VARIANTS = ("float32", "ptq_int8", "qat_int8", "qat_int8_unmerged")
BUILDERS = {0.5: "MobileViTv2_050", 0.75: "MobileViTv2_075", 1.0: "MobileViTv2_100", 2.0: "MobileViTv2_200"}


def flatbuffers(width, size, batch, calibration):
    """{variant: TFLite bytes} of one width at one batch size."""
    import keras_mobilevitv2
    from quantization import calibrate
    from quantization import quantize_model
    from quantization.tflite_export import convert

    model = getattr(keras_mobilevitv2, BUILDERS[width])(weights=None, input_shape=(size, size, 3))
    merged = calibrate(quantize_model(model), calibration)
    unmerged = calibrate(quantize_model(model, merge_pointwise=False), calibration)
    return {
        "float32": convert(model, "float32", io_type="float32", batch_size=batch),
        "ptq_int8": convert(model, "ptq_int8", representative_images=calibration, batch_size=batch),
        "qat_int8": convert(merged, "qat_int8", batch_size=batch),
        "qat_int8_unmerged": convert(unmerged, "qat_int8", batch_size=batch),
    }


def time_cell(width, size, batch, args):
    from benchmarks.runtimes import tflite_runner
    from benchmarks.timing import time_interleaved

    calibration = np.random.RandomState(0).uniform(0, 255, (8, size, size, 3)).astype(np.float32)
    log(f"width {width}, batch {batch}: converting {len(VARIANTS)} models")
    models = flatbuffers(width, size, batch, calibration)
    images = calibration[:1].repeat(batch, 0)
    runs = {name: tflite_runner(flatbuffer, images, args.threads) for name, flatbuffer in models.items()}
    log(f"width {width}, batch {batch}: timing in turn")
    timings = time_interleaved(runs, 3, args.repeats, 6.0)
    return {
        "width": width,
        "batch": batch,
        "ms": {name: timing.median_ms for name, timing in timings.items()},
        "p25_p75_ms": {name: [timing.p25_ms, timing.p75_ms] for name, timing in timings.items()},
        "load_average": max(timing.load_average or 0.0 for timing in timings.values()),
    }


def markdown(result):
    rows = []
    for cell in result["cells"]:
        ms = cell["ms"]
        rows.append(
            [cell["width"], cell["batch"]]
            + [f"{ms[name]:.3g}" for name in VARIANTS]
            + [
                f"{ms['qat_int8'] / ms['ptq_int8']:.2f}x",
                f"{ms['qat_int8'] / ms['float32']:.2f}x",
                f"{ms['qat_int8'] / ms['qat_int8_unmerged']:.2f}x",
                f"{cell['load_average']:.2f}",
            ]
        )
    header = ["width", "batch", "float ms", "PTQ int8 ms", "QAT int8 ms", "QAT int8 unmerged ms"]
    header += ["QAT / PTQ", "QAT / float", "merged / unmerged", "load (1 min)"]
    return "\n".join(
        [
            f"# QAT int8 graph against PTQ int8 and float TFLite ({result['image_size']}x{result['image_size']})",
            "",
            f"Median ms per batch, the four models of a row timed in turn; {result['threads']} threads, XNNPACK; "
            f"random weights; {result['cpus']} CPUs{machine_text(result)}. Command: `{result['command']}`.",
            "",
            table(header, rows),
            "",
        ]
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--widths", type=float, nargs="+", default=[0.5, 1.0], choices=sorted(BUILDERS))
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--image_size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--output", default="", help="Write OUTPUT.json and OUTPUT.md.")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    cells = [time_cell(w, args.image_size, b, args) for w in args.widths for b in args.batch_sizes]
    result = {
        "image_size": args.image_size,
        "threads": args.threads,
        "cpus": os.cpu_count(),
        "machine": cpu_name(),
        "command": "python -m benchmarks.qat_graph " + " ".join(argv if argv is not None else sys.argv[1:]),
        "cells": cells,
    }
    print_and_write(result, markdown(result), args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
