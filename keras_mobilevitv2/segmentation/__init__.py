"""Semantic segmentation with a MobileViTv2 backbone."""

from keras_mobilevitv2.segmentation.deeplabv3 import DeepLabV3

__all__ = ["DeepLabV3"]
