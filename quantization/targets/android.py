"""Android target: float16 and int8 TFLite models with a GPU-delegate
compatibility report (ours, `android_gpu`, beside TensorFlow's Analyzer) and
CPU (XNNPACK) latency.

`xnnpack_latency` times the default CPU runtime (LiteRT with its default op
resolver, which applies the XNNPACK delegate) on this machine: a relative
figure between models, not a phone measurement.
"""

import os
import statistics
import time

import numpy as np

from quantization.targets.android_detection import agreement_line
from quantization.targets.android_detection import int8_against_float16
from quantization.targets.android_detection import postprocess_line
from quantization.targets.android_detection import write_detector
from quantization.targets.android_gpu import PARTITION_NOTE
from quantization.targets.android_gpu import analyzer_checks_gpu
from quantization.targets.android_gpu import compare_with_analyzer
from quantization.targets.android_gpu import gpu_delegate_compatibility
from quantization.targets.android_gpu import run_analyzer
from quantization.targets.common import TargetError
from quantization.targets.common import check_io_type
from quantization.targets.common import check_name
from quantization.targets.common import staged
from quantization.targets.detections import is_ssdlite
from quantization.tflite_export import check_images
from quantization.tflite_export import export_tflite
from quantization.tflite_export import is_qat
from quantization.tflite_export import static_input_shape
from quantization.tflite_graph import DETECTION_POSTPROCESS

TARGET = "android"


# ---------------------------------------------------------------- latency


def _cpu_interpreter(flatbuffer, threads):
    """LiteRT's interpreter with its default resolver (XNNPACK applied)."""
    try:
        from ai_edge_litert.interpreter import Interpreter

        interpreter, runtime = Interpreter(model_content=flatbuffer, num_threads=threads), "ai_edge_litert"
    except ImportError:  # TensorFlow's copy of the same runtime (deprecated, hence the warning filter)
        import warnings

        import tensorflow as tf

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            interpreter, runtime = tf.lite.Interpreter(model_content=flatbuffer, num_threads=threads), "tf.lite"
    interpreter.allocate_tensors()
    return interpreter, runtime


def _random_input(detail, rng):
    dtype = np.dtype(detail["dtype"])
    shape = tuple(detail["shape"])
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(info.min, int(info.max) + 1, size=shape, dtype=dtype)
    return (rng.random(shape) * 255.0).astype(dtype)  # the models' raw-pixel range


def xnnpack_latency(flatbuffer, threads=2, warmup=5, repeats=30, seed=0):
    """Wall-clock time of one `invoke()` on the default CPU runtime.

    The model runs with its own batch size on random inputs of its input
    dtype (floats in [0, 255], integers over their full range).

    Returns:
        {runtime, threads, warmup, repeats, batch, median_ms, mean_ms,
        p10_ms, p90_ms, min_ms, max_ms}.
    """
    if threads < 1 or warmup < 0 or repeats < 1:
        raise ValueError(f"need threads >= 1, warmup >= 0, repeats >= 1; got {threads}, {warmup}, {repeats}")
    interpreter, runtime = _cpu_interpreter(flatbuffer, threads)
    rng = np.random.default_rng(seed)
    for detail in interpreter.get_input_details():
        interpreter.set_tensor(detail["index"], _random_input(detail, rng))
    for _ in range(warmup):
        interpreter.invoke()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        interpreter.invoke()
        times.append((time.perf_counter() - start) * 1e3)
    ordered = sorted(times)
    return {
        "runtime": runtime,
        "threads": int(threads),
        "warmup": int(warmup),
        "repeats": int(repeats),
        "batch": int(interpreter.get_input_details()[0]["shape"][0]),
        "median_ms": statistics.median(times),
        "mean_ms": statistics.fmean(times),
        "p10_ms": float(np.percentile(ordered, 10)),
        "p90_ms": float(np.percentile(ordered, 90)),
        "min_ms": ordered[0],
        "max_ms": ordered[-1],
    }


# ---------------------------------------------------------------- export


def export(
    model,
    output_dir,
    name=None,
    *,
    calibration_images=None,
    sample_images=None,
    qat_model=None,
    io_type="float32",
    allow_cpu_fallback=False,
    threads=2,
    warmup=5,
    repeats=30,
    anchors=None,
    postprocess=None,
):
    """Writes the two Android models of the float `model` and their report.

    An SSDLite detector (outputs box_deltas and class_logits) is written
    with TFLite's `TFLite_Detection_PostProcess` at the end of both models
    (`android_detection`): float32 outputs boxes, classes, scores and count,
    the op on the CPU after the GPU partition by design.

    Files in `output_dir`:
        <name>.android.float16.tflite  float16 weights, float compute and I/O
                                       (the GPU delegate's native format);
        <name>.android.int8.tflite     int8: `qat_model` converted with mode
                                       qat_int8 when given, else `model` by
                                       post-training quantization (ptq_int8);
        <name>.android.*.audit.json    each export's audit;
        <name>.android.report.json     this function's report.

    Args:
        model: The float Keras model (static input size).
        output_dir: Directory for the files (created when missing).
        name: File name stem (default: the model's name).
        calibration_images: Float images (N, H, W, 3) in the model's input
            range: the ptq_int8 calibration set, and the converter's int8
            check for qat_int8.
        sample_images: Images to compare each TFLite model with Keras on
            (the audits' agreement figures); optional.
        qat_model: A calibrated QAT model from `quantize_model(model)`.
        io_type: Input/output type of the int8 model: "float32" (default:
            what the GPU delegate recommends, and the same app code for both
            models), "int8" or "uint8" (raw uint8 pixels for a QAT model,
            whose input scale is 1). The float16 model has float32 I/O.
        allow_cpu_fallback: Write the models even when the float16 model has
            ops the GPU delegate cannot run (by `gpu_delegate_compatibility`
            or TensorFlow's Analyzer); they then run on the CPU.
        threads, warmup, repeats: For `xnnpack_latency`.
        anchors: A detector's anchors [N, 4] (default: `model_anchors(model)`).
        postprocess: A detector's `detection_export.PostProcess` settings.

    Returns:
        The report: {target, name, output_dir, models: [{variant, mode, path,
        size_bytes, io_type, agreement, gpu, analyzer, xnnpack}], files,
        notes}; a detector's int8 entry has `agreement` against the float16
        model's detections on `sample_images`. `analyzer` sets TensorFlow's own check
        (`tf.lite.experimental.Analyzer`, gpu_compatibility=True) beside
        ours: see `android_gpu.compare_with_analyzer`.

    Raises:
        TargetError: the float16 model has ops the GPU delegate cannot run
            and allow_cpu_fallback is False.
        ValueError: from the exports (bad images, a failed audit, a float
            model passed as qat_model...).
        Nothing is written in output_dir when it raises.
    """
    io_type = check_io_type(TARGET, io_type)
    name = check_name(name, model)
    shape = static_input_shape(model, "The Android export")
    if is_qat(model):
        raise ValueError(
            "The Android export needs the float model (it writes float16 and int8); pass the QAT "
            "model as qat_model (--qat_model)."
        )
    if qat_model is not None and not is_qat(qat_model):
        raise ValueError("qat_model must come from quantization.quantize_model (and be calibrated).")
    detector = is_ssdlite(model)
    if not detector and (anchors is not None or postprocess is not None):
        raise ValueError("anchors and postprocess are for an SSDLite detector (outputs box_deltas, class_logits).")
    if detector and sample_images is not None:
        sample_images = check_images(sample_images, shape, "sample_images")
    variants = [
        ("float16", "float16", model, "float32"),
        ("int8", "ptq_int8" if qat_model is None else "qat_int8", qat_model or model, io_type),
    ]
    report = {
        "target": TARGET,
        "name": name,
        "output_dir": os.path.abspath(output_dir),
        "models": [],
        "files": {},
        "notes": [PARTITION_NOTE],
    }
    with staged(output_dir, TARGET) as staging:
        for variant, mode, source, variant_io in variants:
            path = staging.path(f"{name}.{TARGET}.{variant}.tflite")
            if detector:
                audit = write_detector(source, path, mode, variant_io, anchors, postprocess, calibration_images)
            else:
                audit = export_tflite(
                    source,
                    path,
                    mode,
                    io_type=variant_io,
                    representative_images=calibration_images,
                    sample_images=sample_images,
                    verbose=False,
                )
            entry = _model_entry(path, variant, mode, variant_io, audit, (threads, warmup, repeats))
            report["models"].append(entry)
            report["files"][variant] = path
            report["files"][f"{variant}_audit"] = path[: -len(".tflite")] + ".audit.json"
            if variant == "float16" and not allow_cpu_fallback:
                _refuse_cpu_fallback(entry, report)
        if detector:
            report["models"][1]["agreement"] = int8_against_float16(report["models"], sample_images)
        return staging.commit(report, name, TARGET)


def _summarize_gpu(report):
    """The GPU report without the per-op list (kept small for the JSON)."""
    return {key: value for key, value in report.items() if key != "ops"}


def _model_entry(path, variant, mode, io_type, audit, timing):
    """One model's part of the report: our GPU verdict, TensorFlow's
    Analyzer next to it, and XNNPACK latency."""
    with open(path, "rb") as f:
        flatbuffer = f.read()
    gpu = gpu_delegate_compatibility(flatbuffer)
    threads, warmup, repeats = timing
    return {
        "variant": variant,
        "mode": mode,
        "path": os.path.abspath(path),
        "size_bytes": len(flatbuffer),
        "io_type": io_type,
        "agreement": audit.get("agreement"),
        "gpu": _summarize_gpu(gpu),
        "analyzer": compare_with_analyzer(gpu, run_analyzer(flatbuffer), analyzer_checks_gpu()),
        "xnnpack": xnnpack_latency(flatbuffer, threads=threads, warmup=warmup, repeats=repeats),
    }


def _refuse_cpu_fallback(entry, report):
    """TargetError when our rules or the Analyzer find an op of the
    float16 model the GPU delegate cannot run: that model exists for the GPU,
    and a silent CPU fallback would cost the latency it is meant to save.
    A detector's post-processing op on the CPU tail is no fallback: no GPU
    delegate runs it, and the app reads its outputs on the CPU."""
    placement = entry["gpu"].get("detection_postprocess")
    by_design = {placement["index"]} if placement and placement["cpu_tail"] else set()
    ours = [op for op in entry["gpu"]["unsupported"] if op["index"] not in by_design]
    theirs = [op for op in entry["analyzer"]["analyzer_flagged"] if op["index"] not in by_design]
    if not ours and not theirs:
        return
    found = [f"op #{op['index']} {op['op']}: {op['reason']}" for op in ours[:5]]
    found += [f"op #{op['index']} {op['op']}: {op['message']} (TensorFlow's Analyzer)" for op in theirs[:5]]
    raise TargetError(
        f"The float16 Android model has {max(len(ours), len(theirs))} op(s) the GPU delegate cannot run, so "
        f"they would fall back to the CPU: {'; '.join(found)}. Nothing was written. Change the model, or pass "
        "allow_cpu_fallback=True (--allow_cpu_fallback) to export it anyway.",
        report,
    )


def format_report(report):
    """A markdown table of the report of `export`, then its notes."""
    lines = [
        "| model | mode | I/O | size (MB) | GPU ops supported/total | GPU partitions | whole graph on GPU "
        "| XNNPACK median ms (p10-p90) |",
        "|---|---|---|---:|---:|---:|---|---:|",
    ]
    threads = None
    for model in report["models"]:
        gpu, cpu = model["gpu"], model["xnnpack"]
        threads = cpu["threads"]
        lines.append(
            f"| {os.path.basename(model['path'])} | {model['mode']} | {model['io_type']} "
            f"| {model['size_bytes'] / 1e6:.2f} | {gpu['supported_ops']}/{gpu['total_ops']} "
            f"| {gpu['gpu_partitions']} | {'yes' if gpu['fully_supported'] else 'no'} "
            f"| {cpu['median_ms']:.2f} ({cpu['p10_ms']:.2f}-{cpu['p90_ms']:.2f}) |"
        )
    lines.append("")
    lines.append(f"XNNPACK: {threads} threads on this machine (relative figures, not a phone measurement).")
    for model in report["models"]:
        line = postprocess_line(model)
        lines.extend(extra for extra in (line, agreement_line(model)) if extra)
        for reason, count in model["gpu"]["unsupported_summary"].items():
            if not (line and reason.startswith(DETECTION_POSTPROCESS)):  # that op is on the line above
                lines.append(f"- {os.path.basename(model['path'])}: {count} x {reason}")
    for model in report["models"]:
        if "analyzer" in model:
            lines.extend(_analyzer_lines(os.path.basename(model["path"]), model["analyzer"]))
    notes = list(report.get("notes", []))
    for model in report["models"]:
        for note in model["gpu"]["notes"]:
            if note not in notes:
                notes.append(note)
    lines.extend(f"- {note}" for note in notes)
    lines.extend(f"wrote {kind}: {path}" for kind, path in (report.get("files") or {}).items())
    return "\n".join(lines)


def _analyzer_lines(file_name, comparison):
    """The Analyzer's verdict next to ours, one line, then each disagreement."""
    if comparison["analyzer_flagged"]:
        verdict = f"flags {len(comparison['analyzer_flagged'])} op(s)"
    else:
        verdict = "compatible" if comparison["analyzer_compatible"] else "no verdict"
    agreement = "agree" if comparison["agree"] else f"{len(comparison['disagreements'])} disagreement(s)"
    line = (
        f"- {file_name}: TensorFlow's Analyzer: {verdict}; ours: {comparison['ours_unsupported']} "
        f"unsupported op(s); {agreement}"
    )
    if comparison["note"]:
        line += f". {comparison['note']}"
    lines = [line]
    for op in comparison["disagreements"]:
        lines.append(
            f"  - op #{op['index']} {op['op']}: ours: {op['ours']}; Analyzer: {op['analyzer']}; decided by {op['rule']}"
        )
    return lines
