"""`preprocess_input` and `decode_predictions`, as in keras.applications."""

import json
import os

import numpy as np

_CLASS_INDEX_PATH = os.path.join(os.path.dirname(__file__), "data", "imagenet_class_index.json")
_class_index = None


def preprocess_input(x, data_format=None):
    """A placeholder method for backward compatibility.

    The preprocessing of MobileViTv2 (scaling [0, 255] RGB to [0, 1]) is part
    of the model when `include_preprocessing=True` (the default), so this
    returns its input unchanged, as for keras.applications' MobileNetV3 and
    EfficientNetV2. Models built with `include_preprocessing=False` take RGB
    in [0, 1]: divide by 255 yourself.

    Args:
        x: A floating point numpy array or tensor.
        data_format: Optional; only "channels_last" (or None) is supported.

    Returns:
        Unchanged `x`.
    """
    if data_format not in (None, "channels_last"):
        raise ValueError(f"MobileViTv2 supports only data_format='channels_last'. Received: data_format={data_format}")
    return x


def eval_transform(image, image_size=256, resize_size=288):
    """The reference evaluation crop: bicubic resize of the shorter side to
    `resize_size`, then a central `image_size` x `image_size` crop.

    Args:
        image: A [H, W, 3] tensor or array (any numeric dtype, RGB, values in
            [0, 255]); works inside `tf.data` pipelines.
        image_size: Side of the output crop (256 for the released weights).
        resize_size: Shorter side before cropping (288 = 256 / 0.888).

    Returns:
        A float32 [image_size, image_size, 3] tensor with values in [0, 255].
    """
    import tensorflow as tf

    if resize_size < image_size:
        raise ValueError(f"`resize_size` ({resize_size}) must be >= `image_size` ({image_size}).")
    image = tf.cast(tf.convert_to_tensor(image), tf.float32)
    height = tf.cast(tf.shape(image)[0], tf.float32)
    width = tf.cast(tf.shape(image)[1], tf.float32)
    scale = resize_size / tf.minimum(height, width)
    new_height = tf.cast(tf.round(height * scale), tf.int32)
    new_width = tf.cast(tf.round(width * scale), tf.int32)
    resized = tf.image.resize(image, (new_height, new_width), method="bicubic")
    top = (new_height - image_size) // 2
    left = (new_width - image_size) // 2
    cropped = resized[top : top + image_size, left : left + image_size]
    return tf.clip_by_value(cropped, 0.0, 255.0)


def _load_class_index():
    global _class_index
    if _class_index is None:
        with open(_CLASS_INDEX_PATH) as f:
            _class_index = {int(k): tuple(v) for k, v in json.load(f).items()}
    return _class_index


def decode_predictions(preds, top=5):
    """Decodes ImageNet-1k predictions; works offline (names ship with us).

    Args:
        preds: Array of shape (samples, 1000): probabilities or logits.
        top: How many top guesses to return per sample.

    Returns:
        One list per sample of `(class_id, class_name, score)` tuples, best
        first, e.g. `("n02504458", "African_elephant", 0.91)`.
    """
    preds = np.asarray(preds)
    if preds.ndim != 2 or preds.shape[1] != 1000:
        raise ValueError(
            "`decode_predictions` expects a batch of predictions "
            "(i.e. a 2D array of shape (samples, 1000)). "
            f"Received array with shape: {preds.shape}"
        )
    if not isinstance(top, int) or not 1 <= top <= 1000:
        raise ValueError(f"`top` must be an integer in [1, 1000]. Received: top={top}")
    class_index = _load_class_index()
    results = []
    for pred in preds:
        best = np.argsort(pred)[::-1][:top]
        results.append([(*class_index[int(i)], float(pred[i])) for i in best])
    return results
