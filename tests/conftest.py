import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# torchvision (imported by timm) segfaults when loaded after TensorFlow in
# this stack (TF 2.21, torch 2.14); the reference implementations therefore
# load first, when they are installed.
try:
    import timm  # noqa: F401
    import torch  # noqa: F401
except ImportError:
    pass

import numpy as np
import pytest


def randomize_torch_model(model, seed=0):
    """Gives every tensor of a PyTorch model non-trivial random values.

    Includes BatchNorm running statistics and norm affine parameters, so a
    wrong epsilon, a swapped mean/variance or a dropped affine is visible.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            if name.endswith("running_var"):
                value = torch.rand(tensor.shape, generator=generator) + 0.5
            elif name.endswith("running_mean"):
                value = torch.randn(tensor.shape, generator=generator) * 0.2
            elif tensor.ndim == 1:
                offset = 1.0 if name.endswith("weight") else 0.0
                value = torch.randn(tensor.shape, generator=generator) * 0.2 + offset
            else:
                fan_in = int(np.prod(tensor.shape[1:]))
                value = torch.randn(tensor.shape, generator=generator) / np.sqrt(fan_in)
            tensor.copy_(value)
    return model.eval()


def randomize_keras_model(model, seed=0):
    """Keras counterpart of `randomize_torch_model`: activations stay O(1)."""
    rng = np.random.RandomState(seed)
    for variable in model.weights:
        shape = tuple(variable.shape)
        name = variable.path
        if name.endswith("moving_variance"):
            value = rng.rand(*shape) + 0.5
        elif name.endswith("moving_mean"):
            value = rng.randn(*shape) * 0.2
        elif len(shape) == 1:
            offset = 1.0 if name.endswith("gamma") else 0.0
            value = rng.randn(*shape) * 0.2 + offset
        else:
            fan_in = int(np.prod(shape[:-1])) if "depthwise" not in name else int(np.prod(shape[:2]))
            value = rng.randn(*shape) / np.sqrt(fan_in)
        variable.assign(value.astype(variable.dtype))
    return model


def tiny_mobilevitv2(size=32, classes=5):
    """Every MobileViTv2 layer type once (stem, inverted residual, one
    transformer block, classifier): the full network's op types at a fraction
    of its conversion time. Random non-degenerate weights."""
    import keras

    from keras_mobilevitv2.layers import InvertedResidual
    from keras_mobilevitv2.layers import MobileViTv2Block

    inputs = keras.Input((size, size, 3), name="image")
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.ZeroPadding2D(1)(x)
    x = keras.layers.Conv2D(16, 3, strides=2, use_bias=False)(x)
    x = keras.layers.BatchNormalization(epsilon=1e-5)(x)
    x = keras.layers.Activation("silu")(x)
    x = InvertedResidual(24, strides=2)(x)
    x = MobileViTv2Block(32, num_blocks=1)(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(classes)(x)
    outputs = keras.layers.Activation("softmax")(x)
    return randomize_keras_model(keras.Model(inputs, outputs, name="tiny_mobilevitv2"), seed=1)


_TIMM_CACHE = {}


@pytest.fixture
def timm_reference():
    """timm `mobilevitv2_XXX` with random weights, cached per width."""
    timm = pytest.importorskip("timm")

    def build(suffix):
        if suffix not in _TIMM_CACHE:
            model = timm.create_model(f"mobilevitv2_{suffix}", pretrained=False)
            _TIMM_CACHE[suffix] = randomize_torch_model(model, seed=int(suffix))
        return _TIMM_CACHE[suffix]

    return build


_HF_SEGMENTATION_CACHE = {}


@pytest.fixture
def hf_segmentation_reference():
    """transformers `MobileViTV2ForSemanticSegmentation` with random weights,
    cached per (width, output stride, classes). With `dilate_like_ml_cvnets`
    (default) the block's 3x3 convolution in dilated stages is dilated as in
    ml-cvnets, whose checkpoints HF converts (see
    benchmarks/segmentation_parity.py)."""
    pytest.importorskip("transformers")
    # benchmarks/ is not installed: found in the checkout, after the
    # installed packages (appended, so the wheel's modules still win).
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if root not in sys.path:
        sys.path.append(root)
    from benchmarks.segmentation_parity import reference_model

    def build(width, output_stride, num_classes=21, dilate_like_ml_cvnets=True):
        key = (width, output_stride, num_classes, dilate_like_ml_cvnets)
        if key not in _HF_SEGMENTATION_CACHE:
            seed = int(width * 100) + output_stride
            _HF_SEGMENTATION_CACHE[key] = reference_model(
                width, output_stride, num_classes, seed=seed, dilate_like_ml_cvnets=dilate_like_ml_cvnets
            )
        return _HF_SEGMENTATION_CACHE[key]

    return build
