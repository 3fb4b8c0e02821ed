"""The main job's report: accuracy, size and latency of the float / PTQ / QAT
models on the evaluation split, the deployment targets' figures, and a
picture (`report.png`) of both.

Written to `<output_dir>/report/`: `pipeline_report.json` (every figure),
`summary.md` (the tables the command prints) and `report.png`.
"""

import glob
import json
import os
import time

import numpy as np

from quantization.audit import make_interpreter
from quantization.audit import run_tflite
from quantization.targets.common import report_file

REPORT_JSON = "pipeline_report.json"
SUMMARY = "summary.md"
PICTURE = "report.png"
# Rows of the accuracy table: (key, label, TFLite mode or None for Keras).
ROWS = (
    ("float_keras", "float Keras", None),
    ("qat_keras", "QAT Keras (fake-quant)", None),
    ("float_tflite", "float TFLite", "float32"),
    ("ptq_int8_tflite", "PTQ int8 TFLite", "ptq_int8"),
    ("qat_int8_tflite", "QAT int8 TFLite", "qat_int8"),
)
# The QAT int8 model earns its training when its top-1 is at least PTQ int8's
# and at least float TFLite's minus this.
FLOAT_MARGIN = 0.005


def latency_ms(flatbuffer, image, repeats=30):
    """Median batch-1 latency on the default TFLite CPU runtime (XNNPACK)."""
    interpreter = make_interpreter(flatbuffer, use_xnnpack=True, num_threads=os.cpu_count())
    run_tflite(interpreter, image)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run_tflite(interpreter, image)
        times.append((time.perf_counter() - start) * 1000)
    return float(np.median(times))


def evaluate_models(config, images, labels):
    """{row key: {label, top1, size_bytes, latency_ms}} and the QAT int8
    model's predictions (for the picture)."""
    import keras

    rows, predictions = {}, None
    models = {
        "float_keras": os.path.join(config.float_dir, "model.keras"),
        "qat_keras": os.path.join(config.qat_dir, "model.keras"),
    }
    for key, label, mode in ROWS:
        if mode is None:
            model = keras.models.load_model(models[key], compile=False)
            scores = model.predict(images, batch_size=64, verbose=0)
            rows[key] = {"label": label, "top1": _top1(scores, labels), "size_bytes": None, "latency_ms": None}
            continue
        with open(config.tflite_path(mode), "rb") as f:
            flatbuffer = f.read()
        scores = run_tflite(make_interpreter(flatbuffer), images)
        rows[key] = {
            "label": label,
            "top1": _top1(scores, labels),
            "size_bytes": len(flatbuffer),
            "latency_ms": latency_ms(flatbuffer, images[:1]),
        }
        if mode == "qat_int8":
            predictions = scores.argmax(-1)
    return rows, predictions


def _top1(scores, labels):
    return float(np.mean(np.asarray(scores).argmax(-1) == labels))


def target_figures(config):
    """The deployment targets' headline figures, read from their reports."""
    figures = {}
    for target in config.targets:
        found = sorted(glob.glob(os.path.join(config.deploy_dir, report_file("*", target))))
        if not found:
            continue
        path = found[0]
        with open(path) as f:
            report = json.load(f)
        figures[target] = _headline(target, report)
        figures[target]["report"] = path
    return figures


def _headline(target, report):
    if target == "edgetpu":
        return {
            "ops_mapped": report["ops_mapped"],
            "ops_total": report["ops_total"],
            "mac_share_on_tpu": report["mac_share_on_tpu"],
            "compiled": report.get("compiler") is not None,
        }
    if target == "micro":
        return {
            "arena_bytes": report["arena_bytes"],
            "flash_bytes": report["flash_bytes"],
            "ops_to_register": report["num_resolver_ops"],
            "tflm_top1_agreement": report["agreement"]["top1_agreement"],
        }
    if target == "android":
        return {
            model["variant"]: {
                "gpu_ops": f"{model['gpu']['supported_ops']}/{model['gpu']['total_ops']}",
                "xnnpack_ms": model["xnnpack"]["median_ms"],
                "size_bytes": model["size_bytes"],
            }
            for model in report["models"]
        }
    agreement = report.get("agreement") or {}
    return {
        "quantized": report["quantized"],
        "size_bytes": report.get("size_bytes"),
        "top1_agreement": agreement.get("top1_agreement"),
    }


def qat_meets_the_bar(qat_int8, ptq_int8, float_tflite):
    """Whether QAT int8 top-1 >= max(PTQ int8, float - FLOAT_MARGIN)."""
    return qat_int8 >= max(ptq_int8, float_tflite - FLOAT_MARGIN) - 1e-9


def int8_verdict(rows, images):
    """The more accurate int8 model, said in a line: the QAT one unless PTQ int8
    scored higher on the evaluation split (then a warning: the fine-tune did
    not pay), and a note when it is more than FLOAT_MARGIN below float."""
    qat, ptq, float_ = (rows[key]["top1"] for key in ("qat_int8_tflite", "ptq_int8_tflite", "float_tflite"))
    more_accurate = "qat_int8" if qat >= ptq else "ptq_int8"
    if more_accurate == "qat_int8":
        text = f"Ship tflite/qat_int8.tflite: QAT int8 top-1 {qat:.4f} >= PTQ int8 {ptq:.4f}."
    else:
        fewer = round((ptq - qat) * images)
        text = (f"WARNING: QAT int8 top-1 {qat:.4f} is below PTQ int8's {ptq:.4f} ({fewer} of {images} evaluation "
                "images): quantization-aware training did not pay in accuracy here. The more accurate int8 model "
                "is tflite/ptq_int8.tflite; retry QAT with more epochs or another --qat_lr.")  # fmt: skip
        latency = {key: rows[key].get("latency_ms") for key in ("qat_int8_tflite", "ptq_int8_tflite")}
        if all(latency.values()):
            text += (f" (The QAT model is the faster one: {latency['qat_int8_tflite']:.2f} against "
                     f"{latency['ptq_int8_tflite']:.2f} ms.)")  # fmt: skip
    best = max(qat, ptq)
    if best < float_ - FLOAT_MARGIN:
        text += (f" Note: the best int8 model is {100 * (float_ - best):.1f} points below float TFLite "
                 f"({float_:.4f}).")  # fmt: skip
    return {"more_accurate": more_accurate, "meets_the_bar": qat_meets_the_bar(qat, ptq, float_), "text": text}


def accuracy_table(rows):
    lines = ["| model | top-1 | size (MB) | latency (ms) |", "|---|---:|---:|---:|"]
    for row in rows.values():
        size = f"{row['size_bytes'] / 1e6:.2f}" if row["size_bytes"] else "-"
        latency = f"{row['latency_ms']:.2f}" if row["latency_ms"] else "-"
        lines.append(f"| {row['label']} | {row['top1']:.4f} | {size} | {latency} |")
    return "\n".join(lines)


def targets_table(figures):
    """One line per target with the figure a user deploys by."""
    lines = ["| target | result |", "|---|---|"]
    if "edgetpu" in figures:
        tpu = figures["edgetpu"]
        lines.append(
            f"| Edge TPU | {tpu['ops_mapped']}/{tpu['ops_total']} ops on the Edge TPU, "
            f"{100 * tpu['mac_share_on_tpu']:.1f}% of the MACs (predicted from the op table"
            f"{'; compiled' if tpu['compiled'] else ''}) |"
        )
    if "micro" in figures:
        micro = figures["micro"]
        lines.append(
            f"| TFLite Micro | arena {micro['arena_bytes']:,} B, flash {micro['flash_bytes']:,} B, "
            f"{micro['ops_to_register']} ops; top-1 agreement with TFLite "
            f"{micro['tflm_top1_agreement']:.3f} |"
        )
    if "android" in figures:
        parts = [
            f"{variant} {model['gpu_ops']} ops on the GPU delegate, XNNPACK {model['xnnpack_ms']:.2f} ms"
            for variant, model in figures["android"].items()
            if variant != "report"
        ]
        lines.append(f"| Android | {'; '.join(parts)} |")
    if "onnx" in figures:
        onnx = figures["onnx"]
        kind = "QDQ int8" if onnx["quantized"] else "float"
        agreement = onnx["top1_agreement"]
        lines.append(
            f"| ONNX | {kind}, {onnx['size_bytes'] / 1e6:.2f} MB; top-1 agreement with Keras "
            f"{agreement:.3f} (onnxruntime) |"
            if agreement is not None
            else f"| ONNX | {kind} |"
        )
    return "\n".join(lines)


def draw_picture(path, images, labels, predictions, class_names, rows, count=24):
    """A grid of evaluation images with the QAT int8 model's prediction
    (green: right, red: wrong) and bars of top-1 and latency."""
    import matplotlib

    matplotlib.use("Agg")  # no display: write the file only
    from matplotlib import pyplot

    columns = 8
    grid_rows = -(-min(count, len(images)) // columns)
    figure = pyplot.figure(figsize=(12, 1.6 * grid_rows + 3.2))
    spec = figure.add_gridspec(grid_rows + 2, columns)
    for index in range(min(count, len(images))):
        axis = figure.add_subplot(spec[index // columns, index % columns])
        axis.imshow(np.clip(images[index], 0, 255).astype(np.uint8))
        right = predictions[index] == labels[index]
        axis.set_title(
            f"{class_names[predictions[index]]}\n(true: {class_names[labels[index]]})",
            fontsize=7,
            color="green" if right else "red",
        )
        axis.axis("off")
    tflite = [row for row in rows.values() if row["latency_ms"]]
    names = [row["label"].replace(" TFLite", "") for row in tflite]
    for position, (key, title, unit) in enumerate(
        (("top1", "top-1 on the evaluation split", ""), ("latency_ms", "latency, batch 1 (ms)", " ms"))
    ):
        axis = figure.add_subplot(spec[grid_rows:, position * columns // 2 : (position + 1) * columns // 2])
        values = [row[key] for row in tflite]
        bars = axis.bar(names, values, color=["#4c72b0", "#dd8452", "#55a868"])
        axis.bar_label(bars, labels=[f"{v:.3f}{unit}" if key == "top1" else f"{v:.2f}{unit}" for v in values])
        axis.set_title(title, fontsize=9)
        axis.set_ylim(0, max(values) * 1.2)
    figure.suptitle("QAT int8 TFLite predictions on evaluation images", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    pyplot.close(figure)


def summary_text(rows, figures, verdict):
    """What the command prints and summary.md holds: accuracy, the `int8_verdict` line, targets."""
    return "\n\n".join([accuracy_table(rows), verdict["text"], targets_table(figures)])


def write_report(config, rows, figures, extra):
    """pipeline_report.json and summary.md in the report folder; returns the summary text."""
    os.makedirs(config.report_dir, exist_ok=True)
    verdict = int8_verdict(rows, extra["evaluation_images"])
    summary = summary_text(rows, figures, verdict)
    with open(os.path.join(config.report_dir, SUMMARY), "w") as f:
        f.write(summary + "\n")
    with open(os.path.join(config.report_dir, REPORT_JSON), "w") as f:
        json.dump({"rows": rows, "int8_verdict": verdict, "targets": figures, **extra}, f, indent=2, default=str)
    return summary
