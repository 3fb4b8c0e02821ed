"""Coral Edge TPU target: an int8 TFLite model whose every op maps to the
Edge TPU, with the mapping report (`edgetpu_ops`) and, when
`edgetpu_compiler` is on PATH, the compiled model and the compiler's log.
"""

import numpy as np

from quantization.audit import audit
from quantization.audit import format_report as format_audit
from quantization.targets.common import TargetError
from quantization.targets.common import check_io_type
from quantization.targets.common import check_name
from quantization.targets.common import quantized_for
from quantization.targets.common import staged
from quantization.targets.edgetpu_ops import check_edgetpu_io
from quantization.targets.edgetpu_ops import edgetpu_report
from quantization.targets.edgetpu_ops import format_edgetpu_report
from quantization.targets.edgetpu_ops import run_compiler
from quantization.tflite_export import check_images
from quantization.tflite_export import convert
from quantization.tflite_export import is_qat
from quantization.tflite_export import static_input_shape
from quantization.tflite_export import write_model

TARGET = "edgetpu"
# The Edge TPU rewrite only regroups exact int8 arithmetic: anything above
# float32 rounding means it changed the model.
_REWRITE_TOLERANCE = 1e-5


def export(
    model,
    output_dir,
    name=None,
    *,
    calibration_images=None,
    sample_images=None,
    io_type="int8",
    allow_cpu_fallback=False,
):
    """int8 TFLite for the Coral Edge TPU, with its mapping report.

    The MobileViTv2 blocks are rewritten in ops the Edge TPU maps (see
    `quantization.layers.GRAPHS`); the rewrite keeps every int8 value, which
    is checked on `sample_images` against the model as given. The report
    predicts the mapping from the documented op table; when
    `edgetpu_compiler` is on PATH it is also run, and its model and parsed
    log join the report (`report["compiler"]`).

    Args:
        model: A float Keras model (quantized here, on `calibration_images`)
            or a QAT model from `quantize_model`.
        output_dir: Folder for `<name>.edgetpu.int8.tflite` (and the
            compiler's `<name>.edgetpu.int8_edgetpu.tflite`) and
            `<name>.edgetpu.report.json`.
        name: File name stem (default: the model's name).
        calibration_images: About 100 typical float images; needed for a
            float model, unused for a QAT model.
        sample_images: Images to check the rewrite and the TFLite model on.
        io_type: "int8" (default) or "uint8".
        allow_cpu_fallback: Write the model even when some ops would run on
            the CPU.

    Raises:
        TargetError: an op would fall back to the CPU (unless
            `allow_cpu_fallback`), the interface is not batch 1 int8/uint8,
            the audit failed, or the rewritten model disagrees with the
            original. Nothing is written then.
    """
    io_type = check_io_type(TARGET, io_type)
    name = check_name(name, model)
    shape = static_input_shape(model, "The Edge TPU export")
    if sample_images is not None:
        sample_images = check_images(sample_images, shape, "sample_images")
    reference = model if is_qat(model) else None
    rewritten = quantized_for(model, "edgetpu", calibration_images)
    report = {"target": TARGET, "name": name, "io_type": io_type}
    if sample_images is not None:
        report["rewrite_check"] = _rewrite_check(reference, rewritten, sample_images)
    representative = sample_images[:4] if sample_images is not None else None
    flatbuffer = convert(rewritten, "qat_int8", io_type, representative_images=representative)
    report["audit"] = audit(flatbuffer, "qat_int8", rewritten, sample_images)
    problems = list(report["audit"]["errors"])
    check = report.get("rewrite_check")
    if check and check["max_abs_difference"] > _REWRITE_TOLERANCE:
        problems.append(f"the Edge TPU rewrite changed the outputs by up to {check['max_abs_difference']:.3g}")
    return export_flatbuffer(
        flatbuffer, output_dir, name, allow_cpu_fallback=allow_cpu_fallback, report=report, problems=problems
    )


def _rewrite_check(reference, rewritten, sample_images):
    """The rewrite must not change predictions: compared with the QAT model
    as given (for a float model: with its reference-graph quantization)."""
    if reference is None:
        from quantization.quantize import rewrite_graph

        reference = rewrite_graph(rewritten, "reference")
    expected = np.asarray(reference.predict_on_batch(sample_images))
    actual = np.asarray(rewritten.predict_on_batch(sample_images))
    return {
        "samples": int(len(sample_images)),
        "max_abs_difference": float(np.abs(expected - actual).max()),
        "top1_agreement": float(np.mean(expected.argmax(-1) == actual.argmax(-1))),
    }


def export_flatbuffer(flatbuffer, output_dir, name, *, allow_cpu_fallback=False, report=None, problems=()):
    """Checks an int8 TFLite flatbuffer against the Edge TPU and writes it
    with its report, then runs `edgetpu_compiler` when it is installed.
    Works on any int8 flatbuffer.

    Raises:
        TargetError: an op would fall back to the CPU (unless
            `allow_cpu_fallback`), the interface is not batch 1 int8/uint8,
            or `problems` is not empty; nothing is written then.
    """
    name = check_name(name, None)
    report = dict(report or {"target": TARGET, "name": name})
    report.update(edgetpu_report(flatbuffer))
    problems = list(problems) + check_edgetpu_io(flatbuffer)
    first = report["first_cpu_op"]
    if first is not None and not allow_cpu_fallback:
        problems.append(
            f"op #{first['index']} {first['op']} cannot run on the Edge TPU ({first['reason']}); it and the "
            f"{report['ops_total'] - report['ops_mapped'] - 1} ops after it would run on the CPU "
            f"({100 * (1 - report['mac_share_on_tpu']):.1f}% of the MACs). Pass allow_cpu_fallback=True "
            "(--allow_cpu_fallback) to export anyway"
        )
    report["problems"] = problems
    if problems:
        raise TargetError("The Edge TPU export does not fit: " + "; ".join(problems), report)
    with staged(output_dir, TARGET) as staging:
        path = staging.path(f"{name}.{TARGET}.int8.tflite")
        write_model(flatbuffer, path)
        report["files"] = {"tflite": path}
        report["compiler"] = run_compiler(path, staging.folder)
        if report["compiler"] is not None:
            report["files"]["compiled"] = report["compiler"]["output_model"]
        return staging.commit(report, name, TARGET)


def format_report(report):
    """The mapping table, the audit's summary and the files written."""
    lines = [format_audit(report["audit"])] if "audit" in report else []
    lines.append(format_edgetpu_report(report))
    check = report.get("rewrite_check")
    if check:
        lines.append(
            f"  rewrite check on {check['samples']} images: max |diff| {check['max_abs_difference']:.3g}, "
            f"top-1 agreement {check['top1_agreement']:.3f}"
        )
    lines.extend(f"  PROBLEM: {problem}" for problem in report.get("problems", []))
    lines.extend(f"  wrote {kind}: {path}" for kind, path in (report.get("files") or {}).items())
    return "\n".join(lines)
