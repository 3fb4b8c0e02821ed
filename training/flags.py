"""The trainer's absl flags: one per `TrainConfig` field, and --tpu.

Only command lines call `define_flags` (`training.train`, `quantization.qat`):
importing a library module defines no flag, so a program that imports this
package keeps every flag name (`--batch_size`, `--model`...) for itself.
"""

import dataclasses
import os
import sys

from absl import flags

from keras_mobilevitv2.layers.normalization import ATTENTION_NORMS
from training.recipe import PRECISIONS
from training.recipe import RECIPES
from training.recipe import STRATEGIES
from training.recipe import TASKS
from training.recipe import TrainConfig

HELP = {
    "attention_norm": "Norm of the attention blocks: layer_norm_2d (GroupNorm(1), the reference "
    "and the published weights) or batch_norm_2d (folds into the convolutions at inference: "
    "the Edge TPU / microcontroller friendly option).",
    "model": "Model to train: " + ", ".join(sorted(RECIPES)) + ".",
    "task": "classification (the MobileViTv2 classifier), segmentation (DeepLabV3 on the model's "
    "backbone, output stride 16, with the auxiliary head: per-pixel cross-entropy ignoring label 255 "
    "plus 0.4 x the auxiliary loss, mean IoU; --data a PASCAL VOC-layout folder or 'embedded'; "
    "--lr/--min_lr/--weight_decay default to ml-cvnets' VOC recipe; --init_weights loads the backbone "
    "from a classifier); detection (SSDLite on the model's backbone: anchors matched at IoU 0.5, "
    "smooth L1 + cross-entropy with 3:1 hard negatives, COCO mAP from pycocotools; --data a COCO-format "
    "folder or 'embedded'; ml-cvnets' COCO recipe; use --image_size=320 for the published model).",
    "data": "ImageNet-style folder (train/<class>/..., val/<class>/...), a folder of "
    "ImageNet TFRecords (train-*, validation-*), tfds:NAME, or 'embedded' (a generated "
    "10-class dataset; no download).",
    "model_dir": "Checkpoints, TensorBoard logs, summary.json and the exported model.",
    "strategy": "tf.distribute strategy; multi_worker reads TF_CONFIG and needs --model_dir on a "
    "filesystem all workers share; tpu uses --tpu.",
    "batch_size": "Global batch of one step over all replicas.",
    "grad_accum_steps": "Micro-batches per optimizer step (effective batch = batch_size x this).",
    "epochs": "Training epochs (ignored when --steps > 0).",
    "steps": "Optimizer steps; 0 = epochs x steps per epoch.",
    "image_size": "Training crop size (square).",
    "num_classes": "Number of classes; 0 = from the data.",
    "mixed_precision": "Keras dtype policy.",
    "init_weights": "Start from these weights: 'imagenet', a .weights.h5, a .keras model, or a "
    "PyTorch checkpoint (.pt/.pth/.safetensors). A classifier of another size is dropped (with a "
    "warning) and trained anew; weights of another model or attention norm are refused. With --task "
    "detection, an SSDLite .keras or an ml-cvnets SSD checkpoint loads the whole detector, any other "
    "form the backbone.",
    "lr": "Peak learning rate; default: the model's ml-cvnets recipe.",
    "min_lr": "Final learning rate of the cosine; default: recipe.",
    "weight_decay": "AdamW weight decay (not on 1-D parameters); default: recipe.",
    "warmup_steps": "Linear warm-up steps; default min(20000, total_steps // 10).",
    "deterministic": "Bitwise-repeatable training on one machine: TensorFlow runs one op at a "
    "time (inter-op parallelism 1; each op still uses every core) with its deterministic kernels. "
    "Measured on a 2-core CPU: as fast as the default, and two runs give the same weights (without "
    "it they drift apart within 20 steps). Can slow multi-GPU training.",
    "checkpoint_every": "Write a checkpoint every N optimizer steps (and at every epoch end).",
}
# The enum flags and their choices; other fields take their type's flag.
_ENUMS = {
    "task": TASKS,
    "strategy": STRATEGIES,
    "mixed_precision": PRECISIONS,
    "model": sorted(RECIPES),
    "attention_norm": ATTENTION_NORMS,
}
_DEFINE = {"bool": flags.DEFINE_bool, "int": flags.DEFINE_integer, "float": flags.DEFINE_float}


def _define_field(field, flag_values):
    help_text = HELP.get(field.name, field.name.replace("_", " ") + ".")
    if field.name in _ENUMS:
        flags.DEFINE_enum(field.name, field.default, _ENUMS[field.name], help_text, flag_values=flag_values)
        return
    kind = field.type if isinstance(field.type, str) else field.type.__name__
    define = _DEFINE.get(kind, flags.DEFINE_string)
    define(field.name, field.default, help_text, flag_values=flag_values)


def define_flags(flag_values=flags.FLAGS):
    """Defines the trainer's flags in `flag_values`; a second call does nothing
    (the QAT command line calls it as well as the trainer's)."""
    if "tpu" in flag_values and flag_values.find_module_defining_flag("tpu") == __name__:
        return
    for field in dataclasses.fields(TrainConfig):
        _define_field(field, flag_values)
    # Where to run, not what is trained: a flag outside TrainConfig.
    flags.DEFINE_string(
        "tpu",
        "",
        "The TPU of --strategy=tpu: its name, a grpc://host:8470 address, or 'local' "
        "(a TPU VM); empty: found by TPUClusterResolver (TPU_NAME, Cloud TPU metadata).",
        flag_values=flag_values,
    )


def config_from_flags(flag_values=flags.FLAGS):
    """The `TrainConfig` the parsed flags describe."""
    values = {field.name: getattr(flag_values, field.name) for field in dataclasses.fields(TrainConfig)}
    return TrainConfig(**values)


def run_job(job):
    """Runs `job(config)` for the flags given; a ValueError (bad input) is
    printed as one clear line and exits 2. Shared by the training and QAT
    commands."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # TF's checkpoint INFO lines
    try:
        job(config_from_flags())
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
