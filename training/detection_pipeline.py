"""The detection input pipelines: box-aware augmentation and anchor matching
for training, resized images with their ids for evaluation.

Training follows ml-cvnets' SSD recipe: a random crop whose IoU with every
box reaches a randomly chosen minimum (SSD's "SSDCroping"; keeping the boxes
whose centre lies inside), a horizontal flip, a resize to the square input,
then each anchor's target (`match_anchors`). ml-cvnets' photometric
distortion is not applied.
"""

import numpy as np
import tensorflow as tf
from keras.utils import bounding_boxes

from keras_mobilevitv2.detection.anchors import input_anchors
from keras_mobilevitv2.detection.box_coding import match_anchors
from training.data import augmented_batches

__all__ = ["detection_eval_dataset", "detection_train_dataset", "random_iou_crop"]

# The minimum IoU of a crop with every box, one drawn per image; -1: no crop.
CROP_MIN_IOUS = (-1.0, 0.0, 0.1, 0.3, 0.5, 0.7, 0.9)
CROP_TRIALS = 50
CROP_MIN_SIDE = 0.3  # of the image side


def _crop_candidates(seed):
    """CROP_TRIALS normalised (x0, y0, x1, y1) windows with sides in
    [0.3, 1] and an aspect ratio in [0.5, 2]; the validity mask of the ratio."""
    seeds = tf.random.experimental.stateless_split(seed, 2)
    sides = tf.random.stateless_uniform([CROP_TRIALS, 2], seeds[0], CROP_MIN_SIDE, 1.0)  # (w, h)
    corners = tf.random.stateless_uniform([CROP_TRIALS, 2], seeds[1]) * (1.0 - sides)
    ratio = sides[:, 1] / sides[:, 0]
    return tf.concat([corners, corners + sides], -1), (ratio >= 0.5) & (ratio <= 2.0)


def _choose_crop(boxes, seed):
    """The first candidate window whose IoU with every box reaches the drawn
    minimum and that holds a box centre; the whole image if none does."""
    seeds = tf.random.experimental.stateless_split(seed, 2)
    pick = tf.random.stateless_uniform([], seeds[0], 0, len(CROP_MIN_IOUS), dtype=tf.int32)
    min_iou = tf.gather(CROP_MIN_IOUS, pick)
    windows, shaped = _crop_candidates(seeds[1])
    iou = bounding_boxes.compute_iou(windows, boxes, "xyxy")  # [T, M]
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2.0  # [M, 2]
    inside = tf.reduce_all(
        (centres[None] > windows[:, None, :2]) & (centres[None] < windows[:, None, 2:]), -1
    )  # [T, M]
    valid = shaped & tf.reduce_any(inside, 1) & (tf.reduce_min(iou, 1) >= min_iou) & (min_iou >= 0.0)
    whole = tf.constant([[0.0, 0.0, 1.0, 1.0]])
    return tf.concat([tf.boolean_mask(windows, valid), whole], 0)[0]


def random_iou_crop(image, boxes, labels, seed):
    """SSD's IoU-constrained random crop of an (H, W, 3) image and its
    normalised corner-form boxes; boxes whose centre falls outside go."""
    shape = tf.cast(tf.shape(image)[:2], tf.float32)  # (H, W)
    window = _choose_crop(boxes, seed)
    # The window in whole pixels, and the boxes against exactly those pixels.
    top_left = tf.cast(tf.floor(window[1::-1] * shape), tf.int32)  # (y, x)
    size = tf.maximum(tf.cast(tf.round((window[3:1:-1] - window[1::-1]) * shape), tf.int32), 1)
    size = tf.minimum(size, tf.shape(image)[:2] - top_left)
    image = tf.slice(image, tf.concat([top_left, [0]], 0), tf.concat([size, [3]], 0))
    y0, x0 = tf.unstack(tf.cast(top_left, tf.float32) / shape)
    h, w = tf.unstack(tf.cast(size, tf.float32) / shape)
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2.0
    keep = tf.reduce_all((centres > [x0, y0]) & (centres < [x0 + w, y0 + h]), -1)
    cropped = bounding_boxes.crop(tf.boolean_mask(boxes, keep), y0, x0, h, w) / [w, h, w, h]
    return image, cropped, tf.boolean_mask(labels, keep)


def _flip(image, boxes, seed):
    flip = tf.random.stateless_uniform([], seed) < 0.5
    flipped = tf.stack([1.0 - boxes[:, 2], boxes[:, 1], 1.0 - boxes[:, 0], boxes[:, 3]], -1)
    return tf.cond(flip, lambda: (image[:, ::-1], flipped), lambda: (image, boxes))


def _decode(image_bytes):
    return tf.cast(tf.io.decode_image(image_bytes, channels=3, expand_animations=False), tf.float32)


def detection_train_dataset(source, config, input_context, epoch, skip_batches=0, num_batches=None):
    """`train_dataset` for detection: (images, (deltas [B, N, 4], classes
    [B, N]), skipped) batches of one input pipeline for one epoch, keyed per
    image as the classifier's; undecodable images are skipped and counted."""
    per_replica_batch = input_context.get_per_replica_batch_size(config.batch_size)
    shard = (input_context.num_input_pipelines, input_context.input_pipeline_id)
    records = source.train.dataset(shuffle_seed=(config.seed, epoch), shard=shard).repeat().enumerate()
    image_seed = int(np.random.default_rng([config.seed, epoch]).integers(2**62))
    anchors = tf.constant(input_anchors(config.image_size))
    size = (config.image_size, config.image_size)

    def decode(index, record):
        image_bytes, boxes, labels = record
        return index, index, _decode(image_bytes), boxes, labels  # the first index is consumed by count_skipped

    def augment(index, image, boxes, labels, skipped):
        seeds = tf.random.experimental.stateless_split(tf.stack([tf.constant(image_seed, tf.int64), index]), 2)
        image, boxes, labels = random_iou_crop(image, boxes, labels, seeds[0])
        image, boxes = _flip(image, boxes, seeds[1])
        deltas, classes = match_anchors(anchors, boxes, labels)
        return tf.image.resize(image, size, "bilinear"), (deltas, classes), skipped

    decoded = records.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return augmented_batches(decoded, augment, per_replica_batch, skip_batches, num_batches)


def detection_eval_dataset(split, config, batch_size):
    """(images at `image_size` x `image_size`, image ids) of an evaluation
    split, the first `max_eval_images` when set; undecodable images are left
    out (the caller counts them from the ids)."""
    records = tf.data.Dataset.from_tensor_slices((tf.constant(split.image_paths), tf.constant(split.image_ids)))
    if config.max_eval_images:
        records = records.take(config.max_eval_images)
    size = (config.image_size, config.image_size)

    def load(path, image_id):
        return tf.image.resize(_decode(tf.io.read_file(path)), size, "bilinear"), image_id

    pairs = records.map(load, num_parallel_calls=tf.data.AUTOTUNE).ignore_errors(log_warning=True)
    return pairs.batch(batch_size).prefetch(tf.data.AUTOTUNE)
