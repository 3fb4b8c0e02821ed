"""Fake-quantization primitives, tfmot's default 8-bit scheme in Keras 3.

tensorflow-model-optimization cannot wrap Keras 3 models, so the scheme is
re-created here on `tf.quantization.fake_quant_*`, which the TFLite converter
turns into real int8 tensors:

* activations: per-tensor, asymmetric, 8 bits, ranges tracked by an
  exponential moving average (decay 0.999) of batch min/max while training;
* weights: symmetric, narrow range ([-127, 127]), per output channel for
  convolutions, per tensor for dense layers, range = max |w|;
* ops whose int8 output range TFLite fixes (LOGISTIC, SOFTMAX) use that fixed
  range: [0, 255/256], i.e. scale 1/256 and zero point -128.
"""

import keras
import tensorflow as tf

EMA_DECAY = 0.999
# TFLite's int8 LOGISTIC and SOFTMAX output: scale 1/256, zero point -128.
UNIT_INTERVAL_RANGE = (0.0, 255.0 / 256.0)


def quantize_weights_per_channel(kernel, axis=-1):
    """Symmetric narrow-range per-channel fake quantization of a kernel."""
    rank = len(kernel.shape)
    axis = axis % rank
    moved = kernel if axis == rank - 1 else tf.experimental.numpy.moveaxis(kernel, axis, -1)
    reduce_axes = list(range(rank - 1))
    bound = tf.maximum(tf.reduce_max(tf.abs(moved), axis=reduce_axes), 1e-8)
    quantized = tf.quantization.fake_quant_with_min_max_vars_per_channel(
        moved, -bound, bound, num_bits=8, narrow_range=True
    )
    return quantized if axis == rank - 1 else tf.experimental.numpy.moveaxis(quantized, -1, axis)


def quantize_weights_per_tensor(kernel):
    bound = tf.maximum(tf.reduce_max(tf.abs(kernel)), 1e-8)
    return tf.quantization.fake_quant_with_min_max_vars(kernel, -bound, bound, num_bits=8, narrow_range=True)


def _global_batch_range(batch_min, batch_max):
    """The min and max over every replica's share of the batch.

    Under tf.distribute each replica sees its share; the range variables'
    MEAN aggregation alone would average the replicas' minima, not take the
    minimum of the global batch that one device sees. Gathering both across
    replicas makes the range update, and so the trained model, that of one
    device (tests/training/test_equivalence.py).
    """
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return batch_min, batch_max
    gathered = context.all_gather(tf.stack([-batch_min, batch_max])[None], axis=0)  # [replicas, 2]
    largest = tf.reduce_max(gathered, axis=0)
    return -largest[0], largest[1]


@keras.saving.register_keras_serializable(package="keras_mobilevitv2_quantization")
class ActivationQuantizer(keras.layers.Layer):
    """Per-tensor asymmetric int8 fake quantization with a tracked range.

    Three behaviours:
    * calibration (`calibrating = True`): passes values through unchanged and
      records the running min/max (the initial range before QAT);
    * training: updates the range by EMA of the batch min/max, then quantizes;
    * inference: quantizes with the stored range.

    `fixed_range=(lo, hi)` pins the range (no variables), for ops whose int8
    output range TFLite fixes. The range always includes 0, as TFLite requires.
    """

    def __init__(self, fixed_range=None, ema_decay=EMA_DECAY, **kwargs):
        kwargs.setdefault("autocast", False)
        super().__init__(**kwargs)
        self.fixed_range = tuple(fixed_range) if fixed_range is not None else None
        self.ema_decay = ema_decay
        self.calibrating = False

    def build(self, input_shape):
        if self.fixed_range is None:
            # aggregation="mean": replicas agree under tf.distribute.
            self.range_min = self.add_weight(
                name="range_min", shape=(), initializer="zeros", trainable=False, aggregation="mean"
            )
            self.range_max = self.add_weight(
                name="range_max", shape=(), initializer="zeros", trainable=False, aggregation="mean"
            )
            self.initialized = self.add_weight(
                name="initialized", shape=(), initializer="zeros", trainable=False, aggregation="mean"
            )

    def call(self, inputs, training=None, min_width=None):
        """`min_width`: a floor on the width of the range used to quantize
        (the stored range is unchanged), for a tensor whose scale must keep a
        ratio to another's (see `QuantizedNormalize`)."""
        x = tf.cast(inputs, tf.float32)
        if self.calibrating and self.fixed_range is not None:
            return x
        if self.fixed_range is not None:
            low, high = self.fixed_range
            return tf.quantization.fake_quant_with_min_max_vars(x, low, high, num_bits=8)
        batch_min = tf.minimum(tf.reduce_min(x), 0.0)
        batch_max = tf.maximum(tf.reduce_max(x), 0.0)
        if self.calibrating:
            first = self.initialized < 0.5
            self.range_min.assign(tf.where(first, batch_min, tf.minimum(self.range_min, batch_min)))
            self.range_max.assign(tf.where(first, batch_max, tf.maximum(self.range_max, batch_max)))
            self.initialized.assign(1.0)
            return x
        if training:
            batch_min, batch_max = _global_batch_range(batch_min, batch_max)
            decay = self.ema_decay
            self.range_min.assign(decay * self.range_min + (1 - decay) * batch_min)
            self.range_max.assign(decay * self.range_max + (1 - decay) * batch_max)
        # A degenerate range (all zeros) still needs a valid quantization scale.
        high = tf.maximum(self.range_max, self.range_min + 1e-6)
        if min_width is not None:
            high = tf.maximum(high, self.range_min + min_width)
        return tf.quantization.fake_quant_with_min_max_vars(x, self.range_min, high, num_bits=8)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update({"fixed_range": self.fixed_range, "ema_decay": self.ema_decay})
        return config
