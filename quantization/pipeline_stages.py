"""The stages of the main job (`python -m quantization.pipeline`), each the
same as one documented command, which it prints before it runs:

    train    python -m training.train ...            the float model
    qat      python -m quantization.qat ...          QAT fine-tune + QAT int8 TFLite
    export   python -m quantization.export --mode    float32 and PTQ int8 TFLite
    targets  python -m quantization.export --target  Edge TPU, TFLite Micro, Android, ONNX
    report   python -m quantization.pipeline --stages=report

A stage reads what the earlier ones wrote in `output_dir`, so any of them
can be re-run alone.
"""

import dataclasses
import os
import shlex

from training.recipe import RECIPES
from training.recipe import TrainConfig

STAGES = ("train", "qat", "export", "targets", "report")


class StageError(RuntimeError):
    """A stage's export failed its audit or a target refused the model; what
    failed was printed above it."""


TARGET_NAMES = ("edgetpu", "micro", "android", "onnx")


def learning_rates(model, float_lr=None):
    """(float peak lr, QAT lr) of the pipeline's short runs at batch 32, by the
    model's width unless `float_lr` is given (benchmarks.qat_fidelity, README):
    - float 3e-3 up to width 1.0; at width 2.0 it collapsed to chance, 1e-3
      trained it (results/qat_fidelity_float_lr.md). Widths 1.25-1.75 take
      2.0's rate, unmeasured;
    - QAT at 1/30 of it: 1e-4 (with the 50-step warm-up) met the QAT bar in
      more cells than 2e-5; at width 2.0, 1e-4 took a model from 89.0 to 66.8
      in one epoch (results/qat_fidelity_w2_qat_lr1e-4.md)."""
    if float_lr is None:
        float_lr = 3e-3 if _width(model) <= 1.0 else 1e-3
    return float_lr, round(float_lr / 30, 12)


def _width(model):
    if model not in RECIPES:
        raise ValueError(f"Unknown --model {model!r}; choose one of {sorted(RECIPES)}.")
    return RECIPES[model]["width"]


def qat_distillation_for(model):
    """The float model's share of the QAT targets by the model's width
    (benchmarks.qat_fidelity, README): 0 (the labels only) up to width 1.0,
    where the fine-tune on the labels met the QAT bar in 8 of 8 cells and a
    half share in 7; 0.5 above, where the labels met it in 3 of 4 and the
    half share in 4 (a model that already fits its training images learns
    little more from the labels; the float model's share holds the
    fake-quant model to what the float one computed). Widths
    1.25-1.75 take 2.0's share, unmeasured."""
    return 0.0 if _width(model) <= 1.0 else 0.5


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """What the main job trains, on which data, and where it writes."""

    output_dir: str = "runs/pipeline"
    model: str = "mobilevitv2_050"
    attention_norm: str = "layer_norm_2d"
    data: str = "embedded"
    dataset_dir: str = ""
    image_size: int = 64
    batch_size: int = 32
    float_epochs: int = 18
    qat_epochs: int = 1
    float_lr: float = None  # None: by width (`learning_rates`)
    qat_lr: float = None  # None: the float rate / 30 (`learning_rates`)
    qat_warmup_steps: int = 50  # about the first QAT epoch of the embedded and the study's datasets
    qat_bn_steps: int = 0
    qat_distillation: float = None  # None: by width (`qat_distillation_for`)
    seed: int = 0
    calibration_images: int = 128
    targets: tuple = TARGET_NAMES

    def __post_init__(self):
        float_lr, qat_lr = learning_rates(self.model, self.float_lr)
        object.__setattr__(self, "float_lr", float_lr)
        if self.qat_lr is None:
            object.__setattr__(self, "qat_lr", qat_lr)
        if self.qat_distillation is None:
            object.__setattr__(self, "qat_distillation", qat_distillation_for(self.model))
        from quantization.qat import check_distillation

        # Before the float training, not when the QAT stage starts.
        check_distillation(self.qat_distillation, "--qat_distillation")

    @property
    def float_dir(self):
        return os.path.join(self.output_dir, "float")

    @property
    def qat_dir(self):
        return os.path.join(self.output_dir, "qat")

    @property
    def tflite_dir(self):
        return os.path.join(self.output_dir, "tflite")

    @property
    def deploy_dir(self):
        return os.path.join(self.output_dir, "deploy")

    @property
    def report_dir(self):
        return os.path.join(self.output_dir, "report")

    def tflite_path(self, mode):
        """The float32 / ptq_int8 exports of the float model, and the QAT
        command's qat_int8 export."""
        if mode == "qat_int8":
            return os.path.join(self.qat_dir, f"{self.model}_qat_int8.tflite")
        return os.path.join(self.tflite_dir, f"{self.model}_{mode}.tflite")


def float_train_config(config):
    """The trainer's settings for the float model: a short run on a small
    dataset, so light augmentation and a short EMA."""
    return TrainConfig(
        model=config.model,
        attention_norm=config.attention_norm,
        data=config.data,
        dataset_dir=config.dataset_dir,
        model_dir=config.float_dir,
        image_size=config.image_size,
        batch_size=config.batch_size,
        epochs=config.float_epochs,
        lr=config.float_lr,
        min_lr=round(config.float_lr / 20, 12),  # 1.5e-4, not 0.00015000000000000001 in the command
        warmup_steps=50,
        seed=config.seed,
        deterministic=True,  # a rerun gives the same model (see TrainConfig)
        randaugment=False,
        mixup_alpha=0.0,
        cutmix_alpha=0.0,
        random_erasing=0.0,
        crop_min_scale=0.35,
        ema_decay=0.9,  # a few hundred fast-moving steps: a short average
        max_eval_images=100,  # the per-epoch check; the report evaluates the whole split
    )


def qat_train_config(config):
    """The QAT fine-tune: the float run's settings, from its model, at a
    small learning rate."""
    return dataclasses.replace(
        float_train_config(config),
        model_dir=config.qat_dir,
        epochs=config.qat_epochs,
        lr=config.qat_lr,
        min_lr=round(config.qat_lr / 10, 12),
        warmup_steps=config.qat_warmup_steps,
        init_weights=os.path.join(config.float_dir, "model.keras"),
    )


def _flag(name, value):
    if isinstance(value, bool):
        return f"--{name}={'true' if value else 'false'}"
    return f"--{name}={value}"


def trainer_flags(train_config):
    """The trainer's command-line flags that give `train_config` (every field
    that differs from the default)."""
    default = TrainConfig()
    return [
        _flag(field.name, getattr(train_config, field.name))
        for field in dataclasses.fields(TrainConfig)
        if getattr(train_config, field.name) != getattr(default, field.name)
    ]


def pipeline_flags(config):
    """This command's flags that give `config` (those not at their default)."""
    default = PipelineConfig()
    found = []
    for field in dataclasses.fields(PipelineConfig):
        value = getattr(config, field.name)
        if value != getattr(default, field.name):
            found.append(f"--{field.name}={','.join(value)}" if field.name == "targets" else _flag(field.name, value))
    return found


def _data_flags(config):
    """--data, and --dataset_dir when one is set."""
    return ["--data", config.data, *(["--dataset_dir", config.dataset_dir] if config.dataset_dir else [])]


def export_arguments(config, mode):
    """`python -m quantization.export` arguments of the float32 / ptq_int8 export."""
    return [
        "--model", os.path.join(config.float_dir, "model.keras"), "--mode", mode,
        "--output", config.tflite_path(mode), *_data_flags(config),
        "--num_images", str(config.calibration_images),
    ]  # fmt: skip


def target_arguments(config, target):
    """`python -m quantization.export` arguments of one deployment target: the
    QAT model, and for Android the float model (float16) beside it."""
    qat = os.path.join(config.qat_dir, "model.keras")
    model = ["--model", os.path.join(config.float_dir, "model.keras"), "--qat_model", qat]
    return [
        *(model if target == "android" else ["--model", qat]), "--target", target,
        "--output_dir", config.deploy_dir, *_data_flags(config),
        "--num_images", "64",
    ]  # fmt: skip


def command(module, arguments):
    """The shell command line of `python -m module arguments`."""
    return " ".join(["python", "-m", module, *(shlex.quote(str(a)) for a in arguments)])


def announce(step, title, command_line):
    print(f"\n== {step} {title}\n   {command_line}", flush=True)


def run_train(config):
    from training.trainer import Trainer

    train_config = float_train_config(config)
    announce("1/5", "Float training", command("training.train", trainer_flags(train_config)))
    Trainer(train_config).run()


def run_qat_stage(config):
    from quantization.qat import run_qat

    train_config = qat_train_config(config)
    flags = [*trainer_flags(train_config), f"--calibration_images={config.calibration_images}"]
    if config.qat_bn_steps:
        flags.append(f"--batch_statistics_steps={config.qat_bn_steps}")
    if config.qat_distillation:
        flags.append(f"--distillation={config.qat_distillation:g}")
    announce("2/5", "Quantization-aware fine-tuning and the QAT int8 export", command("quantization.qat", flags))
    _, report = run_qat(
        train_config,
        calibration_images=config.calibration_images,
        batch_statistics_steps=config.qat_bn_steps,
        distillation=config.qat_distillation,
    )
    if report["errors"]:
        raise StageError(f"The QAT int8 export failed its audit: {report['errors']}")


def run_exports(config):
    from quantization.export import main as export_main

    for mode in ("float32", "ptq_int8"):
        arguments = export_arguments(config, mode)
        announce("3/5", f"{mode} TFLite export", command("quantization.export", arguments))
        if export_main(arguments) != 0:
            raise StageError(f"The {mode} export failed (see above); rerun it alone with the command printed there.")


def run_targets(config):
    from quantization.export import main as export_main

    for target in config.targets:
        arguments = target_arguments(config, target)
        announce("4/5", f"Deployment target {target}", command("quantization.export", arguments))
        if export_main(arguments) != 0:
            raise StageError(
                f"The {target} target refused the model (see above); rerun it alone with the command printed there."
            )


def run_report(config):
    """Evaluates every model on the evaluation split and writes the report
    (tables, pipeline_report.json, report.png); returns the report's path."""
    import platform

    from quantization import pipeline_report
    from quantization.qat import sample_images
    from training.data import resolve_source

    arguments = [*pipeline_flags(config), "--stages=report"]
    announce("5/5", "Accuracy, size, latency and targets", command("quantization.pipeline", arguments))
    train_config = float_train_config(config)
    source = resolve_source(config.data, dataset_dir=config.dataset_dir or None)
    images, labels = sample_images(source, train_config, source.eval.num_examples, split="eval", with_labels=True)
    rows, predictions = pipeline_report.evaluate_models(config, images, labels)
    figures = pipeline_report.target_figures(config)
    extra = {
        "config": dataclasses.asdict(config),
        "evaluation_images": int(len(images)),
        "machine": {"cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine()},
    }
    summary = pipeline_report.write_report(config, rows, figures, extra)
    pipeline_report.draw_picture(
        os.path.join(config.report_dir, pipeline_report.PICTURE), images, labels, predictions, source.class_names, rows
    )
    print(
        f"\n{len(images)} evaluation images, {config.model} at {config.image_size}x{config.image_size}; latency: "
        f"batch 1, median, default TFLite CPU runtime, {os.cpu_count()} threads\n\n{summary}\n"
    )
    print(
        f"Report: {config.report_dir}/ ({pipeline_report.REPORT_JSON}, {pipeline_report.SUMMARY}, "
        f"{pipeline_report.PICTURE})"
    )
    return os.path.join(config.report_dir, pipeline_report.REPORT_JSON)


RUNNERS = {
    "train": run_train,
    "qat": run_qat_stage,
    "export": run_exports,
    "targets": run_targets,
    "report": run_report,
}
