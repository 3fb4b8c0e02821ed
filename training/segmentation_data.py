"""Semantic segmentation data: PASCAL VOC-layout folders and the embedded
shapes with their masks.

A dataset folder in the VOC layout holds

    JPEGImages/<id>.jpg                  the images (any format TF decodes)
    SegmentationClassAug/<id>.png        masks: one channel of class indices,
      (or SegmentationClass/<id>.png)    255 = ignored (object borders)
    ImageSets/Segmentation/train.txt     the ids of each split, one per line
    ImageSets/Segmentation/val.txt

and optionally `class_names.txt` (one name per line; default: the 21 VOC
classes). VOC's own SegmentationClass PNGs are palette images: TensorFlow
decodes them to RGB, so they are refused with a clear error; convert them to
index PNGs first (SegmentationClassAug already is).
"""

import dataclasses
import os

import numpy as np
import tensorflow as tf

from training.data import EMBEDDED_CLASSES
from training.data import EMBEDDED_NAME
from training.data import augmented_batches
from training.data import generated_folder
from training.data import paint_shape

__all__ = [
    "IGNORE_LABEL",
    "VOC_CLASSES",
    "SegmentationSource",
    "embedded_segmentation_source",
    "resolve_segmentation_source",
    "segmentation_eval_dataset",
    "segmentation_train_dataset",
    "voc_source",
]

IGNORE_LABEL = 255
VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip
_MASK_FOLDERS = ("SegmentationClassAug", "SegmentationClass")


@dataclasses.dataclass
class SegmentationSplit:
    image_paths: list
    mask_paths: list

    @property
    def num_examples(self):
        return len(self.image_paths)

    def dataset(self, shuffle_seed=None, shard=(1, 0)):
        """(image bytes, mask bytes) records, shuffled by `shuffle_seed` (a
        tuple of ints) and restricted to shard `shard[1]` of `shard[0]`."""
        order = np.arange(self.num_examples)
        if shuffle_seed is not None:
            order = np.random.default_rng(list(shuffle_seed)).permutation(self.num_examples)
        order = order[shard[1] :: shard[0]]
        paths = tf.data.Dataset.from_tensor_slices(
            (tf.constant([self.image_paths[i] for i in order]), tf.constant([self.mask_paths[i] for i in order]))
        )
        return paths.map(lambda image, mask: (tf.io.read_file(image), tf.io.read_file(mask)))


@dataclasses.dataclass
class SegmentationSource:
    name: str
    class_names: list
    train: SegmentationSplit
    eval: SegmentationSplit

    @property
    def num_classes(self):
        return len(self.class_names)


def _split_ids(root, split):
    path = os.path.join(root, "ImageSets", "Segmentation", f"{split}.txt")
    if not os.path.exists(path):
        raise ValueError(f"{root} is not a VOC-layout folder: {path} is missing (the ids of the {split} split).")
    with open(path) as f:
        return [line.split()[0] for line in f if line.strip()]


def _find_image(root, image_id):
    for extension in (".jpg", ".jpeg", ".png"):
        path = os.path.join(root, "JPEGImages", image_id + extension)
        if os.path.exists(path):
            return path
    raise ValueError(f"{root}: no image for id {image_id!r} in JPEGImages/ (.jpg, .jpeg or .png).")


def voc_source(root):
    """A VOC-layout folder (see the module docstring) -> SegmentationSource."""
    masks = next((os.path.join(root, m) for m in _MASK_FOLDERS if os.path.isdir(os.path.join(root, m))), None)
    if masks is None:
        raise ValueError(f"{root} is not a VOC-layout folder: it has neither of {_MASK_FOLDERS}.")
    splits = {}
    for split in ("train", "val"):
        ids = _split_ids(root, split)
        if not ids:
            raise ValueError(f"{root}: ImageSets/Segmentation/{split}.txt lists no image.")
        mask_paths = [os.path.join(masks, i + ".png") for i in ids]
        missing = [p for p in mask_paths if not os.path.exists(p)]
        if missing:
            raise ValueError(f"{root}: {len(missing)} masks of the {split} split are missing, e.g. {missing[0]}.")
        splits[split] = SegmentationSplit([_find_image(root, i) for i in ids], mask_paths)
    names_file = os.path.join(root, "class_names.txt")
    class_names = list(VOC_CLASSES)
    if os.path.exists(names_file):
        with open(names_file) as f:
            class_names = [line.strip() for line in f if line.strip()]
    return SegmentationSource(f"VOC layout ({root})", class_names, splits["train"], splits["val"])


def _ignored_border(mask):
    """The one-pixel ring around the shape's outline, ignored like VOC's
    object borders: (the shape or a neighbour of it) minus its interior."""
    padded = np.pad(mask, 1)
    grown = np.zeros_like(mask)
    shrunk = np.ones_like(mask)
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            window = padded[dy : dy + mask.shape[0], dx : dx + mask.shape[1]]
            grown |= window
            shrunk &= window
    return grown & ~shrunk


def _write_embedded(staging, image_size, counts, seed):
    rng = np.random.RandomState(seed)
    for folder in ("JPEGImages", "SegmentationClassAug", os.path.join("ImageSets", "Segmentation")):
        os.makedirs(os.path.join(staging, folder))
    for split, count in counts.items():
        ids = []
        for i in range(count):
            class_index = i % len(EMBEDDED_CLASSES)
            image, shape = paint_shape(rng, image_size, class_index)
            mask = np.where(shape, class_index + 1, 0).astype(np.uint8)
            mask[_ignored_border(shape)] = IGNORE_LABEL
            image_id = f"{split}_{i:05d}"
            tf.io.write_file(os.path.join(staging, "JPEGImages", image_id + ".png"), tf.io.encode_png(image))
            tf.io.write_file(
                os.path.join(staging, "SegmentationClassAug", image_id + ".png"), tf.io.encode_png(mask[..., None])
            )
            ids.append(image_id)
        with open(os.path.join(staging, "ImageSets", "Segmentation", f"{split}.txt"), "w") as f:
            f.write("\n".join(ids) + "\n")
    with open(os.path.join(staging, "class_names.txt"), "w") as f:
        f.write("\n".join(("background",) + EMBEDDED_CLASSES) + "\n")


def embedded_segmentation_source(dataset_dir=None, image_size=72, train_images=800, eval_images=200, seed=4321):
    """Generates (once) and returns the embedded segmentation dataset: the
    classifier's shapes with their masks (11 classes: background and the 10
    shapes), written in the VOC layout so that it runs the same pipeline as
    real data."""
    name = f"mobilevitv2_shapes_voc_{image_size}px_{train_images}_{eval_images}_v1"
    counts = {"train": train_images, "val": eval_images}
    root = generated_folder(dataset_dir, name, lambda folder: _write_embedded(folder, image_size, counts, seed))
    source = voc_source(root)
    source.name = f"embedded segmentation ({root})"
    return source


def resolve_segmentation_source(data, dataset_dir=None):
    """`--data` value of `--task segmentation` -> SegmentationSource."""
    if data == EMBEDDED_NAME:
        return embedded_segmentation_source(dataset_dir)
    if not os.path.isdir(data):
        raise ValueError(
            f"--data {data!r} is not a folder. With --task segmentation give a PASCAL VOC-layout folder "
            f"(JPEGImages/, SegmentationClassAug/ or SegmentationClass/, ImageSets/Segmentation/) or "
            f"'{EMBEDDED_NAME}'."
        )
    return voc_source(data)


# ---------------------------------------------------------------- pipelines

_MASK_HELP = (
    "a segmentation mask must be a one-channel PNG of class indices (255 = ignore); this one has several "
    "channels (a palette or RGB PNG): convert the masks to index PNGs"
)


def _decode_pair(image_bytes, mask_bytes):
    image = tf.cast(tf.io.decode_image(image_bytes, channels=3, expand_animations=False), tf.float32)
    return image, tf.io.decode_png(mask_bytes, channels=0)  # (H, W, 3) float32 pixels, (H, W, c) uint8 mask


def _checked_mask(mask):
    """(H, W, 1) int32 classes. Checked after `ignore_errors` (which skips
    undecodable files): a palette or RGB mask is an error, never a skip."""
    with tf.control_dependencies([tf.debugging.assert_equal(tf.shape(mask)[-1], 1, message=_MASK_HELP)]):
        return tf.cast(mask, tf.int32)


def _random_scale_crop_flip(image, mask, size, seed):
    """ml-cvnets' random short-side resize (here 0.5-2x of the crop size),
    random crop padded with 0 (image) and 255 (mask), horizontal flip."""
    seeds = tf.random.experimental.stateless_split(seed, 4)
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    short = tf.random.stateless_uniform([], seeds[0], 0.5 * size, 2.0 * size)
    scaled = tf.cast(tf.round(shape * short / tf.reduce_min(shape)), tf.int32)
    image = tf.image.resize(image, scaled, "bilinear")
    mask = tf.image.resize(mask, scaled, "nearest")
    # Pad to at least the crop size; the mask's padding is ignored (255 after the shift below).
    target = tf.maximum(scaled, size)
    image = tf.image.pad_to_bounding_box(image, 0, 0, target[0], target[1])
    mask = tf.image.pad_to_bounding_box(mask - IGNORE_LABEL, 0, 0, target[0], target[1]) + IGNORE_LABEL
    stacked = tf.concat([image, tf.cast(mask, tf.float32)], -1)  # (H, W, 4): one crop for both
    stacked = tf.image.stateless_random_crop(stacked, [size, size, 4], seeds[1])
    stacked = tf.image.stateless_random_flip_left_right(stacked, seeds[2])
    return stacked[..., :3], tf.cast(stacked[..., 3], tf.int32)  # (S, S, 3), (S, S)


def segmentation_train_dataset(source, config, input_context, epoch, skip_batches=0, num_batches=None):
    """`train_dataset` for segmentation: (images, masks, skipped) batches of
    one input pipeline for one epoch, keyed per image as the classifier's;
    undecodable images or masks are skipped and counted as the classifier's."""
    per_replica_batch = input_context.get_per_replica_batch_size(config.batch_size)
    shard = (input_context.num_input_pipelines, input_context.input_pipeline_id)
    records = source.train.dataset(shuffle_seed=(config.seed, epoch), shard=shard).repeat().enumerate()
    image_seed = int(np.random.default_rng([config.seed, epoch]).integers(2**62))

    def decode(index, record):
        return (index, index) + _decode_pair(*record)  # the first index is consumed by count_skipped

    def augment(index, image, mask, skipped):
        seed = tf.stack([tf.constant(image_seed, tf.int64), index * shard[0] + shard[1]])
        image, mask = _random_scale_crop_flip(image, _checked_mask(mask), config.image_size, seed)
        return image, mask, skipped

    decoded = records.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return augmented_batches(decoded, augment, per_replica_batch, skip_batches, num_batches)


def segmentation_eval_dataset(source, config, batch_size):
    """(images, masks) of the evaluation split at `image_size` x `image_size`
    (image bilinear, mask nearest), the first `max_eval_images` when set."""
    records = source.eval.dataset()
    if config.max_eval_images:
        records = records.take(config.max_eval_images)
    size = (config.image_size, config.image_size)

    def load(image_bytes, mask_bytes):
        image, mask = _decode_pair(image_bytes, mask_bytes)
        return tf.image.resize(image, size, "bilinear"), tf.image.resize(mask, size, "nearest")

    pairs = records.map(load, num_parallel_calls=tf.data.AUTOTUNE).ignore_errors(log_warning=True)
    pairs = pairs.map(lambda image, mask: (image, _checked_mask(mask)[..., 0]))
    return pairs.batch(batch_size).prefetch(tf.data.AUTOTUNE)
