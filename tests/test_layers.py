"""Layers: numerics against PyTorch references, shapes, serialization."""

import numpy as np
import pytest

import keras
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
    np.testing.assert_allclose(
        ops.convert_to_numpy(norm(x)), expected.transpose(0, 2, 3, 1), atol=1e-5
    )


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

    np.testing.assert_allclose(
        ops.convert_to_numpy(attention(x)), expected, rtol=1e-4, atol=1e-5
    )


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
        expected = torch.nn.functional.interpolate(
            torch.from_numpy(x.transpose(0, 3, 1, 2)), size=target, mode="bilinear", align_corners=True
        ).numpy().transpose(0, 2, 3, 1)
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
