"""Semantic segmentation training (`--task segmentation`).

The classifier's trainer (every strategy, gradient accumulation, EMA, exact
resume, TensorBoard, summary.json) with ml-cvnets' segmentation task:
DeepLabV3 at output stride 16 with its auxiliary head, per-pixel
cross-entropy ignoring label 255 plus 0.4 x the auxiliary loss (averaged
over the global batch's labelled pixels), and mean IoU
(`keras.metrics.MeanIoU`) for evaluation. The exported `model.keras` is the
inference model, without the auxiliary head.
"""

import keras
import tensorflow as tf

from keras_mobilevitv2.mobilevitv2 import MobileViTv2
from keras_mobilevitv2.segmentation import DeepLabV3
from training.segmentation_data import IGNORE_LABEL
from training.segmentation_data import resolve_segmentation_source
from training.segmentation_data import segmentation_eval_dataset
from training.segmentation_data import segmentation_train_dataset
from training.trainer import Trainer
from training.trainer import load_backbone_weights
from training.trainer import model_function

__all__ = ["AUX_WEIGHT", "SegmentationTrainer", "build_segmenter", "evaluate_segmentation", "segmentation_model_fn"]

AUX_WEIGHT = 0.4  # ml-cvnets `loss.segmentation.cross_entropy.aux_weight`
OUTPUT_STRIDE = 16


def build_segmenter(config, num_classes, aux_head=True, init_weights=None):
    """DeepLabV3 on the MobileViTv2 of `config` (its width and attention
    norm), `image_size` square input; the backbone from the classifier
    weights `init_weights` when given."""
    backbone = MobileViTv2(
        config.width,
        include_top=False,
        weights=None,
        input_shape=(config.image_size, config.image_size, 3),
        attention_norm=config.attention_norm,
        output_stride=OUTPUT_STRIDE,
        name=config.model,
    )
    if init_weights:
        load_backbone_weights(backbone, config, init_weights)
    return DeepLabV3(backbone, num_classes=num_classes, aux_head=aux_head, name=f"deeplabv3_{config.model}")


def segmentation_model_fn(config, num_classes, source, classifier_activation, initialize):
    """The Trainer's model_fn: the trained model and its evaluation copy carry
    the auxiliary head (same weights, so the EMA copies over)."""
    del source, classifier_activation
    return build_segmenter(config, num_classes, aux_head=True, init_weights=config.init_weights if initialize else None)


def _logits(outputs):
    return outputs["logits"] if isinstance(outputs, dict) else outputs


def _pixel_cross_entropy_sum(masks, logits):
    """Summed cross-entropy over the labelled pixels; masks (B, H, W)."""
    valid = masks != IGNORE_LABEL
    per_pixel = keras.losses.sparse_categorical_crossentropy(
        tf.where(valid, masks, 0), tf.cast(logits, tf.float32), from_logits=True
    )
    return tf.reduce_sum(per_pixel * tf.cast(valid, tf.float32))


def _float_logits(model, images):
    return tf.cast(_logits(model(images, training=False)), tf.float32)


def evaluate_segmentation(model, source, config, batch_size=16):
    """Mean IoU, pixel accuracy and cross-entropy of `model` (logits, or a
    dict with "logits") on the evaluation split; label 255 is ignored."""
    iou = keras.metrics.MeanIoU(source.num_classes, ignore_class=IGNORE_LABEL)
    correct = labelled = loss = 0.0
    for images, masks in segmentation_eval_dataset(source, config, batch_size):
        spec = tf.TensorSpec((None,) + tuple(images.shape[1:]), images.dtype)
        logits = model_function(model, _float_logits, spec)(images)
        predictions = tf.argmax(logits, -1, output_type=tf.int32)
        iou.update_state(masks, predictions)
        valid = masks != IGNORE_LABEL
        correct += float(tf.reduce_sum(tf.cast((predictions == masks) & valid, tf.float32)))
        labelled += float(tf.reduce_sum(tf.cast(valid, tf.float32)))
        loss += float(_pixel_cross_entropy_sum(masks, logits))
    if labelled == 0:
        raise ValueError("The evaluation split has no labelled pixel (every mask is 255).")
    return {"miou": float(iou.result()), "pixel_accuracy": correct / labelled, "loss": loss / labelled}


class SegmentationTrainer(Trainer):
    """`Trainer` for `TrainConfig(task="segmentation")`; see the module
    docstring. `model_fn` defaults to `segmentation_model_fn`."""

    _train_dataset = staticmethod(segmentation_train_dataset)

    def __init__(self, config, progress_stream=None, verbose=True, model_fn=None, tpu_address=""):
        if config.task != "segmentation":
            raise ValueError(f"SegmentationTrainer trains --task segmentation; this config has task {config.task!r}.")
        super().__init__(config, progress_stream, verbose, model_fn or segmentation_model_fn, tpu_address)

    def _resolve_source(self):
        config = self.config
        return resolve_segmentation_source(config.data, config.dataset_dir)

    def _replica_gradients(self, run):
        """A replica's loss (its share of the global mean over labelled
        pixels), its pixel accuracy x its images, and the all-reduced
        gradients of one micro-batch."""
        model, optimizer, trainable = run.model, run.optimizer, run.trainable
        loss_scaling = run.loss_scaling

        def replica_gradients(images, masks):
            context = tf.distribute.get_replica_context()
            valid = tf.reduce_sum(tf.cast(masks != IGNORE_LABEL, tf.float32))
            global_valid = tf.maximum(context.all_reduce(tf.distribute.ReduceOp.SUM, valid), 1.0)
            with tf.GradientTape() as tape:
                outputs = model(images, training=True)
                total = _pixel_cross_entropy_sum(masks, _logits(outputs))
                if isinstance(outputs, dict):  # QAT fine-tunes the exported model, without the head
                    total += AUX_WEIGHT * _pixel_cross_entropy_sum(masks, outputs["aux_logits"])
                loss = total / global_valid
                scaled = optimizer.scale_loss(loss) if loss_scaling else loss
            gradients = tape.gradient(scaled, trainable)
            predictions = tf.argmax(_logits(outputs), -1, output_type=masks.dtype)
            right = tf.reduce_sum(tf.cast((predictions == masks) & (masks != IGNORE_LABEL), tf.float32))
            correct = right / tf.maximum(valid, 1.0) * tf.cast(tf.shape(masks)[0], tf.float32)
            gradients = context.all_reduce(tf.distribute.ReduceOp.SUM, gradients)
            return loss, correct, gradients

        return replica_gradients

    def _evaluate_model(self, model, source):
        return evaluate_segmentation(model, source, self.config)

    def _exported_model(self, run):
        """The inference DeepLabV3 (no auxiliary head) with the EMA weights:
        the trained graph up to its "logits" output (a float or QAT model)."""
        trained = self.model_fn(self.config, run.num_classes, run.source, None, False)
        trained.set_weights(self.ema_weights)
        if not isinstance(trained.output, dict):
            return trained
        return keras.Model(trained.inputs, trained.output["logits"], name=trained.name)
