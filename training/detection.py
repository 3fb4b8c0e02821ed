"""Object detection training (`--task detection`).

The classifier's trainer (every strategy, gradient accumulation, EMA, exact
resume, TensorBoard, summary.json) with ml-cvnets' SSD task: SSDLite on the
model's backbone, anchors matched in the input pipeline, the multibox loss
(smooth L1 on the positive anchors' deltas plus cross-entropy over the
positives and the 3x as many hardest negatives, divided by the global batch's
positives), and COCO mAP@[.5:.95] / mAP@.5 from pycocotools for evaluation.
"""

import contextlib
import io

import keras
import numpy as np
import tensorflow as tf

from keras_mobilevitv2.checkpoint_io import read_checkpoint
from keras_mobilevitv2.detection import SSDLite
from keras_mobilevitv2.detection.anchors import input_anchors
from keras_mobilevitv2.detection.box_coding import detect
from keras_mobilevitv2.mobilevitv2 import MobileViTv2
from keras_mobilevitv2.pytorch_weights import checkpoint_task
from keras_mobilevitv2.pytorch_weights import load_pytorch_weights
from keras_mobilevitv2.pytorch_weights import strip_wrapper_prefix
from training.detection_data import resolve_detection_source
from training.detection_pipeline import detection_eval_dataset
from training.detection_pipeline import detection_train_dataset
from training.trainer import Trainer
from training.trainer import load_backbone_weights
from training.trainer import model_function

__all__ = ["NEG_POS_RATIO", "DetectionTrainer", "build_detector", "coco_map", "evaluate_detection", "multibox_loss"]

NEG_POS_RATIO = 3  # ml-cvnets `loss.detection.ssd_multibox_loss.neg_pos_ratio`


def build_detector(config, num_classes, init_weights=None):
    """SSDLite on the MobileViTv2 of `config` (its width and attention norm),
    `image_size` square input. `init_weights`: a detector (an SSDLite
    `.keras`, or an ml-cvnets SSD PyTorch checkpoint) loads the whole model;
    any classifier weights `--init_weights` takes load the backbone."""
    size = (config.image_size, config.image_size, 3)
    backbone = MobileViTv2(
        config.width, include_top=False, weights=None, input_shape=size, attention_norm=config.attention_norm,
        name=config.model,
    )  # fmt: skip
    detector = SSDLite(backbone, num_classes=num_classes, input_shape=size, name=f"ssdlite_{config.model}")
    if init_weights and not _load_detector(detector, init_weights):
        load_backbone_weights(backbone, config, init_weights)
    return detector


def _load_detector(detector, path):
    """Loads `path` into `detector` if it holds a detector; False otherwise."""
    path = str(path)
    if path.endswith(".keras"):
        trained = keras.models.load_model(path, compile=False)
        if not (isinstance(trained.output, dict) and "box_deltas" in trained.output):
            return False
        if [w.shape for w in trained.weights] != [w.shape for w in detector.weights]:
            raise ValueError(f"{path} is an SSDLite of another width, attention norm or number of classes.")
        detector.set_weights(trained.get_weights())
        return True
    if path.lower().endswith((".pt", ".pth", ".bin", ".safetensors")):
        state_dict = strip_wrapper_prefix(read_checkpoint(path))
        if checkpoint_task(state_dict) == "detection":
            load_pytorch_weights(detector, state_dict)
            return True
    return False


def detection_model_fn(config, num_classes, source, classifier_activation, initialize):
    """The Trainer's model_fn: the SSDLite outputs logits (the softmax and
    the suppression are the evaluation's and the exported flatbuffer's)."""
    del source, classifier_activation
    return build_detector(config, num_classes, init_weights=config.init_weights if initialize else None)


def multibox_loss(deltas, classes, outputs, neg_pos_ratio=NEG_POS_RATIO):
    """(summed smooth-L1 box loss, summed cross-entropy) of a batch, as
    ml-cvnets' `SSDLoss` before its division by the positives.

    deltas [B, N, 4] and classes [B, N] are the matched targets; the
    negatives are each image's `neg_pos_ratio` x positives anchors of largest
    background loss.
    """
    logits = tf.cast(outputs["class_logits"], tf.float32)
    positive = classes > 0
    positives = tf.reduce_sum(tf.cast(positive, tf.int32), 1, keepdims=True)  # [B, 1]
    background_loss = tf.stop_gradient(-tf.nn.log_softmax(logits)[..., 0])
    background_loss = tf.where(positive, -np.inf, background_loss)
    # Each anchor's rank by background loss (0 = the hardest negative).
    rank = tf.argsort(tf.argsort(background_loss, axis=1, direction="DESCENDING", stable=True), axis=1)
    chosen = positive | (rank < neg_pos_ratio * positives)
    cross_entropy = tf.nn.sparse_softmax_cross_entropy_with_logits(classes, logits)
    class_loss = tf.reduce_sum(tf.where(chosen, cross_entropy, 0.0))
    error = tf.abs(tf.cast(outputs["box_deltas"], tf.float32) - deltas)
    smooth_l1 = tf.where(error < 1.0, 0.5 * error**2, error - 0.5)  # PyTorch's beta 1
    box_loss = tf.reduce_sum(tf.where(positive[..., None], smooth_l1, 0.0))
    return box_loss, class_loss


def coco_map(split, results, image_ids):
    """pycocotools' COCOeval "bbox" stats on `image_ids` of `split` (its
    annotation JSON) for `results` (COCO result dicts); stats[0] is
    mAP@[.5:.95], stats[1] mAP@.5."""
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError as error:
        raise ImportError(
            "Detection mAP uses pycocotools, the official COCO evaluator: pip install pycocotools "
            "(or keras_mobilevitv2[train])."
        ) from error
    if not results:
        return np.zeros(12)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress and table
        truth = COCO(split.annotation_file)
        evaluation = COCOeval(truth, truth.loadRes(results), "bbox")
        evaluation.params.imgIds = list(image_ids)
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return evaluation.stats


def coco_results(split, category_ids, image_ids, boxes, classes, scores, counts):
    """COCO result dicts of a batch's detections: normalised corner boxes
    scaled to each image's size (and clipped there), classes to category ids."""
    sizes = dict(zip(split.image_ids, split.sizes))
    results = []
    for image_id, image_boxes, image_classes, image_scores, count in zip(image_ids, boxes, classes, scores, counts):
        height, width = sizes[int(image_id)]
        pixels = np.clip(image_boxes[:count] * [width, height, width, height], 0, [width, height, width, height])
        for (x0, y0, x1, y1), k, score in zip(pixels, image_classes[:count], image_scores[:count]):
            results.append(
                {
                    "image_id": int(image_id),
                    "category_id": category_ids[int(k)],
                    "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                    "score": float(score),
                }
            )
    return results


def _detections(model, images):
    """The padded detections of a batch; the anchors are those of its size."""
    detections = detect(model(images, training=False), input_anchors(tuple(images.shape[1:3])))
    return detections.boxes, detections.classes, detections.scores, detections.count


def evaluate_detection(model, source, config, batch_size=16):
    """COCO mAP@[.5:.95] ("map") and mAP@.5 ("map50") of an SSDLite on the
    evaluation split, with ml-cvnets' evaluation settings (score 0.01, NMS
    IoU 0.5, 200 detections), and the undecodable images left out."""
    results, evaluated = [], []
    for images, image_ids in detection_eval_dataset(source.eval, config, batch_size):
        spec = tf.TensorSpec((None,) + tuple(images.shape[1:]), images.dtype)
        boxes, classes, scores, counts = (t.numpy() for t in model_function(model, _detections, spec)(images))
        ids = image_ids.numpy()
        results += coco_results(source.eval, source.category_ids, ids, boxes, classes, scores, counts)
        evaluated += [int(i) for i in ids]
    if not evaluated:
        raise ValueError("The evaluation split yielded no decodable image.")
    stats = coco_map(source.eval, results, evaluated)
    wanted = min(config.max_eval_images or source.eval.num_examples, source.eval.num_examples)
    return {"map": float(stats[0]), "map50": float(stats[1]), "skipped_images": wanted - len(evaluated)}


class DetectionTrainer(Trainer):
    """`Trainer` for `TrainConfig(task="detection")`; see the module
    docstring. `model_fn` defaults to `detection_model_fn`."""

    _train_dataset = staticmethod(detection_train_dataset)

    def __init__(self, config, progress_stream=None, verbose=True, model_fn=None, tpu_address=""):
        if config.task != "detection":
            raise ValueError(f"DetectionTrainer trains --task detection; this config has task {config.task!r}.")
        super().__init__(config, progress_stream, verbose, model_fn or detection_model_fn, tpu_address)

    def _resolve_source(self):
        return resolve_detection_source(self.config.data, self.config.dataset_dir)

    def _replica_gradients(self, run):
        """A replica's loss (its share of the global batch's loss per
        positive anchor), the share of its positive anchors classified right
        x its images, and the all-reduced gradients of one micro-batch."""
        model, optimizer, trainable = run.model, run.optimizer, run.trainable
        loss_scaling = run.loss_scaling

        def replica_gradients(images, targets):
            deltas, classes = targets
            context = tf.distribute.get_replica_context()
            positives = tf.reduce_sum(tf.cast(classes > 0, tf.float32))
            global_positives = tf.maximum(context.all_reduce(tf.distribute.ReduceOp.SUM, positives), 1.0)
            with tf.GradientTape() as tape:
                outputs = model(images, training=True)
                box_loss, class_loss = multibox_loss(deltas, classes, outputs)
                loss = (box_loss + class_loss) / global_positives
                scaled = optimizer.scale_loss(loss) if loss_scaling else loss
            gradients = tape.gradient(scaled, trainable)
            predicted = tf.argmax(outputs["class_logits"], -1, output_type=classes.dtype)
            right = tf.reduce_sum(tf.cast((predicted == classes) & (classes > 0), tf.float32))
            correct = right / tf.maximum(positives, 1.0) * tf.cast(tf.shape(classes)[0], tf.float32)
            gradients = context.all_reduce(tf.distribute.ReduceOp.SUM, gradients)
            return loss, correct, gradients

        return replica_gradients

    def _evaluate_model(self, model, source):
        return evaluate_detection(model, source, self.config)
