"""Deployment targets: Edge TPU, TensorFlow Lite Micro, Android and ONNX.

Each `export_for_<target>` takes a float Keras model or a QAT model (from
`quantize_model`, trained or only calibrated), builds what the target runs,
checks it against the target's documented limits, and writes the model and a
JSON report only when everything fits. When something does not fit it raises
`TargetError`, whose `report` says what, and writes no model.
"""

import json
import os

import numpy as np

from quantization.audit import audit
from quantization.audit import format_report
from quantization.tflite_export import check_images
from quantization.tflite_export import convert
from quantization.tflite_export import is_qat
from quantization.tflite_export import static_input_shape
from quantization.tflite_export import write_model

TARGETS = ("edgetpu", "micro", "android", "onnx")
# The input/output types each target can give its model, default first.
TARGET_IO_TYPES = {
    "edgetpu": ("int8", "uint8"),  # the Edge TPU runs integer tensors only
    "micro": ("int8",),  # TFLM's int8 kernels; a float/uint8 interface adds ops it refuses
    "android": ("float32", "int8", "uint8"),  # of the int8 model; the float16 model is float32
    "onnx": ("float32",),  # the QDQ graph quantizes the float image itself
}


class TargetError(ValueError):
    """The model does not fit the target; `report` has the details."""

    def __init__(self, message, report):
        super().__init__(message)
        self.report = report


def check_io_type(target, io_type):
    """`io_type` for `target` (its default for None); ValueError listing what
    the target accepts, so that no requested type is silently dropped."""
    accepted = TARGET_IO_TYPES[target]
    if io_type is None:
        return accepted[0]
    if io_type not in accepted:
        whose = " (of its int8 model; the float16 model has float32)" if target == "android" else ""
        raise ValueError(
            f"The {target} target takes {' or '.join(accepted)} input and output"
            f"{' only' if len(accepted) == 1 else ''}{whose}; got io_type={io_type!r}."
        )
    return io_type


def _write_report(report, path):
    with open(path, "w") as f:
        json.dump(report, f, indent=2, default=str)


def _quantized_for(model, graph, calibration_images):
    """A QAT model in `graph`: rewritten when `model` is QAT already,
    otherwise quantized and calibrated (post-training quantization)."""
    from quantization.quantize import calibrate
    from quantization.quantize import quantize_model
    from quantization.quantize import rewrite_graph

    if is_qat(model):
        return rewrite_graph(model, graph)
    if calibration_images is None:
        raise ValueError("A float model needs calibration_images (about 100 typical inputs) to be quantized.")
    return calibrate(quantize_model(model, graph=graph), calibration_images)


def export_for_edgetpu(model, output_dir, name=None, calibration_images=None, sample_images=None,
                       io_type="int8", allow_cpu_fallback=False, verbose=True):
    """int8 TFLite for the Coral Edge TPU, with its mapping report.

    The MobileViTv2 blocks are rewritten in ops the Edge TPU maps (see
    `quantization.layers.GRAPHS`); the rewrite keeps every int8 value, which
    is checked on `sample_images` against the model as given. The report
    predicts the mapping from the documented op table; when
    `edgetpu_compiler` is on PATH it is also run, its `_edgetpu.tflite`
    written and its log parsed into `report["compiler"]`.

    Raises:
        TargetError: when an op would fall back to the CPU (unless
            `allow_cpu_fallback`), the batch is not 1, or the rewritten
            model disagrees with the original.
    """
    io_type = check_io_type("edgetpu", io_type)
    name = name or model.name
    shape = static_input_shape(model, "The Edge TPU export")
    if sample_images is not None:
        sample_images = check_images(sample_images, shape, "sample_images")
    reference = model if is_qat(model) else None
    rewritten = _quantized_for(model, "edgetpu", calibration_images)
    report = {"target": "edgetpu", "model": name, "io_type": io_type}
    if sample_images is not None:
        # The rewrite must not change predictions: compare with the QAT model
        # as given (for a float model: with its reference-graph quantization).
        if reference is None:
            from quantization.quantize import rewrite_graph

            reference = rewrite_graph(rewritten, "reference")
        expected = np.asarray(reference.predict_on_batch(sample_images))
        actual = np.asarray(rewritten.predict_on_batch(sample_images))
        report["rewrite_check"] = {
            "samples": int(len(sample_images)),
            "max_abs_difference": float(np.abs(expected - actual).max()),
            "top1_agreement": float(np.mean(expected.argmax(-1) == actual.argmax(-1))),
        }
    flatbuffer = convert(rewritten, "qat_int8", io_type, representative_images=sample_images[:4]
                         if sample_images is not None else None)
    report["audit"] = audit(flatbuffer, "qat_int8", rewritten, sample_images)
    problems = list(report["audit"]["errors"])
    check = report.get("rewrite_check")
    if check and check["max_abs_difference"] > 1e-5:
        problems.append(f"the Edge TPU rewrite changed the outputs by up to {check['max_abs_difference']:.3g}")
    if verbose:
        print(format_report(report["audit"]))
    return write_edgetpu_model(flatbuffer, output_dir, name, allow_cpu_fallback, report, problems, verbose)


def write_edgetpu_model(flatbuffer, output_dir, name, allow_cpu_fallback=False, report=None, problems=(),
                        verbose=True):
    """Checks an int8 TFLite model against the Edge TPU and writes it with its
    report (`<name>_edgetpu_int8.tflite`, `.edgetpu_report.json`), then runs
    `edgetpu_compiler` when it is installed. Works on any int8 flatbuffer.

    Raises:
        TargetError: when an op would fall back to the CPU (unless
            `allow_cpu_fallback`), the batch is not 1, or `problems` is not
            empty; nothing is written then.
    """
    from quantization import edgetpu

    report = dict(report or {"target": "edgetpu", "model": name})
    mapping = edgetpu.edgetpu_report(flatbuffer)
    report.update(mapping)
    problems = list(problems) + edgetpu.check_edgetpu_io(flatbuffer)
    if mapping["first_cpu_op"] is not None and not allow_cpu_fallback:
        first = mapping["first_cpu_op"]
        problems.append(
            f"op #{first['index']} {first['op']} cannot run on the Edge TPU ({first['reason']}); it and the "
            f"{mapping['ops_total'] - mapping['ops_mapped'] - 1} ops after it would run on the CPU "
            f"({100 * (1 - mapping['mac_share_on_tpu']):.1f}% of the MACs). Pass allow_cpu_fallback=True "
            "(--allow_cpu_fallback) to export anyway"
        )
    report["problems"] = problems
    if verbose:
        print(edgetpu.format_edgetpu_report(report))
    if problems:
        raise TargetError("The Edge TPU export does not fit: " + "; ".join(problems), report)
    path = os.path.join(output_dir, f"{name}_edgetpu_int8.tflite")
    write_model(flatbuffer, path)
    report["path"] = path
    report["compiler"] = edgetpu.run_compiler(path, output_dir)
    if report["compiler"] is not None and verbose:
        print(edgetpu.format_edgetpu_report(report))
    _write_report(report, path[: -len(".tflite")] + ".edgetpu_report.json")
    return report


def export_for_micro(model, output_dir, name=None, calibration_images=None, sample_images=None,
                     arena_budget_bytes=None, flash_budget_bytes=None, io_type="int8"):
    """int8 TFLite (int8 I/O) for TensorFlow Lite Micro, run in the real TFLM
    interpreter, with a C++ source of the model array and its op resolver.

    `sample_images` (else `calibration_images`) are run in TFLM and in the
    TFLite interpreter, which must agree: one of the two is needed, and
    `calibration_images` too for a float model (post-training quantization).
    See `quantization.micro.export_micro`; raises its `MicroTargetError`
    (with the report) when the model does not fit the budgets or TFLM.
    """
    from quantization.micro import export_micro

    io_type = check_io_type("micro", io_type)
    name = name or model.name
    shape = static_input_shape(model, "The TFLite Micro export")
    if sample_images is None and calibration_images is None:
        raise ValueError(
            "export_for_micro needs sample_images (or calibration_images): the model is run on them in TFLite "
            "Micro and in the TFLite interpreter, and is written only when the two agree."
        )
    samples = check_images(sample_images if sample_images is not None else calibration_images, shape,
                           "sample_images" if sample_images is not None else "calibration_images")
    quantized = _quantized_for(model, "reference", calibration_images)
    flatbuffer = convert(quantized, "qat_int8", "int8", representative_images=samples[:4])
    return export_micro(flatbuffer, output_dir, name, samples, arena_budget_bytes=arena_budget_bytes,
                        flash_budget_bytes=flash_budget_bytes)


def export_for_android(float_model, output_dir, name=None, representative_images=None, sample_images=None,
                       qat_model=None, int8_io_type="float32", allow_cpu_fallback=False):
    """float16 and int8 TFLite for Android with the GPU-delegate compatibility
    report and XNNPACK latency; see `quantization.android.export_android`.
    `int8_io_type` is the int8 model's input/output type (float32, int8 or
    uint8); the float16 model always has float32 I/O. Raises TargetError,
    writing nothing, when the float16 model has ops the GPU delegate cannot
    run, unless `allow_cpu_fallback`."""
    from quantization.android import GpuFallbackError
    from quantization.android import export_android

    int8_io_type = check_io_type("android", int8_io_type)
    static_input_shape(float_model, "The Android export")
    try:
        return export_android(float_model, output_dir, name or float_model.name, representative_images,
                              sample_images=sample_images, qat_model=qat_model, int8_io_type=int8_io_type,
                              allow_cpu_fallback=allow_cpu_fallback)
    except GpuFallbackError as error:  # the same error type as the other targets' refusals
        raise TargetError(str(error), error.report) from error


def export_for_onnx(model, output_dir, name=None, sample_images=None, io_type="float32"):
    """ONNX (QDQ for a QAT model) checked against onnxruntime; see
    `quantization.onnx_export.export_onnx`. The file takes and returns
    float32: a QDQ graph quantizes the float image itself."""
    from quantization.onnx_export import export_onnx

    io_type = check_io_type("onnx", io_type)
    static_input_shape(model, "The ONNX export")
    suffix = "qat" if is_qat(model) else "float"
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, f"{name or model.name}_{suffix}.onnx")
    report = export_onnx(model, path, sample_images=sample_images)
    _write_report(report, path[: -len(".onnx")] + ".onnx_report.json")
    return report
