"""Tiny trainer models for the equivalence tests, and a one-process harness.

`python equivalence_worker.py --config JSON --model tiny --save out.npz`
runs one `Trainer` (e.g. one worker of a MultiWorkerMirroredStrategy cluster
given by TF_CONFIG) on a tiny MobileViTv2-like model and saves its final
weights, EMA and step losses. The same model functions are imported by the
tests for the in-process reference runs.
"""

import argparse
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402


def deterministic_init(model, seed=0):
    """The same non-degenerate weights in every process (BN statistics included)."""
    rng = np.random.RandomState(seed)
    for variable in model.weights:
        shape = tuple(variable.shape)
        name = variable.path
        if name.endswith("moving_variance"):
            value = rng.rand(*shape) + 0.5
        elif name.endswith("moving_mean"):
            value = rng.randn(*shape) * 0.2
        elif len(shape) == 1:
            value = rng.randn(*shape) * 0.2 + (1.0 if name.endswith("gamma") else 0.0)
        else:
            fan_in = int(np.prod(shape[:2])) if "depthwise" in name else int(np.prod(shape[:-1]))
            value = rng.randn(*shape) / np.sqrt(fan_in)
        variable.assign(value.astype(variable.dtype))
    return model


def _blow_up_gradient_layer():
    import keras
    import tensorflow as tf

    class BlowUpGradient(keras.layers.Layer):
        """Identity forward; the backward pass multiplies by 1e8, which
        overflows float16 (max 65504): every step's gradient is inf."""

        def call(self, x):
            @tf.custom_gradient
            def identity(value):
                def grad(upstream):
                    big = tf.constant(1e4, upstream.dtype)
                    return upstream * big * big

                return tf.identity(value), grad

            return identity(x)

    return BlowUpGradient()


def tiny_model(image_size, num_classes, classifier_activation=None, frozen_bn=False, blow_up=False, seed=3):
    """Stem conv + BatchNorm, an inverted residual (BatchNorms), one
    MobileViTv2 block (layer norms, separable attention), classifier."""
    import keras

    from keras_mobilevitv2.layers import InvertedResidual
    from keras_mobilevitv2.layers import MobileViTv2Block

    inputs = keras.Input((image_size, image_size, 3))
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.ZeroPadding2D(1)(x)
    x = keras.layers.Conv2D(8, 3, strides=2, use_bias=False)(x)
    x = keras.layers.BatchNormalization(epsilon=1e-5, momentum=0.9)(x)
    x = keras.layers.Activation("silu")(x)
    if blow_up:
        x = _blow_up_gradient_layer()(x)
    x = InvertedResidual(16, strides=2)(x)
    x = MobileViTv2Block(16, num_blocks=1)(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(num_classes)(x)
    x = keras.layers.Activation(classifier_activation or "linear", dtype="float32")(x)
    model = keras.Model(inputs, x, name="tiny_trainer_model")
    deterministic_init(model, seed)
    if frozen_bn:
        # trainable=False: BatchNorm runs in inference mode (moving statistics),
        # so each example's output depends on that example alone.
        for layer in model._flatten_layers():
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.trainable = False
    return model


def tiny_qat_model(image_size, num_classes, classifier_activation=None):
    """`tiny_model` through quantize_model, calibrated on fixed images; its
    activation ranges move fast (EMA decay 0.5) so that a range update that
    differs between runs shows in three steps."""
    from quantization import calibrate
    from quantization import quantize_model
    from quantization.quantize import quantizers

    qat = quantize_model(tiny_model(image_size, num_classes, classifier_activation))
    for quantizer in quantizers(qat):
        quantizer.ema_decay = 0.5
    images = np.random.RandomState(5).rand(8, image_size, image_size, 3).astype("float32") * 255
    return calibrate(qat, images)


class _TinyModels:
    """A `Trainer(model_fn=...)` for `kind` in tiny | tiny_frozen_bn |
    tiny_blow_up | tiny_qat | tiny_qat_distill (QAT's targets half the
    labels, half the outputs of another tiny float model, its `teacher`)."""

    teacher_weight = 0.5

    def __init__(self, kind):
        self.kind = kind
        self.teacher = None

    def __call__(self, config, num_classes, source, classifier_activation, initialize):
        if self.kind in ("tiny_qat", "tiny_qat_distill"):
            if self.kind == "tiny_qat_distill" and initialize:
                self.teacher = tiny_model(config.image_size, num_classes, seed=7)
            return tiny_qat_model(config.image_size, num_classes, classifier_activation)
        return tiny_model(
            config.image_size,
            num_classes,
            classifier_activation,
            frozen_bn=self.kind == "tiny_frozen_bn",
            blow_up=self.kind == "tiny_blow_up",
        )


def model_fn(kind):
    return _TinyModels(kind)


def run_state(trainer):
    """What a finished run ends with: per model weight `w{i}` its value,
    `ema{i}` its average and, for trainable ones, Adam's first and second
    moments `m{i}`, `v{i}` (linear / quadratic in the gradients, which the
    weights are not: Adam normalises the gradient's scale away)."""
    model, optimizer = trainer.model, trainer.optimizer
    adam = getattr(optimizer, "inner_optimizer", optimizer)
    trainable = {id(v) for v in model.trainable_variables}
    state = {"losses": np.array(trainer.step_losses), "names": np.array([w.path for w in model.weights])}
    for i, weight in enumerate(model.weights):
        state[f"w{i}"] = weight.numpy()
        state[f"ema{i}"] = np.asarray(trainer.ema_weights[i])
        if id(weight) in trainable:
            index = adam._get_variable_index(weight)
            state[f"m{i}"] = adam._momentums[index].numpy()
            state[f"v{i}"] = adam._velocities[index].numpy()
    return state


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True, help="TrainConfig fields as JSON.")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--save", required=True)
    args = parser.parse_args()

    from training import TrainConfig
    from training import Trainer

    trainer = Trainer(TrainConfig(**json.loads(args.config)), verbose=False, model_fn=model_fn(args.model))
    trainer.run()
    np.savez(args.save, **run_state(trainer))
    return 0


if __name__ == "__main__":
    sys.exit(main())
