"""The main job: train -> QAT -> int8 TFLite -> audit -> accuracy table.

    python -m quantization.pipeline [--output_dir runs/pipeline] [--float_epochs 6] [--qat_epochs 2]

On the embedded dataset by default (generated locally, no download): trains a
MobileViTv2-0.5 briefly, fine-tunes it with quantization-aware training,
exports float32, post-training int8 (PTQ) and QAT int8 TFLite models, audits
each (ops, dtypes, ranks, agreement with Keras) and prints accuracy, size and
latency side by side. Re-running resumes or reuses finished stages.
"""

import argparse
import json
import os
import sys
import time

import numpy as np


def _evaluate_tflite(flatbuffer, images, labels):
    from quantization.audit import make_interpreter
    from quantization.audit import run_tflite

    predictions = run_tflite(make_interpreter(flatbuffer), images)
    return float(np.mean(predictions.argmax(-1) == labels))


def _latency_ms(flatbuffer, image, repeats=30):
    from quantization.audit import make_interpreter
    from quantization.audit import run_tflite

    interpreter = make_interpreter(flatbuffer, use_xnnpack=True, num_threads=os.cpu_count())
    run_tflite(interpreter, image)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run_tflite(interpreter, image)
        times.append((time.perf_counter() - start) * 1000)
    return float(np.median(times))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="mobilevitv2_050")
    parser.add_argument("--attention_norm", default="layer_norm_2d", choices=("layer_norm_2d", "batch_norm_2d"),
                        help="batch_norm_2d: the Edge TPU / microcontroller friendly option.")
    parser.add_argument("--data", default="embedded")
    parser.add_argument("--dataset_dir", default="")
    parser.add_argument("--output_dir", default="runs/pipeline")
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--float_epochs", type=int, default=12)
    parser.add_argument("--qat_epochs", type=int, default=2)
    parser.add_argument("--float_lr", type=float, default=2e-3)
    parser.add_argument("--qat_lr", type=float, default=1e-4)
    args = parser.parse_args(argv)

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from absl import logging

    logging.set_verbosity(logging.WARNING)
    import keras

    import keras_mobilevitv2  # noqa: F401
    import quantization  # noqa: F401
    from quantization.audit import format_report
    from quantization.tflite_export import export_tflite
    from quantization.tflite_export import convert
    from quantization.qat import run_qat
    from quantization.qat import sample_images
    from training import TrainConfig
    from training import Trainer
    from training.data import resolve_source

    common = dict(
        model=args.model,
        attention_norm=args.attention_norm,
        data=args.data,
        dataset_dir=args.dataset_dir,
        image_size=args.image_size,
        batch_size=args.batch_size,
        randaugment=False,  # a short run on a small dataset: light augmentation
        mixup_alpha=0.0,
        cutmix_alpha=0.0,
        random_erasing=0.0,
        crop_min_scale=0.35,
        warmup_steps=50,
        ema_decay=0.9,  # a few hundred fast-moving steps: a short average
    )
    float_dir = os.path.join(args.output_dir, "float")
    qat_dir = os.path.join(args.output_dir, "qat")

    print(f"== 1/4 Float training ({args.float_epochs} epochs) -> {float_dir}", flush=True)
    float_config = TrainConfig(model_dir=float_dir, epochs=args.float_epochs, lr=args.float_lr, min_lr=args.float_lr / 10, **common)
    Trainer(float_config).run()

    print(f"\n== 2/4 Quantization-aware fine-tuning ({args.qat_epochs} epochs) -> {qat_dir}", flush=True)
    qat_config = TrainConfig(
        model_dir=qat_dir, epochs=args.qat_epochs, lr=args.qat_lr, min_lr=args.qat_lr / 10,
        init_weights=os.path.join(float_dir, "model.keras"), **common
    )
    _, qat_report = run_qat(qat_config)

    print("\n== 3/4 Float and post-training int8 exports", flush=True)
    source = resolve_source(args.data, dataset_dir=args.dataset_dir or None)
    float_model = keras.models.load_model(os.path.join(float_dir, "model.keras"), compile=False)
    qat_model = keras.models.load_model(os.path.join(qat_dir, "model.keras"), compile=False)
    representative = sample_images(source, float_config, 128)
    eval_images, eval_labels = sample_images(
        source, float_config, source.eval.num_examples, split="eval", with_labels=True
    )
    samples = eval_images[:64]
    reports = {"qat_int8": qat_report}
    for mode in ("float32", "ptq_int8"):
        reports[mode] = export_tflite(
            float_model, os.path.join(args.output_dir, f"{args.model}_{mode}.tflite"), mode,
            representative_images=representative if mode == "ptq_int8" else None, sample_images=samples,
        )

    print("\n== 4/4 Accuracy, size and latency on the evaluation split", flush=True)
    rows = []
    keras_top1 = float(np.mean(float_model.predict(eval_images, verbose=0).argmax(-1) == eval_labels))
    rows.append(("float Keras", keras_top1, None, None))
    qat_keras_top1 = float(np.mean(qat_model.predict(eval_images, verbose=0).argmax(-1) == eval_labels))
    rows.append(("QAT Keras (fake-quant)", qat_keras_top1, None, None))
    paths = {
        "float TFLite": os.path.join(args.output_dir, f"{args.model}_float32.tflite"),
        "PTQ int8 TFLite": os.path.join(args.output_dir, f"{args.model}_ptq_int8.tflite"),
        "QAT int8 TFLite": os.path.join(qat_dir, f"{args.model}_qat_int8.tflite"),
    }
    for name, path in paths.items():
        with open(path, "rb") as f:
            flatbuffer = f.read()
        rows.append((name, _evaluate_tflite(flatbuffer, eval_images, eval_labels), len(flatbuffer), _latency_ms(flatbuffer, eval_images[:1])))
    print(f"\n{len(eval_images)} evaluation images, {args.model} at {args.image_size}x{args.image_size}, "
          f"latency: batch 1, median, default TFLite CPU runtime, {os.cpu_count()} threads\n")
    print("| model | top-1 | size (MB) | latency (ms) |")
    print("|---|---|---|---|")
    for name, top1, size, latency in rows:
        size_text = f"{size / 1e6:.2f}" if size else "-"
        latency_text = f"{latency:.2f}" if latency else "-"
        print(f"| {name} | {top1:.4f} | {size_text} | {latency_text} |")
    result = {
        "rows": [dict(model=r[0], top1=r[1], size_bytes=r[2], latency_ms=r[3]) for r in rows],
        "audits": reports,
    }
    with open(os.path.join(args.output_dir, "pipeline_report.json"), "w") as f:
        json.dump(result, f, indent=2)
    failed = [mode for mode, report in reports.items() if report and report["errors"]]
    print(f"\nAudits: {', '.join(f'{m}: ok' for m in reports if m not in failed)}; report in "
          f"{os.path.join(args.output_dir, 'pipeline_report.json')}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
