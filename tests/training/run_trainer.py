"""Test harness: runs one Trainer in this process from a JSON config.

Used by the tests that need separate processes (multi-worker, SIGKILL,
logical CPU replicas). Writes the final weights and EMA to --save_weights.
"""

import argparse
import json
import os
import socket
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def free_ports(count):
    """`count` loopback ports free at this moment (for a TF_CONFIG cluster)."""
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _listed_block_class():
    import keras

    @keras.saving.register_keras_serializable(package="keras_mobilevitv2_tests")
    class ListedBlock(keras.layers.Layer):
        """Conv + BN held in a list, as MobileViTv2 holds its transformer
        blocks: Keras 3 keeps such layers out of TF's object graph, and the
        BN statistics are reached by no optimizer either."""

        def __init__(self, filters, **kwargs):
            super().__init__(**kwargs)
            self.filters = filters
            self.parts = [
                keras.layers.Conv2D(filters, 3, strides=2, use_bias=False, name="conv"),
                keras.layers.BatchNormalization(name="bn"),
            ]

        def call(self, inputs, training=None):
            return self.parts[1](self.parts[0](inputs), training=training)

        def get_config(self):
            return {**super().get_config(), "filters": self.filters}

    return ListedBlock


def tiny_model_fn(config, num_classes, source, classifier_activation, initialize):
    """A Trainer model_fn with one conv, BN (in a list) and a classifier: the
    trainer's mechanics (BN statistics, EMA, optimizer state) at a fraction
    of the time."""
    import keras

    inputs = keras.Input((config.image_size, config.image_size, 3))
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = _listed_block_class()(8, name="block")(x)
    x = keras.layers.Activation("relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(num_classes, name="logits")(x)
    outputs = keras.layers.Activation(classifier_activation, dtype="float32")(x)
    return keras.Model(inputs, outputs, name="tiny")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True, help="TrainConfig fields as JSON.")
    parser.add_argument("--logical_cpus", type=int, default=0)
    parser.add_argument("--save_weights", default="")
    parser.add_argument("--tiny_model", action="store_true", help="Train tiny_model_fn's model.")
    args = parser.parse_args()

    import numpy as np
    import tensorflow as tf

    if args.logical_cpus:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * args.logical_cpus)
    from training import DetectionTrainer
    from training import SegmentationTrainer
    from training import TrainConfig
    from training import Trainer

    config = TrainConfig(**json.loads(args.config))
    trainer_class = {"segmentation": SegmentationTrainer, "detection": DetectionTrainer}.get(config.task, Trainer)
    trainer = trainer_class(config, model_fn=tiny_model_fn if args.tiny_model else None)
    try:
        trainer.run()
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.save_weights:
        np.savez(
            args.save_weights,
            *[w.numpy() for w in trainer.model.weights],
            *trainer.ema_weights,
        )
    print(json.dumps({"losses": trainer.step_losses}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
