"""Datasets for the trainer: image folders, ImageNet TFRecords, TFDS, and an
embedded dataset that is generated locally (no download).

Every source is reduced to records of (encoded image bytes or file path,
label); one pipeline decodes, augments, shards per worker and batches.
"""

import dataclasses
import glob
import os
import shutil
import tempfile

import numpy as np
import tensorflow as tf

from keras_mobilevitv2.imagenet import eval_transform
from training.augment import TrainAugmentation
from training.augment import mixup_or_cutmix

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
EMBEDDED_NAME = "embedded"
EMBEDDED_CLASSES = (
    "disc",
    "square",
    "triangle",
    "ring",
    "cross",
    "striped_disc",
    "striped_square",
    "striped_triangle",
    "striped_ring",
    "striped_cross",
)


@dataclasses.dataclass
class Split:
    """One split: either file paths or a TFRecord/TFDS dataset of bytes."""

    num_examples: int
    paths: list = None  # folder source
    labels: list = None
    records: object = None  # callable(shuffle_seed) -> tf.data of (bytes, label)

    def dataset(self, shuffle_seed=None, shard=(1, 0)):
        """(bytes or path, label) records, shuffled deterministically by
        `shuffle_seed` (a tuple of ints) and restricted to shard `shard[1]`
        of `shard[0]` before any file is read."""
        num_shards, shard_index = shard
        if self.paths is not None:
            order = np.arange(self.num_examples)
            if shuffle_seed is not None:
                order = np.random.default_rng(list(shuffle_seed)).permutation(self.num_examples)
            order = order[shard_index::num_shards]
            paths = tf.constant([self.paths[i] for i in order])
            labels = tf.constant([self.labels[i] for i in order], tf.int32)
            files = tf.data.Dataset.from_tensor_slices((paths, labels))
            return files.map(
                lambda path, label: (tf.io.read_file(path), label),
                num_parallel_calls=tf.data.AUTOTUNE,
            )
        records = self.records(shuffle_seed)
        return records.shard(num_shards, shard_index) if num_shards > 1 else records

    def balanced_subset(self, count):
        """At most `count` records spread evenly over the classes, the same
        every time. A folder is sorted by class, so its first records would
        be the first classes only; record sources (TFRecords, TFDS) carry no
        label list and keep their first `count` records."""
        if count <= 0 or count >= self.num_examples:
            return self
        if self.paths is None:
            return Split(count, records=lambda seed: self.records(seed).take(count))
        chosen = np.sort(_round_robin_over_classes(self.labels)[:count])
        return Split(count, paths=[self.paths[i] for i in chosen], labels=[self.labels[i] for i in chosen])


def _round_robin_over_classes(labels):
    """Record indices in the order: the first image of every class, then the
    second of every class, and so on."""
    labels = np.asarray(labels)
    rank_in_class = np.empty(len(labels), np.int64)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        rank_in_class[members] = np.arange(len(members))
    return np.lexsort((labels, rank_in_class))


def _int_seed(shuffle_seed):
    """A tuple seed as one int for tf.data's `shuffle` (None stays None)."""
    if shuffle_seed is None:
        return None
    return int(np.random.default_rng(list(shuffle_seed)).integers(2**31 - 1))


@dataclasses.dataclass
class DataSource:
    name: str
    class_names: list
    train: Split
    eval: Split = None

    @property
    def num_classes(self):
        return len(self.class_names)


# ---------------------------------------------------------------- folders


def _list_class_folder(split_dir):
    try:
        entries = sorted(os.listdir(split_dir))
    except OSError as error:
        raise ValueError(f"Cannot read the data folder {split_dir}: {error}") from None
    classes = [e for e in entries if os.path.isdir(os.path.join(split_dir, e))]
    if not classes:
        raise ValueError(
            f"The data folder {split_dir} has no class sub-folders. Expected an "
            "ImageNet-style layout: <data>/train/<class_name>/<image files>."
        )
    paths, labels, empty = [], [], []
    for label, name in enumerate(classes):
        class_dir = os.path.join(split_dir, name)
        try:
            files = sorted(f for f in os.listdir(class_dir) if f.lower().endswith(IMAGE_EXTENSIONS))
        except OSError as error:
            raise ValueError(f"Cannot read the class folder {class_dir}: {error}") from None
        if not files:
            empty.append(name)
        paths += [os.path.join(class_dir, f) for f in files]
        labels += [label] * len(files)
    if not paths:
        raise ValueError(
            f"The data folder {split_dir} has {len(classes)} class folders but no "
            f"image files ({', '.join(IMAGE_EXTENSIONS)})."
        )
    if empty:
        raise ValueError(f"{len(empty)} class folders of {split_dir} hold no images: {empty[:10]}.")
    return classes, paths, labels


def folder_source(root):
    train_dir = os.path.join(root, "train")
    if not os.path.isdir(train_dir):
        raise ValueError(
            f"No 'train' folder in {root}. Expected <data>/train/<class>/... and "
            "optionally <data>/val/<class>/... (or validation/)."
        )
    classes, paths, labels = _list_class_folder(train_dir)
    source = DataSource(
        name=root,
        class_names=classes,
        train=Split(len(paths), paths=paths, labels=labels),
    )
    for eval_name in ("val", "validation"):
        eval_dir = os.path.join(root, eval_name)
        if os.path.isdir(eval_dir):
            eval_classes, eval_paths, eval_labels = _list_class_folder(eval_dir)
            if eval_classes != classes:
                missing = sorted(set(classes) - set(eval_classes))
                extra = sorted(set(eval_classes) - set(classes))
                raise ValueError(
                    f"The class folders of {eval_dir} do not match those of "
                    f"{train_dir}: missing in eval {missing[:10]}, not in train "
                    f"{extra[:10]}."
                )
            source.eval = Split(len(eval_paths), paths=eval_paths, labels=eval_labels)
            break
    return source


# --------------------------------------------------------------- TFRecords


def _tfrecord_split(files, label_offset):
    feature_spec = {
        "image/encoded": tf.io.FixedLenFeature((), tf.string),
        "image/class/label": tf.io.FixedLenFeature((), tf.int64),
    }

    def parse(record):
        features = tf.io.parse_single_example(record, feature_spec)
        label = tf.cast(features["image/class/label"], tf.int32) - label_offset
        return features["image/encoded"], label

    count = int(tf.data.TFRecordDataset(files).reduce(np.int64(0), lambda n, _: n + 1))

    def records(shuffle_seed):
        dataset = tf.data.Dataset.from_tensor_slices(files)
        seed = _int_seed(shuffle_seed)
        if seed is not None:
            dataset = dataset.shuffle(len(files), seed=seed)
        dataset = dataset.interleave(
            tf.data.TFRecordDataset, cycle_length=8, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
        )
        if seed is not None:
            dataset = dataset.shuffle(10_000, seed=seed)
        return dataset.map(parse, num_parallel_calls=tf.data.AUTOTUNE)

    return Split(count, records=records)


def tfrecord_source(root, num_classes, label_offset=0):
    train_files = sorted(glob.glob(os.path.join(root, "train-*")))
    eval_files = sorted(glob.glob(os.path.join(root, "validation-*")))
    if not train_files:
        raise ValueError(f"No train-* TFRecord files in {root}.")
    if num_classes < 1:
        raise ValueError("ImageNet TFRecords carry no class list: give --num_classes.")
    return DataSource(
        name=root,
        class_names=[str(i) for i in range(num_classes)],
        train=_tfrecord_split(train_files, label_offset),
        eval=_tfrecord_split(eval_files, label_offset) if eval_files else None,
    )


# -------------------------------------------------------------------- TFDS


def tfds_source(name, data_dir=None):
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise ValueError(
            f"--data=tfds:{name} needs tensorflow-datasets (pip install tensorflow-datasets) and the prepared data."
        ) from None
    builder = tfds.builder(name, data_dir=data_dir)
    if not os.path.isdir(builder.data_dir):
        raise ValueError(
            f"TFDS dataset {name} is not prepared in {builder.data_dir}; run "
            "`tfds build` for it first (the trainer never downloads)."
        )
    splits = builder.info.splits
    eval_split = next((s for s in ("validation", "test") if s in splits), None)

    def make(split):
        def records(shuffle_seed):
            seed = _int_seed(shuffle_seed)
            dataset = builder.as_dataset(
                split=split,
                shuffle_files=seed is not None,
                decoders={"image": tfds.decode.SkipDecoding()},
                read_config=tfds.ReadConfig(shuffle_seed=seed),
            )
            if seed is not None:  # files alone: a one-shard split keeps its order
                dataset = dataset.shuffle(10_000, seed=seed)
            return dataset.map(lambda ex: (ex["image"], tf.cast(ex["label"], tf.int32)))

        return Split(splits[split].num_examples, records=records)

    return DataSource(
        name=f"tfds:{name}",
        class_names=list(builder.info.features["label"].names),
        train=make("train"),
        eval=make(eval_split) if eval_split else None,
    )


# ---------------------------------------------------------------- embedded


def _draw_shape(rng, size, class_index):
    """One image of the embedded dataset: a coloured shape on a noisy field."""
    return paint_shape(rng, size, class_index)[0]


def paint_shape(rng, size, class_index):
    """`_draw_shape`'s (uint8 image, boolean mask of the shape's pixels); the
    embedded segmentation data uses the mask."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    background = rng.uniform(0.0, 0.6, 3)[None, None] + 0.25 * rng.uniform(-1, 1, 3)[None, None] * x[..., None]
    image = np.clip(background + rng.normal(0, 0.06, (size, size, 3)), 0, 1)
    cy, cx = rng.uniform(0.35, 0.65, 2)
    radius = rng.uniform(0.18, 0.3)
    dy, dx = y - cy, x - cx
    kind = class_index % 5
    if kind == 0:
        mask = dy**2 + dx**2 < radius**2
    elif kind == 1:
        mask = (np.abs(dy) < radius * 0.85) & (np.abs(dx) < radius * 0.85)
    elif kind == 2:
        mask = (dy < radius * 0.7) & (dy > -radius) & (np.abs(dx) < (dy + radius) * 0.6)
    elif kind == 3:
        distance = np.sqrt(dy**2 + dx**2)
        mask = (distance < radius) & (distance > radius * 0.6)
    else:
        mask = ((np.abs(dy) < radius * 0.3) | (np.abs(dx) < radius * 0.3)) & (
            np.maximum(np.abs(dy), np.abs(dx)) < radius
        )
    colour = rng.uniform(0.5, 1.0, 3) * (1 - 0.7 * rng.uniform(0, 1, 3) * (rng.rand() < 0.5))
    image[mask] = colour
    if class_index >= 5:  # striped variants: dark stripes inside the whole outline
        angle = rng.uniform(0, np.pi)
        stripes = np.sin((np.cos(angle) * x + np.sin(angle) * y) * 2 * np.pi * 7) > 0
        image[mask & stripes] = colour * 0.35
    return (image * 255).astype(np.uint8), mask


def generated_folder(dataset_dir, name, write):
    """`<dataset_dir>/<name>`, written once by `write(folder)`.

    Written in a staging folder that is renamed into place, so a half-written
    dataset (an interrupted run, two processes at once) is never used.
    `dataset_dir` defaults to Keras' datasets folder ($KERAS_HOME/datasets).
    """
    if not dataset_dir:
        dataset_dir = os.path.join(os.path.expanduser(os.environ.get("KERAS_HOME", "~/.keras")), "datasets")
    root = os.path.join(dataset_dir, name)
    if not os.path.isdir(root):
        os.makedirs(dataset_dir, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=f".{name}-", dir=dataset_dir)
        try:
            write(staging)
            os.rename(staging, root)  # atomic
        except OSError:
            if not os.path.isdir(root):
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # gone after the rename; else another process won
    return root


def embedded_source(dataset_dir=None, image_size=72, train_per_class=160, eval_per_class=40, seed=1234):
    """Generates (once) and returns the embedded 10-class 'shapes' dataset.

    Written as PNG files in an ImageNet-style folder, so training on it runs
    the same folder pipeline (file reading, decoding) as real data.
    """

    def write(folder):
        rng = np.random.RandomState(seed)
        for split, per_class in (("train", train_per_class), ("val", eval_per_class)):
            for index, name in enumerate(EMBEDDED_CLASSES):
                class_dir = os.path.join(folder, split, name)
                os.makedirs(class_dir)
                for i in range(per_class):
                    png = tf.io.encode_png(_draw_shape(rng, image_size, index))
                    tf.io.write_file(os.path.join(class_dir, f"{i:05d}.png"), png)

    name = f"mobilevitv2_shapes_{image_size}px_{train_per_class}_{eval_per_class}_v2"
    root = generated_folder(dataset_dir, name, write)
    source = folder_source(root)
    source.name = f"embedded ({root})"
    return source


def resolve_source(data, num_classes=0, label_offset=0, dataset_dir=None):
    """`--data` value -> DataSource."""
    if data == EMBEDDED_NAME:
        return embedded_source(dataset_dir)
    if data.startswith("tfds:"):
        return tfds_source(data[len("tfds:") :], data_dir=dataset_dir or None)
    if not os.path.exists(data):
        raise ValueError(
            f"--data {data!r} does not exist. Give an ImageNet-style folder, a "
            "folder of ImageNet TFRecords (train-*, validation-*), tfds:NAME, or "
            f"'{EMBEDDED_NAME}'."
        )
    if glob.glob(os.path.join(data, "train-*")):
        return tfrecord_source(data, num_classes, label_offset)
    return folder_source(data)


# ---------------------------------------------------------------- pipelines


def _decode(encoded):
    return tf.io.decode_image(encoded, channels=3, expand_animations=False)


_LABEL_HELP = (
    "a label is outside [0, num_classes): check --num_classes and, for TFRecords, "
    "--tfrecord_label_offset (1 for 1-based ImageNet labels)"
)


@tf.autograph.experimental.do_not_convert  # plain ops; autograph lost the module globals
def _checked_one_hot(one_hot, num_classes, message=_LABEL_HELP):
    """Fails loudly on an out-of-range label (tf.one_hot gives all zeros).

    Checked after `ignore_errors`, which would otherwise drop it silently.
    """
    check = tf.debugging.assert_equal(tf.reduce_sum(one_hot), 1.0, message=message)
    with tf.control_dependencies([check]):
        return tf.identity(one_hot)


def count_skipped(dataset):
    """Adds to each element how many records were dropped before it.

    Elements carry their record index; `ignore_errors` drops undecodable
    ones, and the gaps in the indices count them.
    """

    def step(state, element):
        last_index, skipped = state
        index = element[0]
        skipped = skipped + index - last_index - 1
        return (index, skipped), element[1:] + (skipped,)

    return dataset.scan((tf.constant(-1, tf.int64), tf.constant(0, tf.int64)), step)


def augmented_batches(decoded, augment, per_replica_batch, skip_batches=0, num_batches=None):
    """The tail of the dense-prediction training pipelines: `decoded`
    (index, ...) records with the undecodable ones skipped and counted
    (`count_skipped`), `augment(index, ..., skipped)` -> (images, targets,
    skipped) per example, batches carrying the count so far, and the epoch's
    window of `num_batches` after `skip_batches`."""
    decoded = count_skipped(decoded.ignore_errors(log_warning=True))
    batches = decoded.map(augment, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    batches = batches.batch(per_replica_batch, drop_remainder=True)
    batches = batches.map(lambda images, targets, skipped: (images, targets, tf.reduce_max(skipped)))
    if skip_batches:
        batches = batches.skip(skip_batches)
    if num_batches is not None:
        batches = batches.take(num_batches)
    return batches.prefetch(tf.data.AUTOTUNE)


def train_dataset(source, config, input_context, epoch, skip_batches=0, num_batches=None):
    """The training stream of one input pipeline for one epoch: `num_batches`
    batches after the first `skip_batches` (without end when None).

    The records repeat, so every worker yields the same number of batches
    whatever its shard size. The trainer passes the epoch's remaining batches,
    so the pipeline stops at the epoch's last step instead of preparing
    batches nobody takes.
    """
    per_replica_batch = input_context.get_per_replica_batch_size(config.batch_size)
    augmentation = TrainAugmentation(
        config.image_size,
        randaugment=config.randaugment,
        magnitude=config.randaugment_magnitude,
        erasing=config.random_erasing,
        crop_min_scale=config.crop_min_scale,
    )
    shard = (input_context.num_input_pipelines, input_context.input_pipeline_id)
    records = source.train.dataset(shuffle_seed=(config.seed, epoch), shard=shard)
    records = records.repeat().enumerate()
    num_classes = source.num_classes
    # Per-batch draws (mixup/cutmix) differ per worker (pipeline id) and per epoch.
    augment_seed = int(np.random.default_rng([config.seed, epoch, shard[1]]).integers(2**62))
    # Per-image draws are keyed by the image's position in the epoch's global
    # order (record i of shard s of n is at i * n + s), not by the shard: an
    # image gets the same crop, flip... with 1 or N workers, so a global batch
    # is the same whatever the number of workers.
    image_seed = int(np.random.default_rng([config.seed, epoch]).integers(2**62))

    def load(index, record):
        encoded, label = record
        seed = tf.stack([tf.constant(image_seed, tf.int64), index * shard[0] + shard[1]])
        image = augmentation(_decode(encoded), seed)
        return index, image, tf.one_hot(label, num_classes)

    images = records.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    images = count_skipped(images.ignore_errors(log_warning=True))
    images = images.map(lambda image, label, skipped: (image, _checked_one_hot(label, num_classes), skipped))
    batches = images.batch(per_replica_batch, drop_remainder=True)

    def mix(batch_index, batch):
        images, labels, skipped = batch
        seed = tf.stack([tf.constant(augment_seed + 7, tf.int64), batch_index])
        images, labels = mixup_or_cutmix(images, labels, seed, config.mixup_alpha, config.cutmix_alpha)
        return images, labels, tf.reduce_max(skipped)

    batches = batches.enumerate().map(mix, num_parallel_calls=tf.data.AUTOTUNE)
    if skip_batches:
        batches = batches.skip(skip_batches)
    if num_batches is not None:
        batches = batches.take(num_batches)
    return batches.prefetch(tf.data.AUTOTUNE)


def eval_split(source, config, shuffle_seed=None):
    """The evaluation records: all, or `max_eval_images` of them spread over
    the classes (a seeded random subset with `shuffle_seed`)."""
    if shuffle_seed is not None or not config.max_eval_images:
        return source.eval
    return source.eval.balanced_subset(config.max_eval_images)


def eval_dataset(source, config, batch_size, shuffle_seed=None):
    """Evaluation: resize the shorter side by 1/ratio (bicubic), center crop.

    The records are `eval_split`'s; `shuffle_seed` takes a seeded random
    subset of `max_eval_images` instead. Undecodable images are dropped (the
    caller counts them against `eval_split(...).num_examples`)."""
    resize = int(round(config.image_size / config.eval_resize_ratio))
    records = eval_split(source, config, shuffle_seed).dataset(shuffle_seed=shuffle_seed)
    if config.max_eval_images:
        records = records.take(config.max_eval_images)

    def load(encoded, label):
        return eval_transform(_decode(encoded), config.image_size, resize), label

    images = records.map(load, num_parallel_calls=tf.data.AUTOTUNE).ignore_errors(log_warning=True)
    num_classes = source.num_classes

    @tf.autograph.experimental.do_not_convert
    def check(image, label, message=_LABEL_HELP):
        valid = tf.logical_and(label >= 0, label < num_classes)
        with tf.control_dependencies([tf.debugging.Assert(valid, [message, label])]):
            return image, tf.identity(label)

    return images.map(check).batch(batch_size).prefetch(tf.data.AUTOTUNE)
