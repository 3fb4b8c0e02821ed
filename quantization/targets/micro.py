"""TensorFlow Lite Micro target: an int8 `.tflite` that the TFLM interpreter
can run on a microcontroller, with its C++ source.

`export` quantizes a Keras model (or converts a QAT model) and hands the
flatbuffer to `export_flatbuffer`, which checks it against what TFLM accepts
(`micro_checks`), runs it in the real TFLM interpreter and in the TFLite
interpreter on sample images (`micro_runtime`), checks the arena and flash
budgets, and writes the model, its C++ source (`micro_source`) and the report
only when everything fits.
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
from quantization.targets.micro_checks import check_micro_compatibility
from quantization.targets.micro_runtime import MicroRuntimeError
from quantization.targets.micro_runtime import run_micro
from quantization.targets.micro_source import write_c_source
from quantization.tflite_export import check_images
from quantization.tflite_export import convert
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
):
    """int8 TFLite (int8 I/O) for TensorFlow Lite Micro, run in the real TFLM
    interpreter, with a C++ source of the model array and its op resolver.

    Args:
        model: A float Keras model (quantized here after training, on
            `calibration_images`) or a QAT model from `quantize_model`.
        output_dir: Folder for `<name>.micro.int8.tflite`, `<name>.micro.h`,
            `<name>.micro.cc` and `<name>.micro.report.json`.
        name: File name stem (default: the model's name).
        calibration_images: About 100 typical float images; needed for a
            float model, unused for a QAT model (its ranges are trained).
        sample_images: Images run in TFLM and in the TFLite interpreter, which
            must agree (default: `calibration_images`).
        io_type: "int8" only (a float or uint8 interface adds ops TFLM refuses).
        arena_budget_bytes, flash_budget_bytes, min_top1_agreement,
        array_name, timeout: see `export_flatbuffer`.

    Returns:
        The report (also written as `<name>.micro.report.json`).

    Raises:
        TargetError: the model does not fit TFLM or the budgets; nothing is
            written.
        ValueError: bad arguments (images of the wrong shape, ...).
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
    )


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
):
    """Checks, runs and writes an int8 TFLite flatbuffer for TensorFlow Lite Micro.

    Runs the compatibility check, then the model in TFLM (subprocess) and in
    the TFLite interpreter on `sample_images`, compares them, measures the
    arena and checks the budgets. When everything fits it writes, in
    `output_dir`: `<name>.micro.int8.tflite`, `<name>.micro.h` /
    `<name>.micro.cc` (see `write_c_source`) and `<name>.micro.report.json`.

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
    io = report["input"], report["output"]
    lines.append(
        f"  input {io[0]['dtype']} {io[0]['shape']}, output {io[1]['dtype']} {io[1]['shape']}; "
        f"{report['operator_count']} operators"
    )
    lines.append(
        f"  ops to register ({report['num_resolver_ops']}): "
        + ", ".join(f"{op['op']} ({op['method']})" for op in report["ops_to_register"])
    )
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
