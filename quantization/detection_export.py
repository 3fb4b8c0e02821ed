"""TFLite detectors ending in TFLite's own `TFLite_Detection_PostProcess`.

That custom op (box decoding, score threshold, non-maximum suppression) is
what Android's Task library, Coral's pycoral and TFLite Micro's
DetectionPostprocess kernel expect: outputs boxes [1, D, 4] (ymin, xmin,
ymax, xmax, normalised), classes [1, D] (0-based, background removed),
scores [1, D] and the count [1]. The converter emits it for a function
marked `experimental_implements="TFLite_Detection_PostProcess"` (the TF
Object Detection API's route); everything before it stays as quantized as
the model is.
"""

import dataclasses
import tempfile

import keras
import numpy as np
import tensorflow as tf

from keras_mobilevitv2.layers.folding import fold_norm_affines
from quantization.tflite_export import check_images
from quantization.tflite_export import is_qat
from quantization.tflite_export import static_input_shape
from quantization.tflite_graph import DETECTION_POSTPROCESS
from quantization.tflite_graph import load_object_model
from quantization.tflite_graph import pack_object_model
from quantization.tflite_graph import postprocessing_ops
from quantization.tflite_graph import read_graph

__all__ = ["POSTPROCESS_OP", "PostProcess", "detection_flatbuffer"]

POSTPROCESS_OP = DETECTION_POSTPROCESS.split(":", 1)[1]
DETECTION_MODES = ("float32", "float16", "ptq_int8", "qat_int8")
INPUT_TYPES = {"int8": tf.int8, "uint8": tf.uint8, "float32": tf.float32}
OUTPUT_NAMES = ("detection_boxes", "detection_classes", "detection_scores", "num_detections")


@dataclasses.dataclass(frozen=True)
class PostProcess:
    """The op's settings. ml-cvnets evaluates with score threshold 0.01, IoU
    0.5 and 200 detections after class-wise NMS (`regular_nms=True`); the
    fast default (one NMS over each box's best class) is what phones and
    the Edge TPU examples use."""

    max_detections: int = 100
    score_threshold: float = 0.01
    iou_threshold: float = 0.5
    regular_nms: bool = False
    # 1 / the box-coding variances (ml-cvnets: centre 0.1, size 0.2).
    center_scale: float = 10.0
    size_scale: float = 5.0

    def implements(self, num_classes):
        """The `experimental_implements` value: the op name and its attributes."""
        ints = {"max_detections": self.max_detections, "max_classes_per_detection": 1, "num_classes": num_classes}
        floats = {
            "nms_score_threshold": self.score_threshold,
            "nms_iou_threshold": self.iou_threshold,
            "y_scale": self.center_scale,
            "x_scale": self.center_scale,
            "h_scale": self.size_scale,
            "w_scale": self.size_scale,
        }
        attributes = [f'attr {{ key: "{k}" value {{ i: {v} }} }}' for k, v in ints.items()]
        attributes += [f'attr {{ key: "{k}" value {{ f: {v} }} }}' for k, v in floats.items()]
        attributes.append(f'attr {{ key: "use_regular_nms" value {{ b: {str(self.regular_nms).lower()} }} }}')
        return f'name: "{POSTPROCESS_OP}" ' + " ".join(attributes)


def _postprocess_function(settings, num_classes, max_detections):
    @tf.function(experimental_implements=settings.implements(num_classes))
    def postprocess(box_encodings, class_scores, anchors):
        # A placeholder body: the converter replaces the whole function with
        # the op. The shapes are the op's outputs.
        del class_scores, anchors
        zeros = tf.zeros([1, max_detections], tf.float32) + tf.reduce_sum(box_encodings) * 0.0
        return tf.stack([zeros] * 4, -1), zeros, zeros, tf.reduce_sum(zeros, 1)

    return postprocess


def _with_yx_box_order(model):
    """A copy of the SSDLite (float or QAT) whose heads output the box
    offsets as the op reads them, (ty, tx, th, tw) instead of ml-cvnets'
    (tx, ty, tw, th): the heads' output channels are permuted, so the
    graph needs no reordering op between the Edge TPU and the CPU."""
    copy = keras.Model.from_config(model.get_config())
    copy.set_weights(model.get_weights())
    columns = int(model.output["class_logits"].shape[-1]) + 4
    for layer in copy.layers:
        if not (layer.name.startswith("head") and layer.name.endswith("_conv")):
            continue
        order = np.arange(layer.bias.shape[0]).reshape(-1, columns)  # [anchors, 4 + C]
        order[:, :4] = order[:, [1, 0, 3, 2]]
        order = order.reshape(-1)
        layer.kernel.assign(np.asarray(layer.kernel)[..., order])
        layer.bias.assign(np.asarray(layer.bias)[order])
    return copy


def _serving_function(model, anchors, settings):
    """images -> the op's four outputs: box encodings (`model` from
    `_with_yx_box_order`), class probabilities (softmax, background in
    column 0)."""
    num_classes = int(model.output["class_logits"].shape[-1]) - 1
    anchors_yxhw = tf.constant(np.asarray(anchors, np.float32)[:, [1, 0, 3, 2]])  # (cx, cy, w, h) -> (cy, cx, h, w)
    postprocess = _postprocess_function(settings, num_classes, settings.max_detections)

    def serve(images):
        outputs = model(images, training=False)
        encodings = outputs["box_deltas"]  # [1, N, 4]: (ty, tx, th, tw)
        scores = tf.nn.softmax(outputs["class_logits"], axis=-1)  # [1, N, C + 1]
        return dict(zip(OUTPUT_NAMES, postprocess(encodings, scores, anchors_yxhw)))

    return serve


def _check(model, mode, anchors, representative_images, input_type):
    if mode not in DETECTION_MODES:
        raise ValueError(f"Unknown mode {mode!r} for a detector; choose one of {DETECTION_MODES}.")
    if input_type not in INPUT_TYPES:
        raise ValueError(f"Unknown input_type {input_type!r}; choose one of {tuple(INPUT_TYPES)}.")
    if mode in ("float32", "float16") and input_type != "float32":
        raise ValueError(f"mode={mode!r} has a float32 input; input_type={input_type!r} needs an int8 mode.")
    if not isinstance(model.output, dict) or set(model.output) != {"box_deltas", "class_logits"}:
        raise ValueError("detection_flatbuffer takes an SSDLite model (outputs box_deltas and class_logits).")
    if len(anchors) != model.output["box_deltas"].shape[1]:
        raise ValueError(
            f"{len(anchors)} anchors for a model with {model.output['box_deltas'].shape[1]} boxes: use "
            "keras_mobilevitv2.detection.model_anchors(model)."
        )
    if (mode == "qat_int8") != is_qat(model):
        raise ValueError("mode 'qat_int8' takes a calibrated QAT model, the other modes the float model.")
    if mode == "ptq_int8" and representative_images is None:
        raise ValueError("mode='ptq_int8' needs representative_images (about 100 typical inputs).")


def detection_flatbuffer(model, mode, anchors, representative_images=None, settings=PostProcess(), input_type=None):
    """The TFLite model (bytes) of an SSDLite `model` (float, or a QAT model
    from `quantize_model` for "qat_int8") with `TFLite_Detection_PostProcess`
    at the end. The op's outputs are float32 in every mode.

    `input_type`: the image input of an int8 mode, "int8" (default),
    "uint8" or "float32" (quantized by a first QUANTIZE op); float32 in the
    float modes ("float16" stores the weights as float16 and computes in
    float32 on the CPU, as the Android GPU delegate's native format)."""
    if input_type is None:
        input_type = "float32" if mode in ("float32", "float16") else "int8"
    _check(model, mode, anchors, representative_images, input_type)
    shape = static_input_shape(model, "The detection export")
    exported = _with_yx_box_order(model)
    serve = _serving_function(exported, anchors, settings)
    with tempfile.TemporaryDirectory() as saved_model:
        with fold_norm_affines():
            archive = keras.export.ExportArchive()
            archive.track(exported)
            signature = [tf.TensorSpec((1,) + shape, tf.float32, name="image")]
            archive.add_endpoint("serve", serve, input_signature=signature)
            archive.write_out(saved_model, verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(saved_model)
        converter.allow_custom_ops = True
        if mode != "float32":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if mode == "float16":
            converter.target_spec.supported_types = [tf.float16]
        elif mode != "float32":
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            converter.inference_input_type = INPUT_TYPES[input_type]
            if representative_images is not None:
                images = check_images(representative_images, shape, "representative_images")
                converter.representative_dataset = lambda: ([image[None]] for image in images)
        return _postprocessing_last(converter.convert())


def _postprocessing_last(flatbuffer):
    """The graph with the post-processing (the op, its DEQUANTIZE inputs, the
    score softmax) as its last ops, and its outputs in the op's order
    (boxes, classes, scores, count).

    The converter may interleave the score softmax with the box branch; the
    Edge TPU compiler ends its segment at the first op it cannot run, so the
    CPU ops must come last. Moving ops that feed only later tail ops keeps a
    valid execution order. The Task library and pycoral read the outputs by
    position, and the converter orders a SavedModel's outputs its own way.
    """
    graph = read_graph(flatbuffer)
    (op,) = [op for op in graph.operators if op.name == DETECTION_POSTPROCESS]
    tail = postprocessing_ops(graph)
    model = load_object_model(flatbuffer)
    subgraph = model.subgraphs[0]
    if sorted(subgraph.outputs) != sorted(op.outputs):
        raise ValueError(f"The converted detector's outputs are not the outputs of {POSTPROCESS_OP}.")
    operators = list(subgraph.operators)
    subgraph.operators = [o for i, o in enumerate(operators) if i not in tail] + [operators[i] for i in sorted(tail)]
    subgraph.outputs = list(op.outputs)
    for signature in model.signatureDefs or []:
        signature.outputs.sort(key=lambda entry: list(op.outputs).index(entry.tensorIndex))
    return pack_object_model(model, len(flatbuffer) + 1024)


def audit_detector(flatbuffer, mode):
    """The structure of a detector from `detection_flatbuffer`: its ops, the
    post-processing op, and the float tensors other than that op's own
    inputs and outputs (none in an int8 detector); `errors` lists what is
    wrong for `mode`."""
    graph = read_graph(flatbuffer)
    postprocess = [op for op in graph.operators if op.name == DETECTION_POSTPROCESS]
    boundary = set(graph.inputs) | set(graph.outputs)
    for op in postprocess:
        boundary |= set(op.present_inputs) | set(op.outputs)
    floats = [t.name for t in graph.tensors if t.dtype in ("FLOAT32", "FLOAT16") and t.index not in boundary]
    report = {
        "mode": mode,
        "size_bytes": len(flatbuffer),
        "ops": sorted({op.name for op in graph.operators}),
        "op_count": len(graph.operators),
        "postprocess_ops": len(postprocess),
        "float_tensors_inside": floats,
        "max_tensor_rank": max(t.rank for t in graph.tensors),
        "input": {"dtype": graph.tensors[graph.inputs[0]].dtype, "shape": list(graph.tensors[graph.inputs[0]].shape)},
        "outputs": [list(graph.tensors[i].shape) for i in graph.outputs],
        "errors": [],
    }
    others = sorted({op.name for op in graph.operators if op.name.startswith("CUSTOM")} - {DETECTION_POSTPROCESS})
    if len(postprocess) != 1 or postprocess[0].outputs != tuple(graph.outputs):
        report["errors"].append(f"the model does not end in one {POSTPROCESS_OP} whose outputs are the model's")
    if others:
        report["errors"].append(f"non-builtin ops besides the post-processing: {others}")
    if report["max_tensor_rank"] > 4:
        report["errors"].append(f"a tensor has rank {report['max_tensor_rank']} (> 4)")
    if mode not in ("float32", "float16") and floats:
        report["errors"].append(f"{len(floats)} float tensors before the post-processing, e.g. {floats[:3]}")
    return report
