"""Quantization-aware fine-tuning with the trainer's loop and strategies.

    python -m quantization.qat --model=mobilevitv2_050 --data=/data/imagenet \
        --init_weights=runs/v2_050/model.keras --model_dir=runs/v2_050_qat \
        --strategy=mirrored --batch_size=256 --epochs=10 --lr=1e-5

Takes every flag of `python -m training.train` (same data and distribution
options) plus --calibration_images, --io_type, --batch_statistics_steps and
--distillation. The float weights given by --init_weights (any form the
models accept, or a trainer's model.keras) are folded and calibrated,
fine-tuned with fake quantization (with --distillation: partly towards the
float model's outputs), and exported to an audited int8 TFLite model in
--model_dir.
"""

import os

import numpy as np
from absl import app
from absl import flags

from training.flags import define_flags
from training.flags import run_job


def define_qat_flags():
    """The trainer's flags and this command's own; a second call does nothing.
    Only the command line calls it: importing this module defines no flag."""
    define_flags()
    if flags.FLAGS.find_module_defining_flag("calibration_images") == __name__:
        return
    flags.DEFINE_integer("calibration_images", 256, "Training images used to initialise the activation ranges.")
    flags.DEFINE_enum("io_type", "int8", ["int8", "uint8", "float32"], "Input/output type of the exported model.")
    flags.DEFINE_integer(
        "batch_statistics_steps",
        0,
        "BatchNorm during QAT: 0 folds the float model's statistics, frozen from the first step; N > 0 "
        "normalizes the first N steps by batch statistics (updating the moving ones), then freezes them.",
        lower_bound=0,
    )
    flags.DEFINE_float(
        "distillation",
        0.0,
        "Knowledge distillation: the share of the float model's class probabilities (on each augmented "
        "batch) in the fine-tune's targets, the labels having the rest; 0: the labels only, 1: the float "
        "model only. Classifiers only.",
        lower_bound=0.0,
        upper_bound=1.0,
    )
    flags.DEFINE_float(
        "min_top1_agreement",
        None,
        "The export's audit: least fraction of 64 sample images on which the int8 TFLite model and the "
        "QAT Keras model predict the same class (default: the qat_int8 minimum, 0.80); 0 turns it off. "
        "The QAT Keras model (model.keras) is kept either way.",
        lower_bound=0.0,
        upper_bound=1.0,
    )


def sample_images(source, config, count, split="train", seed=1234, with_labels=False):
    """`count` images, a seeded random subset of `split` (folder sources are
    sorted by class), through the evaluation transform, as float32 numpy;
    with `with_labels`, also their labels (same order)."""
    import dataclasses

    from training.data import DataSource
    from training.data import eval_dataset

    chosen = source.train if split == "train" else source.eval
    view = dataclasses.replace(config, max_eval_images=count)
    if config.task != "classification" and with_labels:
        raise ValueError("sample_images(with_labels=True) takes a classification source.")
    if config.task == "segmentation":
        return _segmentation_images(dataclasses.replace(source, eval=chosen), view, count)
    if config.task == "detection":
        return _detection_images(chosen, view, count)
    images, labels = [], []
    for batch, batch_labels in eval_dataset(
        DataSource(source.name, source.class_names, chosen, chosen), view, 64, shuffle_seed=(seed,)
    ):
        images.append(batch.numpy())
        labels.append(batch_labels.numpy())
    images = np.concatenate(images)[:count]
    return (images, np.concatenate(labels)[:count]) if with_labels else images


def _segmentation_images(source, config, count):
    """The first `count` images of `source.eval`, as the evaluation sees them
    (the split's order: the embedded data is in random order already)."""
    from training.segmentation_data import segmentation_eval_dataset

    images = [batch.numpy() for batch, _ in segmentation_eval_dataset(source, config, 64)]
    return np.concatenate(images)[:count]


def _detection_images(split, config, count):
    """The first `count` images of a detection split, as the evaluation sees them."""
    from training.detection_pipeline import detection_eval_dataset

    return np.concatenate([batch.numpy() for batch, _ in detection_eval_dataset(split, config, 64)])[:count]


_TRAINED_MODEL = {
    "segmentation": "segmenter (exported, without the auxiliary head) ",
    "detection": "SSDLite detector ",
}


def load_float_weights(model, config, path):
    """Float weights from any form the models accept, or a trainer's .keras file."""
    import keras

    if str(path).endswith(".keras"):
        trained = keras.models.load_model(path, compile=False)
        if len(trained.weights) != len(model.weights):
            kind = _TRAINED_MODEL.get(config.task, "")
            raise ValueError(f"{path} is not a {config.model} {kind}with this number of classes.")
        model.set_weights(trained.get_weights())
    elif config.task != "classification":
        if not str(path).endswith(".weights.h5"):
            raise ValueError(
                f"QAT of a {config.task} model starts from the trained model: give --init_weights=<the "
                f"{config.task} run's model.keras, or a .weights.h5 of the same model>; got {path!r}."
            )
        model.load_weights(path)
    else:
        from training.trainer import load_init_weights

        load_init_weights(model, config, path)


def check_distillation(value, flag="--distillation"):
    """Refuses a share of the float model in the QAT targets outside [0, 1]."""
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{flag} is the float model's share of the QAT targets, in [0, 1]; got {value}.")


class _CalibratedQATModels:
    """A Trainer model_fn that returns calibrated QAT models; it keeps the
    weights of the last calibrated one (`start_weights`), the starting point
    the safeguard compares the fine-tuned model with."""

    def __init__(self, calibration_images, batch_statistics_steps=0, distillation=0.0):
        check_distillation(distillation)
        self.calibration_images = calibration_images
        self.batch_statistics_steps = batch_statistics_steps or None  # 0: BatchNorm folded from the start
        self.teacher_weight = float(distillation)
        self.start_weights = None
        self.teacher = None  # with distillation: the float model, whose outputs the Trainer fits

    @property
    def run_settings(self):
        """What a QAT checkpoint depends on besides its TrainConfig: a resume
        with other values is refused (see `Trainer`)."""
        return {
            "qat_calibration_images": self.calibration_images,
            "qat_batch_statistics_steps": self.batch_statistics_steps or 0,
            "qat_distillation": self.teacher_weight,
        }

    def __call__(self, config, num_classes, source, classifier_activation, initialize):
        from quantization.quantize import calibrate
        from quantization.quantize import quantize_model

        float_model = _float_model(config, num_classes, classifier_activation)
        steps = self.batch_statistics_steps
        if not initialize:
            return quantize_model(float_model, batch_statistics_steps=steps)
        if config.init_weights:
            load_float_weights(float_model, config, config.init_weights)
        qat = quantize_model(float_model, batch_statistics_steps=steps)
        calibrate(qat, sample_images(source, config, self.calibration_images))
        self.start_weights = qat.get_weights()
        if self.teacher_weight > 0:
            # The float model itself: quantize_model copies its weights, so
            # fine-tuning the QAT model leaves the teacher as it was loaded.
            float_model.trainable = False
            self.teacher = float_model
        return qat


def _float_model(config, num_classes, classifier_activation):
    if config.task == "segmentation":
        from training.segmentation import build_segmenter

        # The exported segmenter (no auxiliary head) is what --init_weights
        # holds; a short fine-tune needs no deep supervision.
        return build_segmenter(config, num_classes, aux_head=False)
    if config.task == "detection":
        from training.detection import build_detector

        return build_detector(config, num_classes)
    from training.trainer import build_model

    return build_model(config, num_classes, classifier_activation=classifier_activation)


def qat_model_fn(calibration_images, batch_statistics_steps=0, distillation=0.0):
    """A Trainer model_fn that returns calibrated QAT models (its
    `start_weights` are those of the last one built); `distillation` is the
    float model's share of the fine-tune's targets (0: the labels only)."""
    return _CalibratedQATModels(calibration_images, batch_statistics_steps, distillation)


FINE_TUNED_NAME = "model.finetuned.keras"
SELECTION_NAME = "qat_selection.json"
EPOCHS_NAME = "qat_epochs.json"
BEST_WEIGHTS_NAME = "qat_best.weights.h5"


def _evaluation(config):
    """(the metric the safeguard compares, the function that measures it)."""
    if config.task == "segmentation":
        from training.segmentation import evaluate_segmentation

        return "miou", evaluate_segmentation
    if config.task == "detection":
        from training.detection import evaluate_detection

        return "map", evaluate_detection
    from training.trainer import evaluate

    return "top1", evaluate


# The int8 check of the safeguard converts both candidates and runs them on at
# most this many validation images (held in memory).
INT8_CHECK_IMAGES = 5000


def int8_top1_metric(source, config, io_type="int8", representative_images=None):
    """A function model -> the top-1 of the model's QAT int8 TFLite (what is
    exported) on the validation split (its first INT8_CHECK_IMAGES of a
    seeded mix), for `keep_best`; also returns how many images it uses.
    Given the export's `representative_images`, the chosen model's export
    reuses the conversion made here (tflite_export.convert's cache)."""
    from quantization.audit import make_interpreter
    from quantization.audit import run_tflite
    from quantization.tflite_export import convert

    count = min(source.eval.num_examples, INT8_CHECK_IMAGES)
    images, labels = sample_images(source, config, count, split="eval", with_labels=True)

    def measure(model):
        representative = images[:4] if representative_images is None else representative_images
        flatbuffer = convert(model, "qat_int8", io_type=io_type, representative_images=representative)
        return float(np.mean(run_tflite(make_interpreter(flatbuffer), images).argmax(-1) == labels))

    return measure, len(images)


def _chosen(start, fine_tuned, int8):
    """ "fine-tuned" only if it is better: in int8 where measured (the
    fake-quant metric breaks a tie), otherwise in the fake-quant metric."""
    if int8 and int8["fine_tuned"] != int8["start"]:
        return "fine-tuned" if int8["fine_tuned"] > int8["start"] else "start"
    return "fine-tuned" if fine_tuned > start else "start"


def keep_best(config, source, start_weights, verbose=True, int8_metric=None):
    """The safeguard: the run's `model.keras` becomes the best of the
    calibrated starting point (`start_weights`: post-training ranges, no
    fine-tuning) and the fine-tuned weights, on the whole validation split
    (top-1; mean IoU for a segmenter, COCO mAP for a detector).

    The fine-tuned candidate is the best weights of any epoch (raw or EMA,
    recorded by the trainer in `qat_epochs.json` / `qat_best.weights.h5`),
    or the trainer's final `model.keras` where no epoch was recorded. Unless
    it beats the start, the start becomes `model.keras` and this is said; a
    replaced `model.keras` is kept as `model.finetuned.keras`. With
    `int8_metric` ((model -> top-1, images) from `int8_top1_metric`), "beats" is judged on
    both candidates' int8 TFLite models, what is shipped: the fake-quant
    metric differs from it by a few images. Returns the comparison, also
    written to `qat_selection.json`."""
    import dataclasses

    import keras

    from training.run_config import write_json_atomically

    if source.eval is None:
        return {"chosen": "fine-tuned", "reason": "no validation split to compare on"}
    metric, evaluate = _evaluation(config)
    whole_split = dataclasses.replace(config, max_eval_images=0)
    path = os.path.join(config.model_dir, "model.keras")
    model = keras.models.load_model(path, compile=False)
    records = read_epoch_records(config.model_dir)
    best = records["best"]
    if best is not None:
        model.load_weights(os.path.join(config.model_dir, BEST_WEIGHTS_NAME))
        origin = f"epoch {best['epoch']} ({best['weights']} weights)"
    else:
        origin = "the final weights"
    fine_tuned, fine_tuned_weights = evaluate(model, source, whole_split), model.get_weights()
    int8 = {"fine_tuned": int8_metric[0](model)} if int8_metric else {}
    # The same model with the start's weights: evaluated by the same traced function.
    model.set_weights(start_weights)
    start = evaluate(model, source, whole_split)
    if int8_metric:
        int8.update(start=int8_metric[0](model), images=int8_metric[1])
    chosen = _chosen(start[metric], fine_tuned[metric], int8)
    selection = {
        "chosen": chosen,
        "metric": metric,
        "start": {k: start[k] for k in (metric, "loss") if k in start},
        "fine_tuned": {k: fine_tuned[k] for k in (metric, "loss") if k in fine_tuned},
        "fine_tuned_from": origin,
        "epochs": records["epochs"],
        "evaluation_images": source.eval.num_examples - start.get("skipped_images", 0),
        "int8_top1": int8 or None,
    }
    if chosen == "fine-tuned":
        model.set_weights(fine_tuned_weights)
    if chosen == "start" or best is not None:
        os.replace(path, os.path.join(config.model_dir, FINE_TUNED_NAME))
        temporary = os.path.join(config.model_dir, f".tmp-{os.getpid()}-model.keras")
        model.save(temporary)
        os.replace(temporary, path)
    if verbose:
        _print_selection(selection)
    write_json_atomically(os.path.join(config.model_dir, SELECTION_NAME), selection)
    return selection


def read_epoch_records(model_dir):
    """What `_KeepsBestEpoch` recorded: {"metric", "epochs": [{epoch, step,
    raw, ema}], "best": {epoch, step, weights, value} or None}."""
    import json

    path = os.path.join(model_dir, EPOCHS_NAME)
    if not os.path.exists(path):
        return {"metric": None, "epochs": [], "best": None}
    with open(path) as f:
        return json.load(f)


class _KeepsBestEpoch:
    """Mixed into the task's Trainer by `run_qat`: at every evaluation (each
    epoch end) it records the raw and EMA weights' metric and keeps the
    best weights so far for the safeguard. Both are written at once, so a
    resumed run keeps the earlier epochs' best."""

    qat_metric = "top1"

    def _evaluate(self, run):
        from training.run_config import write_json_atomically

        results = super()._evaluate(run)
        metric, model_dir = self.qat_metric, self.config.model_dir
        records = read_epoch_records(model_dir)
        entry = {"epoch": run.epoch, "step": run.step, "raw": results[metric], "ema": results["ema_" + metric]}
        # A resume re-evaluates the steps after its checkpoint: one entry per step.
        records["epochs"] = [e for e in records["epochs"] if e["step"] != run.step] + [entry]
        records["metric"] = metric
        label = "ema" if entry["ema"] >= entry["raw"] else "raw"
        best = records["best"]
        if best is None or entry[label] > best["value"]:  # NaN never wins
            weights = [v.numpy() for v in run.ema] if label == "ema" else [w.numpy() for w in run.model.weights]
            run.eval_model.set_weights(weights)
            temporary = os.path.join(model_dir, f".tmp-{os.getpid()}-{BEST_WEIGHTS_NAME}")
            run.eval_model.save_weights(temporary)
            os.replace(temporary, os.path.join(model_dir, BEST_WEIGHTS_NAME))
            records["best"] = {"epoch": run.epoch, "step": run.step, "weights": label, "value": entry[label]}
        write_json_atomically(os.path.join(model_dir, EPOCHS_NAME), records)
        return results


def _keeping_best_epoch(trainer_class, metric):
    """`trainer_class` with `_KeepsBestEpoch` mixed in, for `metric`."""
    return type(f"QAT{trainer_class.__name__}", (_KeepsBestEpoch, trainer_class), {"qat_metric": metric})


def _print_selection(selection):
    metric = selection["metric"]
    start, fine_tuned = selection["start"][metric], selection["fine_tuned"][metric]
    name = {"top1": "top-1", "miou": "mean IoU", "map": "mAP@[.5:.95]"}[metric]
    for entry in selection["epochs"]:
        print(f"QAT epoch {entry['epoch']} (step {entry['step']}): {name} {entry['raw']:.4f}, EMA {entry['ema']:.4f}")
    print(
        f"QAT selection on {selection['evaluation_images']} validation images: calibrated start {name} "
        f"{start:.4f}, fine-tuned {fine_tuned:.4f} ({selection['fine_tuned_from']}); "
        + _int8_text(selection.get("int8_top1"))
        + (
            "keeping the fine-tuned model."
            if selection["chosen"] == "fine-tuned"
            else f"fine-tuning did not beat its starting point: model.keras is the calibrated start "
            f"(the fine-tuned model is {FINE_TUNED_NAME})."
        )
    )


def _int8_text(int8):
    if not int8:
        return ""
    return (f"as int8 TFLite on {int8['images']} images: start {int8['start']:.4f}, fine-tuned "
            f"{int8['fine_tuned']:.4f}; ")  # fmt: skip


def _trainer_and_source(config):
    """The task's Trainer class and its data source."""
    if config.task == "segmentation":
        from training.segmentation import SegmentationTrainer
        from training.segmentation_data import resolve_segmentation_source

        return SegmentationTrainer, resolve_segmentation_source(config.data, config.dataset_dir)
    if config.task == "detection":
        from training.detection import DetectionTrainer
        from training.detection_data import resolve_detection_source

        return DetectionTrainer, resolve_detection_source(config.data, config.dataset_dir)
    from training.data import resolve_source
    from training.trainer import Trainer

    return Trainer, resolve_source(config.data, config.num_classes, config.tfrecord_label_offset, config.dataset_dir)


def _export_detector(model, config, representative, verbose):
    """The QAT detector's int8 TFLite, ending in TFLite_Detection_PostProcess,
    and its audit (`audit_detector`)."""
    from keras_mobilevitv2.detection.anchors import input_anchors
    from quantization.detection_export import audit_detector
    from quantization.detection_export import detection_flatbuffer

    flatbuffer = detection_flatbuffer(model, "qat_int8", input_anchors(config.image_size), representative)
    path = os.path.join(config.model_dir, f"ssdlite_{config.model}_qat_int8.tflite")
    with open(path, "wb") as f:
        f.write(flatbuffer)
    report = dict(audit_detector(flatbuffer, "qat_int8"), path=path)
    if verbose:
        print(f"{path}: {report['op_count']} ops, {len(report['float_tensors_inside'])} float tensors before the "
              f"post-processing, errors: {report['errors'] or 'none'}")  # fmt: skip
    return report


def run_qat(
    config,
    calibration_images=256,
    io_type="int8",
    verbose=True,
    tpu_address="",
    batch_statistics_steps=0,
    distillation=0.0,
    min_top1_agreement=None,
):
    """QAT fine-tuning + int8 export. Returns (summary, audit report).
    `batch_statistics_steps`: see `quantize_model` (0: BatchNorm folded).
    `distillation`: the float model's share of the targets (see `qat_model_fn`).
    `min_top1_agreement`: the export audit's bar (see `export_tflite`)."""
    import dataclasses

    import keras

    import quantization  # noqa: F401  (registers the QAT layers)
    from quantization.tflite_export import check_min_top1_agreement
    from quantization.tflite_export import export_tflite

    check_min_top1_agreement(min_top1_agreement)  # before the fine-tune, not after it
    if config.mixed_precision != "float32":
        raise ValueError("QAT runs in float32 (fake quantization); drop --mixed_precision.")
    if not config.init_weights:
        raise ValueError("QAT starts from trained float weights: give --init_weights.")
    if config.task == "detection" and io_type != "int8":
        raise ValueError(f"A detector's int8 TFLite takes int8 images (--io_type int8); got {io_type!r}.")
    # Every epoch is evaluated on the whole validation split: the safeguard
    # compares the epochs and the start on it.
    config = dataclasses.replace(config, max_eval_images=0)
    if distillation and config.task != "classification":
        raise ValueError(
            f"--distillation fits a classifier's outputs; a {config.task} model is fine-tuned on its labels "
            f"(--distillation=0)."
        )
    model_fn = qat_model_fn(calibration_images, batch_statistics_steps, distillation)
    trainer_class, source = _trainer_and_source(config)
    trainer_class = _keeping_best_epoch(trainer_class, _evaluation(config)[0])
    summary = trainer_class(config, verbose=verbose, model_fn=model_fn, tpu_address=tpu_address).run()
    if summary is None:  # not the chief
        return None, None
    # A QAT model carries its own ranges: the converter only checks on a few
    # images that everything is int8. The 4 the targets take (the first of
    # `python -m quantization.export`'s 64), so that the same process's Micro
    # target, and the export after the safeguard's int8 check, reuse one
    # conversion (see tflite_export.convert).
    representative = sample_images(source, config, 64)[:4]
    classifier = config.task == "classification" and source.eval
    check = int8_top1_metric(source, config, io_type, representative) if classifier else None
    summary["selection"] = keep_best(config, source, model_fn.start_weights, verbose, int8_metric=check)
    exported = keras.models.load_model(os.path.join(config.model_dir, "model.keras"), compile=False)
    if config.task == "detection":
        return summary, _export_detector(exported, config, representative, verbose)
    samples = sample_images(source, config, 64, split="eval" if source.eval else "train")
    report = export_tflite(
        exported,
        os.path.join(config.model_dir, f"{config.model}_qat_int8.tflite"),
        "qat_int8",
        io_type=io_type,
        representative_images=representative,
        sample_images=samples,
        verbose=verbose,
        min_top1_agreement=min_top1_agreement,
    )
    return summary, report


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    return run_job(
        lambda config: run_qat(
            config,
            flags.FLAGS.calibration_images,
            flags.FLAGS.io_type,
            tpu_address=flags.FLAGS.tpu,
            batch_statistics_steps=flags.FLAGS.batch_statistics_steps,
            distillation=flags.FLAGS.distillation,
            min_top1_agreement=flags.FLAGS.min_top1_agreement,
        )
    )


def run():
    """Console-script entry point."""
    define_qat_flags()
    app.run(main)


if __name__ == "__main__":
    run()
