"""Layers: numerics against PyTorch references, shapes, serialization."""

import contextlib

import keras
import numpy as np
import pytest
from conftest import randomize_keras_model
from keras import ops

from keras_mobilevitv2 import layers


def _roundtrip(layer, inputs, tmp_path):
    """Output of `layer` in a functional model before and after .keras save/load."""
    x = keras.Input(shape=inputs.shape[1:])
    model = keras.Model(x, layer(x))
    expected = model.predict_on_batch(inputs)
    path = tmp_path / "model.keras"
    model.save(path)
    restored = keras.models.load_model(path)
    return expected, restored.predict_on_batch(inputs)


def test_layer_norm_2d_matches_torch_group_norm_1():
    torch = pytest.importorskip("torch")
    x = np.random.RandomState(0).randn(2, 6, 5, 8).astype("float32") * 3 + 1
    gamma = np.random.RandomState(1).randn(8).astype("float32")
    beta = np.random.RandomState(2).randn(8).astype("float32")

    norm = layers.LayerNorm2D()
    norm.build(x.shape)
    norm.gamma.assign(gamma)
    norm.beta.assign(beta)

    reference = torch.nn.GroupNorm(1, 8, eps=1e-5)
    with torch.no_grad():
        reference.weight.copy_(torch.from_numpy(gamma))
        reference.bias.copy_(torch.from_numpy(beta))
        expected = reference(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
    np.testing.assert_allclose(ops.convert_to_numpy(norm(x)), expected.transpose(0, 2, 3, 1), atol=1e-5)


def test_separable_self_attention_matches_formula():
    rng = np.random.RandomState(0)
    x = rng.randn(2, 7, 4, 6).astype("float32")
    attention = layers.SeparableSelfAttention(6)
    attention.build(x.shape)
    for variable in attention.weights:
        variable.assign(rng.randn(*variable.shape).astype("float32") * 0.5)

    w_qkv = ops.convert_to_numpy(attention.qkv_proj.kernel)[0, 0]
    b_qkv = ops.convert_to_numpy(attention.qkv_proj.bias)
    w_out = ops.convert_to_numpy(attention.out_proj.kernel)[0, 0]
    b_out = ops.convert_to_numpy(attention.out_proj.bias)
    qkv = x @ w_qkv + b_qkv
    q, k, v = qkv[..., :1], qkv[..., 1:7], qkv[..., 7:]
    # softmax over the patch axis N, separately per pixel position P
    scores = np.exp(q - q.max(axis=1, keepdims=True))
    scores /= scores.sum(axis=1, keepdims=True)
    context = (k * scores).sum(axis=1, keepdims=True)
    expected = (np.maximum(v, 0) * context) @ w_out + b_out

    np.testing.assert_allclose(ops.convert_to_numpy(attention(x)), expected, rtol=1e-4, atol=1e-5)


def test_unfold_matches_ml_cvnets_order_and_fold_inverts_it():
    rng = np.random.RandomState(0)
    fm = rng.randn(2, 6, 10, 3).astype("float32")
    patches = ops.convert_to_numpy(layers.unfold_patches(fm, 2))
    assert patches.shape == (2, 15, 4, 3)
    # patches[b, y*w + x, i*2 + j] = fm[b, 2y + i, 2x + j]  (w = 5 patches a row)
    for y, x, i, j in [(0, 0, 0, 0), (1, 3, 1, 0), (2, 4, 1, 1), (2, 1, 0, 1)]:
        np.testing.assert_array_equal(patches[:, y * 5 + x, i * 2 + j], fm[:, 2 * y + i, 2 * x + j])
    folded = ops.convert_to_numpy(layers.fold_patches(patches, 6, 10, 2))
    np.testing.assert_array_equal(folded, fm)


@pytest.mark.parametrize("size, target", [((7, 7), (8, 8)), ((5, 9), (6, 10)), ((4, 4), (4, 4))])
def test_align_corners_resize_matches_torch(size, target):
    torch = pytest.importorskip("torch")
    x = np.random.RandomState(0).randn(2, *size, 3).astype("float32")
    with torch.no_grad():
        expected = (
            torch.nn.functional.interpolate(
                torch.from_numpy(x.transpose(0, 3, 1, 2)), size=target, mode="bilinear", align_corners=True
            )
            .numpy()
            .transpose(0, 2, 3, 1)
        )
    resized = ops.convert_to_numpy(layers.resize_bilinear_align_corners(x, *target))
    np.testing.assert_allclose(resized, expected, atol=1e-5)


def test_align_corners_resize_generic_path_matches_tensorflow_path(monkeypatch):
    x = np.random.RandomState(0).randn(1, 7, 5, 2).astype("float32")
    tf_result = ops.convert_to_numpy(layers.resize_bilinear_align_corners(x, 8, 6))
    monkeypatch.setattr(keras.backend, "backend", lambda: "generic")
    generic = ops.convert_to_numpy(layers.resize_bilinear_align_corners(x, 8, 6))
    np.testing.assert_allclose(generic, tf_result, atol=1e-5)


@pytest.mark.parametrize(
    "layer, shape, expected_shape",
    [
        (lambda: layers.LayerNorm2D(), (2, 9, 4, 8), (2, 9, 4, 8)),
        (lambda: layers.SeparableSelfAttention(8), (2, 9, 4, 8), (2, 9, 4, 8)),
        (lambda: layers.LinearAttentionFFN(16), (2, 9, 4, 16), (2, 9, 4, 16)),
        (lambda: layers.InvertedResidual(24, strides=2), (2, 9, 10, 8), (2, 5, 5, 24)),
        (lambda: layers.InvertedResidual(8, strides=1), (2, 9, 10, 8), (2, 9, 10, 8)),
        (lambda: layers.MobileViTv2Block(16, 2), (2, 8, 6, 24), (2, 8, 6, 24)),
        # odd size: resized up to even, and the output keeps the larger size
        (lambda: layers.MobileViTv2Block(16, 1), (2, 7, 5, 24), (2, 8, 6, 24)),
    ],
)
def test_layer_shapes_config_and_keras_roundtrip(layer, shape, expected_shape, tmp_path):
    instance = layer()
    inputs = np.random.RandomState(0).randn(*shape).astype("float32")
    output = instance(inputs)
    assert tuple(output.shape) == expected_shape
    assert tuple(instance.compute_output_shape(shape)) == expected_shape

    clone = type(instance).from_config(instance.get_config())
    assert clone.get_config() == instance.get_config()

    expected, restored = _roundtrip(layer(), inputs, tmp_path)
    np.testing.assert_array_equal(restored, expected)


def test_inverted_residual_uses_residual_only_when_shapes_match():
    same = layers.InvertedResidual(8, strides=1)
    same.build((None, 4, 4, 8))
    assert same.use_residual
    wider = layers.InvertedResidual(16, strides=1)
    wider.build((None, 4, 4, 8))
    assert not wider.use_residual


def test_layers_reject_bad_arguments():
    with pytest.raises(ValueError, match="strides"):
        layers.InvertedResidual(8, strides=3)
    with pytest.raises(ValueError, match="embed_dim"):
        layers.SeparableSelfAttention(0)
    with pytest.raises(ValueError, match=r"\[B, N, P, 8\]"):
        layers.SeparableSelfAttention(8)(np.zeros((1, 4, 4, 6), "float32"))


def test_make_divisible_matches_ml_cvnets():
    assert layers.make_divisible(32 * 0.75, 8) == 24
    assert layers.make_divisible(64 * 0.75, 16) == 48
    assert layers.make_divisible(10, 8) == 16  # never below 90% of the value
    assert layers.ffn_dim_for(96) == 192
    assert layers.ffn_dim_for(100) == 192


def _conv_and_batch_norm(depthwise, use_bias, strides=1, dilation=1, dtype=None):
    """A built conv + BatchNorm pair with random weights and statistics."""
    rng = np.random.RandomState(3)
    if depthwise:
        conv = keras.layers.DepthwiseConv2D(
            3,
            strides=strides,
            padding="same",
            dilation_rate=dilation,
            use_bias=use_bias,
            dtype=dtype,
        )
    else:
        conv = keras.layers.Conv2D(
            12,
            3 if strides == 1 else 1,
            strides=strides,
            padding="same",
            dilation_rate=dilation,
            use_bias=use_bias,
            dtype=dtype,
        )
    conv.build((None, 10, 10, 6))
    channels = 6 if depthwise else 12
    bn = keras.layers.BatchNormalization(epsilon=1e-5, dtype=dtype)
    bn.build((None, 10, 10, channels))
    for variable in conv.weights:
        variable.assign(rng.randn(*variable.shape).astype("float32") * 0.5)
    bn.set_weights(
        [
            rng.uniform(0.5, 2.0, channels).astype("float32"),  # gamma
            rng.randn(channels).astype("float32"),  # beta
            rng.randn(channels).astype("float32"),  # moving mean
            rng.uniform(0.1, 3.0, channels).astype("float32"),  # moving variance
        ]
    )
    return conv, bn


@pytest.mark.parametrize(
    "depthwise, use_bias, strides, dilation",
    [(False, False, 1, 1), (False, True, 2, 1), (True, False, 1, 2), (True, True, 2, 1)],
)
def test_folded_conv_batch_norm_equals_conv_then_batch_norm(depthwise, use_bias, strides, dilation):
    from keras_mobilevitv2.layers.folding import conv_batch_norm

    conv, bn = _conv_and_batch_norm(depthwise, use_bias, strides, dilation)
    x = np.random.RandomState(4).randn(2, 10, 10, 6).astype("float32")
    expected = ops.convert_to_numpy(bn(conv(x), training=False))
    for training in (False, None):
        folded = ops.convert_to_numpy(conv_batch_norm(conv, bn, x, training))
        np.testing.assert_allclose(folded, expected, rtol=1e-5, atol=1e-5)

    # A frozen BatchNorm is in inference mode even while training: folded too.
    bn.trainable = False
    frozen = ops.convert_to_numpy(conv_batch_norm(conv, bn, x, training=True))
    np.testing.assert_allclose(frozen, expected, rtol=1e-5, atol=1e-5)


def test_conv_batch_norm_trains_with_batch_statistics():
    from keras_mobilevitv2.layers.folding import conv_batch_norm

    conv, bn = _conv_and_batch_norm(depthwise=False, use_bias=False)
    x = np.random.RandomState(5).randn(4, 10, 10, 6).astype("float32") + 2.0
    moving_mean = ops.convert_to_numpy(bn.moving_mean).copy()
    out = ops.convert_to_numpy(conv_batch_norm(conv, bn, x, training=True))
    # Normalized with this batch's statistics (gamma/beta aside) ...
    expected = ops.convert_to_numpy(bn(conv(x), training=True))
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)
    # ... and the moving statistics moved.
    assert not np.allclose(ops.convert_to_numpy(bn.moving_mean), moving_mean)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_folded_conv_batch_norm_under_mixed_precision(policy):
    from keras_mobilevitv2.layers.folding import conv_batch_norm

    conv, bn = _conv_and_batch_norm(depthwise=True, use_bias=False, dtype=policy)
    reference_conv, reference_bn = _conv_and_batch_norm(depthwise=True, use_bias=False)
    x = np.random.RandomState(6).randn(2, 10, 10, 6).astype("float32")
    folded = conv_batch_norm(conv, bn, x, training=False)
    assert keras.backend.standardize_dtype(folded.dtype) == policy.split("_")[1]
    expected = ops.convert_to_numpy(reference_bn(reference_conv(x), training=False))
    tolerance = 0.05 if policy == "mixed_float16" else 0.3
    np.testing.assert_allclose(ops.convert_to_numpy(ops.cast(folded, "float32")), expected, atol=tolerance, rtol=0.02)


def test_silu_written_out_equals_keras_silu():
    from keras_mobilevitv2.layers.folding import fusable_silu

    x = np.linspace(-12, 12, 1001).astype("float32")
    np.testing.assert_array_equal(
        ops.convert_to_numpy(fusable_silu(x)), ops.convert_to_numpy(keras.activations.silu(x))
    )


def _pointwise_after(norm_kind, activation=None, use_bias=True, channels=6):
    rng = np.random.RandomState(7)
    if norm_kind == "layer_norm_2d":
        norm = layers.LayerNorm2D()
    else:
        norm = keras.layers.BatchNormalization(epsilon=1e-5)
    norm.build((None, 5, 4, channels))
    for variable in norm.weights:
        values = rng.uniform(0.5, 2.0, variable.shape) if "variance" in variable.path else rng.randn(*variable.shape)
        variable.assign(values.astype("float32"))
    conv = keras.layers.Conv2D(9, 1, activation=activation, use_bias=use_bias)
    conv.build((None, 5, 4, channels))
    for variable in conv.weights:
        variable.assign(rng.randn(*variable.shape).astype("float32"))
    return norm, conv


@pytest.mark.parametrize("norm_kind", ["layer_norm_2d", "batch_norm_2d"])
@pytest.mark.parametrize("activation, use_bias", [(None, True), ("silu", True), (None, False)])
def test_norm_affine_folds_into_the_next_pointwise_conv(norm_kind, activation, use_bias):
    from keras_mobilevitv2.layers.folding import fold_norm_affines
    from keras_mobilevitv2.layers.folding import norm_then_pointwise

    norm, conv = _pointwise_after(norm_kind, activation, use_bias)
    x = np.random.RandomState(8).randn(2, 5, 4, 6).astype("float32") * 3 + 1
    expected = ops.convert_to_numpy(conv(norm(x, training=False)))
    with fold_norm_affines():
        folded = ops.convert_to_numpy(norm_then_pointwise(norm, conv, x, training=False))
    np.testing.assert_allclose(folded, expected, rtol=1e-5, atol=1e-5)
    # Training: the ordinary path (LayerNorm2D is the same either way;
    # BatchNorm uses the batch statistics).
    with fold_norm_affines():
        trained = ops.convert_to_numpy(norm_then_pointwise(norm, conv, x, training=True))
    np.testing.assert_allclose(trained, ops.convert_to_numpy(conv(norm(x, training=True))), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("norm_kind", ["layer_norm_2d", "batch_norm_2d"])
@pytest.mark.parametrize("activation", [None, "relu", "silu"])
@pytest.mark.parametrize("fold", [False, True])
def test_split_pointwise_outputs_equal_the_slices_of_one_conv(norm_kind, activation, fold):
    """`output_splits` (the attention's query | key | value): separate
    convolutions at export, slices of one convolution otherwise."""
    from keras_mobilevitv2.layers.folding import fold_norm_affines
    from keras_mobilevitv2.layers.folding import norm_then_pointwise

    norm, conv = _pointwise_after(norm_kind, activation)
    x = np.random.RandomState(8).randn(2, 5, 4, 6).astype("float32") * 3 + 1
    expected = ops.convert_to_numpy(conv(norm(x, training=False)))
    with fold_norm_affines() if fold else contextlib.nullcontext():
        parts = norm_then_pointwise(norm, conv, x, training=False, output_splits=(1, 5, 3))
    assert [tuple(part.shape) for part in parts] == [(2, 5, 4, 1), (2, 5, 4, 5), (2, 5, 4, 3)]
    joined = np.concatenate([ops.convert_to_numpy(part) for part in parts], axis=-1)
    np.testing.assert_allclose(joined, expected, rtol=1e-5, atol=1e-5)


def test_conv_batch_norm_folds_an_input_affine():
    from keras_mobilevitv2.layers.folding import conv_batch_norm

    rng = np.random.RandomState(9)
    conv = keras.layers.Conv2D(12, 1, use_bias=False)
    conv.build((None, 10, 10, 6))
    conv.kernel.assign(rng.randn(1, 1, 6, 12).astype("float32"))
    _, bn = _conv_and_batch_norm(depthwise=False, use_bias=False)
    gamma, beta = rng.uniform(0.5, 2, 6).astype("float32"), rng.randn(6).astype("float32")
    x = rng.randn(2, 10, 10, 6).astype("float32")
    expected = ops.convert_to_numpy(bn(conv(x * gamma + beta), training=False))
    folded = conv_batch_norm(conv, bn, x, training=False, input_affine=(gamma, beta))
    np.testing.assert_allclose(ops.convert_to_numpy(folded), expected, rtol=1e-4, atol=1e-4)

    three_by_three, _ = _conv_and_batch_norm(depthwise=False, use_bias=False)
    with pytest.raises(ValueError, match="1x1 Conv2D"):
        conv_batch_norm(three_by_three, bn, x, training=False, input_affine=(gamma, beta))


def _unfolded_conv_batch_norm(conv, bn, inputs, training=None, input_affine=None):
    # input_affine is ignored: with `LayerNorm2D.normalize` patched to the
    # full norm below, the inputs already carry it.
    return bn(conv(inputs), training=training)


def _unfolded_norm_then_pointwise(norm, conv, inputs, training=None, output_splits=None):
    outputs = conv(norm(inputs, training=training))
    if output_splits is None:
        return outputs
    return np.split(ops.convert_to_numpy(outputs), np.cumsum(output_splits)[:-1], axis=-1)


@pytest.mark.parametrize(
    "layer, shape",
    [
        (lambda: layers.InvertedResidual(24, strides=2), (2, 9, 10, 8)),
        (lambda: layers.LinearAttentionFFN(16), (2, 9, 4, 16)),
        (lambda: layers.LinearAttentionFFN(16, attention_norm="batch_norm_2d"), (2, 9, 4, 16)),
        (lambda: layers.MobileViTv2Block(16, 2), (2, 8, 6, 24)),
        (lambda: layers.MobileViTv2Block(16, 1, attention_norm="batch_norm_2d"), (2, 7, 5, 24)),
    ],
)
def test_inference_with_folding_equals_the_unfolded_layers(layer, shape, monkeypatch):
    """Inference folds BatchNorm into the convolutions, and at export the
    norms' affines too (`layers.folding`); either output equals the
    sublayers applied one by one."""
    from keras_mobilevitv2.layers import inverted_residual
    from keras_mobilevitv2.layers import mobilevit_block
    from keras_mobilevitv2.layers import transformer
    from keras_mobilevitv2.layers.folding import fold_norm_affines

    instance = layer()
    x = np.random.RandomState(10).randn(*shape).astype("float32")
    instance(x)
    randomize_keras_model(keras.Sequential([keras.Input(shape[1:]), instance]), seed=3)
    folded = ops.convert_to_numpy(instance(x, training=False))
    with fold_norm_affines():
        exported = ops.convert_to_numpy(instance(x, training=False))

    for module in (inverted_residual, mobilevit_block):
        monkeypatch.setattr(module, "conv_batch_norm", _unfolded_conv_batch_norm)
    monkeypatch.setattr(transformer, "norm_then_pointwise", _unfolded_norm_then_pointwise)
    monkeypatch.setattr(layers.LayerNorm2D, "normalize", layers.LayerNorm2D.call)
    unfolded = ops.convert_to_numpy(instance(x, training=False))
    np.testing.assert_allclose(folded, unfolded, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(exported, unfolded, rtol=1e-4, atol=1e-5)
