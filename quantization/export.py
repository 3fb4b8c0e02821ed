"""Export to TFLite: float32, float16, dynamic-range, PTQ int8 and QAT int8.

Every export is audited (see `audit.py`); the audit is printed and written as
JSON beside the model, and a model that fails it is not written.

`python -m quantization.export` (`mobilevitv2-export`) is the command line.
The library is `quantization.tflite_export`, below the deployment targets that
this command line also drives; its names stay importable from here.
"""

import json
import os

import keras

from quantization.tflite_export import IO_TYPES
from quantization.tflite_export import MODES
from quantization.tflite_export import check_images
from quantization.tflite_export import convert
from quantization.tflite_export import export_tflite
from quantization.tflite_export import is_qat
from quantization.tflite_export import static_input_shape
from quantization.tflite_export import write_model

# The library names this module has always offered.
__all__ = [
    "IO_TYPES",
    "MODES",
    "check_images",
    "convert",
    "export_tflite",
    "is_qat",
    "main",
    "static_input_shape",
    "write_model",
]


# The command-line flags each target takes, by their keyword in its `export`.
_TARGET_OPTIONS = {
    "edgetpu": {"io_type": "io_type", "allow_cpu_fallback": "allow_cpu_fallback"},
    "micro": {"io_type": "io_type", "arena_budget_bytes": "arena_budget", "flash_budget_bytes": "flash_budget"},
    "android": {"io_type": "io_type", "allow_cpu_fallback": "allow_cpu_fallback", "qat_model": "qat_model"},
    "onnx": {"io_type": "io_type"},
}


def _export_target(args, model, images):
    """Looks the target up in `quantization.targets` and runs its `export`
    with the flags it takes; prints its report, also when it refuses."""
    from quantization import targets

    name = os.path.splitext(os.path.basename(args.model))[0]
    if name == "model":  # a trainer's model_dir/model.keras: name it after the model
        name = model.name
    options = {keyword: getattr(args, flag) for keyword, flag in _TARGET_OPTIONS[args.target].items()}
    if options.get("qat_model"):
        options["qat_model"] = keras.models.load_model(args.qat_model, compile=False)
    calibration = images if _calibrates(args, model) or args.target == "android" else None
    module = targets.target(args.target)
    try:
        report = module.export(
            model, args.output_dir, name, calibration_images=calibration, sample_images=images[:64], **options
        )
    except targets.TargetError as error:
        print(module.format_report(error.report))
        raise
    print(module.format_report(report))
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


def _source_settings(data, dataset_dir="", num_classes=0, label_offset=0):
    """The arguments of training.data.resolve_source, by name."""
    return {
        "data": data,
        "dataset_dir": dataset_dir or "",
        "num_classes": num_classes or 0,
        "tfrecord_label_offset": label_offset or 0,
    }


def _recorded_data(model_path):
    """The trainer's data settings recorded beside `model_path` (its
    model_dir/run_config.json): (dict with data, dataset_dir, num_classes,
    tfrecord_label_offset; the file's path), or None when there is none."""
    from training.run_config import RUN_CONFIG

    path = os.path.join(os.path.dirname(os.path.abspath(model_path)), RUN_CONFIG)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        run = json.load(f)
    if not run.get("data"):
        return None
    settings = _source_settings(
        run["data"], run.get("dataset_dir"), run.get("num_classes"), run.get("tfrecord_label_offset")
    )
    return settings, path


def _data_settings(args, model):
    """(settings for training.data.resolve_source, a line saying where they came from).

    --data wins; else the data the model was trained on, when its model_dir
    records it; else the synthetic embedded images, but only for exports that
    use them to compare TFLite with Keras, never to calibrate.
    """
    if args.data:
        return _source_settings(args.data, args.dataset_dir), f"images from --data {args.data}"
    recorded = _recorded_data(args.model)
    if recorded is not None:
        settings, path = recorded
        if args.dataset_dir:
            settings["dataset_dir"] = args.dataset_dir
        return settings, f"images from {settings['data']!r}, the data recorded in {path} (no --data given)"
    if _calibrates(args, model):
        from training.run_config import RUN_CONFIG

        what = f"--mode {args.mode}" if args.mode else f"--target {args.target} with a float model"
        raise ValueError(
            f"{what} calibrates the int8 ranges on --data, and {args.model} has no {RUN_CONFIG} beside it "
            "that records its training data. Give --data (what the model was trained on, as --data of the "
            "trainer); calibrating on other images loses accuracy silently. Pass --data embedded only if the "
            "model was trained on the embedded dataset."
        )
    return _source_settings("embedded", args.dataset_dir), (
        "synthetic embedded images (no --data given): used only to compare the export with Keras, "
        "not to calibrate; the agreement figures say nothing about accuracy on real data"
    )


def _load_images(args, model, size):
    """The --num_images images for calibration and the audit, and logs their source."""
    from quantization.qat import sample_images
    from training import TrainConfig
    from training.data import resolve_source

    settings, origin = _data_settings(args, model)
    data = settings["data"]
    try:
        source = resolve_source(
            data, settings["num_classes"], settings["tfrecord_label_offset"], settings["dataset_dir"] or None
        )
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

    parser = argparse.ArgumentParser(
        prog="mobilevitv2-export",
        description="Export a keras_mobilevitv2 model "
        "(float or QAT .keras file) to TFLite with an audit beside it (--mode), or "
        "for a deployment target with its report (--target).",
    )
    parser.add_argument("--model", required=True, help="A .keras file (a trainer's model.keras, float or QAT).")
    parser.add_argument("--mode", choices=MODES, help="A plain TFLite export (with --output).")
    parser.add_argument(
        "--target",
        choices=TARGETS,
        help="A deployment target (with --output_dir). A float "
        "model is quantized and calibrated on --data; a QAT model keeps its ranges.",
    )
    parser.add_argument(
        "--io_type",
        default=None,
        choices=IO_TYPES,
        help="Model input/output type. --mode: int8 "
        "modes default to int8, the others take float32 only. edgetpu: int8 (default) or uint8; "
        "micro: int8 only; android: of the int8 model, float32 (default), int8 or uint8; "
        "onnx: float32 only.",
    )
    parser.add_argument("--output", help="Output .tflite path (--mode).")
    parser.add_argument("--output_dir", help="Output folder (--target).")
    parser.add_argument(
        "--data",
        default=None,
        help="Images for calibration and the audit (as --data of the "
        "trainer). Default: the data recorded in run_config.json beside --model; without one, "
        "required to calibrate a float model (ptq_int8, or --target edgetpu / micro / android "
        "without --qat_model), else synthetic images for the audit only.",
    )
    parser.add_argument("--dataset_dir", default="")
    parser.add_argument("--num_images", type=int, default=128, help="Representative / sample images.")
    parser.add_argument("--allow_float", action="store_true", help="Accept float tensors in an int8 model.")
    parser.add_argument(
        "--min_top1_agreement",
        type=float,
        default=None,
        help="--mode: least fraction of the sample images on which TFLite and Keras predict the same "
        "class (default: the mode's minimum, MIN_TOP1_AGREEMENT); 0 turns the check off.",
    )
    parser.add_argument(
        "--allow_cpu_fallback",
        action="store_true",
        help="edgetpu: write the model even when some ops would run on the CPU; android: "
        "even when the float16 model has ops the GPU delegate cannot run.",
    )
    parser.add_argument("--arena_budget", type=int, default=None, help="micro: RAM for the tensor arena, bytes.")
    parser.add_argument("--flash_budget", type=int, default=None, help="micro: flash for the model, bytes.")
    parser.add_argument(
        "--qat_model",
        default=None,
        help="android: the QAT .keras model for the int8 export (default: post-training quantization of --model).",
    )
    args = parser.parse_args(argv)
    if (args.mode is None) == (args.target is None):
        parser.error("give exactly one of --mode (with --output) or --target (with --output_dir)")
    if args.mode and not args.output:
        parser.error("--mode needs --output")
    if args.target and not args.output_dir:
        parser.error("--target needs --output_dir")
    if args.min_top1_agreement is not None:
        if args.target:
            parser.error("--min_top1_agreement is the audit bar of a --mode export; the targets have their own checks")
        if not 0.0 <= args.min_top1_agreement <= 1.0:
            parser.error(f"--min_top1_agreement is a fraction, in [0, 1]; got {args.min_top1_agreement:g}")

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
            export_tflite(
                model,
                args.output,
                args.mode,
                io_type=args.io_type,
                representative_images=images,
                sample_images=images[:64],
                allow_float=args.allow_float,
                min_top1_agreement=args.min_top1_agreement,
            )
    except ValueError as error:  # includes the targets' TargetError
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
