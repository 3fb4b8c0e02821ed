"""SSDLite latency: MobileViTv2 against MobileNetV2 in the same detector, and keras-hub.

    python -m benchmarks.detection_latency [--models KEY ...] [--threads 2]
        [--repeats 20] [--output benchmarks/results/detection_latency]
    python -m benchmarks.detection_latency --quick   # a smoke run, not a benchmark

Batch 1, 320x320, random non-degenerate weights, TFLite on the CPU (the
interpreter's default XNNPACK delegate), float32 and post-training int8
(calibrated on a few random images: latency does not depend on the ranges).
Models:

* `ssdlite_mobilevitv2_050`, `ssdlite_mobilevitv2_100`: this package's
  `SSDLite(width)`, ml-cvnets' detector (81 classes, 3232 anchors);
* `ssdlite_mobilenet_v2`: the same extra layers and heads on
  `keras.applications.MobileNetV2` (width 1.0; levels at block 13's
  expansion and `out_relu`, as the SSDLite paper), so the two rows differ
  only in the backbone: what the transformer blocks cost;
* `keras_hub_retinanet`: keras-hub's `RetinaNetObjectDetector` with the
  architecture of its `retinanet_resnet50_fpn_coco` preset (ResNet-50, FPN
  P3-P7, 80 classes), built without downloads from keras-hub installed
  `--no-deps --target` into a cache folder (see `segmentation_latency`).

The SSDLite rows are exported by `quantization.detection_export`: the
network, the score softmax and TFLite's `TFLite_Detection_PostProcess` (box
decoding, fast NMS, 100 detections), as a phone runs them. With random
weights most anchors pass the op's 0.01 score threshold, so its NMS sees
about as many candidates as it can. keras-hub's detector decodes and runs
NMS outside its model (in `predict`), so its rows are the network only.

Each model runs in its own worker process, one after the other. Times are
medians of `benchmarks.timing.time_callable`; params are trainable weights
(PyTorch's and the model zoos' count); MACs are the network's
(`benchmarks.macs`). Writes `<output>.json` and `.md`.
"""

import argparse
import dataclasses
import json
import os
import sys

from benchmarks.console import log
from benchmarks.report import busy_load
from benchmarks.report import busy_note
from benchmarks.report import print_and_write
from benchmarks.report import timing_text

IMAGE_SIZE = 320
NUM_CLASSES = 81  # COCO's 80 and the background (class 0) of SSD's softmax
RETINANET_CLASSES = 80  # sigmoid scores, no background class
WITH_POSTPROCESSING = "network + softmax + TFLite_Detection_PostProcess"
NETWORK_ONLY = "network only (raw box deltas and class logits)"
# --quick: a smoke run of the whole path, seconds instead of minutes.
QUICK = {"size": 96, "models": ["ssdlite_mobilevitv2_050"], "repeats": 3, "max_seconds": 2.0, "calibration": 1}


@dataclasses.dataclass(frozen=True)
class Model:
    label: str
    includes: str
    input_range: tuple  # what the model takes: calibration and timing images are drawn from it


MODELS = {
    "ssdlite_mobilevitv2_050": Model("SSDLite MobileViTv2-0.5 (this package)", WITH_POSTPROCESSING, (0, 255)),
    "ssdlite_mobilevitv2_100": Model("SSDLite MobileViTv2-1.0 (this package)", WITH_POSTPROCESSING, (0, 255)),
    "ssdlite_mobilenet_v2": Model("MobileNetV2-SSDLite (same heads)", WITH_POSTPROCESSING, (-1, 1)),
    # keras-hub's image converter normalises with ImageNet's mean and std.
    "keras_hub_retinanet": Model("keras-hub RetinaNet ResNet-50 FPN", NETWORK_ONLY, (-2, 2)),
}


def _images(key, size, count, seed):
    import numpy as np

    low, high = MODELS[key].input_range
    return np.random.default_rng(seed).uniform(low, high, (count, size, size, 3)).astype(np.float32)


def _build(key, size):
    """The Keras model of `key` at `size`x`size`, random weights."""
    from benchmarks.random_weights import randomize_keras_weights

    model = _retinanet(size) if key == "keras_hub_retinanet" else _ssdlite(key, size)
    return randomize_keras_weights(model, seed=1)


def _ssdlite(key, size):
    import keras

    from keras_mobilevitv2.detection import MOBILENET_V2_LEVELS
    from keras_mobilevitv2.detection import SSDLite

    widths = {"ssdlite_mobilevitv2_050": 0.5, "ssdlite_mobilevitv2_100": 1.0}
    if key in widths:
        return SSDLite(widths[key], NUM_CLASSES, input_shape=(size, size, 3))
    backbone = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(size, size, 3))
    return SSDLite(backbone, NUM_CLASSES, backbone_levels=MOBILENET_V2_LEVELS)


def _retinanet(size):
    import keras_hub

    # The retinanet_resnet50_fpn_coco preset's configuration.
    encoder = keras_hub.models.ResNetBackbone(
        input_conv_filters=[64],
        input_conv_kernel_sizes=[7],
        stackwise_num_filters=[64, 128, 256, 512],
        stackwise_num_blocks=[3, 4, 6, 3],
        stackwise_num_strides=[1, 2, 2, 2],
        block_type="bottleneck_block",
        image_shape=(size, size, 3),
    )
    backbone = keras_hub.models.RetinaNetBackbone(
        image_encoder=encoder, min_level=3, max_level=7, use_p5=False, image_shape=(size, size, 3)
    )
    return keras_hub.models.RetinaNetObjectDetector(backbone=backbone, num_classes=RETINANET_CLASSES)


def _ssdlite_tflite(model, mode, calibration):
    """(flatbuffer, float tensors inside) with the post-processing op."""
    from keras_mobilevitv2.detection import model_anchors
    from quantization.detection_export import audit_detector
    from quantization.detection_export import detection_flatbuffer

    export_mode = "float32" if mode == "float32" else "ptq_int8"
    flatbuffer = detection_flatbuffer(model, export_mode, model_anchors(model), representative_images=calibration)
    audit = audit_detector(flatbuffer, export_mode)
    if audit["errors"]:
        raise ValueError(f"the exported detector is not as expected: {audit['errors']}")
    return flatbuffer, len(audit["float_tensors_inside"])


def _network_tflite(model, mode, calibration):
    """(flatbuffer, float tensors inside): the Keras model as it is, with
    the converter settings every other benchmark uses for other models."""
    from benchmarks.tflite_export import ROUTE_INT8
    from benchmarks.tflite_export import convert_keras_model
    from benchmarks.tflite_export import float_tensors_inside

    flatbuffer, route = convert_keras_model(model, "keras3", mode, 1, representative_images=calibration)
    if mode == "int8" and route != ROUTE_INT8:
        log(f"  int8 kept float ops ({route})")
    return flatbuffer, float_tensors_inside(flatbuffer)


def _model_facts(model):
    import numpy as np

    from benchmarks.console import short_reason
    from benchmarks.macs import count_keras_macs

    facts = {"params": sum(int(np.prod(w.shape)) for w in model.trainable_weights), "macs": None}
    try:
        facts["macs"] = count_keras_macs(model)["macs"]
    except Exception as error:  # a graph the counter cannot read: the column says "-"
        log(f"  MACs not counted: {short_reason(error)}")
    return facts


def _row(key, size, runtime, facts, timing=None, reason="", size_mb=None, floats=None):
    return {
        "model": key,
        "label": MODELS[key].label,
        "includes": MODELS[key].includes,
        "image_size": size,
        "runtime": runtime,
        **facts,
        "size_mb": size_mb,
        "float_tensors_inside": floats,
        "timing": timing.to_dict() if timing else None,
        "status": "ok" if timing else "failed",
        "reason": reason,
    }


def measure(key, args):
    """float32 and int8 TFLite rows of one model, in this process."""
    from benchmarks.console import short_reason
    from benchmarks.runtimes import tflite_runner
    from benchmarks.timing import time_callable

    log(f"{MODELS[key].label}: building at {args.size}x{args.size}")
    model = _build(key, args.size)
    facts = _model_facts(model)
    export = _network_tflite if MODELS[key].includes == NETWORK_ONLY else _ssdlite_tflite
    calibration, image = _images(key, args.size, args.calibration, 1), _images(key, args.size, 1, 2)
    rows = []
    for mode in ("float32", "int8"):
        runtime = f"TFLite {mode}"
        log(f"  {runtime}: converting")
        try:
            flatbuffer, floats = export(model, mode, calibration)
        except Exception as error:  # the converter raises many types; the row records it
            log(f"  {runtime}: failed: {short_reason(error)}")
            rows.append(_row(key, args.size, runtime, facts, reason=short_reason(error)))
            continue
        run = tflite_runner(flatbuffer, image, args.threads)
        timing = time_callable(run, warmup=3, repeats=args.repeats, max_seconds=args.max_seconds)
        log(f"  {runtime}: median {timing.median_ms:.1f} ms, {len(flatbuffer) / 1e6:.1f} MB")
        inside = floats if mode == "int8" else None
        rows.append(_row(key, args.size, runtime, facts, timing, size_mb=len(flatbuffer) / 1e6, floats=inside))
    return rows


def worker(args):
    from benchmarks.latency_common import prepare_worker_process

    prepare_worker_process(argparse.Namespace(framework="keras3"), args.threads)
    with open(args.output, "w") as f:
        json.dump(measure(args.worker, args), f)
    return 0


def _run_worker(key, args):
    from benchmarks.console import short_reason
    from benchmarks.isolation import REPOSITORY_ROOT
    from benchmarks.isolation import WorkerError
    from benchmarks.isolation import run_module
    from benchmarks.segmentation_latency import keras_hub_path

    environment = {}
    failed = [_row(key, args.size, "-", {"params": None, "macs": None})]
    if key == "keras_hub_retinanet":
        try:
            paths = [REPOSITORY_ROOT, keras_hub_path(), os.environ.get("PYTHONPATH")]
        except RuntimeError as error:  # no network and no cached copy
            failed[0]["reason"] = short_reason(error)
            return failed
        environment["PYTHONPATH"] = os.pathsep.join(filter(None, paths))
    options = ["--worker", key, "--size", str(args.size), "--threads", str(args.threads)]
    options += ["--repeats", str(args.repeats), "--max_seconds", str(args.max_seconds)]
    options += ["--calibration", str(args.calibration)]
    try:
        return run_module("benchmarks.detection_latency", options, environment=environment)
    except WorkerError as error:
        failed[0]["reason"] = str(error)
        return failed


def add_int8_ratios(rows):
    """Each int8 row's latency over its model's float32 latency."""
    medians = {(row["model"], row["runtime"]): row["timing"]["median_ms"] for row in rows if row["timing"]}
    for row in rows:
        if row["runtime"] == "TFLite int8":
            float_ms = medians.get((row["model"], "TFLite float32"))
            int8_ms = row["timing"]["median_ms"] if row["timing"] else None
            row["int8_over_float"] = int8_ms / float_ms if int8_ms and float_ms else None
    return rows


def run(args):
    rows = []
    for index, key in enumerate(args.models, 1):
        log(f"[{index}/{len(args.models)}] {MODELS[key].label} (worker process)")
        rows += _run_worker(key, args)
    return {
        "rows": add_int8_ratios(rows),
        "image_size": args.size,
        "threads": args.threads,
        "calibration_images": args.calibration,
        "quick": args.quick,
        "command": "python -m benchmarks.detection_latency " + " ".join(sys.argv[1:]),
        "machine": f"{os.cpu_count()} CPU cores",
        "cpus": os.cpu_count(),
    }


def _cells(row, busy):
    latency = timing_text(row["timing"], busy) if row["timing"] else f"failed: {row['reason'][:120]}"
    params = f"{row['params'] / 1e6:.2f}" if row["params"] else "-"
    macs = f"{row['macs'] / 1e9:.2f}" if row["macs"] else "-"
    size = f"{row['size_mb']:.2f}" if row["size_mb"] else "-"
    floats = "-" if row["float_tensors_inside"] is None else row["float_tensors_inside"]
    int8_ratio = f"{row['int8_over_float']:.2f}x" if row.get("int8_over_float") else "-"
    return [row["label"], row["includes"], params, macs, row["runtime"], size, latency, int8_ratio, floats]


def markdown(result):
    size, busy = result["image_size"], busy_load(result)
    lines = [
        f"# Detection latency: batch 1, {size}x{size}, random weights, TFLite (XNNPACK)",
        "",
        f"`{result['command']}` on {result['machine']}, {result['threads']} threads; latency: median ms per "
        "image [p25-p75].",
        "",
        "| model | includes | params (M) | GMACs | runtime | size (MB) | latency (ms) | int8 / float "
        "| float tensors inside |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    lines += ["| " + " | ".join(str(cell) for cell in _cells(row, busy)) + " |" for row in result["rows"]]
    lines += [
        "",
        f"* includes: `{WITH_POSTPROCESSING}` is the exported detector a phone runs (decoding, fast NMS, 100 "
        f"boxes; with random weights most anchors pass the score threshold); `{NETWORK_ONLY}`: keras-hub "
        "decodes and runs NMS outside its model.",
        "* params: trainable weights; GMACs: the network's multiply-accumulates (benchmarks.macs), without "
        "the post-processing.",
        f"* int8: post-training quantization calibrated on {result['calibration_images']} random image(s), "
        "int8 input; the SSDLite rows' post-processing op runs in float on the dequantized outputs. "
        "int8 / float: the int8 latency over the same model's float32 latency.",
        "* MobileNetV2-SSDLite: keras.applications MobileNetV2 (width 1.0) with this package's SSDLite extra "
        "layers and heads (`backbone_levels=MOBILENET_V2_LEVELS`): it differs from the MobileViTv2 rows only "
        "in the backbone.",
        f"* {busy_note(result)}",
    ]
    if result["quick"]:
        lines += ["", "A `--quick` smoke run (small input, few repeats): not a benchmark."]
    return "\n".join(lines) + "\n"


def _arguments(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), help="Default: all (--quick: one).")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--max_seconds", type=float, default=20.0, help="Timed runs per row stop after about this.")
    parser.add_argument("--calibration", type=int, default=8, help="Random images for the int8 calibration.")
    parser.add_argument("--quick", action="store_true", help="A smoke run: small input, few repeats, one model.")
    parser.add_argument("--output", default="")
    parser.add_argument("--worker", choices=sorted(MODELS), help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, default=IMAGE_SIZE, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.repeats = QUICK["size"], min(args.repeats, QUICK["repeats"])
        args.max_seconds, args.calibration = QUICK["max_seconds"], min(args.calibration, QUICK["calibration"])
    args.models = args.models or (QUICK["models"] if args.quick else list(MODELS))
    if min(args.threads, args.repeats, args.calibration) < 1:
        parser.error("--threads, --repeats and --calibration must be at least 1")
    return args


def main(argv=None):
    args = _arguments(argv)
    if args.worker:
        return worker(args)
    result = run(args)
    print_and_write(result, markdown(result), args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
