"""How close int8 MobileViTv2 gets to the machine's int8 limit, MobileNetV2 as the yardstick.

    python -m benchmarks.int8_efficiency [--output_dir benchmark_results] [--threads 2] [--repeats 20] [--tiny]

Per width of this package's MobileViTv2 at 256x256, and keras.applications
MobileNetV2 (alpha 1.0) at 224x224: MACs counted from the TensorFlow graph
(`macs.py`, as the size section counts them), batch-1 int8 latency on the
LiteRT interpreter (XNNPACK), and the MAC rate GMAC/s = MACs / time. An int8
CNN such as MobileNetV2 runs near what XNNPACK's int8 kernels reach on this
CPU, so MobileViTv2's rate as a fraction of MobileNetV2's says how close it
gets (the target asked for: 90% or more).

MobileViTv2 is timed as PTQ int8, as QAT int8 (`quantize_model` +
`calibrate`, not trained) and as the QAT model rewritten for the Edge TPU
(`rewrite_graph(qat, "edgetpu")`), which is what runs on the CPU when no TPU
is attached. Each width's models are timed in turn with MobileNetV2's PTQ
int8 (`timing.time_interleaved`), so the machine's drift falls on all alike;
each fraction divides by the MobileNetV2 timing of the same round.

The MACs are the Keras graph's. The exporters merge three pairs of linear
1x1 convolutions, so the TFLite models run somewhat fewer MACs than counted
(12% fewer at width 1.0 for the float model); the rate is then a rate of the
model's nominal work.
"""

import argparse
import dataclasses
import gc
import os
import sys
import tempfile

from benchmarks import competitors
from benchmarks.console import log
from benchmarks.isolation import cpu_name
from benchmarks.latency_common import SEED
from benchmarks.latency_common import random_images
from benchmarks.report import busy_load
from benchmarks.report import busy_note
from benchmarks.report import cpus_text
from benchmarks.report import machine_text
from benchmarks.report import print_and_write
from benchmarks.report import table
from benchmarks.report import timing_text
from benchmarks.settings import ALL_WIDTHS
from benchmarks.v1_v2 import add_common_arguments
from benchmarks.v1_v2 import build_v2
from benchmarks.v1_v2 import config_from_args
from benchmarks.v1_v2 import export_v2
from benchmarks.v1_v2 import model_record
from benchmarks.v1_v2 import tflite_info
from benchmarks.v1_v2 import time_in_turn
from benchmarks.v1_v2 import width_text

MOBILENET = competitors.BY_KEY["mobilenet_v2"]
MOBILENET_SIZE = 224
TARGET_FRACTION = 0.9
OURS_VARIANTS = ("ptq_int8", "qat_int8", "qat_int8_edgetpu")
VARIANT_NAMES = {
    "ptq_int8": "PTQ int8",
    "qat_int8": "QAT int8",
    "qat_int8_edgetpu": "QAT int8, Edge TPU graph on CPU",
}
# --tiny: one width and 64x64 inputs for both models (conversions take most of its time).
TINY_WIDTHS = (0.5,)
TINY_MOBILENET_SIZE = 64


def mobilenet_record(config, size):
    """MobileNetV2's record with its PTQ int8 flatbuffer, converted with the
    shared settings of the latency section (`benchmarks.tflite_export`)."""
    from benchmarks.random_weights import randomize_keras_weights
    from benchmarks.tflite_export import convert_keras_model

    log(f"MobileNetV2 {size}x{size}: building and converting PTQ int8")
    model = randomize_keras_weights(MOBILENET.build(1.0, size), seed=SEED)
    record = model_record("mobilenet_v2", "keras.applications MobileNetV2 (alpha 1.0)", MOBILENET.key, model)
    calibration = random_images(MOBILENET, config.calibration_images, size, seed=1)
    flatbuffer, route = convert_keras_model(model, "keras3", "int8", 1, calibration)
    path = os.path.join(config.directory, "mobilenet_v2_ptq_int8.tflite")
    with open(path, "wb") as f:
        f.write(flatbuffer)
    record["tflite"]["ptq_int8"] = tflite_info(flatbuffer, route, path)
    return record


def ours_record(width, config):
    model = build_v2(width, config.image_size)
    name = f"mobilevitv2_{width:g}"
    record = model_record(name, f"MobileViTv2-{width_text(width)}", "keras_mobilevitv2", model)
    record["tflite"] = export_v2(model, name, config, OURS_VARIANTS)
    del model
    gc.collect()
    return record


def _rate(macs, timing):
    """GMAC/s, or None when the model was not timed."""
    median = (timing or {}).get("median_ms")
    return macs / (median / 1e3) / 1e9 if median else None


def width_row(width, record, mobilenet, timings):
    """One width's figures; fractions divide by MobileNetV2's rate of the same round."""
    reference = timings[(mobilenet["name"], "ptq_int8")]
    reference_rate = _rate(mobilenet["macs"], reference)
    row = {
        "width": width,
        "image_size": record["image_size"],
        "params": record["params"],
        "macs": record["macs"],
        "mobilenet_v2": {"timing": reference, "gmacs_per_s": reference_rate},
    }
    for variant in OURS_VARIANTS:
        timing = timings[(record["name"], variant)]
        rate = _rate(record["macs"], timing)
        info = {key: value for key, value in record["tflite"][variant].items() if key not in ("path", "op_counts")}
        row[variant] = dict(
            info,
            timing=timing,
            gmacs_per_s=rate,
            fraction_of_mobilenet=rate / reference_rate if rate and reference_rate else None,
        )
    return row


def run(config, widths, mobilenet_size):
    from benchmarks.competitors import library_versions

    mobilenet = mobilenet_record(config, mobilenet_size)
    rows = []
    for width in widths:
        log(f"MobileViTv2-{width_text(width)} at {config.image_size}x{config.image_size}")
        record = ours_record(width, config)
        log(f"timing {len(OURS_VARIANTS)} MobileViTv2-{width_text(width)} models in turn with MobileNetV2")
        entries = [(record, variant) for variant in OURS_VARIANTS] + [(mobilenet, "ptq_int8")]
        rows.append(width_row(width, record, mobilenet, time_in_turn(entries, config)))
    mobilenet_info = dict(mobilenet["tflite"]["ptq_int8"])
    for key in ("path", "op_counts"):
        mobilenet_info.pop(key)
    return {
        "config": dataclasses.asdict(config),
        "versions": library_versions(),
        "machine": cpu_name(),
        "cpus": os.cpu_count(),
        "load_average_end": os.getloadavg()[0],
        "target_fraction": TARGET_FRACTION,
        "mobilenet_v2": dict(
            {key: mobilenet[key] for key in ("label", "image_size", "params", "macs")}, tflite=mobilenet_info
        ),
        "rows": rows,
    }


# ---------------------------------------------------------------- report


def _ms(timing, busy):
    """`median [p25-p75]` with the latency section's flags (report.timing_text:
    † busy machine, ‡ wide spread): a rate from a flagged cell is not stable."""
    if not (timing or {}).get("median_ms"):
        return f"n/a ({(timing or {}).get('reason', 'not timed')})"
    return timing_text(timing, busy)


def _rate_text(value):
    return "-" if value is None else f"{value:.2f}"


def _fraction_text(value):
    return "-" if value is None else f"{100 * value:.0f}%"


def rate_table(result):
    rows, busy = result["rows"], busy_load(result)
    names = [VARIANT_NAMES[variant] for variant in OURS_VARIANTS]
    header = ["width", "GMACs"] + [f"{name} ms" for name in names] + ["MobileNetV2 ms (same rounds)"]
    header += [f"{name} GMAC/s" for name in names] + ["MobileNetV2 GMAC/s"]
    header += [f"{name} / MobileNetV2 rate" for name in names]
    body = []
    for row in rows:
        body.append(
            [width_text(row["width"]), f"{row['macs'] / 1e9:.3f}"]
            + [_ms(row[variant]["timing"], busy) for variant in OURS_VARIANTS]
            + [_ms(row["mobilenet_v2"]["timing"], busy)]
            + [_rate_text(row[variant]["gmacs_per_s"]) for variant in OURS_VARIANTS]
            + [_rate_text(row["mobilenet_v2"]["gmacs_per_s"])]
            + [_fraction_text(row[variant]["fraction_of_mobilenet"]) for variant in OURS_VARIANTS]
        )
    return table(header, body)


def model_table(rows, mobilenet):
    header = ["model", "params (M)", "GMACs"] + [f"{VARIANT_NAMES[v]} MB / float tensors inside" for v in OURS_VARIANTS]
    body = []
    for row in rows:
        cells = [f"{row[v]['bytes'] / 1e6:.2f} / {row[v]['float_tensors_inside']}" for v in OURS_VARIANTS]
        body.append(
            [f"MobileViTv2-{width_text(row['width'])}", f"{row['params'] / 1e6:.2f}", f"{row['macs'] / 1e9:.3f}"]
        )
        body[-1] += cells
    info = mobilenet["tflite"]
    body.append(
        [mobilenet["label"], f"{mobilenet['params'] / 1e6:.2f}", f"{mobilenet['macs'] / 1e9:.3f}"]
        + [f"{info['bytes'] / 1e6:.2f} / {info['float_tensors_inside']} (PTQ int8)", "-", "-"]
    )
    return table(header, body)


def verdict(rows, target):
    """Which widths reach the target share of MobileNetV2's int8 MAC rate."""
    lines = []
    for variant in ("ptq_int8", "qat_int8"):
        fractions = [(row["width"], row[variant]["fraction_of_mobilenet"]) for row in rows]
        reached = [width_text(w) for w, f in fractions if f is not None and f >= target]
        missed = [f"{width_text(w)} ({_fraction_text(f)})" for w, f in fractions if f is None or f < target]
        lines.append(
            f"- {VARIANT_NAMES[variant]}: at or above {target:.0%} of MobileNetV2's rate: "
            f"{', '.join(reached) or 'no width'}; below: {', '.join(missed) or 'no width'}"
        )
    return "\n".join(lines)


def markdown(result):
    config = result["config"]
    mobilenet = result["mobilenet_v2"]
    size = config["image_size"]
    parts = [
        "# int8 MobileViTv2 against the machine's int8 rate (MobileNetV2 as the yardstick)",
        f"- MobileViTv2 at {size}x{size}, MobileNetV2 at {mobilenet['image_size']}x{mobilenet['image_size']}; "
        f"batch 1, LiteRT interpreter (XNNPACK), {config['threads']} threads, random weights; median of up to "
        f"{config['repeats']} rounds, each width's models timed in turn with MobileNetV2 "
        f"(1-minute load average at the end {result['load_average_end']:.2f}, "
        f"on {cpus_text(result)}{machine_text(result)})",
        "- GMACs: counted from the Keras graph (Conv2D, depthwise, matmuls; `benchmarks/macs.py`); GMAC/s = "
        "GMACs / median time. The exporters merge three pairs of linear 1x1 convolutions, so the TFLite models "
        "run somewhat fewer MACs than counted.",
        "- QAT int8: `quantize_model` + `calibrate` on random images, not trained; the Edge TPU graph is "
        '`rewrite_graph(qat, "edgetpu")` converted the same way and run on the CPU (no TPU attached).',
    ]
    if config["tiny"]:
        parts.append("- **--tiny configuration: a smoke run, not a benchmark.**")
    parts += [
        "",
        "## Latency (ms), MAC rate and share of MobileNetV2's rate",
        "",
        rate_table(result),
        "",
        busy_note(result),
    ]
    parts += ["", f"Target: {result['target_fraction']:.0%} of MobileNetV2's int8 GMAC/s.", ""]
    parts += [
        verdict(result["rows"], result["target_fraction"]),
        "",
        "## Models",
        "",
        model_table(result["rows"], mobilenet),
    ]
    return "\n".join(parts) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument("--widths", type=float, nargs="+", default=None, help="Default: every width (--tiny: 0.5).")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    widths = tuple(args.widths or (TINY_WIDTHS if args.tiny else ALL_WIDTHS))
    mobilenet_size = TINY_MOBILENET_SIZE if args.tiny else MOBILENET_SIZE
    os.makedirs(args.output_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="int8_efficiency_") as directory:
        result = run(config_from_args(args, directory=directory), widths, mobilenet_size)
    print_and_write(result, markdown(result), os.path.join(args.output_dir, "int8_efficiency"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
