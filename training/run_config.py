"""What a model_dir's run_config.json records, and which changes a resume accepts.

A run's directory keeps the settings it was started (or last resumed) with.
A later run in that directory either continues it or is refused; it never
silently hands back a model trained with other settings than it was given.
"""

import dataclasses
import json
import os

from keras_mobilevitv2.weights import sha256_of
from training.recipe import TrainConfig

__all__ = [
    "COMPATIBILITY_FIELDS",
    "RUN_CONFIG",
    "changed_settings",
    "describe_changes",
    "read_run_config",
    "run_configuration",
    "write_json_atomically",
]

RUN_CONFIG = "run_config.json"
# Settings whose change makes an existing checkpoint meaningless.
COMPATIBILITY_FIELDS = (
    "model",
    "task",
    "attention_norm",
    "image_size",
    "num_classes",
    "data",
    "batch_size",
    "grad_accum_steps",
    "mixed_precision",  # the optimizer (loss scaling or not) must match the checkpoint
    "seed",  # the data order that a resume skips through
    "init_weights_sha256",  # the weights a run started from: a retrained --init_weights file is another run
)
# Settings that say how a run is carried out, not what it trains: a resume
# takes them as they are now, without a word.
OPERATIONAL_FIELDS = (
    "model_dir",
    "strategy",
    "checkpoint_every",
    "keep_checkpoints",
    "max_eval_images",
    "dataset_dir",
    "deterministic",
)


def write_json_atomically(path, payload):
    """Writes `payload` as JSON to `path` whole or not at all (a crash leaves the old file)."""
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


def run_configuration(config, num_classes, model_settings=None):
    """The run_config.json of `config`: its fields, the number of classes,
    the SHA-256 of an --init_weights file, and `model_settings` (the settings
    of a model_fn outside TrainConfig, e.g. QAT's calibration; they must match
    to resume, like COMPATIBILITY_FIELDS)."""
    current = dataclasses.asdict(config)
    current["num_classes"] = num_classes
    if config.init_weights and os.path.isfile(config.init_weights):
        current["init_weights_sha256"] = sha256_of(config.init_weights)
    current.update(model_settings or {})
    return current


def read_run_config(model_dir):
    """The run_config.json in `model_dir`, or None."""
    path = os.path.join(model_dir, RUN_CONFIG)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def changed_settings(previous, current, model_settings=()):
    """(incompatible, changed): {field: (there, now)} of the settings that
    forbid a resume, and of those a resume may change (what is trained from
    the resumed step on). Operational fields are in neither."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    incompatible, changed = {}, {}
    for field, now in current.items():
        if field in OPERATIONAL_FIELDS:
            continue
        if field in defaults:
            there = previous.get(field, defaults[field])  # a field the file predates had its default then
        elif field in previous:
            there = previous[field]
        else:
            continue  # recorded since: nothing to compare with
        if there != now:
            target = incompatible if field in COMPATIBILITY_FIELDS or field in model_settings else changed
            target[field] = (there, now)
    return incompatible, changed


def describe_changes(changes):
    return ", ".join(f"{field}: {there!r} there, {now!r} now" for field, (there, now) in sorted(changes.items()))
