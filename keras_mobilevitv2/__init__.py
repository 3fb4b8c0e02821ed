"""MobileViTv2 for Keras 3: models, layers and PyTorch checkpoint loading."""

from keras_mobilevitv2 import detection
from keras_mobilevitv2 import layers
from keras_mobilevitv2 import segmentation
from keras_mobilevitv2.convert import load_pytorch_weights
from keras_mobilevitv2.features import feature_extractor
from keras_mobilevitv2.imagenet import decode_predictions
from keras_mobilevitv2.imagenet import eval_transform
from keras_mobilevitv2.imagenet import preprocess_input
from keras_mobilevitv2.mobilevitv2 import MobileViTv2
from keras_mobilevitv2.mobilevitv2 import MobileViTv2_050
from keras_mobilevitv2.mobilevitv2 import MobileViTv2_075
from keras_mobilevitv2.mobilevitv2 import MobileViTv2_100
from keras_mobilevitv2.mobilevitv2 import MobileViTv2_125
from keras_mobilevitv2.mobilevitv2 import MobileViTv2_150
from keras_mobilevitv2.mobilevitv2 import MobileViTv2_175
from keras_mobilevitv2.mobilevitv2 import MobileViTv2_200

__version__ = "0.1.0"

__all__ = [
    "MobileViTv2",
    "MobileViTv2_050",
    "MobileViTv2_075",
    "MobileViTv2_100",
    "MobileViTv2_125",
    "MobileViTv2_150",
    "MobileViTv2_175",
    "MobileViTv2_200",
    "decode_predictions",
    "detection",
    "eval_transform",
    "feature_extractor",
    "layers",
    "load_pytorch_weights",
    "preprocess_input",
    "segmentation",
]
