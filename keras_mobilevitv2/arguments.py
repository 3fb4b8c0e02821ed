"""Argument checks shared by the model builders (keras.applications style)."""

import math
import numbers

import keras

MIN_SIZE = 32


def is_number(value):
    # bool is an int to Python, but True is no width, size or rate; numpy
    # numbers are registered with `numbers` and pass.
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_positive_integer(value):
    return is_number(value) and isinstance(value, numbers.Integral) and value > 0


def is_width(value):
    """A width multiplier: a positive, finite number (not a bool)."""
    return is_number(value) and math.isfinite(value) and value > 0


def validate_rates(**rates):
    """Dropout-style rates in [0, 1), as floats; names the first bad one."""
    for name, rate in rates.items():
        if not (is_number(rate) and 0 <= rate < 1):
            raise ValueError(f"`{name}` must be a number in [0, 1) (not a bool). Received: {name}={rate!r}")
    return {name: float(rate) for name, rate in rates.items()}


def validate_input_shape(input_shape, input_tensor, weights):
    """Returns the (H, W, C) input shape to build, checking every source."""
    if input_tensor is not None and not isinstance(input_tensor, keras.KerasTensor):
        raise ValueError(
            "`input_tensor` must be a Keras tensor (from `keras.Input` or a "
            f"layer output). Received: input_tensor of type {type(input_tensor)}"
        )
    if input_shape is not None:
        if not (
            isinstance(input_shape, (tuple, list))
            and len(input_shape) == 3
            and all(d is None or is_positive_integer(d) for d in input_shape)
        ):
            raise ValueError(
                "`input_shape` must be a tuple of three integers (height, "
                "width, channels), positive and not bools; height or width "
                f"may be None. Received: input_shape={input_shape}"
            )
        input_shape = tuple(None if d is None else int(d) for d in input_shape)
        if input_tensor is not None:
            tensor_shape = tuple(input_tensor.shape[1:])
            if len(tensor_shape) != 3 or any(
                a is not None and b is not None and a != b for a, b in zip(input_shape, tensor_shape)
            ):
                raise ValueError(
                    f"`input_shape` {input_shape} does not match the shape of "
                    f"`input_tensor` {tensor_shape} (batch axis excluded)."
                )
    elif input_tensor is not None:
        input_shape = tuple(input_tensor.shape[1:])
        if len(input_shape) != 3:
            raise ValueError(
                "`input_tensor` must have shape (batch, height, width, "
                f"channels). Received: input_tensor.shape={input_tensor.shape}"
            )
    else:
        input_shape = (None, None, 3)

    height, width, channels = input_shape
    if (height is not None and height < MIN_SIZE) or (width is not None and width < MIN_SIZE):
        raise ValueError(f"Input size must be at least {MIN_SIZE}x{MIN_SIZE}; Received: input_shape={input_shape}")
    if channels is None:
        raise ValueError(f"The number of input channels must be known. Received: input_shape={input_shape}")
    if weights is not None and channels != 3:
        raise ValueError(
            f"The input must have 3 channels (RGB) to load pretrained weights; Received `input_shape={input_shape}`"
        )
    return input_shape
