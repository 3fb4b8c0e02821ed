import collections

import keras
import numpy as np
import pytest
import tensorflow as tf

from quantization.audit import make_interpreter
from quantization.audit import read_operators
from quantization.audit import run_tflite
from quantization.merge_pointwise import merge_linear_pointwise_pairs


def _conv(filters, kernel=1, strides=1, activation=None, name=None):
    return keras.layers.Conv2D(filters, kernel, strides=strides, padding="same", activation=activation, name=name)


def _float_tflite(model, optimize=False, images=None):
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if optimize:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([image[None]] for image in images)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    return converter.convert()


def _count(flatbuffer, op):
    return collections.Counter(entry["op"] for entry in read_operators(flatbuffer))[op]


def _mixed_model():
    """Every case the merge must tell apart, in one graph."""
    inputs = keras.Input((12, 12, 8))
    x = _conv(16, name="linear_a")(inputs)
    x = _conv(32, activation="relu", name="merges_with_a")(x)  # a -> this: merged
    x = _conv(32, name="linear_b")(x)
    x = _conv(32, name="linear_c")(x)  # b -> c -> d chain: both merged
    x = _conv(48, activation="relu", name="merges_with_c")(x)
    shared = _conv(24, name="read_twice")(x)  # two readers: kept
    y = _conv(24, name="after_shared")(shared) + shared
    narrow = _conv(4, name="bottleneck")(y)  # 24 -> 4 -> 24 costs more merged: kept
    y = _conv(24, activation="relu", name="after_bottleneck")(narrow)
    y = _conv(24, name="before_strided")(y)
    y = _conv(24, strides=2, name="strided")(y)  # stride 2: kept
    y = _conv(24, activation="relu", name="activated")(y)
    y = _conv(24, kernel=3, name="before_3x3")(y)  # activation above: kept
    return keras.Model(inputs, y)


@pytest.fixture(scope="module")
def mixed():
    model = _mixed_model()
    rng = np.random.default_rng(0)
    for variable in model.weights:
        variable.assign(rng.normal(0, 0.3, variable.shape).astype("float32"))
    return model, _float_tflite(model)


def test_merges_exactly_the_linear_pairs_and_keeps_the_outputs(mixed):
    model, flatbuffer = mixed
    merged, count = merge_linear_pointwise_pairs(flatbuffer)
    assert count == 3
    assert _count(merged, "CONV_2D") == _count(flatbuffer, "CONV_2D") - 3
    assert len(merged) < len(flatbuffer)  # the old kernels are not carried along

    images = np.random.default_rng(1).normal(size=(3, 12, 12, 8)).astype("float32")
    expected = model.predict_on_batch(images)
    for content in (flatbuffer, merged):
        outputs = run_tflite(make_interpreter(content), images)
        np.testing.assert_allclose(outputs, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_merged_model_keeps_signature_and_metadata(mixed):
    _, flatbuffer = mixed
    merged, _ = merge_linear_pointwise_pairs(flatbuffer)
    interpreter = make_interpreter(merged)
    assert interpreter.get_signature_list() == make_interpreter(flatbuffer).get_signature_list()
    from tensorflow.lite.python import schema_py_generated as schema

    def metadata(content):
        model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(content, 0))
        return {entry.name: bytes(model.buffers[entry.buffer].data) for entry in model.metadata}

    assert metadata(merged) == metadata(flatbuffer)


def test_int8_models_and_models_without_pairs_are_returned_unchanged(mixed):
    model, _ = mixed
    images = np.random.default_rng(2).normal(size=(4, 12, 12, 8)).astype("float32")
    int8 = _float_tflite(model, optimize=True, images=images)
    assert merge_linear_pointwise_pairs(int8) == (int8, 0)

    inputs = keras.Input((6, 6, 3))
    single = keras.Model(inputs, _conv(4)(inputs))
    flatbuffer = _float_tflite(single)
    assert merge_linear_pointwise_pairs(flatbuffer) == (flatbuffer, 0)
