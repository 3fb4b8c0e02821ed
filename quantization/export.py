"""Export to TFLite: float32, float16, dynamic-range, PTQ int8 and QAT int8.

Every export is audited (see `audit.py`); the audit is printed and written as
JSON beside the model, and a model that fails it is not written.
"""

import json
import os
import tempfile

import keras
import numpy as np
import tensorflow as tf

from keras_mobilevitv2.layers.folding import fold_norm_affines

from quantization.audit import audit as audit_flatbuffer
from quantization.audit import format_report
from quantization.fake_quant import ActivationQuantizer
from quantization.merge_pointwise import merge_linear_pointwise_pairs

MODES = ("float32", "float16", "dynamic", "ptq_int8", "qat_int8")
IO_TYPES = ("int8", "uint8", "float32")


def _is_qat(model):
    return any(isinstance(layer, ActivationQuantizer) for layer in model._flatten_layers())


def _check_images(images, shape, what):
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
    shape = tuple(model.inputs[0].shape[1:])
    if None in shape:
        raise ValueError(
            f"TFLite export needs a static input size; the model's input is {shape}. "
            "Build the model with input_shape=(H, W, 3)."
        )
    qat = _is_qat(model)
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
        representative_images = _check_images(representative_images, shape, "representative_images")

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
    return flatbuffer


def export_tflite(model, path, mode, io_type=None, representative_images=None, sample_images=None,
                  batch_size=1, allow_float=False, verbose=True):
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

    Returns:
        The audit dict. Raises ValueError (and writes no model) when the audit
        finds non-builtin ops, a tensor of rank > 4, or float tensors inside
        an int8 model.
    """
    if not str(path).endswith(".tflite"):
        raise ValueError(f"path must end in .tflite; got {path!r}")
    if io_type is None:
        io_type = "int8" if mode in ("ptq_int8", "qat_int8") else "float32"
    flatbuffer = convert(model, mode, io_type, representative_images, batch_size)
    if sample_images is not None:
        sample_images = _check_images(sample_images, model.inputs[0].shape[1:], "sample_images")
    report = audit_flatbuffer(flatbuffer, mode, model, sample_images, allow_float=allow_float)
    report["path"] = str(path)
    report["io_type"] = io_type
    if verbose:
        print(format_report(report))
    if report["errors"]:
        raise ValueError(f"The {mode} export of {model.name} failed its audit: " + "; ".join(report["errors"]))
    write_model(flatbuffer, path)
    with open(str(path)[: -len(".tflite")] + ".audit.json", "w") as f:
        json.dump(report, f, indent=2)
    return report


def write_model(content, path):
    """Writes bytes atomically: a reader never sees a half-written model."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    temporary = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    with open(temporary, "wb") as f:
        f.write(content)
    os.replace(temporary, path)


def _export_target(args, model, images):
    from quantization import targets

    name = os.path.splitext(os.path.basename(args.model))[0]
    if name == "model":  # a trainer's model_dir/model.keras: name it after the model
        name = model.name
    calibration, samples = images, images[:64]
    if args.target == "edgetpu":
        report = targets.export_for_edgetpu(model, args.output_dir, name, calibration_images=calibration,
                                            sample_images=samples, io_type=args.io_type or "int8",
                                            allow_cpu_fallback=args.allow_cpu_fallback)
    elif args.target == "micro":
        from quantization.micro import format_micro_report

        report = targets.export_for_micro(model, args.output_dir, name, calibration_images=calibration,
                                          sample_images=samples, arena_budget_bytes=args.arena_budget,
                                          flash_budget_bytes=args.flash_budget)
        print(format_micro_report(report))
    elif args.target == "android":
        from quantization.android import format_android_report

        qat_model = model if _is_qat(model) else None
        if qat_model is not None:
            raise ValueError("--target android needs the float model (it writes float16 and int8); "
                             "pass the QAT model with --qat_model.")
        qat = keras.models.load_model(args.qat_model, compile=False) if args.qat_model else None
        report = targets.export_for_android(model, args.output_dir, name, representative_images=calibration,
                                            sample_images=samples, qat_model=qat)
        print(format_android_report(report))
    else:
        from quantization.onnx_export import format_onnx_report

        report = targets.export_for_onnx(model, args.output_dir, name, sample_images=samples)
        print(format_onnx_report(report))
    return report


def main(argv=None):
    """`mobilevitv2-export`: a saved Keras model -> audited TFLite, or a
    deployment target (Edge TPU, TFLite Micro, Android, ONNX)."""
    import argparse
    import sys

    from quantization.targets import TARGETS

    parser = argparse.ArgumentParser(prog="mobilevitv2-export", description="Export a keras_mobilevitv2 model "
                                     "(float or QAT .keras file) to TFLite with an audit beside it (--mode), or "
                                     "for a deployment target with its report (--target).")
    parser.add_argument("--model", required=True, help="A .keras file (a trainer's model.keras, float or QAT).")
    parser.add_argument("--mode", choices=MODES, help="A plain TFLite export (with --output).")
    parser.add_argument("--target", choices=TARGETS, help="A deployment target (with --output_dir). A float "
                        "model is quantized and calibrated on --data; a QAT model keeps its ranges.")
    parser.add_argument("--io_type", default=None, choices=IO_TYPES, help="Default: int8 for int8 modes, else float32.")
    parser.add_argument("--output", help="Output .tflite path (--mode).")
    parser.add_argument("--output_dir", help="Output folder (--target).")
    parser.add_argument("--data", default="embedded", help="Images for calibration and the audit (as --data of the trainer).")
    parser.add_argument("--dataset_dir", default="")
    parser.add_argument("--num_images", type=int, default=128, help="Representative / sample images.")
    parser.add_argument("--allow_float", action="store_true", help="Accept float tensors in an int8 model.")
    parser.add_argument("--allow_cpu_fallback", action="store_true",
                        help="edgetpu: write the model even when some ops would run on the CPU.")
    parser.add_argument("--arena_budget", type=int, default=None, help="micro: RAM for the tensor arena, bytes.")
    parser.add_argument("--flash_budget", type=int, default=None, help="micro: flash for the model, bytes.")
    parser.add_argument("--qat_model", default=None, help="android: the QAT .keras model for the int8 export "
                        "(default: post-training quantization of --model).")
    args = parser.parse_args(argv)
    if (args.mode is None) == (args.target is None):
        parser.error("give exactly one of --mode (with --output) or --target (with --output_dir)")
    if args.mode and not args.output:
        parser.error("--mode needs --output")
    if args.target and not args.output_dir:
        parser.error("--target needs --output_dir")

    import keras_mobilevitv2  # noqa: F401  (registers the layers)
    import quantization  # noqa: F401
    from quantization.qat import sample_images
    from training import TrainConfig
    from training.data import resolve_source

    model = keras.models.load_model(args.model, compile=False)
    size = model.inputs[0].shape[1]
    source = resolve_source(args.data, dataset_dir=args.dataset_dir or None)
    config = TrainConfig(data=args.data, image_size=size, dataset_dir=args.dataset_dir)
    images = sample_images(source, config, args.num_images)
    try:
        if args.target:
            _export_target(args, model, images)
        else:
            export_tflite(model, args.output, args.mode, io_type=args.io_type, representative_images=images,
                          sample_images=images[:64], allow_float=args.allow_float)
    except ValueError as error:  # includes the targets' TargetError / MicroTargetError
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
