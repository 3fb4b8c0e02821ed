"""Detectors ending in TFLite's `TFLite_Detection_PostProcess`, as the
deployment targets check them: the op and its settings, model variants that
expose or isolate it, the detections a TFLite run gives, and how closely the
detections of two runs agree.

Such a detector (`quantization.detection_export.detection_flatbuffer`) has
four float32 outputs, in the op's order: boxes [1, D, 4] (ymin, xmin, ymax,
xmax, normalised), classes [1, D] (0-based, background removed), scores
[1, D] and the count [1]; only the first `count` rows are detections. Runs
over N images stack them: [N, D, 4], [N, D], [N, D], [N].
"""

import numpy as np
from flatbuffers import flexbuffers
from tensorflow.lite.python import schema_py_generated as schema

from quantization.audit import make_interpreter
from quantization.tflite_graph import DETECTION_POSTPROCESS
from quantization.tflite_graph import load_object_model
from quantization.tflite_graph import pack_object_model
from quantization.tflite_graph import read_graph

# Matching tolerances between two runtimes: box corners in normalised
# coordinates (2% of the image side), scores in probability (about 5 steps
# of the int8 softmax that feeds the op, whose step is 1/256).
BOX_TOLERANCE = 0.02
SCORE_TOLERANCE = 0.02


# ---------------------------------------------------------------- the op


def is_ssdlite(model):
    """Whether the Keras `model` is an SSDLite detector (float or QAT): its
    outputs are box_deltas and class_logits."""
    outputs = model.output
    return isinstance(outputs, dict) and set(outputs) == {"box_deltas", "class_logits"}


def detection_postprocess(graph):
    """The `TFLite_Detection_PostProcess` operator that ends `graph` (a
    `tflite_graph.Graph`; its outputs are the graph's), or None."""
    ops = [op for op in graph.operators if op.name == DETECTION_POSTPROCESS]
    if len(ops) == 1 and tuple(ops[0].outputs) == tuple(graph.outputs):
        return ops[0]
    return None


def is_detector(flatbuffer):
    """Whether the TFLite model ends in `TFLite_Detection_PostProcess`."""
    return detection_postprocess(read_graph(flatbuffer)) is not None


def postprocess_settings(flatbuffer, operator_index):
    """The op's attributes (max_detections, num_classes, nms_score_threshold,
    ...), read from its flexbuffer custom options."""
    model = schema.Model.GetRootAsModel(bytes(flatbuffer), 0)
    options = model.Subgraphs(0).Operators(operator_index).CustomOptionsAsNumpy()
    settings = flexbuffers.Loads(bytes(options))
    if "use_regular_nms" in settings:
        settings["use_regular_nms"] = bool(settings["use_regular_nms"])
    return settings


def micro_scratch_bytes(num_boxes, num_class_columns, num_classes, max_detections):
    """Bytes of scratch that TFLM's DetectionPostprocess kernel requests in
    its Prepare (tensorflow/lite/micro/kernels/detection_postprocess.cc):
    several buffers grow with max_detections x anchors, so at 3,232 anchors
    and 100 detections they take megabytes of arena."""
    n, d = num_boxes, max_detections
    return (
        n  # active candidates (uint8)
        + 4 * n * 4  # decoded boxes
        + 4 * n * num_class_columns  # scores
        + 4 * n * 3  # score buffer, kept scores, kept indices
        + 4 * d * n * 3  # scores after NMS, sorted values, sorted indices
        + 4 * max(num_classes, d) * n  # buffer
        + 4 * min(n, d) * n  # selected
    )


# ---------------------------------------------------------------- variants


def _edited(flatbuffer, edit):
    """`flatbuffer` after `edit(subgraph)` on its main subgraph. The
    signatures are dropped: they would name the old inputs and outputs."""
    model = load_object_model(flatbuffer)
    edit(model.subgraphs[0])
    model.signatureDefs = []
    return pack_object_model(model, len(flatbuffer) + 1024)


def _postprocess_op(flatbuffer):
    op = detection_postprocess(read_graph(flatbuffer))
    if op is None:
        raise ValueError("the model does not end in one TFLite_Detection_PostProcess op")
    return op


def with_anchor_outputs(flatbuffer):
    """The detector with two more outputs after its four: the op's runtime
    inputs, box encodings [1, A, 4] and class scores [1, A, C + 1] (float32),
    the per-anchor values before decoding and NMS. Same computation: only
    what is returned changes."""
    op = _postprocess_op(flatbuffer)

    def edit(subgraph):
        subgraph.outputs = list(subgraph.outputs) + list(op.inputs[:2])

    return _edited(flatbuffer, edit)


def postprocess_only(flatbuffer):
    """A model of the post-processing op alone: its inputs are the box
    encodings and class scores (float32), the anchors stay a constant, its
    outputs are the detector's four."""
    op = _postprocess_op(flatbuffer)
    # Only the op's own tensors stay: TFLM plans every tensor of the graph,
    # and the backbone's would inflate the arena of this one-op model.
    kept = list(dict.fromkeys(op.present_inputs + op.outputs))
    position = {index: new for new, index in enumerate(kept)}

    def edit(subgraph):
        operator = subgraph.operators[op.index]
        operator.inputs = [position[i] for i in operator.inputs]
        operator.outputs = [position[i] for i in operator.outputs]
        subgraph.operators = [operator]
        subgraph.tensors = [subgraph.tensors[i] for i in kept]
        subgraph.inputs = [position[i] for i in op.inputs[:2]]
        subgraph.outputs = [position[i] for i in op.outputs]

    return _edited(flatbuffer, edit)


def anchor_output_steps(flatbuffer):
    """The int8 step (scale) of the box encodings and of the class scores
    before the DEQUANTIZE that feeds each to the op; None for one computed
    in float."""
    graph = read_graph(flatbuffer)
    op = _postprocess_op(flatbuffer)
    producers = {index: producer for producer in graph.operators for index in producer.outputs}
    steps = []
    for index in op.inputs[:2]:
        producer = producers.get(index)
        source = graph.tensors[producer.inputs[0]] if producer is not None and producer.name == "DEQUANTIZE" else None
        quantization = source.quantization if source is not None else None
        steps.append(float(quantization.scale[0]) if quantization is not None else None)
    return steps


# ---------------------------------------------------------------- running


def _to_input(values, detail):
    """Float values -> the input tensor's dtype, with the rounding the TFLM
    worker uses, so that both runtimes see the same integers."""
    dtype = np.dtype(detail["dtype"])
    if dtype.kind == "f":
        return values.astype(dtype)
    scale, zero_point = detail["quantization"]
    info = np.iinfo(dtype)
    return np.clip(np.round(values / scale + zero_point), info.min, info.max).astype(dtype)


def run_tflite_detector(flatbuffer, images):
    """Every image through the TFLite interpreter (batch 1): one float32
    array [N, ...] per output, in the model's output order."""
    interpreter = make_interpreter(bytes(flatbuffer))
    (input_detail,) = interpreter.get_input_details()
    output_details = interpreter.get_output_details()
    outputs = [[] for _ in output_details]
    for image in np.asarray(images, np.float32):
        interpreter.set_tensor(input_detail["index"], _to_input(image[None], input_detail))
        interpreter.invoke()
        for collected, detail in zip(outputs, output_details):
            value = interpreter.get_tensor(detail["index"]).astype(np.float32)
            if np.dtype(detail["dtype"]).kind != "f" and detail["quantization"][0]:
                scale, zero_point = detail["quantization"]
                value = (value - zero_point) * scale
            collected.append(value)
    return [np.concatenate(collected) for collected in outputs]


# ---------------------------------------------------------------- agreement


def _image_detections(outputs, image):
    boxes, classes, scores, count = (np.asarray(output[image]) for output in outputs)
    count = int(np.reshape(count, -1)[0])
    return boxes[:count], classes[:count].astype(np.int64), scores[:count]


def _match_image(expected, actual, box_tolerance, score_tolerance):
    """Pairs (i, j) of matching detections, greedily in `expected`'s order
    (highest score first), each taking the nearest unmatched box of the
    same class within both tolerances."""
    boxes, classes, scores = expected
    other_boxes, other_classes, other_scores = actual
    free = np.ones(len(other_boxes), bool)
    pairs = []
    for i in range(len(boxes)):
        distance = np.abs(other_boxes - boxes[i]).max(-1) if len(other_boxes) else np.zeros(0)
        candidates = (
            free
            & (other_classes == classes[i])
            & (distance <= box_tolerance)
            & (np.abs(other_scores - scores[i]) <= score_tolerance)
        )
        if candidates.any():
            j = int(np.flatnonzero(candidates)[np.argmin(distance[candidates])])
            free[j] = False
            pairs.append((i, j))
    return pairs


def detection_agreement(expected, actual, box_tolerance=BOX_TOLERANCE, score_tolerance=SCORE_TOLERANCE):
    """How closely `actual` detections (e.g. TFLite Micro's) reproduce
    `expected` ones (the TFLite interpreter's) on the same images.

    Both are the detector's four outputs over N images. Two detections match
    when they have the same class, box corners within `box_tolerance` and
    scores within `score_tolerance`; each is matched at most once, whatever
    its position (runtimes may list near-equal scores in another order).

    Returns {images, expected_detections, actual_detections, matched,
    detection_agreement (matched / the sum over images of the larger count:
    1.0 only when every detection of either run has its match; 1.0 too when
    neither finds anything), count_agreement (share of images with equal
    counts), identical_images (share whose detections are equal value for
    value, in the same order), max_box_difference and max_score_difference
    over the matched pairs (None without any), box_tolerance,
    score_tolerance}.
    """
    images = len(expected[3])
    if len(actual[3]) != images:
        raise ValueError(f"detections of {images} and {len(actual[3])} images cannot be compared")
    matched = union = equal_counts = identical = 0
    expected_total = actual_total = 0
    box_differences, score_differences = [], []
    for image in range(images):
        ours, theirs = _image_detections(expected, image), _image_detections(actual, image)
        pairs = _match_image(ours, theirs, box_tolerance, score_tolerance)
        matched += len(pairs)
        union += max(len(ours[0]), len(theirs[0]))
        expected_total, actual_total = expected_total + len(ours[0]), actual_total + len(theirs[0])
        equal_counts += len(ours[0]) == len(theirs[0])
        identical += len(ours[0]) == len(theirs[0]) and all(np.array_equal(a, b) for a, b in zip(ours, theirs))
        box_differences += [float(np.abs(ours[0][i] - theirs[0][j]).max()) for i, j in pairs]
        score_differences += [float(abs(ours[2][i] - theirs[2][j])) for i, j in pairs]
    return {
        "images": images,
        "expected_detections": expected_total,
        "actual_detections": actual_total,
        "matched": matched,
        "detection_agreement": matched / union if union else 1.0,
        "count_agreement": equal_counts / images if images else 1.0,
        "identical_images": identical / images if images else 1.0,
        "max_box_difference": max(box_differences, default=None),
        "max_score_difference": max(score_differences, default=None),
        "box_tolerance": float(box_tolerance),
        "score_tolerance": float(score_tolerance),
    }


def anchor_agreement(expected, actual, steps):
    """The per-anchor values before NMS of two runs (box encodings
    [N, A, 4] and class scores [N, A, C + 1], float; see
    `with_anchor_outputs`): their largest and mean differences, in int8
    steps where `steps` (from `anchor_output_steps`) gives one, and the share
    of anchors whose best class (background included) is the same."""
    report = {}
    for name, ours, theirs, step in zip(("box_encodings", "class_scores"), expected, actual, steps):
        difference = np.abs(np.asarray(ours, np.float64) - np.asarray(theirs, np.float64))
        report[name] = {
            "max_abs_difference": float(difference.max()),
            "mean_abs_difference": float(difference.mean()),
            "quantization_step": step,
            "max_difference_in_steps": float(difference.max() / step) if step else None,
            "values_equal": float(np.mean(difference == 0)),
        }
    report["best_class_agreement"] = float(np.mean(expected[1].argmax(-1) == actual[1].argmax(-1)))
    report["anchors"] = int(expected[1].shape[1])
    return report
