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


def is_qat(model):
    """True for a model from `quantize_model` (it holds activation fake-quants)."""
    return any(isinstance(layer, ActivationQuantizer) for layer in model._flatten_layers())


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
        sample_images = check_images(sample_images, static_input_shape(model), "sample_images")
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
                                            sample_images=samples, io_type=args.io_type,
                                            allow_cpu_fallback=args.allow_cpu_fallback)
    elif args.target == "micro":
        from quantization.micro import format_micro_report

        report = targets.export_for_micro(model, args.output_dir, name, calibration_images=calibration,
                                          sample_images=samples, arena_budget_bytes=args.arena_budget,
                                          flash_budget_bytes=args.flash_budget, io_type=args.io_type)
        print(format_micro_report(report))
    elif args.target == "android":
        from quantization.android import format_android_report

        if is_qat(model):
            raise ValueError("--target android needs the float model (it writes float16 and int8); "
                             "pass the QAT model with --qat_model.")
        qat = keras.models.load_model(args.qat_model, compile=False) if args.qat_model else None
        report = targets.export_for_android(model, args.output_dir, name, representative_images=calibration,
                                            sample_images=samples, qat_model=qat,
                                            int8_io_type=args.io_type)
        print(format_android_report(report))
    else:
        from quantization.onnx_export import format_onnx_report

        report = targets.export_for_onnx(model, args.output_dir, name, sample_images=samples,
                                         io_type=args.io_type)
        print(format_onnx_report(report))
    return report


def _calibrates(args, model):
    """True when the export quantizes a float model after training: the images
    then set its int8 ranges, and images unlike the training data cost
    accuracy without any error."""
    if is_qat(model):
        return False
    if args.mode:
        return args.mode == "ptq_int8"
    if args.target == "android":
        return not args.qat_model  # without it, the int8 model is PTQ of --model
    return args.target in ("edgetpu", "micro")


def _recorded_data(model_path):
    """The trainer's data settings recorded beside `model_path` (its
    model_dir/run_config.json): (dict with data, dataset_dir, num_classes,
    tfrecord_label_offset; the file's path), or None when there is none."""
    from training.trainer import RUN_CONFIG

    path = os.path.join(os.path.dirname(os.path.abspath(model_path)), RUN_CONFIG)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        run = json.load(f)
    if not run.get("data"):
        return None
    settings = {
        "data": run["data"],
        "dataset_dir": run.get("dataset_dir") or "",
        "num_classes": run.get("num_classes") or 0,
        "tfrecord_label_offset": run.get("tfrecord_label_offset") or 0,
    }
    return settings, path


def _data_settings(args, model):
    """(settings for training.data.resolve_source, a line saying where they came from).

    --data wins; else the data the model was trained on, when its model_dir
    records it; else the synthetic embedded images, but only for exports that
    use them to compare TFLite with Keras, never to calibrate.
    """
    if args.data:
        settings = {"data": args.data, "dataset_dir": args.dataset_dir, "num_classes": 0,
                    "tfrecord_label_offset": 0}
        return settings, f"images from --data {args.data}"
    recorded = _recorded_data(args.model)
    if recorded is not None:
        settings, path = recorded
        if args.dataset_dir:
            settings["dataset_dir"] = args.dataset_dir
        return settings, f"images from {settings['data']!r}, the data recorded in {path} (no --data given)"
    if _calibrates(args, model):
        from training.trainer import RUN_CONFIG

        what = f"--mode {args.mode}" if args.mode else f"--target {args.target} with a float model"
        raise ValueError(
            f"{what} calibrates the int8 ranges on --data, and {args.model} has no {RUN_CONFIG} beside it "
            "that records its training data. Give --data (what the model was trained on, as --data of the "
            "trainer); calibrating on other images loses accuracy silently. Pass --data embedded only if the "
            "model was trained on the embedded dataset."
        )
    settings = {"data": "embedded", "dataset_dir": args.dataset_dir, "num_classes": 0, "tfrecord_label_offset": 0}
    return settings, ("synthetic embedded images (no --data given): used only to compare the export with Keras, "
                      "not to calibrate; the agreement figures say nothing about accuracy on real data")


def _load_images(args, model, size):
    """The --num_images images for calibration and the audit, and logs their source."""
    from quantization.qat import sample_images
    from training import TrainConfig
    from training.data import resolve_source

    settings, origin = _data_settings(args, model)
    data = settings["data"]
    try:
        source = resolve_source(data, settings["num_classes"], settings["tfrecord_label_offset"],
                                settings["dataset_dir"] or None)
    except ValueError as error:
        if args.data:
            raise
        raise ValueError(f"{origin}: {error} Give --data.") from error
    print(f"Using {args.num_images} {origin}.", flush=True)
    config = TrainConfig(data=data, image_size=size, dataset_dir=settings["dataset_dir"])
    return sample_images(source, config, args.num_images)


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
    parser.add_argument("--io_type", default=None, choices=IO_TYPES, help="Model input/output type. --mode: int8 "
                        "modes default to int8, the others take float32 only. edgetpu: int8 (default) or uint8; "
                        "micro: int8 only; android: of the int8 model, float32 (default), int8 or uint8; "
                        "onnx: float32 only.")
    parser.add_argument("--output", help="Output .tflite path (--mode).")
    parser.add_argument("--output_dir", help="Output folder (--target).")
    parser.add_argument("--data", default=None, help="Images for calibration and the audit (as --data of the "
                        "trainer). Default: the data recorded in run_config.json beside --model; without one, "
                        "required to calibrate a float model (ptq_int8, or --target edgetpu / micro / android "
                        "without --qat_model), else synthetic images for the audit only.")
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

    from quantization.targets import check_io_type

    model = keras.models.load_model(args.model, compile=False)
    try:
        if args.target:  # before the slow part: a refused io_type costs nothing
            args.io_type = check_io_type(args.target, args.io_type)
        size = static_input_shape(model, f"Exporting {args.model}")[0]
        images = _load_images(args, model, size)
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
