"""tensorflow-model-optimization's QAT export of a small conv/BN/ReLU model.

Runs in its own process: importing tfmot switches TensorFlow to legacy Keras
(tf_keras) for the whole process. Writes the float weights, the calibration
images and tfmot's int8 TFLite model for the comparison test.

    python tfmot_reference.py OUTPUT_DIR
"""

import os
import sys

os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_model_optimization as tfmot  # noqa: E402
import tf_keras  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from small_model import SIZE  # noqa: E402
from small_model import build  # noqa: E402


def build_float_model():
    model = build(tf_keras)
    rng = np.random.RandomState(0)
    for weight in model.weights:
        shape, name = weight.shape, weight.name
        if "moving_variance" in name:
            value = rng.rand(*shape) + 0.5
        elif "moving_mean" in name:
            value = rng.randn(*shape) * 0.2
        elif "gamma" in name:
            value = rng.randn(*shape) * 0.2 + 1
        elif len(shape) == 1:
            value = rng.randn(*shape) * 0.2
        else:
            value = rng.randn(*shape) / np.sqrt(np.prod(shape[:-1]))
        weight.assign(value.astype("float32"))
    return model


def main(output_dir):
    model = build_float_model()
    images = np.random.RandomState(1).rand(64, SIZE, SIZE, 3).astype("float32")
    np.savez(os.path.join(output_dir, "float_weights.npz"), *[w.numpy() for w in model.weights])
    np.save(os.path.join(output_dir, "images.npy"), images)

    qat = tfmot.quantization.keras.quantize_model(model)
    # Calibrate tfmot's activation ranges to the float ranges of the same data,
    # as calibrate() does on our side: each quantize wrapper's output range is
    # the range of the float layer it wraps (tfmot moves the range of a conv
    # folded with BN and ReLU onto the ReLU).
    float_outputs = {
        layer.name: tf_keras.Model(model.input, layer.output)(images).numpy() for layer in model.layers[1:]
    }
    for variable in qat.weights:
        name = variable.name
        if name.startswith("quantize_layer/"):
            value = images.min() if name.endswith("_min:0") else images.max()
        elif "output_min" in name or "output_max" in name:
            layer = name.split("/")[0][len("quant_") :]
            value = float_outputs[layer].min() if "output_min" in name else float_outputs[layer].max()
            value = min(value, 0.0) if "output_min" in name else max(value, 0.0)
        else:
            continue
        variable.assign(value)

    converter = tf.lite.TFLiteConverter.from_keras_model(qat)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    with open(os.path.join(output_dir, "tfmot_int8.tflite"), "wb") as f:
        f.write(converter.convert())


if __name__ == "__main__":
    main(sys.argv[1])
