"""What the latency section (`latency.py`) and its in-turn timing
(`in_turn.py`) share: the row layout, the input images and a worker's set-up.
Below both, so that neither imports the other's internals.
"""

import os

import numpy as np

SEED = 0


def latency_row(implementation, width, batch, image_size, runtime, status="ok", reason="", timing=None, tflite=None):
    """One latency result (or its failure) as the report reads it."""
    return {
        "implementation": implementation.key,
        "label": implementation.label,
        "width": width,
        "batch": batch,
        "image_size": image_size,
        "runtime": runtime,
        "status": status,
        "reason": reason,
        "timing": timing.to_dict() if timing is not None else None,
        "tflite": tflite,
    }


def random_images(implementation, count, image_size, seed, channels_first=False):
    """`count` seeded random images in `implementation`'s input range."""
    low, high = implementation.input_range
    rng = np.random.default_rng(seed)
    shape = (count, 3, image_size, image_size) if channels_first else (count, image_size, image_size, 3)
    return rng.uniform(low, high, shape).astype(np.float32)


def prepare_worker_process(implementation, threads):
    """Thread settings before the framework runs its first op."""
    if implementation.framework == "torch":
        from benchmarks.runtimes import configure_torch_threads

        configure_torch_threads(threads)
        return
    if implementation.framework == "tf_keras":
        # Before TensorFlow is imported: tf.keras is then tf_keras (Keras 2).
        os.environ["TF_USE_LEGACY_KERAS"] = "1"
    from benchmarks.runtimes import configure_tensorflow_threads

    configure_tensorflow_threads(threads)
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")  # retracing notices: every runner has its own tf.function
