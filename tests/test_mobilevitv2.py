"""The keras.applications surface: signature, validation, shapes, export."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import randomize_keras_model

import keras_mobilevitv2
from keras_mobilevitv2 import MobileViTv2
from keras_mobilevitv2 import MobileViTv2_050

# ml-cvnets / timm / Hugging Face parameter counts (identical in all three).
REFERENCE_PARAMETERS = {
    "MobileViTv2_050": 1_370_593,
    "MobileViTv2_075": 2_866_009,
    "MobileViTv2_100": 4_901_841,
    "MobileViTv2_125": 7_478_089,
    "MobileViTv2_150": 10_594_753,
    "MobileViTv2_175": 14_251_833,
    "MobileViTv2_200": 18_449_329,
}
LAST_CHANNELS = {"MobileViTv2_050": 256, "MobileViTv2_100": 512, "MobileViTv2_200": 1024}


def _trainable_parameters(model):
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


@pytest.mark.parametrize("name, expected", sorted(REFERENCE_PARAMETERS.items()))
def test_parameter_count_equals_reference(name, expected):
    model = getattr(keras_mobilevitv2, name)(weights=None)
    assert _trainable_parameters(model) == expected
    assert model.name == "mobilevitv2_" + name[-3:]


@pytest.mark.parametrize("pooling, expected", [(None, (1, 2, 2, 256)), ("avg", (1, 256)), ("max", (1, 256))])
def test_no_top_pooling_shapes(pooling, expected):
    model = MobileViTv2_050(weights=None, include_top=False, pooling=pooling, input_shape=(64, 64, 3))
    assert model.output_shape == (None,) + expected[1:]
    assert model.predict_on_batch(np.zeros((1, 64, 64, 3), "float32")).shape == expected


def test_top_output_is_a_probability_distribution():
    model = MobileViTv2_050(weights=None, classes=7)
    assert model.layers[-1].activation.__name__ == "softmax"
    probs = model.predict_on_batch(np.random.rand(2, 96, 80, 3).astype("float32") * 255)
    assert probs.shape == (2, 7)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("size", [(32, 32), (123, 123), (224, 224), (100, 177)])
def test_any_input_size_from_32(size):
    model = MobileViTv2_050(weights=None, include_top=False, pooling="avg")
    out = model.predict_on_batch(np.random.rand(1, *size, 3).astype("float32"))
    assert out.shape == (1, 256) and np.all(np.isfinite(out))


def test_static_and_dynamic_shapes_give_same_result_on_odd_sizes():
    dynamic = MobileViTv2_050(weights=None, classifier_activation=None)
    static = MobileViTv2_050(weights=None, classifier_activation=None, input_shape=(200, 136, 3))
    static.set_weights(dynamic.get_weights())
    x = np.random.RandomState(0).rand(2, 200, 136, 3).astype("float32") * 255
    np.testing.assert_allclose(dynamic.predict_on_batch(x), static.predict_on_batch(x), atol=1e-5)


def test_input_tensor_and_channels():
    inputs = keras.Input((200, 200, 4))
    x = keras.layers.Conv2D(3, 2, strides=2)(inputs)
    model = MobileViTv2_050(weights=None, input_tensor=x, include_top=False, pooling="avg")
    assert model.inputs[0] is inputs or model.input_shape == (None, 200, 200, 4)
    for channels in (1, 4):
        model = MobileViTv2_050(weights=None, include_top=False, input_shape=(None, None, channels))
        assert model.output_shape == (None, None, None, 256)


def test_include_preprocessing_scales_0_255_to_0_1():
    with_pre = MobileViTv2_050(weights=None, classifier_activation=None, input_shape=(64, 64, 3))
    without = MobileViTv2_050(
        weights=None, classifier_activation=None, input_shape=(64, 64, 3), include_preprocessing=False
    )
    without.set_weights(with_pre.get_weights())
    x = np.random.RandomState(0).rand(1, 64, 64, 3).astype("float32")
    np.testing.assert_allclose(with_pre.predict_on_batch(x * 255), without.predict_on_batch(x), atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"weights": "nonexistent.h5"}, "The `weights` argument should be either"),
        ({"weights": "imagenet", "classes": 10}, "`classes` should be 1000"),
        ({"weights": None, "input_shape": (16, 16, 3)}, "Input size must be at least 32x32"),
        ({"weights": None, "input_shape": (224, 224)}, "tuple of three integers"),
        ({"weights": "imagenet", "input_shape": (224, 224, 1)}, "must have 3 channels"),
        ({"weights": None, "pooling": "median"}, "`pooling` must be one of"),
        ({"weights": "imagenet", "classifier_activation": "relu"}, "Only `None` and `softmax`"),
        ({"weights": None, "input_tensor": np.zeros((1, 64, 64, 3))}, "must be a Keras tensor"),
        (
            {"weights": None, "input_tensor": keras.Input((64, 64, 3)), "input_shape": (96, 96, 3)},
            "does not match the shape of `input_tensor`",
        ),
        ({"weights": None, "classes": 0}, "positive integer"),
    ],
)
def test_bad_arguments_raise_clear_value_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MobileViTv2_050(**kwargs)


def test_bad_width_and_weights_file_type(tmp_path):
    with pytest.raises(ValueError, match="width_multiplier"):
        MobileViTv2(0.6, weights="imagenet")
    with pytest.raises(ValueError, match="width_multiplier"):
        MobileViTv2(-1, weights=None)
    odd_file = tmp_path / "weights.npz"
    odd_file.write_bytes(b"")
    with pytest.raises(ValueError, match="Unrecognised weights file"):
        MobileViTv2_050(weights=str(odd_file))


def test_channels_first_is_refused_clearly():
    keras.config.set_image_data_format("channels_first")
    try:
        with pytest.raises(ValueError, match="channels_first"):
            MobileViTv2_050(weights=None)
    finally:
        keras.config.set_image_data_format("channels_last")


def test_keras_file_roundtrip_is_exact(tmp_path):
    model = MobileViTv2_050(weights=None, input_shape=(96, 96, 3))
    x = np.random.RandomState(0).rand(2, 96, 96, 3).astype("float32") * 255
    path = tmp_path / "m.keras"
    model.save(path)
    restored = keras.models.load_model(path)
    np.testing.assert_array_equal(restored.predict_on_batch(x), model.predict_on_batch(x))
    # and through the serialization of the functional config alone
    clone = keras.Model.from_config(model.get_config())
    clone.set_weights(model.get_weights())
    np.testing.assert_array_equal(clone.predict_on_batch(x), model.predict_on_batch(x))


def test_weights_h5_roundtrip(tmp_path):
    model = MobileViTv2_050(weights=None, input_shape=(64, 64, 3))
    path = str(tmp_path / "m.weights.h5")
    model.save_weights(path)
    loaded = MobileViTv2_050(weights=path, input_shape=(64, 64, 3))
    for a, b in zip(model.weights, loaded.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def _graph_tensor_ranks(model, shape):
    function = tf.function(lambda x: model(x, training=False))
    graph = function.get_concrete_function(tf.TensorSpec(shape, tf.float32)).graph
    return {
        op.type: max((len(t.shape) for t in op.outputs if t.shape.rank is not None), default=0)
        for op in graph.get_operations()
    }


def test_every_graph_tensor_has_rank_at_most_4():
    # 96x96 reaches an odd 3x3 map at stage 5, so the resize path is included.
    model = MobileViTv2_050(weights=None, input_shape=(96, 96, 3))
    ranks = _graph_tensor_ranks(model, (1, 96, 96, 3))
    assert max(ranks.values()) <= 4, {k: v for k, v in ranks.items() if v > 4}
    assert "ResizeBilinear" in ranks


def test_converts_to_tflite_with_builtin_ops_only():
    model = MobileViTv2_050(weights=None, input_shape=(96, 96, 3))
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    flatbuffer = converter.convert()

    interpreter = tf.lite.Interpreter(
        model_content=flatbuffer,
        experimental_op_resolver_type=tf.lite.experimental.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
    )
    interpreter.allocate_tensors()
    op_names = {op["op_name"] for op in interpreter._get_ops_details()}
    assert not any(name.startswith(("Flex", "Custom")) for name in op_names), op_names
    assert max(len(t["shape"]) for t in interpreter.get_tensor_details()) <= 4

    x = np.random.RandomState(0).rand(1, 96, 96, 3).astype("float32") * 255
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
    interpreter.invoke()
    tflite_out = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    np.testing.assert_allclose(tflite_out, model.predict_on_batch(x), atol=1e-5)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_builds_runs_and_stays_close(policy):
    reference = MobileViTv2_050(weights=None, input_shape=(64, 64, 3), classifier_activation=None)
    randomize_keras_model(reference)
    keras.mixed_precision.set_global_policy(policy)
    try:
        model = MobileViTv2_050(weights=None, input_shape=(64, 64, 3), classifier_activation=None)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    model.set_weights(reference.get_weights())
    x = np.random.RandomState(0).rand(2, 64, 64, 3).astype("float32") * 255
    out = model.predict_on_batch(x)
    assert out.dtype == np.float32 and np.all(np.isfinite(out))
    expected = reference.predict_on_batch(x)
    tolerance = 0.05 if policy == "mixed_float16" else 0.3
    assert np.abs(out - expected).max() <= tolerance * max(1.0, np.abs(expected).max())
    # a training step runs too (loss scaling is the optimizer's business)
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    loss = model.train_on_batch(x, np.array([1, 2]))
    assert np.isfinite(loss)


def test_preprocess_input_and_decode_predictions():
    x = np.random.rand(1, 8, 8, 3).astype("float32") * 255
    assert keras_mobilevitv2.preprocess_input(x) is x
    with pytest.raises(ValueError, match="channels_last"):
        keras_mobilevitv2.preprocess_input(x, data_format="channels_first")

    preds = np.zeros((2, 1000), "float32")
    preds[0, 386] = 0.9
    preds[0, 0] = 0.05
    preds[1, 999] = 1.0
    decoded = keras_mobilevitv2.decode_predictions(preds, top=2)
    assert decoded[0][0] == ("n02504458", "African_elephant", pytest.approx(0.9))
    assert decoded[0][1][:2] == ("n01440764", "tench")
    assert decoded[1][0][:2] == ("n15075141", "toilet_tissue")
    with pytest.raises(ValueError, match=r"\(samples, 1000\)"):
        keras_mobilevitv2.decode_predictions(np.zeros((1, 10)))


def test_batch_norm_attention_option(tmp_path):
    model = MobileViTv2(0.5, weights=None, input_shape=(64, 64, 3), classes=10, attention_norm="batch_norm_2d")
    norms = {type(layer).__name__ for layer in model._flatten_layers() if layer.name in ("attn_norm", "ffn_norm")}
    assert norms == {"BatchNormalization"}
    finals = {type(layer).__name__ for layer in model._flatten_layers() if layer.name == "final_norm"}
    assert finals == {"LayerNorm2D"}  # GroupNorm(1) after the last block either way
    x = np.random.RandomState(0).rand(2, 64, 64, 3).astype("float32") * 255
    path = str(tmp_path / "bn.keras")
    model.save(path)
    np.testing.assert_array_equal(keras.models.load_model(path).predict_on_batch(x), model.predict_on_batch(x))
    with pytest.raises(ValueError, match="attention_norm"):
        MobileViTv2(0.5, weights=None, attention_norm="group_norm")
    with pytest.raises(ValueError, match="only load a Keras"):
        MobileViTv2(0.5, weights="imagenet", attention_norm="batch_norm_2d")
