"""Command line of the trainer: `python -m training.train --helpfull`.

    python -m training.train --model=mobilevitv2_100 --data=/data/imagenet \
        --model_dir=runs/v2_100 --strategy=mirrored --batch_size=1024 --epochs=300
"""

import dataclasses
import os
import sys

from absl import app
from absl import flags

from training.recipe import PRECISIONS
from keras_mobilevitv2.layers.normalization import ATTENTION_NORMS
from training.recipe import RECIPES
from training.recipe import STRATEGIES
from training.recipe import TrainConfig

_HELP = {
    "attention_norm": "Norm of the attention blocks: layer_norm_2d (GroupNorm(1), the reference "
    "and the published weights) or batch_norm_2d (folds into the convolutions at inference: "
    "the Edge TPU / microcontroller friendly option).",
    "model": "Model to train: " + ", ".join(sorted(RECIPES)) + ".",
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
    "warning) and trained anew; weights of another model or attention norm are refused.",
    "lr": "Peak learning rate; default: the model's ml-cvnets recipe.",
    "min_lr": "Final learning rate of the cosine; default: recipe.",
    "weight_decay": "AdamW weight decay (not on 1-D parameters); default: recipe.",
    "warmup_steps": "Linear warm-up steps; default min(20000, total_steps // 10).",
    "checkpoint_every": "Write a checkpoint every N optimizer steps (and at every epoch end).",
}


def _define_flags():
    for field in dataclasses.fields(TrainConfig):
        name, default = field.name, field.default
        help_text = _HELP.get(name, name.replace("_", " ") + ".")
        if name == "strategy":
            flags.DEFINE_enum(name, default, STRATEGIES, help_text)
        elif name == "mixed_precision":
            flags.DEFINE_enum(name, default, PRECISIONS, help_text)
        elif name == "model":
            flags.DEFINE_enum(name, default, sorted(RECIPES), help_text)
        elif name == "attention_norm":
            flags.DEFINE_enum(name, default, ATTENTION_NORMS, help_text)
        elif field.type in ("bool", bool):
            flags.DEFINE_bool(name, default, help_text)
        elif field.type in ("int", int):
            flags.DEFINE_integer(name, default, help_text)
        elif field.type in ("float", float):
            flags.DEFINE_float(name, default, help_text)
        else:
            flags.DEFINE_string(name, default, help_text)


_define_flags()
# Where to run, not what is trained: a flag outside TrainConfig.
flags.DEFINE_string(
    "tpu", "", "The TPU of --strategy=tpu: its name, a grpc://host:8470 address, or 'local' "
    "(a TPU VM); empty: found by TPUClusterResolver (TPU_NAME, Cloud TPU metadata)."
)


def config_from_flags():
    values = {field.name: getattr(flags.FLAGS, field.name) for field in dataclasses.fields(TrainConfig)}
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


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    from training.trainer import Trainer

    return run_job(lambda config: Trainer(config, tpu_address=flags.FLAGS.tpu).run())


def run():
    """Console-script entry point."""
    app.run(main)


if __name__ == "__main__":
    run()
