"""DeepLabV3 latency: this package against transformers (PyTorch) and keras-hub.

    python -m benchmarks.segmentation_latency [--widths 0.5 1.0] [--sizes 512 256]
        [--threads N] [--output benchmarks/results/segmentation_latency]

Batch 1, random non-degenerate weights, 21 classes (PASCAL VOC), the logits
upsampled to the input size in every model (ml-cvnets evaluates so;
transformers' model stops at stride 16, so its row adds the bilinear
upsampling, `F.interpolate`, to the timed call). Rows:

* this package's `DeepLabV3(width)`: Keras graph mode, float32 TFLite and
  post-training int8 TFLite (XNNPACK);
* transformers' `MobileViTV2ForSemanticSegmentation` (the same network),
  PyTorch eager;
* keras-hub's `DeepLabV3ImageSegmenter` on its ResNet-50 encoder (its only
  published DeepLabV3; keras-hub has no MobileViTv2 backbone), Keras graph
  mode and float32 / int8 TFLite. keras-hub is installed, without
  dependencies, into a cache folder outside the package's environment
  (`pip install --no-deps --target`); where that fails the row says so.

Each implementation runs in its own worker process, one after the other
(PyTorch must not share a process with TensorFlow here); times are medians
of `benchmarks.timing.time_callable`. Writes `<output>.json` and `.md`.
"""

import argparse
import json
import os
import subprocess
import sys

from benchmarks.report import print_and_write

KERAS_HUB = "keras-hub==0.32.0"
NUM_CLASSES = 21
IMPLEMENTATIONS = ("ours", "transformers", "keras_hub")


def keras_hub_path():
    """A folder holding keras-hub (pure Python), installed on first use."""
    folder = os.path.join(os.path.expanduser("~"), ".cache", "keras_mobilevitv2", KERAS_HUB.replace("==", "-"))
    if not os.path.exists(os.path.join(folder, "keras_hub")):
        command = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", folder, KERAS_HUB]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"pip could not install {KERAS_HUB}: {result.stderr.strip().splitlines()[-1:]}")
    return folder


def _images(size, count=1, seed=0):
    import numpy as np

    return np.random.default_rng(seed).uniform(0, 255, (count, size, size, 3)).astype(np.float32)


def _row(implementation, runtime, width, size, timing=None, reason="", **extra):
    return {
        "implementation": implementation,
        "runtime": runtime,
        "width": width,
        "image_size": size,
        "median_ms": timing.median_ms if timing else None,
        "runs": timing.runs if timing else 0,
        "status": "ok" if timing else "failed",
        "reason": reason,
        **extra,
    }


def _time(run, args):
    from benchmarks.timing import time_callable

    return time_callable(run, warmup=3, repeats=args.repeats, max_seconds=args.max_seconds)


def _keras_rows(implementation, model, width, size, args, int8_convert):
    """Keras graph mode, float32 and int8 TFLite of one Keras model."""
    from benchmarks.runtimes import keras_runner
    from benchmarks.runtimes import tflite_runner
    from benchmarks.tflite_export import float_tensors_inside

    image = _images(size)
    rows = [_row(implementation, "Keras graph", width, size, _time(keras_runner(model, image, "graph"), args))]
    for mode in ("float32", "int8"):
        try:
            flatbuffer = int8_convert(model, mode)
        except Exception as error:  # the converter raises many types; the row records it
            rows.append(_row(implementation, f"TFLite {mode}", width, size, reason=f"{type(error).__name__}: {error}"))
            continue
        timing = _time(tflite_runner(flatbuffer, image, args.threads), args)
        inside = float_tensors_inside(flatbuffer) if mode == "int8" else None
        rows.append(
            _row(implementation, f"TFLite {mode}", width, size, timing, size_mb=len(flatbuffer) / 1e6, floats=inside)
        )
    return rows


def _ours(width, size, args):
    from benchmarks.random_weights import randomize_keras_weights
    from keras_mobilevitv2.segmentation import DeepLabV3
    from quantization.tflite_export import convert

    model = randomize_keras_weights(DeepLabV3(width, NUM_CLASSES, input_shape=(size, size, 3)), seed=1)
    calibration = _images(size, count=8, seed=1)

    def to_tflite(model, mode):
        if mode == "float32":
            return convert(model, "float32", "float32")
        return convert(model, "ptq_int8", "int8", representative_images=calibration)

    return _keras_rows("this package", model, width, size, args, to_tflite)


def _keras_hub(width, size, args):
    del width  # one model: ResNet-50
    import keras_hub

    from benchmarks.tflite_export import convert_keras_model

    encoder = keras_hub.models.ResNetBackbone(
        input_conv_filters=[64],
        input_conv_kernel_sizes=[7],
        stackwise_num_filters=[64, 128, 256, 512],
        stackwise_num_blocks=[3, 4, 6, 3],
        stackwise_num_strides=[1, 2, 2, 2],
        block_type="bottleneck_block",
        image_shape=(size, size, 3),
    )
    # keras-hub's PASCAL VOC preset (deeplab_v3_plus_resnet50_pascalvoc): DeepLabV3+ on P5, low-level P2.
    backbone = keras_hub.models.DeepLabV3Backbone(
        image_encoder=encoder,
        spatial_pyramid_pooling_key="P5",
        upsampling_size=8,
        dilation_rates=[6, 12, 18],
        low_level_feature_key="P2",
        image_shape=(size, size, 3),
    )
    model = keras_hub.models.DeepLabV3ImageSegmenter(backbone=backbone, num_classes=NUM_CLASSES)
    calibration = _images(size, count=8, seed=1)

    def to_tflite(model, mode):
        return convert_keras_model(model, "keras3", mode, 1, representative_images=calibration)[0]

    return _keras_rows("keras-hub DeepLabV3+ ResNet-50", model, None, size, args, to_tflite)


def _transformers(width, size, args):
    import torch

    from benchmarks.runtimes import torch_runner
    from benchmarks.segmentation_parity import reference_model

    model = reference_model(width, 16, NUM_CLASSES)

    class Upsampled(torch.nn.Module):
        def __init__(self, segmenter):
            super().__init__()
            self.segmenter = segmenter

        def forward(self, x):
            logits = self.segmenter(x).logits
            return torch.nn.functional.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=True)

    run = torch_runner(Upsampled(model).eval(), _images(size).transpose(0, 3, 1, 2) / 255.0)
    return [_row("transformers", "PyTorch eager", width, size, _time(run, args))]


def worker(args):
    """One implementation at one width and size, in this process."""
    from benchmarks.latency_common import prepare_worker_process

    framework = "torch" if args.worker == "transformers" else "keras3"
    prepare_worker_process(argparse.Namespace(framework=framework), args.threads)
    measure = {"ours": _ours, "transformers": _transformers, "keras_hub": _keras_hub}[args.worker]
    rows = measure(args.width, args.size, args)
    with open(args.output, "w") as f:
        json.dump(rows, f)
    return 0


def _run_worker(implementation, width, size, args):
    from benchmarks.isolation import REPOSITORY_ROOT
    from benchmarks.isolation import WorkerError
    from benchmarks.isolation import run_module

    environment = {}
    if implementation == "keras_hub":
        try:
            paths = [REPOSITORY_ROOT, keras_hub_path(), os.environ.get("PYTHONPATH")]
            environment["PYTHONPATH"] = os.pathsep.join(filter(None, paths))
        except RuntimeError as error:
            return [_row("keras-hub DeepLabV3+ ResNet-50", "-", None, size, reason=str(error))]
    options = ["--worker", implementation, "--size", str(size)] + (["--width", str(width)] if width else [])
    options += ["--threads", str(args.threads), "--repeats", str(args.repeats), "--max_seconds", str(args.max_seconds)]
    try:
        return run_module("benchmarks.segmentation_latency", options, environment=environment)
    except WorkerError as error:
        return [_row(implementation, "-", width, size, reason=str(error))]


def run(args):
    rows = []
    for size in args.sizes:
        for width in args.widths:
            for implementation in ("ours", "transformers"):
                rows += _run_worker(implementation, width, size, args)
        rows += _run_worker("keras_hub", None, size, args)
    return {
        "rows": rows,
        "threads": args.threads,
        "command": "python -m benchmarks.segmentation_latency " + " ".join(sys.argv[1:]),
        "machine": f"{os.cpu_count()} CPU cores",
    }


def markdown(result):
    lines = [
        "# DeepLabV3 latency: batch 1, 21 classes, logits at the input size",
        "",
        f"`{result['command']}` on {result['machine']}, {result['threads']} threads; median ms per image.",
        "",
        "| model | width | input | runtime | latency (ms) | size (MB) | float tensors inside |",
        "|---|---:|---:|---|---:|---:|---:|",
    ]
    for row in result["rows"]:
        width = "-" if row["width"] is None else f"{row['width']:g}"
        size = f"{row['size_mb']:.2f}" if row.get("size_mb") else "-"
        latency = f"{row['median_ms']:.1f}" if row["status"] == "ok" else f"failed: {row['reason'][:120]}"
        floats = "-" if row.get("floats") is None else row["floats"]
        lines.append(
            f"| {row['implementation']} | {width} | {row['image_size']} | {row['runtime']} | {latency} | {size} "
            f"| {floats} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=float, nargs="+", default=[0.5, 1.0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 256])
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--max_seconds", type=float, default=20.0)
    parser.add_argument("--output", default="")
    parser.add_argument("--worker", choices=IMPLEMENTATIONS, help=argparse.SUPPRESS)
    parser.add_argument("--width", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    result = run(args)
    print_and_write(result, markdown(result), args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
