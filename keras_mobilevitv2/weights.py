"""Resolving the `weights` argument: "imagenet", Keras files, PyTorch files."""

import os

import keras

from keras_mobilevitv2.config import WIDTHS
from keras_mobilevitv2.convert import load_pytorch_weights

# timm republishes the ml-cvnets ImageNet-1k weights as safetensors, which
# need no PyTorch to read. The ml-cvnets originals (same tensors, .pt):
# https://docs-assets.developer.apple.com/ml-research/models/cvnets-v2/classification/mobilevitv2/imagenet1k/256x256/mobilevitv2-{width}.pt
IMAGENET_BASE_URL = "https://huggingface.co/timm/mobilevitv2_{suffix}.cvnets_in1k/resolve/main/model.safetensors"
# None: Keras' own cache, `$KERAS_HOME/models` (default ~/.keras/models).
CACHE_DIR = None


def _cache_dir():
    if CACHE_DIR is not None:
        return CACHE_DIR
    try:
        from keras.src.backend.config import keras_home

        return keras_home()
    except ImportError:  # private Keras API; fall back to its documented default
        return os.path.join(os.path.expanduser("~"), ".keras")


def imagenet_weights_path(width_multiplier):
    """Downloads (once) and returns the official ImageNet-1k checkpoint."""
    suffix = {width: key for key, width in WIDTHS.items()}[float(width_multiplier)]
    url = IMAGENET_BASE_URL.format(suffix=suffix)
    file_name = f"mobilevitv2_{suffix}.cvnets_in1k.safetensors"
    cache_dir = _cache_dir()
    try:
        return keras.utils.get_file(
            file_name, url, cache_dir=cache_dir, cache_subdir="models"
        )
    except Exception as error:
        raise OSError(
            f"Could not download the ImageNet weights of MobileViTv2-"
            f"{width_multiplier} ({error}). Without network access, download\n"
            f"    {url}\n"
            f"on a connected machine and either pass its path, e.g.\n"
            f"    MobileViTv2_{suffix}(weights='/path/to/{file_name}')\n"
            f"or copy it to {os.path.join(cache_dir, 'models', file_name)}. The ml-cvnets "
            f".pt checkpoint (mobilevitv2-{width_multiplier}.pt) works too."
        ) from None


def load_weights_into(model, weights, width_multiplier):
    """Loads `weights` ("imagenet" or a file path) into a freshly built model."""
    if weights == "imagenet":
        load_pytorch_weights(model, imagenet_weights_path(width_multiplier))
        return
    path = os.fspath(weights)
    if path.lower().endswith((".h5", ".weights.h5")):
        model.load_weights(path)
    else:
        load_pytorch_weights(model, path)
