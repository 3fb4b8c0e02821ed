"""Layers of MobileViTv2, each registered for `.keras` save/load."""

from keras_mobilevitv2.layers.attention import SeparableSelfAttention
from keras_mobilevitv2.layers.channel_slice import ChannelSlice
from keras_mobilevitv2.layers.inverted_residual import InvertedResidual
from keras_mobilevitv2.layers.inverted_residual import make_divisible
from keras_mobilevitv2.layers.mobilevit_block import MobileViTv2Block
from keras_mobilevitv2.layers.mobilevit_block import fold_patches
from keras_mobilevitv2.layers.mobilevit_block import resize_bilinear_align_corners
from keras_mobilevitv2.layers.mobilevit_block import unfold_patches
from keras_mobilevitv2.layers.normalization import ATTENTION_NORMS
from keras_mobilevitv2.layers.normalization import LayerNorm2D
from keras_mobilevitv2.layers.resize import ResizeLike
from keras_mobilevitv2.layers.transformer import LinearAttentionFFN
from keras_mobilevitv2.layers.transformer import ffn_dim_for

__all__ = [
    "ATTENTION_NORMS",
    "ChannelSlice",
    "InvertedResidual",
    "LayerNorm2D",
    "LinearAttentionFFN",
    "MobileViTv2Block",
    "ResizeLike",
    "SeparableSelfAttention",
    "ffn_dim_for",
    "fold_patches",
    "make_divisible",
    "resize_bilinear_align_corners",
    "unfold_patches",
]
