"""Random but well-scaled weights, so int8 calibration sees sensible ranges.

A freshly initialised network can be degenerate for quantization (zero
biases and shifts, unit BatchNorm statistics, zero-initialised residual
scales): activation ranges collapse and the int8 graph is not representative.
These helpers give every tensor non-trivial values while keeping activations
of order one: kernels are normal with variance 1/fan-in, normalisation scales
near 1, shifts and running means near 0, running variances in [0.5, 1.5].
"""

import numpy as np


def _leaf_name(variable):
    # Keras 3 variables have `path` ("block/conv/kernel"); tf_keras ones only
    # `name` ("block/conv/kernel:0").
    name = getattr(variable, "path", None) or variable.name
    return name.split(":")[0].rsplit("/", 1)[-1]


def _numpy_dtype(variable):
    dtype = variable.dtype
    return np.dtype(getattr(dtype, "as_numpy_dtype", dtype))


def _depthwise_kernel_ids(model):
    # A depthwise kernel [kh, kw, C, 1] has fan-in kh*kw, not kh*kw*C; the
    # layer type is the only reliable sign (Keras 3 names it plain "kernel").
    # Imported here: the package loads TensorFlow, and a PyTorch worker that
    # loads TensorFlow before timm/torchvision segfaults (torch first only).
    from keras_mobilevitv2.layers.nesting import nested_layers

    ids = set()
    for layer in nested_layers(model, include_self=False):
        if "Depthwise" in type(layer).__name__:
            ids.update(id(variable) for variable in layer.weights if len(variable.shape) == 4)
    return ids


def randomize_keras_weights(model, seed=0):
    """Assigns random values to every float variable of a Keras 3 or tf_keras model."""
    rng = np.random.default_rng(seed)
    depthwise = _depthwise_kernel_ids(model)
    for variable in model.weights:
        dtype = _numpy_dtype(variable)
        if dtype.kind != "f":
            continue
        shape = tuple(int(d) for d in variable.shape)
        leaf = _leaf_name(variable)
        if leaf == "moving_variance":
            value = rng.uniform(0.5, 1.5, shape)
        elif leaf == "moving_mean":
            value = rng.normal(0.0, 0.2, shape)
        elif len(shape) <= 1:
            # Scales (gamma, layer scale) around 1, shifts and biases around 0.
            center = 1.0 if ("gamma" in leaf or "scale" in leaf) else 0.0
            value = center + rng.normal(0.0, 0.2, shape)
        else:
            fan_in = int(np.prod(shape[:2])) if id(variable) in depthwise else int(np.prod(shape[:-1]))
            value = rng.normal(0.0, 1.0, shape) / np.sqrt(max(fan_in, 1))
        variable.assign(value.astype(dtype))
    return model


def randomize_torch_weights(model, seed=0):
    """PyTorch counterpart (running statistics included); returns the model in eval mode."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point():
                continue  # num_batches_tracked
            if name.endswith("running_var"):
                value = torch.rand(tensor.shape, generator=generator) + 0.5
            elif name.endswith("running_mean"):
                value = torch.randn(tensor.shape, generator=generator) * 0.2
            elif tensor.ndim <= 1:
                center = 1.0 if name.endswith("weight") else 0.0
                value = torch.randn(tensor.shape, generator=generator) * 0.2 + center
            else:
                fan_in = int(np.prod(tensor.shape[1:]))  # [out, in/groups, kh, kw]
                value = torch.randn(tensor.shape, generator=generator) / np.sqrt(max(fan_in, 1))
            tensor.copy_(value)
    return model.eval()
