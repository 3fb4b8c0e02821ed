"""TFLite conversion of every Keras implementation, and what is inside a model.

`TFLiteExporter` converts this package's models with the package's own
`quantization.export.convert` (what users get; PTQ int8, and QAT int8 from
`quantize_model` + `calibrate` without training) and the other Keras models
(Keras 3 or tf_keras) with the same converter settings, so every
implementation is quantized the same way:

* float32: builtin ops only;
* int8: post-training quantization, `Optimize.DEFAULT` with a representative
  dataset, `TFLITE_BUILTINS_INT8` and int8 input/output. When the converter
  refuses that, the model is converted again with `TFLITE_BUILTINS`, which
  keeps float ops where no int8 kernel exists. The op set used and the float
  tensors left inside (`float_tensors_inside`) are reported.

The SavedModel has a fixed batch size: TFLite folds shapes into constants, so
a batch-1 model cannot be resized to batch 16 afterwards.
"""

import os
import tempfile

import numpy as np

FLOAT_TYPES = ("FLOAT32", "FLOAT16", "FLOAT64")
# The converter's op set; the float tensors left inside are counted apart
# (TFLITE_BUILTINS_INT8 does not by itself guarantee a float-free model).
ROUTE_INT8 = "TFLITE_BUILTINS_INT8"
ROUTE_FALLBACK = "TFLITE_BUILTINS (float fallback)"


def float_tensors_inside(flatbuffer):
    """Number of float tensors that are not the model's inputs or outputs.

    Weights, constants and activations alike: an int8 model without float
    islands has none.
    """
    from quantization.audit import read_structure

    structure = read_structure(flatbuffer)
    boundary = set(structure["inputs"]) | set(structure["outputs"])
    return sum(
        1
        for index, tensor in enumerate(structure["tensors"])
        if index not in boundary and tensor["dtype"] in FLOAT_TYPES
    )


def _write_saved_model(model, directory, batch_shape, framework):
    import tensorflow as tf

    spec = tf.TensorSpec(batch_shape, tf.float32, name="image")
    if framework == "keras3":
        # Keras 3 variables are only frozen into constants through Keras'
        # own export archive (tf.saved_model.save keeps them as resources).
        import keras

        archive = keras.export.ExportArchive()
        archive.track(model)
        archive.add_endpoint("serve", lambda images: model(images, training=False), input_signature=[spec])
        archive.write_out(directory, verbose=False)
    elif framework == "tf_keras":
        serve = tf.function(lambda images: model(images, training=False), input_signature=[spec])
        tf.saved_model.save(model, directory, signatures={"serving_default": serve})
    else:
        raise ValueError(f"Cannot convert a {framework} model to TFLite.")


def _convert(saved_model, int8, representative_images, batch_size, supported_ops):
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(saved_model)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if int8:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]

        def dataset():
            for image in representative_images:
                yield [np.repeat(image[None], batch_size, axis=0).astype(np.float32)]

        converter.representative_dataset = dataset
        converter.target_spec.supported_ops = [supported_ops]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    return converter.convert()


def convert_keras_model(model, framework, mode, batch_size, representative_images=None):
    """(flatbuffer, route) for a Keras 3 or tf_keras model; mode float32 or int8."""
    import tensorflow as tf

    if mode not in ("float32", "int8"):
        raise ValueError(f"mode must be float32 or int8; got {mode!r}")
    shape = tuple(model.inputs[0].shape[1:])
    if None in shape:
        raise ValueError(f"TFLite export needs a static input shape; got {shape}")
    with tempfile.TemporaryDirectory() as directory:
        saved_model = os.path.join(directory, "saved_model")
        _write_saved_model(model, saved_model, (batch_size,) + shape, framework)
        if mode == "float32":
            return _convert(saved_model, False, None, batch_size, None), "float32"
        try:
            flatbuffer = _convert(
                saved_model, True, representative_images, batch_size, tf.lite.OpsSet.TFLITE_BUILTINS_INT8
            )
            return flatbuffer, ROUTE_INT8
        except Exception:  # the converter raises several types for "no int8 kernel"
            flatbuffer = _convert(saved_model, True, representative_images, batch_size, tf.lite.OpsSet.TFLITE_BUILTINS)
            return flatbuffer, ROUTE_FALLBACK


class TFLiteExporter:
    """Converts one built model per (mode, batch); this package's own export
    for our model, the shared converter settings for the others."""

    def __init__(self, implementation, model, calibration_images):
        self.implementation = implementation
        self.model = model
        self.calibration_images = calibration_images
        self._qat_model = None

    def _representative(self, batch):
        # Both converters fill each calibration batch with copies of one
        # image; about the same number of images is run whatever the batch
        # (latency does not depend on the ranges, conversion time does).
        count = max(1, -(-len(self.calibration_images) // batch))
        return self.calibration_images[:count]

    def export(self, runtime, batch):
        """(flatbuffer, route) for runtime tflite_float / tflite_int8 / tflite_int8_qat."""
        if self.implementation.ours:
            return self._export_ours(runtime, batch)
        mode = "float32" if runtime == "tflite_float" else "int8"
        return convert_keras_model(self.model, self.implementation.framework, mode, batch, self._representative(batch))

    def _export_ours(self, runtime, batch):
        from quantization.export import convert

        if runtime == "tflite_float":
            return convert(self.model, "float32", io_type="float32", batch_size=batch), "float32"
        if runtime == "tflite_int8":
            flatbuffer = convert(
                self.model,
                "ptq_int8",
                io_type="int8",
                representative_images=self._representative(batch),
                batch_size=batch,
            )
            return flatbuffer, "package PTQ int8"
        if self._qat_model is None:
            from quantization import calibrate
            from quantization import quantize_model

            qat_model = quantize_model(self.model)
            calibrate(qat_model, self.calibration_images)
            self._qat_model = qat_model
        flatbuffer = convert(
            self._qat_model,
            "qat_int8",
            io_type="int8",
            representative_images=self._representative(batch),
            batch_size=batch,
        )
        return flatbuffer, "package QAT int8 (calibrated, not trained)"
