"""The training loop: one custom `strategy.run` loop for every tf.distribute strategy.

Keras 3's `model.fit` fails under MultiWorkerMirroredStrategy in these
versions, so the loop is written out: forward/backward per replica, an
explicit all-reduce so that gradient-norm clipping sees the true global
gradient, gradient accumulation, AdamW, an EMA of every model weight (BN
statistics included, as ml-cvnets), and checkpoints that resume at the exact
data position.
"""

import dataclasses
import json
import math
import os
import shutil
import tempfile
import time
import warnings
import weakref

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from keras_mobilevitv2.layers.nesting import nested_layers
from keras_mobilevitv2.mobilevitv2 import MobileViTv2
from training.data import eval_dataset
from training.data import eval_split
from training.data import resolve_source
from training.data import train_dataset
from training.distribution import check_shared_model_dir
from training.distribution import is_chief
from training.distribution import make_deterministic
from training.distribution import make_strategy
from training.distribution import worker_index
from training.progress import Progress
from training.recipe import TrainConfig
from training.run_config import RUN_CONFIG
from training.run_config import changed_settings
from training.run_config import describe_changes
from training.run_config import read_run_config
from training.run_config import run_configuration
from training.run_config import write_json_atomically
from training.schedule import WarmupCosine
from training.summaries import ScalarWriter

SUMMARY = "summary.json"
EXPORT_NAME = "model.keras"


def build_model(config, num_classes, weights=None, classifier_activation=None):
    """The MobileViTv2 of `config`, optionally initialised from `weights`."""
    model = MobileViTv2(
        config.width,
        weights=None,
        input_shape=(config.image_size, config.image_size, 3),
        classes=num_classes,
        classifier_activation=classifier_activation,
        attention_norm=config.attention_norm,
        name=config.model,
    )
    if weights:
        load_init_weights(model, config, weights)
    return model


def load_backbone_weights(backbone, config, weights):
    """The backbone layers of a classifier loaded from `weights` (any form
    `--init_weights` takes); its classifier, whatever its size, is unused."""
    verbosity = logging.get_verbosity()
    logging.set_verbosity(logging.ERROR)  # the "classifier dropped" warning is about classification
    try:
        classifier = build_model(config, 1000, weights=weights)
    finally:
        logging.set_verbosity(verbosity)
    for layer in backbone.layers:
        if layer.weights:
            layer.set_weights(classifier.get_layer(layer.name).get_weights())


def load_init_weights(model, config, weights):
    """Fine-tuning start from any weights the models accept. A classifier of
    another size is dropped, with a warning: the backbone is loaded and the
    classifier keeps its fresh initialisation."""
    path = str(weights)
    if path.endswith((".h5", ".keras")):
        dropped = _load_keras_file(model, config, path)
    else:
        dropped = _load_released_weights(model, config, weights)
    if dropped:
        logging.warning(
            "--init_weights %s: its classifier is not for %d classes; it is dropped and "
            "a new one is trained from scratch (the backbone is loaded).",
            path,
            model.output_shape[-1],
        )


def _load_keras_file(model, config, path):
    """Loads a Keras weights/model file; True when its classifier was dropped."""
    initial = [w.numpy() for w in model.weights]
    for weight in model.weights:  # NaN marks "not loaded": skip_mismatch is silent
        weight.assign(np.full(weight.shape, np.nan, weight.dtype))
    try:
        with warnings.catch_warnings():  # Keras' per-layer warnings: the checks below say it better
            warnings.simplefilter("ignore")
            model.load_weights(path, skip_mismatch=True)
    except Exception as error:
        model.set_weights(initial)  # not left full of NaN markers
        if not isinstance(error, ValueError):
            raise
        raise ValueError(f"--init_weights {path} cannot be read as Keras weights: {error}") from None
    classifier = {id(w) for w in model.get_layer("logits").weights}
    not_loaded = [w for w in model.weights if np.isnan(w.numpy()).all()]
    for weight, value in zip(model.weights, initial):
        if np.isnan(weight.numpy()).all():
            weight.assign(value)
    backbone_missing = [w.path for w in not_loaded if id(w) not in classifier]
    if backbone_missing:
        raise ValueError(
            f"--init_weights {path} does not fit {config.model} (attention_norm "
            f"{config.attention_norm}): {len(backbone_missing)} backbone weights are missing "
            f"from it or have another shape, e.g. {backbone_missing[:3]}. Accepted: weights "
            "of the same model and attention norm, with any number of classes."
        )
    return bool(not_loaded)


def _load_released_weights(model, config, weights):
    """'imagenet' or a PyTorch checkpoint; True when its classifier was dropped."""
    try:
        full = MobileViTv2(
            config.width,
            weights=weights,
            classes=model.output_shape[-1],
            input_shape=(config.image_size, config.image_size, 3),
            attention_norm=config.attention_norm,
        )
        model.set_weights(full.get_weights())
        return False
    except ValueError:  # the checkpoint's classifier has another size
        pass
    backbone = MobileViTv2(
        config.width,
        weights=weights,
        include_top=False,
        input_shape=(config.image_size, config.image_size, 3),
        attention_norm=config.attention_norm,
    )
    for layer in backbone.layers:
        if layer.weights:
            model.get_layer(layer.name).set_weights(layer.get_weights())
    return True


def default_model_fn(config, num_classes, source, classifier_activation, initialize):
    weights = config.init_weights or None if initialize else None
    return build_model(config, num_classes, weights=weights, classifier_activation=classifier_activation)


@dataclasses.dataclass
class _Run:
    """What one `Trainer.run` has built, and where its loop stands: handed
    from step to step of the run."""

    strategy: tf.distribute.Strategy
    chief: bool
    source: object  # from `resolve_source`
    num_classes: int
    steps_per_epoch: int
    total_steps: int
    epochs: int
    warmup_steps: int
    resuming: bool  # model_dir already held this run's configuration
    run_configuration: dict  # what run_config.json records for these settings
    changed_settings: dict  # {field: (there, now)} that a resume may change
    # Built by `_build`, under the strategy's scope.
    model: keras.Model = None
    schedule: WarmupCosine = None
    optimizer: keras.optimizers.Optimizer = None  # LossScaleOptimizer(AdamW) under mixed_float16
    loss_scaling: bool = False
    trainable: list = None
    ema: list = None
    accumulators: list = None
    state: dict = None  # the loop position as variables: what a resume restores
    checkpoint: tf.train.Checkpoint = None
    checkpoint_parts: dict = None  # what the checkpoint holds besides the weights list
    checkpoint_dir: str = None
    manager: tf.train.CheckpointManager = None
    latest: str = None  # the checkpoint resumed from
    writers: dict = dataclasses.field(default_factory=dict)
    eval_model: keras.Model = None
    teacher: keras.Model = None  # the model_fn's `teacher`: its softmax enters the targets
    teacher_weight: float = 1.0  # its share of the targets (the labels have the rest)
    # The loop position as Python numbers, which the loop compares and logs.
    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    first_step: int = 0
    saved_step: int = None
    train_time: float = 0.0
    timed_steps: int = 0
    history: dict = dataclasses.field(default_factory=lambda: {"train": {}, "eval": {}})

    def images_per_second(self, images_per_step):
        return self.timed_steps * images_per_step / self.train_time if self.train_time else 0.0


class Trainer:
    """Runs one training job described by a `TrainConfig`.

    After `run()`, `model` holds the trained weights and `ema_weights` their
    moving average (what is evaluated and exported).
    """

    def __init__(self, config, progress_stream=None, verbose=True, model_fn=None, tpu_address=""):
        """`model_fn(config, num_classes, source, classifier_activation,
        initialize)` builds the model; `initialize` is True for the model that
        is trained (load `init_weights`, calibrate...), False for the copies
        that receive its weights (evaluation, export). Default: `build_model`.
        A model_fn's `run_settings` dict, if it has one, is recorded in
        run_config.json and must match to resume (QAT's calibration). A
        model_fn's `teacher` (a model giving logits, set when it builds the
        trained model; None: none) makes the run distil: the targets are
        `teacher_weight` (default 1) x the teacher's probabilities on each
        augmented batch + the rest x the (smoothed) labels.
        `tpu_address`: the TPU of `strategy="tpu"` (where to run, not part of
        the run's configuration), as `make_strategy` takes it.
        """
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
        self.config = config
        self.model_fn = model_fn or default_model_fn
        self.tpu_address = tpu_address
        self.progress_stream = progress_stream
        self.verbose = verbose
        self.model = None
        self.optimizer = None  # LossScaleOptimizer(AdamW) under mixed_float16
        self.ema_weights = None
        self.skipped_eval_images = 0  # undecodable images left out of the last evaluation
        self.step_losses = []  # training loss of every optimizer step run here

    # ------------------------------------------------------------ set-up

    def _prepare_model_dir(self, num_classes, chief):
        """(resuming, run configuration, settings changed since the run in
        model_dir was started). Refuses a model_dir that holds another run."""
        config = self.config
        model_settings = getattr(self.model_fn, "run_settings", {})
        current = run_configuration(config, num_classes, model_settings)
        previous = read_run_config(config.model_dir)
        if previous is not None:
            incompatible, changed = changed_settings(previous, current, model_settings)
            if incompatible:
                raise ValueError(
                    f"--model_dir {config.model_dir} holds a different run ({describe_changes(incompatible)}). "
                    "Its checkpoints cannot be resumed with these settings and are "
                    "not overwritten: use another --model_dir, or the same settings."
                )
            return True, current, changed
        if not chief:
            return False, current, {}
        if os.path.isdir(config.model_dir) and os.listdir(config.model_dir):
            raise ValueError(
                f"--model_dir {config.model_dir} is not empty and has no {RUN_CONFIG}: "
                "it is not a run of this trainer. Refusing to write into it; use a "
                "new or empty directory."
            )
        os.makedirs(config.model_dir, exist_ok=True)
        write_json_atomically(os.path.join(config.model_dir, RUN_CONFIG), current)
        return False, current, {}

    def _accept_changed_settings(self, run):
        """A resume with changed learning-rate, schedule or augmentation
        settings trains the remaining steps with them, and says so; a finished
        run would train nothing, so it is refused rather than handed back as
        if it had been trained with them."""
        if not run.changed_settings:
            return
        config, step = self.config, int(run.state["step"].numpy())
        details = describe_changes(run.changed_settings)
        if run.latest and step >= run.total_steps:
            raise ValueError(
                f"--model_dir {config.model_dir} holds a finished run (step {step} of {run.total_steps}) that "
                f"was trained with other settings ({details}). Resuming it trains nothing, so its model would "
                "not be what these settings describe. Use another --model_dir, delete this one to train "
                "anew, or give the settings it was trained with."
            )
        if run.latest:
            self._log(f"Resuming with changed settings, which apply from step {step} on: {details}.")
        if run.chief:  # the settings the steps from now on are trained with
            write_json_atomically(os.path.join(config.model_dir, RUN_CONFIG), run.run_configuration)

    def _log(self, text):
        if self.verbose and self._chief:
            self._progress.message(text)

    # -------------------------------------------------------------- run

    def run(self):
        config = self.config
        if config.deterministic:
            make_deterministic()
        previous_policy = keras.mixed_precision.global_policy().name
        keras.mixed_precision.set_global_policy(config.mixed_precision)
        try:
            return self._run()
        finally:
            keras.mixed_precision.set_global_policy(previous_policy)

    def _run(self):
        run = self._build()
        self._restore(run)
        train_steps = self._make_train_step(run)
        self._open_outputs(run)
        self.model = run.model
        self.optimizer = run.optimizer
        self._train_epochs(run, train_steps)

        # The final step is saved once: not again after an epoch end's save, nor
        # when a resume found training already complete.
        restored_step = int(run.latest.rsplit("-", 1)[-1]) if run.latest else None
        if run.step not in (run.saved_step, restored_step):  # decided locally: no race with the chief
            self._save_checkpoint(run)
        if run.eval_model is not None and not run.history["eval"]:
            run.history["eval"] = self._evaluate(run)
        self.ema_weights = [v.numpy() for v in run.ema]
        if not run.chief:
            return None
        return self._finish(run)

    # ------------------------------------------------------------ build

    def _build(self):
        """Everything the loop needs, checkpoint manager included; nothing
        restored yet."""
        run = self._plan()
        # Initial weights from --seed: a rerun, or the run a resume continues,
        # starts from the same model.
        keras.utils.set_random_seed(self.config.seed)
        with run.strategy.scope():
            self._build_variables(run)
        self._make_checkpoint(run)
        return run

    def _plan(self):
        """The strategy, the data source and the step counts, checked against
        each other and against model_dir before anything is built."""
        config = self.config
        strategy = make_strategy(config.strategy, tpu_address=self.tpu_address)
        self._chief = chief = is_chief(strategy)
        replicas = strategy.num_replicas_in_sync
        if config.batch_size % replicas:
            raise ValueError(
                f"--batch_size {config.batch_size} cannot be split evenly over "
                f"{replicas} replicas; use a multiple of {replicas}."
            )
        source = self._resolve_source()
        num_classes = source.num_classes
        if config.num_classes and config.num_classes != num_classes:
            raise ValueError(
                f"--num_classes {config.num_classes} does not match the data, which has {num_classes} classes."
            )
        steps_per_epoch = source.train.num_examples // config.effective_batch_size
        if steps_per_epoch < 1:
            raise ValueError(
                f"The training data has {source.train.num_examples} images, fewer "
                f"than one optimizer step ({config.effective_batch_size} = batch "
                f"{config.batch_size} x {config.grad_accum_steps} accumulation steps)."
            )
        total_steps = config.steps or config.epochs * steps_per_epoch
        warmup_steps = config.warmup_steps if config.warmup_steps is not None else min(20_000, total_steps // 10)
        resuming, run_configuration_now, changed = self._prepare_model_dir(num_classes, chief)
        run = _Run(
            strategy,
            chief,
            source,
            num_classes,
            steps_per_epoch,
            total_steps,
            math.ceil(total_steps / steps_per_epoch),
            warmup_steps,
            resuming,
            run_configuration_now,
            changed,
        )
        self._progress = Progress(
            total_steps, steps_per_epoch, stream=self.progress_stream, enabled=self.verbose and chief
        )
        self._log_plan(run)
        return run

    def _resolve_source(self):
        """The data of `config.data` (a task's trainer reads its own kind)."""
        config = self.config
        return resolve_source(config.data, config.num_classes, config.tfrecord_label_offset, config.dataset_dir)

    def _log_plan(self, run):
        config, source = self.config, run.source
        self._log(
            f"{config.model}: {source.name}, {run.num_classes} classes, "
            f"{source.train.num_examples} train / "
            f"{source.eval.num_examples if source.eval else 0} eval images; "
            f"{type(run.strategy).__name__} with {run.strategy.num_replicas_in_sync} replica(s); batch "
            f"{config.batch_size} x {config.grad_accum_steps} = {config.effective_batch_size}; "
            f"{run.total_steps} steps ({run.epochs} epochs of {run.steps_per_epoch}); "
            f"lr {config.lr} -> {config.min_lr}, warm-up {run.warmup_steps}; wd {config.weight_decay}; "
            f"{config.mixed_precision}"
        )

    def _build_variables(self, run):
        """Model, optimizer, EMA, gradient accumulators and loop position;
        under `strategy.scope()`, so that they are distributed variables."""
        config = self.config
        run.model = model = self.model_fn(config, run.num_classes, run.source, None, True)
        run.teacher = getattr(self.model_fn, "teacher", None)
        run.teacher_weight = float(getattr(self.model_fn, "teacher_weight", 1.0))
        if run.strategy.num_replicas_in_sync > 1:
            for layer in nested_layers(model):
                if isinstance(layer, keras.layers.BatchNormalization):
                    layer.synchronized = True  # one set of BN statistics
        run.schedule = WarmupCosine(
            config.lr, config.min_lr, run.warmup_steps, config.warmup_init_lr, run.steps_per_epoch, run.epochs
        )
        optimizer = keras.optimizers.AdamW(
            learning_rate=run.schedule,
            weight_decay=config.weight_decay,
            beta_1=0.9,
            beta_2=0.999,
            epsilon=1e-8,  # PyTorch's default
        )
        # ml-cvnets `no_decay_bn_filter_bias`: no decay on 1-D parameters.
        optimizer.exclude_from_weight_decay(var_list=[v for v in model.trainable_variables if len(v.shape) <= 1])
        run.loss_scaling = config.mixed_precision == "mixed_float16"
        if run.loss_scaling:
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        run.optimizer = optimizer
        run.trainable = trainable = model.trainable_variables
        optimizer.build(trainable)
        # Every replica computes the same values (gradients are all-reduced
        # first), so one replica's copy is the value.
        only_first = tf.VariableAggregation.ONLY_FIRST_REPLICA
        run.ema = [
            tf.Variable(tf.zeros(w.shape, w.dtype), trainable=False, aggregation=only_first) for w in model.weights
        ]
        run.accumulators = (
            [tf.Variable(tf.zeros(v.shape, v.dtype), trainable=False, aggregation=only_first) for v in trainable]
            if config.grad_accum_steps > 1
            else []
        )
        run.state = {
            name: tf.Variable(0, dtype=tf.int64, trainable=False, aggregation=only_first)
            for name in ("step", "epoch", "step_in_epoch", "skipped", "skipped_before_epoch")
        }

    def _make_checkpoint(self, run):
        config = self.config
        # Dropout's random state (Keras seed generators, not among the weights):
        # a resume draws the masks that the uninterrupted run draws.
        weights = {id(w) for w in run.model.weights}
        seeds = [v for v in run.model.variables if id(v) not in weights]
        run.checkpoint_parts = dict(model=run.model, optimizer=run.optimizer, ema=run.ema, state=run.state, seeds=seeds)
        # Keras 3 keeps layers held in a list or dict (MobileViTv2's transformer
        # blocks, a QAT norm's quantizers) out of TF's object graph, so `model`
        # alone reaches only some weights (the optimizer reaches the other
        # trainable ones; their non-trainable ones, QAT ranges among them, no
        # path). `weights` lists every one, in order; a variable reached
        # twice is stored once.
        run.checkpoint = tf.train.Checkpoint(weights=list(run.model.weights), **run.checkpoint_parts)
        run.checkpoint_dir = os.path.join(config.model_dir, "checkpoints")
        if not run.chief:
            # Saving is collective, so every worker writes; a non-chief writes
            # to its own local scratch folder, never under model_dir, which
            # no other process then has to clean up (or race to clean up).
            run.checkpoint_dir = tempfile.mkdtemp(prefix=f"mobilevitv2_worker{worker_index(run.strategy)}_")
        run.manager = tf.train.CheckpointManager(
            run.checkpoint, run.checkpoint_dir, max_to_keep=config.keep_checkpoints
        )

    def _open_outputs(self, run):
        """The chief's TensorBoard writers and evaluation model."""
        config = self.config
        if run.chief:
            logs = os.path.join(config.model_dir, "logs")
            run.writers = {
                "train": ScalarWriter(os.path.join(logs, "train")),
                "eval": ScalarWriter(os.path.join(logs, "eval")),
            }
        if run.chief and run.source.eval is not None:
            run.eval_model = self.model_fn(config, run.num_classes, run.source, None, False)

    # ---------------------------------------------------------- restore

    def _restore(self, run):
        """Resumes from the chief's latest checkpoint, or starts the EMA at
        the initial weights."""
        config = self.config
        # The chief's directory on every worker: the workers resume together.
        run.latest = latest = tf.train.latest_checkpoint(os.path.join(config.model_dir, "checkpoints"))
        check_shared_model_dir(
            run.strategy,
            config.model_dir,
            lambda: [
                int(latest.rsplit("-", 1)[-1]) if latest else -1,
                int(os.path.exists(os.path.join(config.model_dir, RUN_CONFIG))),
            ],
        )
        if latest:
            self._restore_checkpoint(run, latest)
            self._log(f"Resumed from {latest} at step {int(run.state['step'].numpy())}.")
        else:
            if run.resuming:
                self._log("model_dir has a run configuration but no checkpoint yet: starting anew.")
            for average, weight in zip(run.ema, run.model.weights):
                average.assign(weight.value)
        self._accept_changed_settings(run)

    def _restore_checkpoint(self, run, path):
        if any(name.startswith("weights/") for name, _ in tf.train.list_variables(path)):
            run.checkpoint.restore(path).assert_existing_objects_matched()
            return
        # Written before checkpoints listed every weight: it resumes exactly
        # only where its object graph reaches them all (a float run's, whose
        # listed layers hold trainable weights only).
        legacy = tf.train.Checkpoint(**run.checkpoint_parts)
        reached = {id(item) for item in tf.train.TrackableView(legacy).descendants()}
        missing = [weight.path for weight in run.model.weights if id(weight) not in reached]
        if missing:
            raise ValueError(
                f"The checkpoint {path} was written before checkpoints held every model weight: "
                f"{len(missing)} of the model's {len(run.model.weights)} weights are not in it "
                f"(e.g. {', '.join(missing[:3])}), so resuming from it would not continue the run it "
                "saved. Start this run in a new --model_dir."
            )
        legacy.restore(path).assert_existing_objects_matched()

    # ------------------------------------------------------- train step

    def _make_train_step(self, run):
        """(accumulate_step, apply_step): one micro-batch per replica each,
        the second also updating the weights. Created once per run, so that
        each traces once."""
        strategy = run.strategy
        accumulate_replica, apply_replica = self._replica_steps(run)

        def reduce(per_replica):
            loss, correct, skipped = per_replica
            skipped = tf.reduce_max(tf.stack(strategy.experimental_local_results(skipped)))
            return (
                strategy.reduce(tf.distribute.ReduceOp.SUM, loss, axis=None),
                strategy.reduce(tf.distribute.ReduceOp.SUM, correct, axis=None),
                skipped,
            )

        @tf.function
        def accumulate_step(iterator):
            return reduce(strategy.run(accumulate_replica, args=next(iterator)))

        @tf.function
        def apply_step(iterator):
            return reduce(strategy.run(apply_replica, args=next(iterator)))

        return accumulate_step, apply_step

    def _replica_steps(self, run):
        """The per-replica bodies of the two micro-steps."""
        config = self.config
        model, optimizer, trainable = run.model, run.optimizer, run.trainable
        ema, accumulators, loss_scaling = run.ema, run.accumulators, run.loss_scaling
        replicas = run.strategy.num_replicas_in_sync
        clip = config.grad_clip_norm
        accum = config.grad_accum_steps
        decay = config.ema_decay
        replica_gradients = self._replica_gradients(run)

        def accumulate_replica(images, labels, skipped):
            loss, correct, gradients = replica_gradients(images, labels)
            for accumulator, gradient in zip(accumulators, gradients):
                accumulator.assign_add(gradient)
            return loss, correct, skipped

        def apply_replica(images, labels, skipped):
            loss, correct, gradients = replica_gradients(images, labels)
            if accum > 1:
                gradients = [(g + a) / accum for g, a in zip(gradients, accumulators)]
            if clip > 0:
                # Scaled gradients are clipped at the scaled threshold: the same
                # as clipping the true gradients at `clip`.
                threshold = clip * optimizer.dynamic_scale if loss_scaling else clip
                gradients, _ = tf.clip_by_global_norm(gradients, threshold)
            # The optimizer sums over replicas again; every replica already
            # holds the full gradient.
            optimizer.apply([g / replicas for g in gradients], trainable)
            for average, weight in zip(ema, model.weights):
                average.assign(decay * average + (1.0 - decay) * tf.cast(weight.value, average.dtype))
            for accumulator in accumulators:
                accumulator.assign(tf.zeros_like(accumulator))
            return loss, correct, skipped

        return accumulate_replica, apply_replica

    def _replica_gradients(self, run):
        """A replica's loss, correct count and the all-reduced gradients of
        one micro-batch."""
        model, optimizer, trainable = run.model, run.optimizer, run.trainable
        loss_scaling = run.loss_scaling
        global_micro_batch = self.config.batch_size
        teacher, teacher_weight = run.teacher, run.teacher_weight
        smoothing = self.config.label_smoothing

        def replica_gradients(images, labels):
            # Keras' label smoothing, on the labels' share only.
            targets = labels * (1.0 - smoothing) + smoothing / tf.cast(tf.shape(labels)[-1], labels.dtype)
            if teacher is not None:
                taught = tf.nn.softmax(tf.cast(teacher(images, training=False), tf.float32))
                targets = teacher_weight * taught + (1.0 - teacher_weight) * targets
            with tf.GradientTape() as tape:
                logits = tf.cast(model(images, training=True), tf.float32)
                per_example = keras.losses.categorical_crossentropy(targets, logits, from_logits=True)
                loss = tf.reduce_sum(per_example) / global_micro_batch
                scaled = optimizer.scale_loss(loss) if loss_scaling else loss
            gradients = tape.gradient(scaled, trainable)
            correct = tf.reduce_sum(tf.cast(tf.argmax(logits, -1) == tf.argmax(labels, -1), tf.float32))
            # The true global gradient (every replica gets the sum).
            gradients = tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, gradients)
            return loss, correct, gradients

        return replica_gradients

    # ------------------------------------------------------------- loop

    def _train_epochs(self, run, train_steps):
        """Trains from the restored position to `total_steps`; evaluates and
        checkpoints at every epoch end."""
        state = run.state
        run.step = run.first_step = int(state["step"].numpy())
        run.epoch = int(state["epoch"].numpy())
        run.step_in_epoch = int(state["step_in_epoch"].numpy())
        self._progress.start(run.step)
        while run.step < run.total_steps:
            self._train_pass(run, train_steps)
            if run.step_in_epoch >= run.steps_per_epoch:
                self._end_epoch(run)

    def _train_pass(self, run, train_steps):
        """The rest of the current epoch (or of training), from a pipeline
        that starts at the current position."""
        config = self.config
        images_per_step = config.effective_batch_size
        iterator = iter(self._train_data(run))
        epoch_loss, epoch_correct, epoch_images = 0.0, 0.0, 0
        while run.step_in_epoch < run.steps_per_epoch and run.step < run.total_steps:
            batch_loss, correct = self._optimizer_step(run, iterator, train_steps)
            self.step_losses.append(batch_loss)
            epoch_loss += batch_loss
            epoch_correct += correct
            epoch_images += images_per_step
            self._report_step(run, batch_loss, correct)
            if run.step % config.checkpoint_every == 0:
                self._save_checkpoint(run)
        run.history["train"] = {
            "loss": epoch_loss / max(epoch_images / images_per_step, 1),
            "accuracy": epoch_correct / max(epoch_images, 1),
        }

    def _train_data(self, run):
        """The epoch's distributed training data: the micro-batches from the
        current position (a resume, exactly where the checkpoint was) to the
        end of the epoch or of training, and no more."""
        config, source = self.config, run.source
        done = run.step_in_epoch * config.grad_accum_steps
        steps_left = min(run.steps_per_epoch - run.step_in_epoch, run.total_steps - run.step)
        left = steps_left * config.grad_accum_steps

        def dataset_fn(context, epoch=run.epoch):
            # Each micro-step takes one batch per local replica from the worker's pipeline.
            local_replicas = context.num_replicas_in_sync // context.num_input_pipelines
            return self._train_dataset(
                source, config, context, epoch, skip_batches=done * local_replicas, num_batches=left * local_replicas
            )

        return run.strategy.distribute_datasets_from_function(dataset_fn)

    # (source, config, input_context, epoch, skip_batches, num_batches) -> tf.data
    # of (images, labels, skipped): the task's training pipeline.
    _train_dataset = staticmethod(train_dataset)

    def _optimizer_step(self, run, iterator, train_steps):
        """One optimizer step (grad_accum_steps micro-steps); its mean loss
        and its number of correct predictions."""
        accumulate_step, apply_step = train_steps
        accum = self.config.grad_accum_steps
        started = time.perf_counter()
        loss_sum, correct_sum = 0.0, 0.0
        for _ in range(accum - 1):
            loss, correct, _ = accumulate_step(iterator)
            loss_sum += float(loss)
            correct_sum += float(correct)
        loss, correct, skipped = apply_step(iterator)
        loss_sum += float(loss)
        correct_sum += float(correct)
        elapsed = time.perf_counter() - started
        if run.step > run.first_step:  # untimed: the first step traces
            run.train_time += elapsed
            run.timed_steps += 1
        run.step += 1
        run.step_in_epoch += 1
        state = run.state
        state["step"].assign(run.step)
        state["step_in_epoch"].assign(run.step_in_epoch)
        # The pipeline counts from the start of the epoch: add the earlier epochs.
        state["skipped"].assign(int(state["skipped_before_epoch"].numpy()) + int(skipped))
        return loss_sum / accum, correct_sum

    def _report_step(self, run, batch_loss, correct):
        images_per_step = self.config.effective_batch_size
        rate = run.images_per_second(images_per_step)
        learning_rate = float(run.schedule(run.step - 1))
        self._progress.update(
            run.step,
            run.epoch,
            run.step_in_epoch,
            {"loss": batch_loss, "acc": correct / images_per_step, "lr": learning_rate},
            rate,
        )
        if run.chief and (run.step % 10 == 0 or run.step == run.total_steps):
            run.writers["train"].write(
                run.step,
                {
                    "loss": batch_loss,
                    "accuracy": correct / images_per_step,
                    "learning_rate": learning_rate,
                    "images_per_second": rate,
                },
            )

    def _end_epoch(self, run):
        run.epoch += 1
        run.step_in_epoch = 0
        state = run.state
        state["skipped_before_epoch"].assign(state["skipped"])
        state["epoch"].assign(run.epoch)
        state["step_in_epoch"].assign(0)
        history = run.history
        if run.eval_model is not None:
            history["eval"] = self._evaluate(run)
            self._progress.message(
                f"epoch {run.epoch}/{run.epochs}: train loss {history['train']['loss']:.4f} "
                f"acc {history['train']['accuracy']:.4f} | eval "
                + "  ".join(f"{k} {v:.4f}" for k, v in history["eval"].items())
            )
        self._save_checkpoint(run)

    def _save_checkpoint(self, run):
        run.manager.save(checkpoint_number=int(run.state["step"].numpy()))
        run.saved_step = int(run.state["step"].numpy())
        if not run.chief:  # saved only because saving is collective
            shutil.rmtree(run.checkpoint_dir, ignore_errors=True)

    # -------------------------------------------------------- evaluation

    def _evaluate(self, run):
        results = {}
        for label, weights in (
            ("", [w.numpy() for w in run.model.weights]),
            ("ema_", [v.numpy() for v in run.ema]),
        ):
            run.eval_model.set_weights(weights)
            metrics = self._evaluate_model(run.eval_model, run.source)
            self.skipped_eval_images = metrics.pop("skipped_images", 0)
            results.update({label + k: v for k, v in metrics.items()})
        if self.skipped_eval_images:
            self._log(
                f"Evaluation: {self.skipped_eval_images} undecodable images skipped; the "
                "metrics are over the other images."
            )
        if run.writers:
            run.writers["eval"].write(run.step, results)
        return results

    def _evaluate_model(self, model, source):
        """The task's metrics of `model` on the evaluation split."""
        return evaluate(model, source, self.config)

    # ------------------------------------------------------------ finish

    def _finish(self, run):
        """The chief's export of the EMA weights and summary.json."""
        config = self.config
        previous = keras.mixed_precision.global_policy().name
        keras.mixed_precision.set_global_policy("float32")
        try:
            exported = self._exported_model(run)
        finally:
            keras.mixed_precision.set_global_policy(previous)
        export_path = os.path.join(config.model_dir, EXPORT_NAME)
        temporary = os.path.join(config.model_dir, f".tmp-{os.getpid()}-{EXPORT_NAME}")
        exported.save(temporary)
        os.replace(temporary, export_path)
        with open(os.path.join(config.model_dir, "class_names.json"), "w") as f:
            json.dump(run.source.class_names, f)
        skipped = int(run.state["skipped"].numpy())
        summary = {
            "model": config.model,
            "final_step": run.step,
            "total_steps": run.total_steps,
            "epochs_completed": run.epoch,
            "train": run.history["train"],
            "eval": run.history["eval"],
            "images_per_second": run.images_per_second(config.effective_batch_size),
            "skipped_images": skipped,
            "skipped_eval_images": self.skipped_eval_images,
            "num_replicas": run.strategy.num_replicas_in_sync,
            "strategy": type(run.strategy).__name__,
            "exported_model": export_path,
            "exported_weights": "ema",
        }
        write_json_atomically(os.path.join(config.model_dir, SUMMARY), summary)
        if skipped or self.skipped_eval_images:
            self._progress.message(
                f"Undecodable images skipped: {skipped} in training (each pass counts), "
                f"{self.skipped_eval_images} in the last evaluation."
            )
        self._progress.message(f"Done: step {run.step}; summary in {os.path.join(config.model_dir, SUMMARY)}")
        return summary

    def _exported_model(self, run):
        """The float32 inference model holding the EMA weights."""
        exported = self.model_fn(self.config, run.num_classes, run.source, "softmax", False)
        exported.set_weights(self.ema_weights)
        return exported


_MODEL_FUNCTIONS = weakref.WeakKeyDictionary()


def model_function(model, body, image_spec):
    """`body(model, images)` as one traced function per model, `body` and
    image spec, kept for the model's life: evaluating every epoch (and the
    EMA model, and the QAT safeguard's two weight sets) then traces once per
    model, for every batch size, instead of at every call. The function holds
    its model weakly, so the cache never keeps a model alive."""
    functions = _MODEL_FUNCTIONS.setdefault(model, {})
    key = (body, image_spec)
    if key not in functions:
        model_ref = weakref.ref(model)
        functions[key] = tf.function(lambda images: body(model_ref(), images), input_signature=[image_spec])
    return functions[key]


def _float_outputs(model, images):
    return tf.cast(model(images, training=False), tf.float32)


def evaluate(model, source, config, batch_size=64):
    """top-1, top-5 and cross-entropy of `model` (logits) on the eval split,
    and `skipped_images`: the undecodable images left out of them."""
    top1 = top5 = loss = 0.0
    count = 0
    for images, labels in eval_dataset(source, config, batch_size):
        # Any batch size, the concrete image size (a QAT model needs it static).
        spec = tf.TensorSpec((None,) + tuple(images.shape[1:]), images.dtype)
        logits = model_function(model, _float_outputs, spec)(images)
        top1 += float(tf.reduce_sum(tf.cast(tf.math.in_top_k(labels, logits, 1), tf.float32)))
        top5 += float(tf.reduce_sum(tf.cast(tf.math.in_top_k(labels, logits, min(5, logits.shape[-1])), tf.float32)))
        loss += float(tf.reduce_sum(keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)))
        count += int(images.shape[0])
    if count == 0:
        raise ValueError("The evaluation split yielded no decodable image.")
    skipped = eval_split(source, config).num_examples - count
    return {"top1": top1 / count, "top5": top5 / count, "loss": loss / count, "skipped_images": skipped}


def train(config=None, **overrides):
    """Python API: `train(TrainConfig(...))` or `train(model=..., data=..., ...)`.

    Returns the run summary (also written to `model_dir/summary.json`).
    """
    if config is None:
        config = TrainConfig(**overrides)
    elif overrides:
        config = dataclasses.replace(config, **overrides)
    return Trainer(config).run()
