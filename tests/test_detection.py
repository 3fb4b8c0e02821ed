"""SSDLite (ml-cvnets' detector on MobileViTv2): structure, anchors, int8."""

import itertools
import math
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.append(ROOT)  # benchmarks/ (not installed), after the installed packages
from benchmarks.random_weights import randomize_keras_weights  # noqa: E402
from keras_mobilevitv2.detection import AnchorConfig
from keras_mobilevitv2.detection import SSDLite
from keras_mobilevitv2.detection import model_anchors
from keras_mobilevitv2.detection import ssd_anchors

# ml-cvnets model zoo (COCO, 81 classes with background): params in millions, to its rounding; and the
# exact PyTorch parameter count of ml-cvnets' model (its layers counted from cvnets/models/detection/ssd.py,
# cvnets/modules/ssd_heads.py and the MobileViTv2 config).
PUBLISHED = {0.5: 2.0, 0.75: 3.6, 1.0: 5.6, 1.25: 8.2, 1.5: 11.3, 1.75: 14.9, 2.0: 19.1}
EXACT = {
    0.5: 2_035_395,
    0.75: 3_584_955,
    1.0: 5_608_883,
    1.25: 8_173_227,
    1.5: 11_277_987,
    1.75: 14_923_163,
    2.0: 19_108_755,
}


def _parameters(model):
    # PyTorch's `parameters()`: BatchNorm running statistics are buffers.
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


@pytest.mark.parametrize("width", sorted(PUBLISHED))
def test_parameter_counts_equal_the_model_zoo(width):
    model = SSDLite(width)
    assert _parameters(model) == EXACT[width]
    assert round(EXACT[width] / 1e6, 1) == PUBLISHED[width]
    assert model.output["box_deltas"].shape == (None, 3232, 4)
    assert model.output["class_logits"].shape == (None, 3232, 81)


def _reference_anchors(sizes, min_scale=0.1, max_scale=1.05, ratios=((2, 3),) * 5 + ((2,),)):
    """ml-cvnets' generator, written as it loops: levels, then (y, x), then the boxes of a location."""
    scales = np.linspace(min_scale, max_scale, len(sizes) + 1)
    boxes = []
    for level, (height, width) in enumerate(sizes):
        low, high = scales[level], math.sqrt(scales[level] * scales[level + 1])
        for y, x in itertools.product(range(height), range(width)):
            cx, cy = (x + 0.5) / width, (y + 0.5) / height
            boxes += [[cx, cy, low, low], [cx, cy, high, high]]
            for ratio in ratios[level]:
                root = math.sqrt(ratio)
                boxes += [[cx, cy, low * root, low / root], [cx, cy, low / root, low * root]]
    return np.clip(np.asarray(boxes), 0, 1)


def test_anchors_equal_the_reference_generator_box_by_box():
    sizes = [(20, 20), (10, 10), (5, 5), (3, 3), (2, 2), (1, 1)]  # 320x320
    anchors = ssd_anchors(sizes)
    np.testing.assert_allclose(anchors, _reference_anchors(sizes), atol=1e-6)
    assert anchors.shape == (3232, 4)
    # Values worked out by hand from the formula: the first location, and the global level.
    np.testing.assert_allclose(anchors[1], [0.025, 0.025, 0.160728, 0.160728], atol=1e-6)
    np.testing.assert_allclose(anchors[-2:], [[0.5, 0.5, 1.0, 0.630504], [0.5, 0.5, 0.630504, 1.0]], atol=1e-6)
    rectangular = [(9, 13), (5, 7)]
    config = AnchorConfig(output_strides=(16, 32), aspect_ratios=((2, 3), (3, 2, 2)), min_scale=0.2, max_scale=0.9)
    np.testing.assert_allclose(
        ssd_anchors(rectangular, config), _reference_anchors(rectangular, 0.2, 0.9, ((2, 3), (2, 3))), atol=1e-6
    )


@pytest.mark.parametrize("size", [320, 300, 257])
def test_one_output_row_per_anchor_at_any_size(size):
    model = SSDLite(0.5, num_classes=11, input_shape=(size, size, 3))
    anchors = model_anchors(model)
    assert model.output["box_deltas"].shape[1] == len(anchors) == model.output["class_logits"].shape[1]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"backbone": 0}, "`backbone` must be a width multiplier"),
        ({"num_classes": 1}, "counts the background"),
        ({"input_shape": (None, None, 3)}, "the anchors depend on it"),
        ({"anchors": AnchorConfig(output_strides=(32, 16), aspect_ratios=((2,), (2,)))}, "in order"),
        ({"anchors": AnchorConfig(output_strides=(16, 64), aspect_ratios=((2,), (2,)))}, "after 32"),
        ({"proj_channels": (512, 256)}, "one positive integer per level"),
    ],
)
def test_argument_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SSDLite(**{"backbone": 0.5, **kwargs})
    with pytest.raises(ValueError, match="aspect ratios per output stride"):
        AnchorConfig(output_strides=(16,), aspect_ratios=((2,), (3,)))


@pytest.fixture(scope="module")
def small_detector():
    model = randomize_keras_weights(SSDLite(0.5, num_classes=11, input_shape=(128, 128, 3)), seed=3)
    images = np.random.RandomState(0).rand(12, 128, 128, 3).astype("float32") * 255
    return model, images


def test_quantization_aware_detector_computes_the_float_function_and_is_fully_int8(small_detector, tmp_path):
    from quantization import calibrate
    from quantization import export_tflite
    from quantization import quantize_model
    from quantization.quantize import quantizers

    model, images = small_detector
    qat = calibrate(quantize_model(model), images[:8])
    for quantizer in quantizers(qat):
        quantizer.calibrating = True  # quantization off: the folded model computes the float function
    try:
        folded, expected = qat(images[:4], training=False), model(images[:4], training=False)
    finally:
        for quantizer in quantizers(qat):
            quantizer.calibrating = False
    for key in ("box_deltas", "class_logits"):
        np.testing.assert_allclose(np.asarray(folded[key]), np.asarray(expected[key]), atol=1e-4)
    report = export_tflite(qat, str(tmp_path / "ssd.tflite"), "qat_int8", sample_images=images[8:], verbose=False)
    assert report["errors"] == [] and report["float_tensors_inside"] == [] and report["max_tensor_rank"] <= 4
    # Both outputs are compared with Keras; the class output gives the top-1 agreement.
    agreement = report["agreement"]
    assert set(agreement["outputs"]) == {"box_deltas", "class_logits"} and agreement["class_output"] == "class_logits"
    for output in agreement["outputs"].values():
        assert output["mean_abs_error"] <= 3 * output["output_quantization_step"]


def _decode(deltas, anchors):
    """ml-cvnets' decoding, written out: (tx, ty, tw, th) against (cx, cy, w, h), variances 0.1 / 0.2;
    -> (ymin, xmin, ymax, xmax)."""
    cx = deltas[:, 0] * 0.1 * anchors[:, 2] + anchors[:, 0]
    cy = deltas[:, 1] * 0.1 * anchors[:, 3] + anchors[:, 1]
    w = np.exp(deltas[:, 2] * 0.2) * anchors[:, 2]
    h = np.exp(deltas[:, 3] * 0.2) * anchors[:, 3]
    return np.stack([cy - h / 2, cx - w / 2, cy + h / 2, cx + w / 2], -1)


def _iou(box, boxes):
    top, left = np.maximum(box[0], boxes[:, 0]), np.maximum(box[1], boxes[:, 1])
    bottom, right = np.minimum(box[2], boxes[:, 2]), np.minimum(box[3], boxes[:, 3])
    inter = np.clip(bottom - top, 0, None) * np.clip(right - left, 0, None)
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
    return inter / (area(box) + area(boxes) - inter)


def _fast_nms(boxes, probabilities, score_threshold, iou_threshold, limit):
    """TFLite's default (fast) post-processing: each box's best class, background dropped, greedy NMS."""
    classes = probabilities[:, 1:].argmax(-1)
    scores = probabilities[:, 1:].max(-1)
    order = [i for i in np.argsort(-scores, kind="stable") if scores[i] >= score_threshold]
    kept = []
    while order and len(kept) < limit:
        best, order = order[0], order[1:]
        kept.append(best)
        order = [i for i in order if _iou(boxes[best], boxes[[i]])[0] <= iou_threshold]
    return boxes[kept], classes[kept], scores[kept]


def test_float_detector_ends_in_tflites_postprocessing_and_decodes_like_ml_cvnets(small_detector):
    from quantization.audit import make_interpreter
    from quantization.detection_export import PostProcess
    from quantization.detection_export import audit_detector
    from quantization.detection_export import detection_flatbuffer

    model, images = small_detector
    anchors = model_anchors(model)
    settings = PostProcess(max_detections=10, score_threshold=0.2)
    flatbuffer = detection_flatbuffer(model, "float32", anchors, settings=settings)
    report = audit_detector(flatbuffer, "float32")
    assert report["errors"] == [] and report["postprocess_ops"] == 1
    assert report["outputs"] == [[1, 10, 4], [1, 10], [1, 10], [1]]  # boxes, classes, scores, count: by position
    interpreter = make_interpreter(flatbuffer)
    (image_input,) = interpreter.get_input_details()
    interpreter.set_tensor(image_input["index"], images[:1])
    interpreter.invoke()
    boxes, classes, scores, count = (interpreter.get_tensor(o["index"]) for o in interpreter.get_output_details())
    outputs = model.predict_on_batch(images[:1])
    logits = outputs["class_logits"][0]
    probabilities = np.exp(logits - logits.max(-1, keepdims=True))
    probabilities /= probabilities.sum(-1, keepdims=True)
    expected = _fast_nms(_decode(outputs["box_deltas"][0], anchors), probabilities, 0.2, 0.5, 10)
    assert int(count[0]) == len(expected[0]) > 0
    np.testing.assert_allclose(boxes[0, : len(expected[0])], expected[0], atol=1e-4)
    np.testing.assert_array_equal(classes[0, : len(expected[0])], expected[1])
    np.testing.assert_allclose(scores[0, : len(expected[0])], expected[2], atol=1e-5)


def test_qat_detector_maps_to_the_edge_tpu_up_to_the_postprocessing(small_detector, tmp_path):
    from quantization import calibrate
    from quantization import quantize_model
    from quantization.detection_export import audit_detector
    from quantization.detection_export import detection_flatbuffer
    from quantization.targets import edgetpu

    model, images = small_detector
    qat = calibrate(quantize_model(model, graph="edgetpu"), images[:8])
    flatbuffer = detection_flatbuffer(qat, "qat_int8", model_anchors(model), representative_images=images[:4])
    audit = audit_detector(flatbuffer, "qat_int8")
    assert audit["errors"] == [] and audit["float_tensors_inside"] == []
    assert audit["input"]["dtype"] == "INT8" and "CUSTOM:TFLite_Detection_PostProcess" in audit["ops"]
    report = edgetpu.export_flatbuffer(flatbuffer, str(tmp_path), "ssd")  # refuses any CPU op before the tail
    assert report["first_cpu_op"] is None and report["mac_share_on_tpu"] == 1.0
    # the score softmax, the two DEQUANTIZE and the op: the last ops, on the CPU
    assert report["postprocessing_ops"] == 4
    assert [op["op"] for op in report["ops"][-4:]][-1] == "CUSTOM:TFLite_Detection_PostProcess"
    with pytest.raises(ValueError, match="model_anchors"):
        detection_flatbuffer(model, "float32", model_anchors(model)[:-1])
    with pytest.raises(ValueError, match="calibrated QAT model"):
        detection_flatbuffer(model, "qat_int8", model_anchors(model))
