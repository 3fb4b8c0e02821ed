"""DeepLabV3-MobileViTv2 on the embedded segmentation data, float to int8.

    python -m benchmarks.segmentation_int8 [--epochs 6] [--output benchmarks/results/segmentation_int8]

Trains DeepLabV3 (MobileViTv2-0.5 backbone, output stride 16, auxiliary head)
with `--task segmentation` on the embedded shapes-with-masks data, fine-tunes
it with quantization-aware training (`python -m quantization.qat --task
segmentation`'s `run_qat`), exports float32, post-training int8 and QAT int8
TFLite, and prints mean IoU of Keras and of the TFLite models on the whole
evaluation split, batch-1 latency (XNNPACK, this machine's cores) at the
training size and at 512x512 (ml-cvnets' VOC size; same weights), and the
deployment targets of the QAT model: Edge TPU (documented op table), TFLite
Micro (real TFLM interpreter; arena and flash at two input sizes) and
Android. Writes `<output>.json` and `<output>.md`.
"""

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

from benchmarks.report import print_and_write
from benchmarks.report import target_report


def train(args, model_dir):
    from training import SegmentationTrainer
    from training import TrainConfig

    config = TrainConfig(
        task="segmentation",
        model="mobilevitv2_050",
        data="embedded",
        dataset_dir=args.dataset_dir,
        model_dir=model_dir,
        image_size=args.image_size,
        batch_size=16,
        epochs=args.epochs,
        lr=args.lr,
        min_lr=args.lr / 20,
        warmup_steps=50,
        ema_decay=0.9,
        max_eval_images=50,
        deterministic=True,
    )
    started = time.perf_counter()
    summary = SegmentationTrainer(config).run()
    return config, summary, time.perf_counter() - started


def _eval_arrays(source, config):
    """The whole evaluation split (the trainer's per-epoch check takes 50)."""
    import dataclasses

    from training.segmentation_data import segmentation_eval_dataset

    whole = dataclasses.replace(config, max_eval_images=0)
    images, masks = zip(*segmentation_eval_dataset(source, whole, 50))
    return np.concatenate([i.numpy() for i in images]), np.concatenate([m.numpy() for m in masks])


def mean_iou(predictions, masks, num_classes):
    """Mean IoU over the classes present in truth or prediction; 255 ignored."""
    from training.segmentation_data import IGNORE_LABEL

    keep = masks != IGNORE_LABEL
    confusion = np.zeros((num_classes, num_classes))
    np.add.at(confusion, (masks[keep], predictions[keep]), 1)
    union = confusion.sum(0) + confusion.sum(1) - np.diag(confusion)
    return float((np.diag(confusion)[union > 0] / union[union > 0]).mean())


def tflite_row(label, flatbuffer, images, masks, num_classes, image_512):
    from quantization.audit import make_interpreter
    from quantization.audit import run_tflite
    from quantization.pipeline_report import latency_ms

    scores = run_tflite(make_interpreter(flatbuffer), images)
    return {
        "label": label,
        "miou": mean_iou(scores.argmax(-1), masks, num_classes),
        "size_bytes": len(flatbuffer),
        "latency_ms": latency_ms(flatbuffer, images[:1]),
        "latency_512_ms": latency_ms(image_512[0], image_512[1], repeats=5) if image_512 else None,
    }


def at_size(model, size, num_classes, config):
    """The segmenter at `size` x `size` with `model`'s weights."""
    import dataclasses

    from training.segmentation import build_segmenter

    resized = build_segmenter(dataclasses.replace(config, image_size=size), num_classes, aux_head=False)
    resized.set_weights(model.get_weights())
    return resized


def qat(args, config, float_dir):
    """QAT fine-tuning of the trained segmenter; returns the kept QAT model
    (the safeguard's choice) and the run's selection."""
    import dataclasses

    import keras

    from quantization.qat import run_qat

    qat_config = dataclasses.replace(
        config,
        model_dir=os.path.join(args.work_dir, "qat"),
        init_weights=os.path.join(float_dir, "model.keras"),
        epochs=args.qat_epochs,
        lr=args.qat_lr,
        min_lr=args.qat_lr / 10,
        warmup_steps=0,
        ema_decay=0.0,
    )
    summary, _ = run_qat(qat_config, calibration_images=64, verbose=False)
    model = keras.models.load_model(os.path.join(qat_config.model_dir, "model.keras"), compile=False)
    return model, summary["selection"]


def qat_at_size(qat_model, model, size, num_classes, config):
    """The QAT segmenter at `size` x `size` (same weights and ranges)."""
    from quantization import quantize_model

    resized = quantize_model(at_size(model, size, num_classes, config))
    resized.set_weights(qat_model.get_weights())
    return resized


def deploy(model, qat_model, resized_qat, images, work_dir):
    """Edge TPU, Micro (at the training size and at `resized_qat`'s) and
    Android (QAT int8, and float16 from the float `model`) reports."""
    import keras

    samples = images[64:96]
    size = resized_qat.inputs[0].shape[1]
    resized_samples = np.asarray(keras.ops.image.resize(samples[:8], (size, size)))
    folder = os.path.join(work_dir, "deploy")
    edgetpu = target_report("edgetpu", qat_model, folder, "deeplabv3", sample_images=samples, allow_cpu_fallback=True)
    micro = [
        target_report("micro", qat_model, folder, "deeplabv3", sample_images=samples),
        target_report("micro", resized_qat, folder, f"deeplabv3_{size}", sample_images=resized_samples),
    ]
    android = target_report("android", model, folder, "deeplabv3", qat_model=qat_model, sample_images=samples)
    return {
        "edgetpu": {
            k: edgetpu.get(k)
            for k in ("ops_total", "ops_mapped", "mac_share_on_tpu", "first_cpu_op", "unsupported", "refused")
        },
        "micro": [
            {"input": report["input"]["shape"]}
            | {k: report.get(k) for k in ("arena_bytes", "flash_bytes", "agreement", "fits", "problems", "refused")}
            for report in micro
        ],
        "android": {"refused": android.get("refused")}
        | {
            entry["variant"]: {
                "gpu_ops": f"{entry['gpu']['supported_ops']}/{entry['gpu']['total_ops']}",
                "xnnpack_ms": entry["xnnpack"]["median_ms"],
                "size_bytes": entry["size_bytes"],
            }
            for entry in android.get("models", [])
        },
    }


def run(args):
    import keras

    from quantization.tflite_export import convert
    from training.segmentation_data import resolve_segmentation_source

    model_dir = os.path.join(args.work_dir, "deeplabv3")
    config, summary, train_s = train(args, model_dir)
    source = resolve_segmentation_source("embedded", args.dataset_dir)
    model = keras.models.load_model(os.path.join(model_dir, "model.keras"), compile=False)
    started = time.perf_counter()
    qat_model, selection = qat(args, config, model_dir)
    qat_s = time.perf_counter() - started
    images, masks = _eval_arrays(source, config)
    calibration = images[:64]  # the first evaluation images stand in for training images
    keras_miou = mean_iou(model.predict(images, batch_size=25, verbose=0).argmax(-1), masks, source.num_classes)
    big = at_size(model, 512, source.num_classes, config)
    big_image = np.asarray(keras.ops.image.resize(images[:1], (512, 512)))
    big_calibration = np.asarray(keras.ops.image.resize(calibration[:16], (512, 512)))
    rows = [{"label": "float Keras", "miou": keras_miou, "size_bytes": None, "latency_ms": None}]
    for mode, label in (("float32", "float TFLite"), ("ptq_int8", "PTQ int8 TFLite")):
        representative, big_representative = (calibration, big_calibration) if mode == "ptq_int8" else (None, None)
        io_type = "int8" if mode == "ptq_int8" else "float32"
        flatbuffer = convert(model, mode, io_type, representative_images=representative)
        flatbuffer_512 = convert(big, mode, io_type, representative_images=big_representative)
        rows.append(tflite_row(label, flatbuffer, images, masks, source.num_classes, (flatbuffer_512, big_image)))
    flatbuffer = convert(qat_model, "qat_int8", "int8", representative_images=calibration[:4])
    big_qat = qat_at_size(qat_model, model, 512, source.num_classes, config)
    flatbuffer_512 = convert(big_qat, "qat_int8", "int8", representative_images=big_calibration[:4])
    rows.append(
        tflite_row("QAT int8 TFLite", flatbuffer, images, masks, source.num_classes, (flatbuffer_512, big_image))
    )
    resized_qat = qat_at_size(qat_model, model, 2 * config.image_size, source.num_classes, config)
    return {
        "model": model.name,
        "image_size": config.image_size,
        "evaluation_images": int(len(images)),
        "training": {"epochs": config.epochs, "seconds": train_s, "eval": summary["eval"]},
        "qat": {"epochs": args.qat_epochs, "lr": args.qat_lr, "seconds": qat_s, "selection": selection},
        "rows": rows,
        **deploy(model, qat_model, resized_qat, images, args.work_dir),
        "command": "python -m benchmarks.segmentation_int8 " + " ".join(sys.argv[1:]),
        "machine": f"{os.cpu_count()} CPU cores",
    }


def markdown(result):
    lines = [
        f"# DeepLabV3 {result['model']}: embedded segmentation data, {result['image_size']}x{result['image_size']}",
        "",
        f"`{result['command']}` on {result['machine']}; mean IoU over {result['evaluation_images']} evaluation "
        f"images (11 classes); trained {result['training']['epochs']} epochs in {result['training']['seconds']:.0f} s.",
        "Latency: batch 1, median, TFLite CPU runtime (XNNPACK) on every core.",
        "",
        "| model | mIoU | size (MB) | latency (ms) | latency at 512x512 (ms) |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        size = f"{row['size_bytes'] / 1e6:.2f}" if row["size_bytes"] else "-"
        latency = f"{row['latency_ms']:.2f}" if row["latency_ms"] else "-"
        big = f"{row['latency_512_ms']:.0f}" if row.get("latency_512_ms") else "-"
        lines.append(f"| {row['label']} | {row['miou']:.4f} | {size} | {latency} | {big} |")
    qat = result["qat"]
    chosen = qat["selection"]["chosen"]
    start, tuned = (qat["selection"][k]["miou"] for k in ("start", "fine_tuned"))
    lines += [
        "",
        f"QAT: {qat['epochs']} epoch(s) at lr {qat['lr']:g} in {qat['seconds']:.0f} s; the safeguard kept the "
        f"{chosen} model (calibrated start mIoU {start:.4f}, fine-tuned {tuned:.4f}, Keras fake-quant).",
        "",
    ]
    lines += _target_lines(result)
    return "\n".join(lines) + "\n"


def _target_lines(result):
    edgetpu, android = result["edgetpu"], result["android"]
    lines = [
        "Deployment targets of the QAT model:",
        "",
        f"- Edge TPU (rewritten graph, predicted from the documented op table): {edgetpu['ops_mapped']}/"
        f"{edgetpu['ops_total']} ops mapped, {100 * edgetpu['mac_share_on_tpu']:.1f}% of the MACs on the TPU"
        + (f"; first CPU op: {json.dumps(edgetpu['first_cpu_op'])}" if edgetpu["first_cpu_op"] else ""),
    ]
    for micro in result["micro"]:
        arena, flash = (f"{v:,} B" if v is not None else "-" for v in (micro["arena_bytes"], micro["flash_bytes"]))
        agreement = micro["agreement"] or {}
        lines.append(
            f"- TFLite Micro, input {micro['input']}: arena {arena}, flash {flash}, fits: {micro['fits']}; "
            f"per-pixel top-1 agreement with TFLite {agreement.get('top1_agreement', float('nan')):.3f} "
            f"over {agreement.get('predictions', 0):,} pixels"
        )
    for kind in ("int8", "float16"):
        if kind in android:
            figures = android[kind]
            lines.append(
                f"- Android {kind}: {figures['gpu_ops']} ops on the GPU delegate, XNNPACK "
                f"{figures['xnnpack_ms']:.2f} ms, {figures['size_bytes'] / 1e6:.2f} MB"
            )
    for name, report in [("Edge TPU", edgetpu), ("Android", android)] + [("Micro", m) for m in result["micro"]]:
        if report.get("refused"):
            lines.append(f"- {name} refused: {report['refused']}")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--qat_epochs", type=int, default=1)
    parser.add_argument("--qat_lr", type=float, default=1e-4)
    parser.add_argument("--dataset_dir", default="")
    parser.add_argument("--output", default="")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as work_dir:
        args.work_dir = work_dir
        result = run(args)
    print_and_write(result, markdown(result), args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
