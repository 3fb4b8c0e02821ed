"""The TensorFlow Lite Micro target's runs of a detector: a model that is
int8 up to TFLite's `TFLite_Detection_PostProcess` (decoding and NMS in
float32), which TFLM runs with its DetectionPostprocess kernel.

`run_and_compare_detections` measures the arena and runs the detector in
TFLM and in the TFLite interpreter on the same images, then compares at
three depths, so that a disagreement says where it comes from:

  detections       what an application reads (boxes, classes, scores, count),
                   matched as sets (`detections.detection_agreement`);
  per-anchor       the box encodings and class scores the op reads, in int8
                   steps: how far TFLM's int8 kernels drift from TFLite's;
  post-processing  the op alone in TFLM, fed TFLite's per-anchor values: TFLM's
                   kernel must then give TFLite's detections exactly.
"""

from quantization.targets.detections import anchor_agreement
from quantization.targets.detections import anchor_output_steps
from quantization.targets.detections import detection_agreement
from quantization.targets.detections import detection_postprocess
from quantization.targets.detections import micro_scratch_bytes
from quantization.targets.detections import postprocess_only
from quantization.targets.detections import postprocess_settings
from quantization.targets.detections import run_tflite_detector
from quantization.targets.detections import with_anchor_outputs
from quantization.targets.micro_runtime import MicroRuntimeError
from quantization.targets.micro_runtime import measure_arena
from quantization.targets.micro_runtime import run_micro_outputs
from quantization.tflite_graph import read_graph

# What TFLM prints when its op resolver lacks a custom op (micro_allocator.cc).
_MISSING_CUSTOM_OP = "Failed to get registration from op code CUSTOM"
# On the same inputs the two kernels differ only in rounding: TFLM decodes
# the boxes in double, TFLite in float; scores are copied, not computed.
_KERNEL_BOX_TOLERANCE = 1e-5
_KERNEL_SCORE_TOLERANCE = 1e-6


def detector_summary(flatbuffer):
    """The detector's side of the report: anchors, classes, the op's
    settings and the scratch TFLM's kernel requests for them."""
    graph = read_graph(flatbuffer)
    op = detection_postprocess(graph)
    settings = postprocess_settings(flatbuffer, op.index)
    anchors, columns = graph.tensors[op.inputs[1]].shape[1:]
    return {
        "anchors": int(anchors),
        "classes": int(settings["num_classes"]),
        "postprocess": settings,
        "postprocess_scratch_bytes": micro_scratch_bytes(
            int(anchors), int(columns), int(settings["num_classes"]), int(settings["max_detections"])
        ),
        "postprocess_arena_bytes": None,
        "python_resolver_registers_postprocess": None,
    }


def _failure(what, error, detector):
    """The problem sentence for a failed TFLM run; notes a resolver without the op."""
    if _MISSING_CUSTOM_OP in (error.stderr_tail or ""):
        detector["python_resolver_registers_postprocess"] = False
        return (
            f"{what}: the tflite_micro Python interpreter's op resolver (PythonOpsResolver) does not register "
            "TFLite_Detection_PostProcess, so TFLM cannot run the detector in this environment; firmware "
            f"registers it with MicroMutableOpResolver::AddDetectionPostprocess(). TFLM said: {error}"
        )
    return f"{what}: {error}"


def run_and_compare_detections(flatbuffer, images, report, limits, timeout):
    """Fills `report` (from `micro.export_flatbuffer`) for a detector:
    arena_bytes, detector, detections, anchor_agreement and
    postprocess_kernel; every failure and shortfall goes to its problems.

    `limits`: {min_detection_agreement, box_tolerance, score_tolerance}."""
    problems, detector = report["problems"], report["detector"]
    try:
        report["arena_bytes"] = measure_arena(flatbuffer, timeout=timeout)
    except MicroRuntimeError as error:
        problems.append(_failure("TFLite Micro could not allocate the detector", error, detector))
        return
    exposed = with_anchor_outputs(flatbuffer)
    try:
        micro, _ = run_micro_outputs(exposed, [images], timeout=timeout)
    except MicroRuntimeError as error:
        problems.append(_failure("TFLite Micro could not run the detector", error, detector))
        return
    detector["python_resolver_registers_postprocess"] = True  # it ran the op
    try:
        tflite = run_tflite_detector(exposed, images)
    except (RuntimeError, ValueError) as error:
        problems.append(f"the TFLite interpreter could not run the detector: {error}")
        return
    agreement = detection_agreement(tflite[:4], micro[:4], limits["box_tolerance"], limits["score_tolerance"])
    agreement["min_detection_agreement"] = float(limits["min_detection_agreement"])
    report["detections"] = agreement
    report["anchor_agreement"] = anchor_agreement(tflite[4:], micro[4:], anchor_output_steps(flatbuffer))
    report["postprocess_kernel"] = _kernel_check(flatbuffer, tflite, detector, problems, timeout)
    if agreement["detection_agreement"] < limits["min_detection_agreement"]:
        problems.append(_shortfall(agreement, report["anchor_agreement"], report["postprocess_kernel"]))


def _kernel_check(flatbuffer, tflite, detector, problems, timeout):
    """The post-processing op alone in TFLM, on TFLite's per-anchor values:
    its detections against TFLite's (identical up to float rounding), and
    the arena the op needs by itself (mostly its scratch)."""
    try:
        outputs, detector["postprocess_arena_bytes"] = run_micro_outputs(
            postprocess_only(flatbuffer), tflite[4:], timeout=timeout
        )
    except MicroRuntimeError as error:
        problems.append(_failure("TFLite Micro could not run the post-processing op alone", error, detector))
        return None
    check = detection_agreement(tflite[:4], outputs, _KERNEL_BOX_TOLERANCE, _KERNEL_SCORE_TOLERANCE)
    if check["detection_agreement"] < 1.0 or check["count_agreement"] < 1.0:
        problems.append(
            "TFLM's DetectionPostprocess kernel and TFLite's give different detections from the same per-anchor "
            f"values: {check['matched']} of {max(check['expected_detections'], check['actual_detections'])} "
            f"match, counts equal on {check['count_agreement']:.0%} of {check['images']} images"
        )
    return check


def _shortfall(agreement, anchors, kernel):
    """The problem sentence for too few matched detections, with where the
    difference comes from."""
    scores = anchors["class_scores"]
    steps = scores["max_difference_in_steps"]
    drift = f"{steps:.0f} int8 steps" if steps is not None else f"{scores['max_abs_difference']:.3g}"
    same = "gives TFLite's detections exactly" if kernel and kernel["identical_images"] == 1.0 else "differs too"
    return (
        f"TFLite Micro and the TFLite interpreter agree on only {agreement['detection_agreement']:.1%} of the "
        f"detections ({agreement['matched']} matched; same class, box within {agreement['box_tolerance']:g}, "
        f"score within {agreement['score_tolerance']:g}) on {agreement['images']} sample images; the minimum is "
        f"{agreement['min_detection_agreement']:.1%}. On the same per-anchor values the post-processing {same}; "
        f"before it, the class scores differ by up to {drift} and the best class of "
        f"{anchors['best_class_agreement']:.1%} of the anchors agrees"
    )


def format_detection_lines(report):
    """The detector's lines of `micro.format_report`."""
    detector = report["detector"]
    settings = detector["postprocess"]
    nms = "class-wise NMS" if settings.get("use_regular_nms") else "fast NMS"
    alone = detector["postprocess_arena_bytes"]
    lines = [
        f"  detector: {detector['anchors']:,} anchors, {detector['classes']} classes; TFLite_Detection_PostProcess "
        f"(max {settings['max_detections']} detections, score >= {settings['nms_score_threshold']:.3g}, IoU "
        f"{settings['nms_iou_threshold']:.3g}, {nms}) needs {detector['postprocess_scratch_bytes']:,} bytes of "
        f"scratch (grows with max detections x anchors)"
        + (f", {alone:,} bytes of arena on its own" if alone is not None else "")
    ]
    agreement = report.get("detections")
    if agreement:
        lines.append(
            f"  TFLM vs TFLite on {agreement['images']} images: {agreement['detection_agreement']:.1%} of the "
            f"detections matched (minimum {agreement['min_detection_agreement']:.0%}; {agreement['matched']} "
            f"matched, TFLite found {agreement['expected_detections']}, TFLM {agreement['actual_detections']}), "
            f"counts equal on {agreement['count_agreement']:.0%} of the images, identical on "
            f"{agreement['identical_images']:.0%}"
        )
    kernel = report.get("postprocess_kernel")
    if kernel:
        lines.append(
            f"  post-processing alone, on TFLite's per-anchor values: identical detections on "
            f"{kernel['identical_images']:.0%} of the images (TFLM's DetectionPostprocess vs TFLite's)"
        )
    anchors = report.get("anchor_agreement")
    if anchors:
        boxes, scores = anchors["box_encodings"], anchors["class_scores"]
        lines.append(
            f"  before NMS ({anchors['anchors']:,} anchors): box encodings differ by up to "
            f"{_in_steps(boxes)}, class scores by up to {_in_steps(scores)}; best class agrees on "
            f"{anchors['best_class_agreement']:.1%} of the anchors"
        )
    return lines


def _in_steps(comparison):
    steps = comparison["max_difference_in_steps"]
    return f"{steps:.0f} int8 steps" if steps is not None else f"{comparison['max_abs_difference']:.3g}"
