"""A norm's mean calibrated too narrow is widened so that XNNPACK runs its SUB."""

import keras
import numpy as np
import tensorflow as tf
from ai_edge_litert.interpreter import Interpreter

from quantization.layers import MEAN_RANGE_FLOOR
from quantization.tflite_export import convert
from quantization.tflite_graph import read_graph
from quantization.xnnpack_ranges import widen_narrow_means


def _centring_model():
    inputs = keras.Input((8, 8, 16), batch_size=1)
    centred = inputs - keras.ops.mean(inputs, axis=(1, 2, 3), keepdims=True)
    return keras.Model(inputs, keras.layers.Conv2D(8, 1)(centred))


def _zero_mean_images():
    # Each image's mean is ~1e-6: calibration gives the MEAN output a scale
    # thousands of times finer than the SUB's output.
    images = np.random.RandomState(0).randn(16, 8, 8, 16).astype("float32") * 20
    return images - images.mean(axis=(1, 2, 3), keepdims=True)


def _raw_ptq(model, images):
    """The converter's own int8 model, without this package's passes."""
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([image[None]] for image in images)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = converter.inference_output_type = tf.int8
    return converter.convert()


def _run(flatbuffer, image):
    """(int8 output, XNNPACK partitions: the DELEGATE nodes of the node list)."""
    interpreter = Interpreter(model_content=flatbuffer)
    interpreter.allocate_tensors()
    detail = interpreter.get_input_details()[0]
    scale, zero_point = detail["quantization"]
    interpreter.set_tensor(
        detail["index"], np.clip(np.round(image[None] / scale + zero_point), -128, 127).astype(np.int8)
    )
    interpreter.invoke()
    partitions = sum(node["op_name"] == "DELEGATE" for node in interpreter._get_ops_details())
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"]).astype(int), partitions


def _mean_and_sub_scales(flatbuffer):
    graph = read_graph(flatbuffer)
    (sub,) = [operator for operator in graph.operators if operator.name == "SUB"]
    (mean,) = [operator for operator in graph.operators if operator.name == "MEAN"]
    scale = lambda index: float(graph.tensors[index].quantization.scale[0])  # noqa: E731
    return scale(mean.outputs[0]), scale(sub.outputs[0])


def test_a_too_narrow_mean_is_widened_and_the_sub_runs_on_xnnpack():
    model, images = _centring_model(), _zero_mean_images()
    raw = _raw_ptq(model, images)
    mean_scale, sub_scale = _mean_and_sub_scales(raw)
    assert mean_scale < sub_scale * 2**-10  # the premise: XNNPACK refuses this SUB
    widened, count = widen_narrow_means(raw)
    assert count == 1
    assert _mean_and_sub_scales(widened) == (np.float32(sub_scale * MEAN_RANGE_FLOOR), sub_scale)
    for image in images[:4]:
        (before, partitions_before), (after, partitions_after) = _run(raw, image), _run(widened, image)
        assert (partitions_before, partitions_after) == (2, 1)  # MEAN | SUB on TFLite's kernel | CONV -> one
        assert np.abs(after - before).max() <= 1  # within one int8 output step
    # The export applies it; a model without a narrow mean comes back as it was.
    exported = convert(model, "ptq_int8", representative_images=images)
    assert _mean_and_sub_scales(exported)[0] >= _mean_and_sub_scales(exported)[1] * 2**-10
    assert widen_narrow_means(exported) == (exported, 0)


def test_a_mean_that_other_operators_read_is_left_alone():
    inputs = keras.Input((8, 8, 16), batch_size=1)
    mean = keras.ops.mean(inputs, axis=(1, 2, 3), keepdims=True)
    outputs = keras.layers.Conv2D(8, 1)((inputs - mean) * mean)
    model = keras.Model(inputs, outputs)
    raw = _raw_ptq(model, _zero_mean_images())
    mean_scale, sub_scale = _mean_and_sub_scales(raw)
    assert mean_scale < sub_scale * 2**-10  # narrow, but the MUL reads it at this scale too
    assert widen_narrow_means(raw) == (raw, 0)
