"""SSDLite-MobileViTv2 on the embedded detection data, float to int8.

    python -m benchmarks.detection_int8 [--epochs 30] [--output benchmarks/results/detection_int8]

Trains SSDLite (MobileViTv2-0.5 backbone, ml-cvnets' heads and anchors) with
`--task detection` on the embedded shapes-with-boxes data, its backbone
started from a classifier trained on the embedded shapes (as ml-cvnets starts
from ImageNet); fine-tunes it with quantization-aware training (`python -m
quantization.qat --task detection`'s `run_qat`); exports float32,
post-training int8 and QAT int8 TFLite ending in TFLite_Detection_PostProcess;
and prints COCO mAP (pycocotools) of Keras and of each TFLite model on the
whole evaluation split, batch-1 latency (XNNPACK, this machine's cores) at the
training size and at 320x320 (ml-cvnets' COCO size; same weights), the int8
model's op list and audit, and the deployment targets of the QAT model.
Writes `<output>.json` and `<output>.md`.
"""

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time

import numpy as np

from benchmarks.report import print_and_write
from benchmarks.report import target_report

# The TFLite models are scored with ml-cvnets' evaluation settings (class-wise
# NMS, 200 detections), the Keras evaluation's; the shipped default is the
# fast single-NMS op that phones use.
EVALUATION_POSTPROCESS = dict(max_detections=200, regular_nms=True)
# A microcontroller keeps a few confident detections: the op's scratch memory
# grows with max detections x anchors.
MICRO_POSTPROCESS = dict(max_detections=10, score_threshold=0.3)


def _cached(args, stage, work):
    """`work()`'s result and seconds, kept in `<work_dir>/<stage>.json`: a
    rerun with the same --work_dir reuses the stages already done."""
    path = os.path.join(args.work_dir, f"{stage}.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    started = time.perf_counter()
    result = {"result": work(), "seconds": time.perf_counter() - started}
    with open(path, "w") as f:
        json.dump(result, f)
    return result


def train_classifier(args):
    """The embedded shapes classifier whose backbone starts the detector."""
    from training import TrainConfig
    from training import Trainer

    config = TrainConfig(
        data="embedded", dataset_dir=args.dataset_dir, model_dir=os.path.join(args.work_dir, "classifier"),
        image_size=64, batch_size=32, epochs=args.classifier_epochs, lr=2e-3, min_lr=1e-4, warmup_steps=50,
        max_eval_images=100, deterministic=True,
    )  # fmt: skip
    summary = Trainer(config, verbose=False).run()
    return {"weights": os.path.join(config.model_dir, "model.keras"), "top1": summary["eval"]["ema_top1"]}


def detection_config(args, init_weights):
    from training import TrainConfig

    config = TrainConfig(
        task="detection", model="mobilevitv2_050", data="embedded", dataset_dir=args.dataset_dir,
        model_dir=os.path.join(args.work_dir, "ssdlite"), image_size=args.image_size, batch_size=32,
        epochs=args.epochs, lr=args.lr, min_lr=args.lr / 20, warmup_steps=50, ema_decay=0.99,
        max_eval_images=100, init_weights=init_weights, deterministic=True,
    )  # fmt: skip
    return config


def train(config):
    from training import DetectionTrainer

    return DetectionTrainer(config).run()


def qat(args, config):
    """QAT fine-tuning of the trained detector: the kept QAT model (the
    safeguard's choice), the run's selection and its seconds."""
    import keras

    from quantization.qat import run_qat

    trained = os.path.join(config.model_dir, "model.keras")
    qat_config = dataclasses.replace(
        config, model_dir=os.path.join(args.work_dir, "qat"), init_weights=trained, epochs=args.qat_epochs,
        lr=args.qat_lr, min_lr=args.qat_lr / 10, warmup_steps=0, ema_decay=0.0,
    )  # fmt: skip
    stage = _cached(args, "qat", lambda: run_qat(qat_config, calibration_images=64, verbose=False)[0]["selection"])
    model = keras.models.load_model(os.path.join(qat_config.model_dir, "model.keras"), compile=False)
    return model, stage["result"], stage["seconds"]


def eval_images(source, config):
    """The whole evaluation split as the evaluation sees it, and the ids."""
    from training.detection_pipeline import detection_eval_dataset

    whole = dataclasses.replace(config, max_eval_images=0)
    images, ids = zip(*detection_eval_dataset(source.eval, whole, 50))
    return np.concatenate([i.numpy() for i in images]), np.concatenate([i.numpy() for i in ids])


def tflite_map(flatbuffer, images, ids, source):
    """(mAP@[.5:.95], mAP@.5) of a TFLite detector on `images`."""
    from quantization.audit import make_interpreter
    from quantization.audit import run_tflite_outputs
    from training.detection import coco_map
    from training.detection import coco_results

    outputs, _ = run_tflite_outputs(make_interpreter(flatbuffer), images)
    boxes = outputs["detection_boxes"][..., [1, 0, 3, 2]]  # (ymin, xmin, ymax, xmax) -> corner (x, y) form
    classes = outputs["detection_classes"].astype(np.int32) + 1  # the op drops the background
    counts = outputs["num_detections"].astype(np.int32).reshape(-1)
    results = coco_results(source.eval, source.category_ids, ids, boxes, classes, outputs["detection_scores"], counts)
    stats = coco_map(source.eval, results, ids)
    return float(stats[0]), float(stats[1])


def at_size(model, size, num_classes, config):
    """The detector at `size` x `size` with `model`'s weights."""
    from training.detection import build_detector

    resized = build_detector(dataclasses.replace(config, image_size=size), num_classes)
    resized.set_weights(model.get_weights())
    return resized


def qat_at_size(qat_model, model, size, num_classes, config):
    from quantization import quantize_model

    resized = quantize_model(at_size(model, size, num_classes, config))
    resized.set_weights(qat_model.get_weights())
    return resized


def _flatbuffers(model, qat_model, calibration, size, settings):
    """{mode: flatbuffer} of float32, PTQ int8 and QAT int8 at `size`."""
    from keras_mobilevitv2.detection import model_anchors
    from quantization.detection_export import detection_flatbuffer

    anchors = model_anchors(model)
    return {
        "float32": detection_flatbuffer(model, "float32", anchors, settings=settings),
        "ptq_int8": detection_flatbuffer(model, "ptq_int8", anchors, calibration, settings=settings),
        "qat_int8": detection_flatbuffer(qat_model, "qat_int8", anchors, calibration[:4], settings=settings),
    }


def rows(model, qat_model, config, source, images, ids):
    import keras

    from quantization.detection_export import PostProcess
    from quantization.pipeline_report import latency_ms
    from training.detection import evaluate_detection

    calibration = images[:64]  # the first evaluation images stand in for training images
    keras_map = evaluate_detection(model, source, dataclasses.replace(config, max_eval_images=0))
    table = [{"label": "float Keras", "map": keras_map["map"], "map50": keras_map["map50"]}]
    scored = _flatbuffers(model, qat_model, calibration, config.image_size, PostProcess(**EVALUATION_POSTPROCESS))
    shipped = _flatbuffers(model, qat_model, calibration, config.image_size, PostProcess())
    size = 320
    big_model = at_size(model, size, source.num_classes, config)
    big_qat = qat_at_size(qat_model, model, size, source.num_classes, config)
    big_calibration = np.asarray(keras.ops.image.resize(calibration[:16], (size, size)))
    big = _flatbuffers(big_model, big_qat, big_calibration, size, PostProcess())
    labels = {"float32": "float TFLite", "ptq_int8": "PTQ int8 TFLite", "qat_int8": "QAT int8 TFLite"}
    for mode, label in labels.items():
        map_all, map50 = tflite_map(scored[mode], images, ids, source)
        table.append(
            {
                "label": label,
                "map": map_all,
                "map50": map50,
                "size_bytes": len(shipped[mode]),
                "latency_ms": latency_ms(shipped[mode], images[:1]),
                "latency_320_ms": latency_ms(big[mode], big_calibration[:1], repeats=10),
            }
        )
    return table, shipped["qat_int8"], big_qat, big_calibration


def edgetpu_report(qat_model, anchors, calibration, work_dir):
    """The QAT detector rewritten for the Edge TPU (same int8 values), its
    flatbuffer with the post-processing, and the op-table mapping report."""
    from quantization.detection_export import detection_flatbuffer
    from quantization.targets import edgetpu
    from quantization.targets.common import quantized_for

    rewritten = quantized_for(qat_model, "edgetpu", None)
    flatbuffer = detection_flatbuffer(rewritten, "qat_int8", anchors, calibration[:4])
    report = edgetpu.export_flatbuffer(
        flatbuffer, os.path.join(work_dir, "edgetpu"), "ssdlite", allow_cpu_fallback=True
    )
    keys = ("ops_total", "ops_mapped", "mac_share_on_tpu", "first_cpu_op", "postprocessing_ops", "unsupported")
    return {k: report.get(k) for k in keys}


def _micro_entry(report):
    keys = ("arena_bytes", "flash_bytes", "fits", "problems", "refused")
    entry = {"input": report.get("input", {}).get("shape")} | {k: report.get(k) for k in keys}
    agreement = report.get("detections") or {}
    entry["detections"] = {k: agreement.get(k) for k in ("images", "detection_agreement", "count_agreement")}
    entry["postprocess_scratch_bytes"] = (report.get("detector") or {}).get("postprocess_scratch_bytes")
    return entry


def deploy(model, qat_model, big_qat, images, big_calibration, work_dir):
    """TFLite Micro (QAT model at the training size and at 320x320) and
    Android (float16 from the float model, int8 from the QAT model)."""
    from quantization.detection_export import PostProcess

    folder = os.path.join(work_dir, "deploy")
    samples = images[64:72]
    micro = [
        target_report(
            "micro", qat_model, folder, "ssdlite", sample_images=samples, postprocess=PostProcess(**MICRO_POSTPROCESS)
        ),
        target_report(
            "micro",
            big_qat,
            folder,
            "ssdlite_320",
            sample_images=big_calibration[:4],
            postprocess=PostProcess(**MICRO_POSTPROCESS),
        ),
    ]
    android = target_report(
        "android", model, folder, "ssdlite", qat_model=qat_model, calibration_images=images[:64],
        sample_images=samples, io_type="int8",
    )  # fmt: skip
    entries = {
        entry["variant"]: {
            "gpu_ops": f"{entry['gpu']['supported_ops']}/{entry['gpu']['total_ops']}",
            "xnnpack_ms": entry["xnnpack"]["median_ms"],
            "size_bytes": entry["size_bytes"],
        }
        for entry in android.get("models", [])
    }
    return {"micro": [_micro_entry(r) for r in micro], "android": {"refused": android.get("refused")} | entries}


def _target_lines(result):
    edgetpu, android = result["edgetpu"], result["android"]
    lines = [
        "Deployment targets of the QAT model:",
        "",
        f"- Edge TPU (the QAT model in the Edge TPU graph, same int8 values; predicted from the documented op "
        f"table): {edgetpu['ops_mapped']}/{edgetpu['ops_total']} ops mapped, "
        f"{100 * edgetpu['mac_share_on_tpu']:.1f}% of the MACs on the TPU, {edgetpu['postprocessing_ops']} "
        "post-processing ops last on the CPU"
        + (f"; first CPU op: {json.dumps(edgetpu['first_cpu_op'])}" if edgetpu["first_cpu_op"] else ""),
    ]
    for micro in result["micro"]:
        arena, flash = (f"{v:,} B" if v is not None else "-" for v in (micro["arena_bytes"], micro["flash_bytes"]))
        detections = micro["detections"]
        agreement = detections.get("detection_agreement")
        lines.append(
            f"- TFLite Micro (post-processing: {MICRO_POSTPROCESS['max_detections']} detections, score >= "
            f"{MICRO_POSTPROCESS['score_threshold']}), input {micro['input']}: arena {arena} (post-processing scratch "
            f"{micro['postprocess_scratch_bytes'] or 0:,} B), flash {flash}, fits: {micro['fits']}; "
            + (
                f"{agreement:.1%} of TFLite's detections matched on {detections['images']} images"
                if agreement is not None
                else "no comparison"
            )
        )
    for kind in ("int8", "float16"):
        if kind in android:
            figures = android[kind]
            lines.append(
                f"- Android {kind}: {figures['gpu_ops']} ops on the GPU delegate (the post-processing op on the "
                f"CPU, last), XNNPACK {figures['xnnpack_ms']:.2f} ms, {figures['size_bytes'] / 1e6:.2f} MB"
            )
    for name, report in [("Android", android)] + [("Micro", m) for m in result["micro"]]:
        if report.get("refused"):
            lines.append(f"- {name} refused: {report['refused']}")
    return lines


def run(args):
    import keras

    from keras_mobilevitv2.detection import model_anchors
    from quantization.detection_export import audit_detector
    from training.detection_data import resolve_detection_source

    classifier = _cached(args, "classifier", lambda: train_classifier(args))
    config = detection_config(args, classifier["result"]["weights"])
    training = _cached(args, "detector", lambda: train(config))
    source = resolve_detection_source("embedded", args.dataset_dir)
    model = keras.models.load_model(os.path.join(config.model_dir, "model.keras"), compile=False)
    qat_model, selection, qat_s = qat(args, config)
    images, ids = eval_images(source, config)
    table, qat_flatbuffer, big_qat, big_calibration = rows(model, qat_model, config, source, images, ids)
    audit = audit_detector(qat_flatbuffer, "qat_int8")
    return {
        "model": model.name,
        "image_size": config.image_size,
        "evaluation_images": int(len(images)),
        "classifier": {
            "epochs": args.classifier_epochs,
            "seconds": classifier["seconds"],
            "top1": classifier["result"]["top1"],
        },
        "training": {"epochs": config.epochs, "seconds": training["seconds"], "eval": training["result"]["eval"]},
        "qat": {"epochs": args.qat_epochs, "lr": args.qat_lr, "seconds": qat_s, "selection": selection},
        "rows": table,
        "audit": {
            k: audit[k]
            for k in (
                "ops",
                "op_count",
                "postprocess_ops",
                "float_tensors_inside",
                "max_tensor_rank",
                "input",
                "outputs",
                "errors",
            )
        },
        "edgetpu": edgetpu_report(qat_model, model_anchors(model), images[:64], args.work_dir),
        **deploy(model, qat_model, big_qat, images, big_calibration, args.work_dir),
        "command": "python -m benchmarks.detection_int8 " + " ".join(sys.argv[1:]),
        "machine": f"{os.cpu_count()} CPU cores",
    }


def markdown(result):
    size = result["image_size"]
    lines = [
        f"# SSDLite {result['model']}: embedded detection data, {size}x{size}",
        "",
        f"`{result['command']}` on {result['machine']}; COCO mAP (pycocotools) over {result['evaluation_images']} "
        f"evaluation images (10 classes); backbone from a classifier trained {result['classifier']['epochs']} epochs "
        f"on the embedded shapes ({result['classifier']['seconds']:.0f} s, top-1 {result['classifier']['top1']:.4f}); "
        f"detector trained {result['training']['epochs']} epochs in {result['training']['seconds']:.0f} s.",
        "mAP with ml-cvnets' evaluation settings (score 0.01, class-wise NMS at IoU 0.5, 200 detections); the TFLite "
        "rows run TFLite_Detection_PostProcess so set. Size and latency: the shipped flatbuffers (the op's fast NMS, "
        "100 detections); batch 1, median, TFLite CPU runtime (XNNPACK) on every core.",
        "",
        "| model | mAP@[.5:.95] | mAP@.5 | size (MB) | latency (ms) | latency at 320x320 (ms) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        size_mb = f"{row['size_bytes'] / 1e6:.2f}" if row.get("size_bytes") else "-"
        latency = f"{row['latency_ms']:.2f}" if row.get("latency_ms") else "-"
        big = f"{row['latency_320_ms']:.1f}" if row.get("latency_320_ms") else "-"
        lines.append(f"| {row['label']} | {row['map']:.4f} | {row['map50']:.4f} | {size_mb} | {latency} | {big} |")
    qat = result["qat"]
    start, tuned = (qat["selection"][k]["map"] for k in ("start", "fine_tuned"))
    audit = result["audit"]
    lines += [
        "",
        f"QAT: {qat['epochs']} epoch(s) at lr {qat['lr']:g} in {qat['seconds']:.0f} s; the safeguard kept the "
        f"{qat['selection']['chosen']} model (calibrated start mAP {start:.4f}, fine-tuned {tuned:.4f}, Keras "
        "fake-quant).",
        "",
        f"QAT int8 model: {audit['op_count']} ops, input {audit['input']['dtype']} {audit['input']['shape']}, "
        f"{len(audit['float_tensors_inside'])} float tensors before the post-processing, max tensor rank "
        f"{audit['max_tensor_rank']}, audit errors: {audit['errors'] or 'none'}; ops: {', '.join(audit['ops'])}.",
        "",
    ]
    return "\n".join(lines + _target_lines(result)) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classifier_epochs", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--image_size", type=int, default=96)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--qat_epochs", type=int, default=1)
    parser.add_argument("--qat_lr", type=float, default=1e-4)
    parser.add_argument("--dataset_dir", default="")
    parser.add_argument("--output", default="")
    parser.add_argument("--work_dir", default="", help="Keep the trained models here (a rerun reuses them).")
    args = parser.parse_args(argv)
    if args.work_dir:
        os.makedirs(args.work_dir, exist_ok=True)
        result = run(args)
    else:
        with tempfile.TemporaryDirectory() as work_dir:
            args.work_dir = work_dir
            result = run(args)
    print_and_write(result, markdown(result), args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
