"""TensorFlow Lite Micro target: an int8 `.tflite` that the TFLM interpreter
can run on a microcontroller, with its C++ source.

`export` quantizes a Keras model (or converts a QAT model) and hands the
flatbuffer to `export_flatbuffer`, which checks it against what TFLM accepts
(`micro_checks`), runs it in the real TFLM interpreter and in the TFLite
interpreter on sample images (`micro_runtime`), checks the arena and flash
budgets, and writes the model, its C++ source (`micro_source`) and the report
only when everything fits.

Detectors take the same route. An SSDLite (`keras_mobilevitv2.detection`)
given to `export` becomes an int8 model ending in TFLite's
`TFLite_Detection_PostProcess` (`quantization.detection_export`), and
`export_flatbuffer` recognises such a flatbuffer, whoever built it: its
float32 outputs (boxes, classes, scores, count) are expected, everything
before the op must be int8, and the TFLM run is compared detection by
detection (`micro_detection`) instead of by top-1 class.
"""

import re

import numpy as np

from quantization.audit import FLOAT_TYPES
from quantization.audit import make_interpreter
from quantization.audit import run_tflite
from quantization.targets.common import TargetError
from quantization.targets.common import check_io_type
from quantization.targets.common import check_name
from quantization.targets.common import quantized_for
from quantization.targets.common import staged
from quantization.targets.detections import BOX_TOLERANCE
from quantization.targets.detections import SCORE_TOLERANCE
from quantization.targets.detections import is_ssdlite
from quantization.targets.micro_checks import check_micro_compatibility
from quantization.targets.micro_detection import detector_summary
from quantization.targets.micro_detection import format_detection_lines
from quantization.targets.micro_detection import run_and_compare_detections
from quantization.targets.micro_runtime import MicroRuntimeError
from quantization.targets.micro_runtime import run_micro
from quantization.targets.micro_source import write_c_source
from quantization.tflite_export import check_images
from quantization.tflite_export import convert
from quantization.tflite_export import is_qat
from quantization.tflite_export import static_input_shape
from quantization.tflite_export import write_model

TARGET = "micro"
_C_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NOTES = [
    "arena measured by TFLM's RecordingMicroAllocator with reference kernels; optimized kernels may need some "
    "more scratch",
    "flash_bytes counts the model only; the TFLM runtime and the application add their code size",
]


def export(
    model,
    output_dir,
    name=None,
    *,
    calibration_images=None,
    sample_images=None,
    io_type="int8",
    arena_budget_bytes=None,
    flash_budget_bytes=None,
    min_top1_agreement=0.95,
    array_name="g_model",
    timeout=600,
    anchors=None,
    postprocess=None,
    min_detection_agreement=0.9,
    box_tolerance=BOX_TOLERANCE,
    score_tolerance=SCORE_TOLERANCE,
):
    """int8 TFLite (int8 I/O) for TensorFlow Lite Micro, run in the real TFLM
    interpreter, with a C++ source of the model array and its op resolver.

    Args:
        model: A float Keras model (quantized here after training, on
            `calibration_images`) or a QAT model from `quantize_model`. An
            SSDLite detector (outputs `box_deltas` and `class_logits`) is
            exported with TFLite's `TFLite_Detection_PostProcess` at the end:
            a float one quantized by the converter on `calibration_images`
            (ptq_int8), a QAT one as trained (qat_int8).
        output_dir: Folder for `<name>.micro.int8.tflite`, `<name>.micro.h`,
            `<name>.micro.cc` and `<name>.micro.report.json`.
        name: File name stem (default: the model's name).
        calibration_images: About 100 typical float images; needed for a
            float model, unused for a QAT model (its ranges are trained).
        sample_images: Images run in TFLM and in the TFLite interpreter, which
            must agree (default: `calibration_images`).
        io_type: "int8" only (a float or uint8 interface adds ops TFLM refuses;
            a detector's outputs are the post-processing op's float32).
        arena_budget_bytes, flash_budget_bytes, min_top1_agreement,
        array_name, timeout: see `export_flatbuffer`.
        anchors: A detector's anchors [N, 4] (cx, cy, w, h); default
            `keras_mobilevitv2.detection.model_anchors(model)` (ml-cvnets'
            COCO anchor shapes: pass `model_anchors(model, config)` for a
            model built with another `AnchorConfig`).
        postprocess: A detector's `quantization.detection_export.PostProcess`
            (max detections, score and IoU thresholds; its defaults when None).
        min_detection_agreement, box_tolerance, score_tolerance: a
            detector's agreement check; see `export_flatbuffer`.

    Returns:
        The report (also written as `<name>.micro.report.json`).

    Raises:
        TargetError: the model does not fit TFLM or the budgets; nothing is
            written.
        ValueError: bad arguments (images of the wrong shape, detector
            options for a classifier, ...).
    """
    check_io_type(TARGET, io_type)
    name = check_name(name, model)
    shape = static_input_shape(model, "The TFLite Micro export")
    if sample_images is None and calibration_images is None:
        raise ValueError(
            "The TFLite Micro export needs sample_images (or calibration_images): the model is run on them in "
            "TFLite Micro and in the TFLite interpreter, and is written only when the two agree."
        )
    which = "sample_images" if sample_images is not None else "calibration_images"
    samples = check_images(sample_images if sample_images is not None else calibration_images, shape, which)
    if is_ssdlite(model):
        flatbuffer = _detector_flatbuffer(model, shape, calibration_images, samples, anchors, postprocess)
    elif anchors is not None or postprocess is not None:
        raise ValueError("anchors and postprocess are for an SSDLite detector (outputs box_deltas, class_logits).")
    else:
        quantized = quantized_for(model, "reference", calibration_images)
        flatbuffer = convert(quantized, "qat_int8", "int8", representative_images=samples[:4])
    return export_flatbuffer(
        flatbuffer,
        output_dir,
        name,
        samples,
        arena_budget_bytes=arena_budget_bytes,
        flash_budget_bytes=flash_budget_bytes,
        min_top1_agreement=min_top1_agreement,
        array_name=array_name,
        timeout=timeout,
        min_detection_agreement=min_detection_agreement,
        box_tolerance=box_tolerance,
        score_tolerance=score_tolerance,
    )


def _detector_flatbuffer(model, shape, calibration_images, samples, anchors, postprocess):
    """The int8 detector ending in TFLite_Detection_PostProcess: ptq_int8 for
    a float SSDLite (the converter calibrates on `calibration_images`), qat_int8
    for a QAT one."""
    # Imported here: a classifier's export needs neither the detection models nor their converter.
    from keras_mobilevitv2.detection import model_anchors
    from quantization.detection_export import PostProcess
    from quantization.detection_export import detection_flatbuffer

    if anchors is None:
        anchors = model_anchors(model)
    if is_qat(model):
        mode, representative = "qat_int8", samples[:4]
    elif calibration_images is None:
        raise ValueError("A float detector needs calibration_images (about 100 typical inputs) to be quantized.")
    else:
        mode, representative = "ptq_int8", check_images(calibration_images, shape, "calibration_images")
    settings = postprocess if postprocess is not None else PostProcess()
    return detection_flatbuffer(model, mode, anchors, representative, settings=settings, input_type="int8")


def export_flatbuffer(
    flatbuffer,
    output_dir,
    name,
    sample_images,
    arena_budget_bytes=None,
    flash_budget_bytes=None,
    min_top1_agreement=0.95,
    array_name="g_model",
    timeout=600,
    min_detection_agreement=0.9,
    box_tolerance=BOX_TOLERANCE,
    score_tolerance=SCORE_TOLERANCE,
):
    """Checks, runs and writes an int8 TFLite flatbuffer for TensorFlow Lite Micro.

    Runs the compatibility check, then the model in TFLM (subprocess) and in
    the TFLite interpreter on `sample_images`, compares them, measures the
    arena and checks the budgets. When everything fits it writes, in
    `output_dir`: `<name>.micro.int8.tflite`, `<name>.micro.h` /
    `<name>.micro.cc` (see `write_c_source`) and `<name>.micro.report.json`.

    A detector (a flatbuffer ending in `TFLite_Detection_PostProcess`, e.g.
    from `quantization.detection_export.detection_flatbuffer(..., "ptq_int8"
    or "qat_int8")`) is compared detection by detection instead of by top-1
    class: the report's `detections` (see `detections.detection_agreement`),
    `anchor_agreement` (the op's inputs, in int8 steps), `postprocess_kernel`
    (TFLM's op alone on TFLite's inputs: must be identical) and `detector`
    (anchors, the op's settings, its scratch and arena).

    Args:
        flatbuffer: The `.tflite` model (bytes), e.g. from
            `quantization.tflite_export.convert(..., "qat_int8", io_type="int8")`.
        output_dir: Folder for the files.
        name: File name stem.
        sample_images: float32 [N, H, W, C] in the model's input range.
        arena_budget_bytes: RAM for the tensor arena, or None.
        flash_budget_bytes: Flash for the model (the flatbuffer), or None.
        min_top1_agreement: Least fraction of predictions whose top-1 class
            TFLM and the TFLite interpreter must agree on: one prediction per
            image for a classifier, one per pixel for a segmenter.
        array_name: C identifier of the model array in the .h/.cc.
        timeout: Seconds for each TFLM interpreter process.
        min_detection_agreement: Least share of a detector's detections that
            must match between TFLM and the TFLite interpreter (matched /
            the larger count, summed over the images).
        box_tolerance: Largest difference of a matched box's corners
            (normalised coordinates).
        score_tolerance: Largest difference of a matched detection's score.

    Returns:
        The report dict.

    Raises:
        TargetError: something does not fit; the message lists every reason
            with the figures, `.report` holds the report. Nothing is written
            then, not even the report: the folder is left as it was, so a
            stale `.tflite` is never paired with a new report.
    """
    flatbuffer = bytes(flatbuffer)
    if not _C_IDENTIFIER.fullmatch(array_name):
        raise ValueError(f"array_name must be a C identifier; got {array_name!r}")
    name = check_name(name, None)
    check = check_micro_compatibility(flatbuffer)
    images = _check_samples(sample_images, check["inputs"][0]["shape"])
    report = _new_report(name, flatbuffer, check, arena_budget_bytes, flash_budget_bytes)
    if check["detector"]:
        report["detector"] = detector_summary(flatbuffer)
        limits = {
            "min_detection_agreement": min_detection_agreement,
            "box_tolerance": box_tolerance,
            "score_tolerance": score_tolerance,
        }
        run_and_compare_detections(flatbuffer, images, report, limits, timeout)
    else:
        _run_and_compare(flatbuffer, images, report, min_top1_agreement, timeout)
    _check_budgets(report)
    if report["problems"]:
        raise TargetError(f"{name} does not fit the TFLite Micro target: " + "; ".join(report["problems"]), report)
    report["fits"] = True
    with staged(output_dir, TARGET) as staging:
        prefix = staging.path(f"{name}.{TARGET}")
        header_path, source_path = write_c_source(
            flatbuffer,
            prefix,
            array_name,
            ops=[op["op"] for op in check["ops_to_register"]],
            arena_bytes=report["arena_bytes"],
        )
        write_model(flatbuffer, prefix + ".int8.tflite")
        report["files"] = {"tflite": prefix + ".int8.tflite", "header": header_path, "source": source_path}
        return staging.commit(report, name, TARGET)


def _check_samples(sample_images, model_shape):
    images = np.asarray(sample_images, np.float32)
    if images.ndim != len(model_shape) or list(images.shape[1:]) != list(model_shape[1:]) or not len(images):
        raise ValueError(
            f"sample_images must be float images of shape (N, {', '.join(map(str, model_shape[1:]))}) in the "
            f"model's input range; got shape {images.shape}"
        )
    return images


def _new_report(name, flatbuffer, check, arena_budget_bytes, flash_budget_bytes):
    return {
        "target": TARGET,
        "name": name,
        "fits": False,
        "flash_bytes": len(flatbuffer),
        "flash_budget_bytes": flash_budget_bytes,
        "arena_bytes": None,
        "arena_budget_bytes": arena_budget_bytes,
        "ops_to_register": check["ops_to_register"],
        "resolver_methods": check["resolver_methods"],
        "num_resolver_ops": check["num_resolver_ops"],
        "operator_count": check["operator_count"],
        "input": check["inputs"][0],
        "output": check["outputs"][0],
        "outputs": check["outputs"],
        "agreement": None,
        "compatibility": check,
        "notes": list(check["notes"]) + _NOTES,
        "problems": list(check["problems"]),
    }


def _run_and_compare(flatbuffer, images, report, min_top1_agreement, timeout):
    """Runs the model in TFLM and in the TFLite interpreter; records the
    arena, the agreement, and each failure as a problem."""
    problems = report["problems"]
    micro_outputs = tflite_outputs = None
    try:
        micro_outputs, report["arena_bytes"] = run_micro(flatbuffer, images, timeout=timeout)
    except MicroRuntimeError as error:
        problems.append(f"TFLite Micro could not run the model: {error}")
    try:
        tflite_outputs = run_tflite(make_interpreter(flatbuffer), images)
    except (RuntimeError, ValueError) as error:
        problems.append(f"the TFLite interpreter could not run the model: {error}")
    if micro_outputs is None or tflite_outputs is None:
        return
    output = report["output"]
    step = float(output["scale"]) if output["dtype"] not in FLOAT_TYPES and "scale" in output else 0.0
    report["agreement"] = agreement = _agreement(micro_outputs, tflite_outputs, step, min_top1_agreement)
    if agreement["top1_agreement"] < min_top1_agreement:
        problems.append(
            f"TFLite Micro and the TFLite interpreter agree on the top-1 class of only "
            f"{agreement['top1_agreement']:.1%} of {agreement['predictions']:,} predictions "
            f"({agreement['samples']} sample images); the minimum is {min_top1_agreement:.1%}"
        )


def _check_budgets(report):
    arena, arena_budget = report["arena_bytes"], report["arena_budget_bytes"]
    if arena_budget is not None and arena is not None and arena > arena_budget:
        report["problems"].append(f"needs an arena of {arena:,} bytes; the budget is {arena_budget:,} bytes")
    flash, flash_budget = report["flash_bytes"], report["flash_budget_bytes"]
    if flash_budget is not None and flash > flash_budget:
        report["problems"].append(f"the model takes {flash:,} bytes of flash; the budget is {flash_budget:,} bytes")


def _agreement(micro_outputs, tflite_outputs, output_step, min_top1_agreement):
    difference = np.abs(micro_outputs.astype(np.float64) - tflite_outputs.astype(np.float64))
    # The class axis is the last one: one prediction per image for a
    # classifier, one per pixel for a segmenter ([N, H, W, classes]).
    agree = micro_outputs.argmax(-1) == tflite_outputs.argmax(-1)
    return {
        "samples": int(len(micro_outputs)),
        "predictions": int(agree.size),
        "top1_agreement": float(np.mean(agree)),
        "min_top1_agreement": float(min_top1_agreement),
        "max_abs_difference": float(difference.max()),
        "mean_abs_difference": float(difference.mean()),
        "output_quantization_step": output_step,
        "max_difference_in_steps": float(difference.max() / output_step) if output_step else None,
    }


def format_report(report):
    """The report of `export` as a few human-readable lines."""
    verdict = "fits" if report["fits"] else "DOES NOT FIT"
    lines = [f"TFLite Micro target {report['name']}: {verdict}"]

    def against(value, budget):
        if value is None:
            return "not measured"
        text = f"{value:,} bytes"
        return text + (f" (budget {budget:,})" if budget is not None else "")

    lines.append(f"  flash (model): {against(report['flash_bytes'], report['flash_budget_bytes'])}")
    lines.append(f"  tensor arena (measured): {against(report['arena_bytes'], report['arena_budget_bytes'])}")
    given = report["input"]
    outputs = ", ".join(f"{o['dtype']} {o['shape']}" for o in report.get("outputs") or [report["output"]])
    lines.append(
        f"  input {given['dtype']} {given['shape']}, output{'s' if ', ' in outputs else ''} {outputs}; "
        f"{report['operator_count']} operators"
    )
    lines.append(
        f"  ops to register ({report['num_resolver_ops']}): "
        + ", ".join(f"{op['op']} ({op['method']})" for op in report["ops_to_register"])
    )
    if report.get("detector"):
        lines.extend(format_detection_lines(report))
    agreement = report.get("agreement")
    if agreement:
        steps = agreement["max_difference_in_steps"]
        lines.append(
            f"  TFLM vs TFLite on {agreement['samples']} images: top-1 agreement {agreement['top1_agreement']:.3f} "
            f"(minimum {agreement['min_top1_agreement']:.2f}), max |diff| {agreement['max_abs_difference']:.4g}"
            + (f" ({steps:.1f} output steps)" if steps is not None else "")
            + f", mean |diff| {agreement['mean_abs_difference']:.4g}"
        )
    for note in report.get("notes", []):
        lines.append(f"  note: {note}")
    for problem in report["problems"]:
        lines.append(f"  PROBLEM: {problem}")
    for kind, path in (report.get("files") or {}).items():
        lines.append(f"  wrote {kind}: {path}")
    return "\n".join(lines)
