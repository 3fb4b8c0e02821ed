"""The Android target's detector models: an SSDLite written with TFLite's
`TFLite_Detection_PostProcess` at the end (the four outputs Android's Task
library `ObjectDetector` reads), in the target's two variants, and the
report lines that say where the post-processing runs.

The GPU delegate has no kernel for that op, so a detector cannot be whole on
the GPU: the delegate takes everything before it, and the op runs on the CPU
after one GPU-to-CPU hand-over (`android_gpu.gpu_delegate_compatibility`'s
`detection_postprocess`). That tail is the design, not a fallback.
"""

import json
import os

from quantization.detection_export import PostProcess
from quantization.detection_export import audit_detector
from quantization.detection_export import detection_flatbuffer
from quantization.targets.detections import detection_agreement
from quantization.targets.detections import run_tflite_detector
from quantization.tflite_export import write_model


def write_detector(model, path, mode, io_type, anchors, postprocess, calibration_images):
    """Converts the SSDLite `model` in `mode` ("float16", "ptq_int8" or
    "qat_int8") with the post-processing op, writes it to `path` and its
    audit (`audit_detector`) beside it as `.audit.json`; returns the audit.
    ValueError when the audit finds an error (e.g. float tensors before the
    op of an int8 model)."""
    # Imported here: keras_mobilevitv2.detection is only needed for its anchors.
    from keras_mobilevitv2.detection import model_anchors

    if anchors is None:
        anchors = model_anchors(model)
    settings = postprocess if postprocess is not None else PostProcess()
    representative = calibration_images if mode != "float16" else None
    input_type = io_type if mode != "float16" else "float32"
    flatbuffer = detection_flatbuffer(model, mode, anchors, representative, settings=settings, input_type=input_type)
    audit = audit_detector(flatbuffer, mode)
    if audit["errors"]:
        raise ValueError(f"The {mode} detector failed its audit: " + "; ".join(audit["errors"]))
    write_model(flatbuffer, path)
    with open(path[: -len(".tflite")] + ".audit.json", "w") as f:
        json.dump(audit, f, indent=2, default=str)
    return audit


def int8_against_float16(models, sample_images):
    """The int8 detector's detections against the float16 one's on
    `sample_images` (`detections.detection_agreement`), or None without
    images: how much the int8 quantization changes what an app shows."""
    if sample_images is None:
        return None
    paths = {model["variant"]: model["path"] for model in models}
    outputs = {}
    for variant in ("float16", "int8"):
        with open(paths[variant], "rb") as f:
            outputs[variant] = run_tflite_detector(f.read(), sample_images)
    return {"reference": "float16", **detection_agreement(outputs["float16"], outputs["int8"])}


def postprocess_line(model):
    """One report line on where a detector's post-processing runs, or None
    for a model without the op."""
    gpu = model["gpu"]
    placement = gpu.get("detection_postprocess")
    if placement is None:
        return None
    where = "on the GPU" if placement["on_gpu"] else "on the CPU"
    boundaries = len(gpu["partitions"]) - 1
    layout = " -> ".join("GPU" if p["on_gpu"] else "CPU" for p in gpu["partitions"])
    tail = "the CPU tail after one GPU partition" if placement["cpu_tail"] else f"partitions {layout}"
    return (
        f"- {os.path.basename(model['path'])}: {gpu['supported_ops']} of {gpu['total_ops']} ops on the GPU; "
        f"TFLite_Detection_PostProcess (op #{placement['index']}) runs {where}, {tail} "
        f"({boundaries} partition boundar{'y' if boundaries == 1 else 'ies'})"
    )


def agreement_line(model):
    """The int8 detector's agreement with the float16 one, as a report line,
    or None (no agreement measured, or not a detector)."""
    agreement = model.get("agreement")
    if not agreement or agreement.get("reference") != "float16":
        return None
    return (
        f"- {os.path.basename(model['path'])} vs the float16 model on {agreement['images']} images: "
        f"{agreement['detection_agreement']:.1%} of the detections matched ({agreement['matched']} matched; same "
        f"class, box within {agreement['box_tolerance']:g}, score within {agreement['score_tolerance']:g}), counts "
        f"equal on {agreement['count_agreement']:.0%} of the images"
    )
