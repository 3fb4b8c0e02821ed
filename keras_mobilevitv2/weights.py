"""Resolving the `weights` argument: "imagenet", Keras files, PyTorch files."""

import collections
import hashlib
import os

import keras

from keras_mobilevitv2.config import WIDTHS
from keras_mobilevitv2.pytorch_weights import load_pytorch_weights

# The ml-cvnets ImageNet-1k weights, as republished on the Hugging Face Hub.
# Per timm suffix: the file's URL at a fixed revision and its SHA-256 (the
# Git LFS oid the Hub shows on the file's page). timm's model.safetensors
# needs no PyTorch to read; where its SHA-256 is not recorded, a .bin with a
# recorded SHA-256 is used instead (read with torch.load(weights_only=True):
# `pip install keras_mobilevitv2[convert]`). The SHA-256 is what makes a
# download trustworthy, so a width without one refuses "imagenet" rather than
# load an unverified file. "main" stands where the full commit id is not
# recorded; the SHA-256 still pins the content. The ml-cvnets originals:
# https://docs-assets.developer.apple.com/ml-research/models/cvnets-v2/classification/mobilevitv2/imagenet1k/256x256/mobilevitv2-{width}.pt
_HUB = "https://huggingface.co"
_TIMM = _HUB + "/timm/mobilevitv2_{}.cvnets_in1k/resolve/{}/{}"

ImagenetFile = collections.namedtuple("ImagenetFile", ["url", "sha256"])

IMAGENET_FILES = {
    "050": ImagenetFile(
        _TIMM.format("050", "e63cc672dc7cb8cf823fc4a6cdc3458449cb49ee", "pytorch_model.bin"),
        "07c8461a4c536e0b84c44abd7cdbabb60a60451d93bf923e03a0865dbe757823",
    ),
    "075": ImagenetFile(
        _TIMM.format("075", "ebe193002b7797b7faff92e08bb65578b66d934d", "model.safetensors"),
        None,
    ),
    "100": ImagenetFile(
        _TIMM.format("100", "75eb7f2bb7f9bd8662106fd0e43b675c0607f4dc", "model.safetensors"),
        "103bf57c1001cb735f72ad4632c3ec1790005d9535f952a7823422cdb32d401e",
    ),
    "125": ImagenetFile(
        _TIMM.format("125", "main", "model.safetensors"),
        "83a9e64c34f67185ef719d1b37886994983df0e4f6ee865ed678e48e4854fa47",
    ),
    "150": ImagenetFile(
        _TIMM.format("150", "main", "model.safetensors"),
        "4c91ca8f47269f959a88505506ecd1dbf19b2d5fa7622806be88afe5207f6164",
    ),
    "175": ImagenetFile(
        _TIMM.format("175", "main", "model.safetensors"),
        "b0e5255f14a71792b71e3d1e1ada4d1519f94b35769307ac647c41b4f1030b39",
    ),
    # Hugging Face transformers' conversion of the same ml-cvnets checkpoint
    # (HF tensor names, which the loader detects).
    "200": ImagenetFile(
        _HUB + "/apple/mobilevitv2-2.0-imagenet1k-256/resolve/refs%2Fpr%2F1/pytorch_model.bin",
        "4c146b9d3552b5944ef8b7e1bddcac606604f822b63142f4a70ed7d7ef00c04b",
    ),
}
# None: Keras' own cache, `$KERAS_HOME/models` (default ~/.keras/models).
CACHE_DIR = None


def _cache_dir():
    if CACHE_DIR is not None:
        return CACHE_DIR
    # Keras' own cache folder, worked out as Keras documents it (its helper,
    # keras_home, is private API): $KERAS_HOME, else ~/.keras, or /tmp/.keras
    # when the home folder is not writable.
    if "KERAS_HOME" in os.environ:
        return os.environ["KERAS_HOME"]
    home = os.path.expanduser("~")
    return os.path.join(home if os.access(home, os.W_OK) else "/tmp", ".keras")


def _suffix_of(width_multiplier):
    by_width = {width: suffix for suffix, width in WIDTHS.items()}
    try:
        return by_width[float(width_multiplier)]
    except (KeyError, TypeError, ValueError):
        raise ValueError(
            "ImageNet weights exist for width_multiplier in "
            f"{sorted(WIDTHS.values())}. Received: "
            f"width_multiplier={width_multiplier!r}"
        ) from None


def sha256_of(path):
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _mismatch_message(path, actual, expected, url):
    return (
        f"The ImageNet weights file {path} is not the published one: its "
        f"SHA-256 is {actual}, expected {expected} (the file of {url}). "
        "It may be truncated, corrupted or a different checkpoint; delete it "
        "to download it again."
    )


def imagenet_weights_path(width_multiplier):
    """Downloads (once), verifies and returns the official ImageNet-1k checkpoint.

    A cached file is used only if its SHA-256 is the published one; a wrong
    file, cached or downloaded, raises `ValueError` naming both hashes.
    """
    suffix = _suffix_of(width_multiplier)
    url, expected = IMAGENET_FILES[suffix]
    # The extension tells the loader how to read the file (.safetensors, .bin).
    file_name = f"mobilevitv2_{suffix}.imagenet1k{os.path.splitext(url)[1]}"
    target = os.path.join(_cache_dir(), "models", file_name)
    if expected is None:
        raise OSError(_no_hash_message(width_multiplier, suffix, url, file_name))
    if os.path.exists(target):
        actual = sha256_of(target)
        if actual != expected:
            raise ValueError(_mismatch_message(target, actual, expected, url))
        return target
    return _download(url, file_name, expected, width_multiplier, suffix)


def _download(url, file_name, expected, width_multiplier, suffix):
    cache_dir = _cache_dir()
    # get_file falls back to /tmp/.keras when the cache folder does not exist
    # yet; creating it keeps the file where the cache check looks for it.
    try:
        os.makedirs(os.path.join(cache_dir, "models"), exist_ok=True)
    except OSError:
        pass  # not writable: get_file then reports or falls back itself
    try:
        return keras.utils.get_file(
            file_name,
            url,
            file_hash=expected,
            hash_algorithm="sha256",
            cache_dir=cache_dir,
            cache_subdir="models",
        )
    except ValueError:
        # get_file keeps a download that fails the hash and names only the
        # expected one: report both, and remove the file so that the next
        # call downloads again.
        target = os.path.join(cache_dir, "models", file_name)
        actual = sha256_of(target) if os.path.exists(target) else None
        if actual is None or actual == expected:
            raise
        os.remove(target)
        raise ValueError(_mismatch_message(target, actual, expected, url)) from None
    except Exception as error:
        raise OSError(
            f"Could not download the ImageNet weights of MobileViTv2-"
            f"{width_multiplier} ({error}). Without network access, download\n"
            f"    {url}\n"
            f"on a connected machine, check that its SHA-256 is {expected}, "
            f"and either pass its path, e.g.\n"
            f"    MobileViTv2_{suffix}(weights='/path/to/{file_name}')\n"
            f"or copy it to {os.path.join(cache_dir, 'models', file_name)}. The "
            f"ml-cvnets .pt checkpoint (mobilevitv2-{width_multiplier}.pt) "
            "works too."
        ) from None


def _no_hash_message(width_multiplier, suffix, url, file_name):
    return (
        f"The SHA-256 of the ImageNet weights of MobileViTv2-{width_multiplier} "
        "is not yet recorded in keras_mobilevitv2 (IMAGENET_FILES in "
        "keras_mobilevitv2/weights.py), so weights='imagenet' cannot download "
        f"and verify them. Download\n    {url}\nyourself, check it, and pass "
        f"its path instead, e.g.\n"
        f"    MobileViTv2_{suffix}(weights='/path/to/{file_name}')"
    )


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
