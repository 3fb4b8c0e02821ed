"""Export to TFLite: float32, float16, dynamic-range, PTQ int8 and QAT int8.

Every export is audited (see `audit.py`); the audit is printed and written as
JSON beside the model, and a model that fails it is not written.
"""

import collections
import hashlib
import json
import numbers
import os
import tempfile

import keras
import numpy as np
import tensorflow as tf

from keras_mobilevitv2.layers.folding import fold_norm_affines
from keras_mobilevitv2.layers.nesting import nested_layers
from quantization.audit import audit as audit_flatbuffer
from quantization.audit import format_report
from quantization.fake_quant import ActivationQuantizer
from quantization.merge_pointwise import merge_linear_pointwise_pairs
from quantization.xnnpack_ranges import widen_narrow_means

MODES = ("float32", "float16", "dynamic", "ptq_int8", "qat_int8")
IO_TYPES = ("int8", "uint8", "float32")
# Least top-1 agreement with Keras on the sample images before an export is
# refused. Float modes differ from Keras by rounding only (float32 ~1e-6,
# float16 ~1e-3 relative): on 64 images 0.98 lets one near-tie flip, 0.95
# three. int8 drifts further: on the README's trained MobileViTv2-0.5 the QAT
# model (as ONNX QDQ) agrees 0.969 with Keras on 64 images and PTQ int8 loses
# 2 points of accuracy (0.8025 vs 0.8225),
# while a broken calibration collapses the images into fewer classes
# (0.27 for the colour model of tests/quantization/test_export_inputs.py
# calibrated on [0, 1] images instead of [0, 255] pixels). The random-weight
# test models predict one class for every image, so they agree 1.0 in every
# mode and set no bound themselves.
MIN_TOP1_AGREEMENT = {"float32": 0.98, "float16": 0.95, "dynamic": 0.90, "ptq_int8": 0.80, "qat_int8": 0.80}


def is_qat(model):
    """True for a model from `quantize_model` (it holds activation fake-quants)."""
    return any(isinstance(layer, ActivationQuantizer) for layer in nested_layers(model))


def static_input_shape(model, what="TFLite export"):
    """(H, W, C) of the model's input; ValueError naming the shape when a size
    is dynamic, since every export traces one fixed-size graph."""
    shape = tuple(model.inputs[0].shape[1:])
    if None in shape:
        full = tuple(model.inputs[0].shape)
        raise ValueError(
            f"{what} needs a static input size; {model.name}'s input shape is {full}. Rebuild the model with "
            "input_shape=(H, W, 3) (e.g. MobileViTv2_050(weights=None, input_shape=(256, 256, 3))), copy the "
            "weights over with model.set_weights(loaded.get_weights()) and export that."
        )
    return shape


def check_images(images, shape, what):
    """`images` as float32 (N, *shape); ValueError saying what is expected."""
    raw = np.asarray(images)
    expected = f"float32 images of shape (N, {', '.join(map(str, shape))}) in the model's input range"
    if raw.dtype.kind not in "fiu":  # floats, or integer pixels that cast exactly
        raise ValueError(f"{what} must be {expected}; got dtype {raw.dtype}.")
    if raw.ndim != 4 or tuple(raw.shape[1:]) != tuple(shape):
        raise ValueError(f"{what} must be {expected}; got shape {raw.shape}.")
    images = raw.astype(np.float32)
    if len(images) == 0:
        raise ValueError(f"{what} is empty.")
    return images


def convert(model, mode, io_type="int8", representative_images=None, batch_size=1):
    """Returns the TFLite flatbuffer (bytes) of `model` in `mode`."""
    if mode not in MODES:
        raise ValueError(f"Unknown mode {mode!r}; choose one of {MODES}.")
    if io_type not in IO_TYPES:
        raise ValueError(f"Unknown io_type {io_type!r}; choose one of {IO_TYPES}.")
    integer = mode in ("ptq_int8", "qat_int8")
    if io_type != "float32" and not integer:
        raise ValueError(f"io_type={io_type!r} needs an int8 mode (ptq_int8 or qat_int8); {mode} has float I/O.")
    shape = static_input_shape(model)
    qat = is_qat(model)
    if mode == "qat_int8":
        if not qat:
            raise ValueError("mode='qat_int8' needs a model from quantization.quantize_model.")
        from quantization.quantize import uncalibrated_quantizers

        missing = uncalibrated_quantizers(model)
        if missing:
            raise ValueError(
                f"{len(missing)} activation ranges of the QAT model were never set (e.g. "
                f"{missing[:3]}): run quantization.calibrate(model, images) first."
            )
    elif qat:
        raise ValueError(f"mode={mode!r} takes the float model; this is a QAT model (use 'qat_int8').")
    if mode == "ptq_int8" and representative_images is None:
        raise ValueError("mode='ptq_int8' needs representative_images (about 100 typical inputs).")
    if representative_images is not None:
        representative_images = check_images(representative_images, shape, "representative_images")

    try:
        key = _conversion_key(model, mode, io_type, representative_images, batch_size)
    except (NotImplementedError, TypeError, ValueError):  # a layer without a config: not cached
        return _convert_uncached(model, mode, io_type, representative_images, batch_size)
    if key not in _CONVERSIONS:
        _CONVERSIONS[key] = _convert_uncached(model, mode, io_type, representative_images, batch_size)
        while len(_CONVERSIONS) > _CONVERSIONS_KEPT:
            _CONVERSIONS.popitem(last=False)
    return _CONVERSIONS[key]


# Converting a QAT model takes most of a minute on 2 cores. A process that
# exports the same model with the same settings twice (the pipeline's QAT
# stage and its TFLite Micro target) gets the bytes of the first conversion:
# the converter is deterministic, and the key covers everything it reads.
_CONVERSIONS = collections.OrderedDict()
_CONVERSIONS_KEPT = 4


def _conversion_key(model, mode, io_type, representative_images, batch_size):
    """A digest of the model (architecture and weights) and of the settings."""
    digest = hashlib.sha256(f"{mode}|{io_type}|{batch_size}|{tf.__version__}".encode())
    digest.update(model.to_json().encode())
    for weight in model.weights:
        value = np.ascontiguousarray(keras.ops.convert_to_numpy(weight))
        digest.update(f"{weight.path}|{value.dtype}|{value.shape}".encode())
        digest.update(value.tobytes())
    if representative_images is not None:
        digest.update(np.ascontiguousarray(representative_images).tobytes())
    return digest.hexdigest()


def _convert_uncached(model, mode, io_type, representative_images, batch_size):
    integer = mode in ("ptq_int8", "qat_int8")
    shape = static_input_shape(model)
    with tempfile.TemporaryDirectory() as saved_model:
        # Traced with each norm's affine folded into the next 1x1 convolution
        # (the converter does not do it): one MUL and ADD fewer per norm.
        with fold_norm_affines():
            archive = keras.export.ExportArchive()
            archive.track(model)
            archive.add_endpoint(
                "serve",
                lambda images: model(images, training=False),
                input_signature=[tf.TensorSpec((batch_size,) + shape, tf.float32, name="image")],
            )
            archive.write_out(saved_model, verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(saved_model)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        if mode != "float32":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if mode == "float16":
            converter.target_spec.supported_types = [tf.float16]
        if integer:
            if representative_images is not None:

                def dataset():
                    for image in representative_images:
                        yield [image[None].repeat(batch_size, 0)]

                converter.representative_dataset = dataset
                converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            io_dtype = {"int8": tf.int8, "uint8": tf.uint8, "float32": tf.float32}[io_type]
            converter.inference_input_type = io_dtype
            converter.inference_output_type = io_dtype
        flatbuffer = converter.convert()
    if mode == "float32":
        # Linear 1x1 conv pairs across block boundaries become one conv.
        flatbuffer, _ = merge_linear_pointwise_pairs(flatbuffer)
    if integer:
        # A norm's mean calibrated too narrow sends its SUB off XNNPACK.
        flatbuffer, _ = widen_narrow_means(flatbuffer)
    return flatbuffer


def export_tflite(
    model,
    path,
    mode,
    io_type=None,
    representative_images=None,
    sample_images=None,
    batch_size=1,
    allow_float=False,
    verbose=True,
    min_top1_agreement=None,
):
    """Converts, audits and writes `model` to `path` (a .tflite file).

    Args:
        model: A float Keras model (modes float32, float16, dynamic, ptq_int8)
            or a calibrated QAT model from `quantize_model` (qat_int8).
        path: Output file; the audit goes to `<path without .tflite>.audit.json`.
        mode: One of float32, float16, dynamic, ptq_int8, qat_int8.
        io_type: int8, uint8 or float32 input/output; int8 modes default to
            int8, the others are float32.
        representative_images: Float images in the model's input range; needed
            for ptq_int8, used by qat_int8 to let the converter check that
            everything is int8.
        sample_images: Images to compare TFLite with Keras on (the audit).
        batch_size: Static batch of the exported model (1 by default).
        allow_float: Accept float tensors inside an int8 model.
        min_top1_agreement: Least fraction of `sample_images` whose top-1
            class TFLite and Keras must agree on; default
            `MIN_TOP1_AGREEMENT[mode]` (float32 0.98, float16 0.95, dynamic
            0.90, ptq_int8 and qat_int8 0.80). 0 turns the check off.

    Returns:
        The audit dict. Raises ValueError (and writes no model) when the audit
        finds non-builtin ops, a tensor of rank > 4, float tensors inside an
        int8 model, or a top-1 agreement with Keras below the minimum.
    """
    if not str(path).endswith(".tflite"):
        raise ValueError(f"path must end in .tflite; got {path!r}")
    check_min_top1_agreement(min_top1_agreement)
    if io_type is None:
        io_type = "int8" if mode in ("ptq_int8", "qat_int8") else "float32"
    flatbuffer = convert(model, mode, io_type, representative_images, batch_size)
    if sample_images is not None:
        sample_images = check_images(sample_images, static_input_shape(model), "sample_images")
    report = audit_flatbuffer(flatbuffer, mode, model, sample_images, allow_float=allow_float)
    report["path"] = str(path)
    report["io_type"] = io_type
    _check_agreement(report, mode, min_top1_agreement)
    if verbose:
        print(format_report(report))
    if report["errors"]:
        raise ValueError(f"The {mode} export of {model.name} failed its audit: " + "; ".join(report["errors"]))
    write_model(flatbuffer, path)
    with open(str(path)[: -len(".tflite")] + ".audit.json", "w") as f:
        json.dump(report, f, indent=2)
    return report


def check_min_top1_agreement(value):
    """Raises on a minimum agreement that is not a fraction (None: the mode's)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value <= 1.0:
        raise ValueError(
            f"min_top1_agreement is a fraction of the sample images, in [0, 1] (or None for the mode's); got {value!r}"
        )


def _check_agreement(report, mode, minimum):
    """Records the minimum top-1 agreement in the audit and adds an error
    when the measured agreement is below it (no sample images: no check)."""
    agreement = report.get("agreement")
    if agreement is None:
        return
    minimum = MIN_TOP1_AGREEMENT[mode] if minimum is None else float(minimum)
    agreement["min_top1_agreement"] = minimum
    if agreement["top1_agreement"] < minimum:
        report["errors"].append(
            f"top-1 agreement with Keras {agreement['top1_agreement']:.3f} on {agreement['samples']} sample images "
            f"is below the {mode} minimum {minimum:.2f} (the TFLite model predicts other classes than Keras; "
            "check the calibration images, or pass min_top1_agreement= (--min_top1_agreement) to accept it)"
        )


def write_model(content, path):
    """Writes bytes atomically: a reader never sees a half-written model."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    temporary = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    with open(temporary, "wb") as f:
        f.write(content)
    os.replace(temporary, path)
