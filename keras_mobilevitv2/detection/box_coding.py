"""SSD box coding: anchor matching, box deltas, and the detections of a batch.

Boxes are normalised to [0, 1]. Ground-truth and detected boxes are corner
form (x_min, y_min, x_max, y_max); anchors are centre form (cx, cy, w, h), as
`ssd_anchors` returns them. Format conversion, IoU and the delta coding are
Keras' own (`keras.utils.bounding_boxes`); matching follows ml-cvnets' SSD
matcher (`cvnets/matcher_det/ssd_matcher.py`). These run on TensorFlow
tensors (the training pipeline and evaluation use them inside tf.data and
tf.function).
"""

import dataclasses

import tensorflow as tf
from keras.utils import bounding_boxes

__all__ = ["VARIANCES", "Detections", "decode_boxes", "detect", "encode_boxes", "match_anchors"]

# ml-cvnets' center_variance 0.1 and size_variance 0.2, per coordinate.
VARIANCES = (0.1, 0.1, 0.2, 0.2)
IOU_THRESHOLD = 0.5  # ml-cvnets `matcher.ssd.iou_threshold` for COCO


def encode_boxes(anchors, boxes):
    """Deltas (tx, ty, tw, th) of corner-form `boxes` against centre-form
    `anchors` (broadcast over leading axes)."""
    return bounding_boxes.encode_box_to_deltas(
        anchors, boxes, "center_xywh", "xyxy", encoding_format="center_xywh", variance=VARIANCES
    )


def decode_boxes(anchors, deltas):
    """Corner-form boxes of the model's `box_deltas` [..., N, 4] against the
    anchors [N, 4]; not clipped (as ml-cvnets: the caller clips in pixels)."""
    return bounding_boxes.decode_deltas_to_boxes(
        anchors, deltas, "center_xywh", "xyxy", encoded_format="center_xywh", variance=VARIANCES
    )


def match_anchors(anchors, boxes, labels, iou_threshold=IOU_THRESHOLD):
    """The training targets of one image: (deltas [N, 4], classes [N] int32).

    Each anchor takes the object it overlaps most, and that object's class
    where the IoU reaches `iou_threshold` (else 0, the background); every
    object also takes its own best anchor, whatever the IoU, so that no object
    goes untrained. `boxes` [M, 4] corner form, `labels` [M] in 1..C-1; an
    image without objects has only background anchors.
    """
    anchors = tf.convert_to_tensor(anchors, tf.float32)
    boxes = tf.reshape(tf.cast(boxes, tf.float32), [-1, 4])
    labels = tf.reshape(tf.cast(labels, tf.int32), [-1])
    # ml-cvnets' dummy object for an empty image: a zero box of class 0.
    empty = tf.equal(tf.shape(boxes)[0], 0)
    boxes = tf.cond(empty, lambda: tf.zeros([1, 4]), lambda: boxes)
    labels = tf.cond(empty, lambda: tf.zeros([1], tf.int32), lambda: labels)
    iou = bounding_boxes.compute_iou(bounding_boxes.convert_format(anchors, "center_xywh", "xyxy"), boxes, "xyxy")
    best_box = tf.argmax(iou, 1, output_type=tf.int32)  # [N]
    best_iou = tf.reduce_max(iou, 1)
    best_anchor = tf.argmax(iou, 0, output_type=tf.int32)  # [M]
    objects = tf.shape(boxes)[0]
    best_box = tf.tensor_scatter_nd_update(best_box, best_anchor[:, None], tf.range(objects))
    best_iou = tf.tensor_scatter_nd_update(best_iou, best_anchor[:, None], tf.fill([objects], 2.0))
    classes = tf.where(best_iou < iou_threshold, 0, tf.gather(labels, best_box))
    deltas = encode_boxes(anchors, tf.gather(boxes, best_box))
    # A background anchor's deltas are never used, and a degenerate box's are infinite.
    return tf.where(classes[:, None] > 0, deltas, 0.0), classes


@dataclasses.dataclass
class Detections:
    """A batch's detections, padded to `max_detections` per image."""

    boxes: tf.Tensor  # [B, D, 4] corner form, normalised
    classes: tf.Tensor  # [B, D] int32, 1..C-1
    scores: tf.Tensor  # [B, D]
    count: tf.Tensor  # [B] int32: the valid rows of each image


def detect(outputs, anchors, score_threshold=0.01, iou_threshold=0.5, max_detections=200):
    """The detections of an SSDLite's outputs: class-wise softmax scores,
    per-class non-maximum suppression, the best `max_detections` per image
    (ml-cvnets' evaluation settings by default: 0.01, 0.5, 200).

    Suppression is TensorFlow's `combined_non_max_suppression`: Keras 3 has
    no NMS op, and the package trains and exports with the TF backend.
    """
    boxes = decode_boxes(anchors, tf.cast(outputs["box_deltas"], tf.float32))  # [B, N, 4]
    scores = tf.nn.softmax(tf.cast(outputs["class_logits"], tf.float32))[..., 1:]  # [B, N, C-1]: no background
    yx = tf.gather(boxes, [1, 0, 3, 2], axis=-1)[:, :, None]  # [B, N, 1, 4], the order NMS takes
    result = tf.image.combined_non_max_suppression(
        yx,
        scores,
        max_output_size_per_class=max_detections,
        max_total_size=max_detections,
        iou_threshold=iou_threshold,
        score_threshold=score_threshold,
        clip_boxes=False,
    )
    return Detections(
        tf.gather(result.nmsed_boxes, [1, 0, 3, 2], axis=-1),
        tf.cast(result.nmsed_classes, tf.int32) + 1,
        result.nmsed_scores,
        result.valid_detections,
    )
