"""The main job, `make demo`: train -> QAT -> float / PTQ / QAT int8 TFLite
(audited) -> Edge TPU, TFLite Micro, Android and ONNX targets -> one report.

    python -m quantization.pipeline [--output_dir=runs/pipeline] [--stages=train,qat,...] [--helpfull]

On the embedded dataset by default (generated locally, no download). Every
stage prints the documented command that does the same alone (see
`quantization.pipeline_stages`); `--stages` re-runs some of them on what the
others wrote. Re-running resumes or reuses finished training.
"""

import dataclasses
import os
import sys

from absl import app
from absl import flags

from quantization.pipeline_stages import RUNNERS
from quantization.pipeline_stages import STAGES
from quantization.pipeline_stages import TARGET_NAMES
from quantization.pipeline_stages import PipelineConfig
from quantization.pipeline_stages import StageError

_HELP = {
    "output_dir": "Where every stage writes: float/, qat/, tflite/, deploy/, report/.",
    "model": "The classifier to train (mobilevitv2_050 ... mobilevitv2_200).",
    "attention_norm": "layer_norm_2d (the reference) or batch_norm_2d (the Edge TPU / MCU friendly option).",
    "data": "As the trainer's --data; 'embedded' is the generated 10-class dataset.",
    "dataset_dir": "Where the embedded dataset is generated (default ~/.keras/datasets).",
    "image_size": "Training and export input size (square).",
    "batch_size": "Training batch.",
    "float_epochs": "Epochs of float training.",
    "qat_epochs": "Epochs of quantization-aware fine-tuning.",
    "float_lr": "Peak learning rate of the float training. Default by width: 3e-3 up to width 1.0, 1e-3 above "
    "(width 2.0 collapsed to chance at 3e-3: benchmarks/results/qat_fidelity_float_lr.md).",
    "qat_lr": "Learning rate of the QAT fine-tune. Default: the float rate / 30 (1e-4 up to width 1.0).",
    "qat_warmup_steps": "Linear learning-rate warm-up steps of the QAT fine-tune (its AdamW starts afresh: "
    "without a warm-up its first steps move every weight by about the full learning rate).",
    "qat_bn_steps": "QAT BatchNorm: 0 folds frozen statistics from the first step; N normalizes the first N "
    "steps by batch statistics, then freezes them (as quantization.qat's --batch_statistics_steps).",
    "qat_distillation": "The float model's share of the QAT targets (knowledge distillation), the labels having "
    "the rest: 0 labels only, 1 the float model only (as quantization.qat's --distillation). Default by width: 0 "
    "up to width 1.0, 0.5 above (benchmarks/results/qat_fidelity.md).",
    "seed": "Seed of the initial weights and the data order.",
    "calibration_images": "Training images for the QAT ranges and the PTQ calibration.",
}


def define_pipeline_flags(flag_values=flags.FLAGS):
    """This command's flags; only its command line calls this."""
    defaults = PipelineConfig()
    for field in dataclasses.fields(PipelineConfig):
        value = getattr(defaults, field.name)
        if field.name == "targets":
            flags.DEFINE_list("targets", list(value), "Deployment targets to export to, of "
                              f"{', '.join(TARGET_NAMES)}.", flag_values=flag_values)  # fmt: skip
            continue
        define = {int: flags.DEFINE_integer, float: flags.DEFINE_float}.get(field.type, flags.DEFINE_string)
        # A default that depends on --model (the learning rates) stays None until PipelineConfig resolves it.
        default = None if field.default is None else value
        define(field.name, default, _HELP[field.name], flag_values=flag_values)
    flags.DEFINE_list("stages", list(STAGES), f"Stages to run, in order: {', '.join(STAGES)}.", flag_values=flag_values)


def config_from_flags(flag_values=flags.FLAGS):
    """The `PipelineConfig` of the parsed flags; UsageError for an unknown target."""
    values = {field.name: getattr(flag_values, field.name) for field in dataclasses.fields(PipelineConfig)}
    unknown = [target for target in values["targets"] if target not in TARGET_NAMES]
    if unknown:
        raise app.UsageError(f"Unknown --targets {unknown}; the targets are {', '.join(TARGET_NAMES)}.")
    values["targets"] = tuple(dict.fromkeys(values["targets"]))
    try:
        return PipelineConfig(**values)
    except ValueError as error:  # an unknown --model: a usage error, not a traceback
        raise app.UsageError(str(error)) from None


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    unknown = [stage for stage in flags.FLAGS.stages if stage not in STAGES]
    if unknown:
        raise app.UsageError(f"Unknown --stages {unknown}; the stages are {', '.join(STAGES)}.")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from absl import logging

    logging.set_verbosity(logging.WARNING)
    import keras_mobilevitv2  # noqa: F401  (registers the layers for loading)
    import quantization  # noqa: F401

    config = config_from_flags()
    for stage in STAGES:
        if stage not in flags.FLAGS.stages:
            continue
        try:
            RUNNERS[stage](config)
        except (StageError, ValueError) as error:  # said what failed: no traceback
            print(f"error: stage {stage}: {error}", file=sys.stderr)
            return 1
    return 0


def run():
    """Console-script entry point."""
    define_pipeline_flags()
    app.run(main)


if __name__ == "__main__":
    sys.exit(run())
