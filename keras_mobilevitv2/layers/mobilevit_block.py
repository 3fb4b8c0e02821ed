"""The MobileViTv2 block: local conv, unfold, separable transformer, fold."""

import math

import keras
from keras import ops

from keras_mobilevitv2.layers.folding import conv_batch_norm
from keras_mobilevitv2.layers.folding import folding_norm_affines
from keras_mobilevitv2.layers.folding import fusable_silu
from keras_mobilevitv2.layers.inverted_residual import batch_norm
from keras_mobilevitv2.layers.normalization import attention_norm_layer
from keras_mobilevitv2.layers.normalization import validate_attention_norm
from keras_mobilevitv2.layers.transformer import LinearAttentionFFN
from keras_mobilevitv2.layers.transformer import ffn_dim_for


def unfold_patches(feature_map, patch_size):
    """[B, H, W, C] -> [B, N, P, C] with N = (H/p)(W/p) patches, P = p*p.

    patches[b, y*w + x, i*p + j, c] = feature_map[b, y*p + i, x*p + j, c],
    the order of ml-cvnets' unfold. Every intermediate tensor has rank <= 4:
    the usual 6-D reshape/transpose becomes TRANSPOSE v6 in TFLite, which
    TFLite Micro and the Edge TPU compiler reject.
    """
    p = patch_size
    _, height, width, channels = ops.shape(feature_map)
    h, w = height // p, width // p
    x = ops.reshape(feature_map, (-1, p, w, p * channels))  # [B*h, p, w, p*C]
    x = ops.transpose(x, (0, 2, 1, 3))  # [B*h, w, p, p*C]
    return ops.reshape(x, (-1, h * w, p * p, channels))  # [B, N, P, C]


def fold_patches(patches, height, width, patch_size):
    """Exact inverse of `unfold_patches`: [B, N, P, C] -> [B, H, W, C]."""
    p = patch_size
    channels = ops.shape(patches)[-1]
    x = ops.reshape(patches, (-1, width // p, p, p * channels))  # [B*h, w, p, p*C]
    x = ops.transpose(x, (0, 2, 1, 3))  # [B*h, p, w, p*C]
    return ops.reshape(x, (-1, height, width, channels))


def resize_bilinear_align_corners(images, height, width):
    """Bilinear resize of [B, H, W, C] with `align_corners=True` semantics.

    This is what ml-cvnets and timm apply to odd-sized inputs of a MobileViTv2
    block; `keras.ops.image.resize` has no align_corners option. On the
    TensorFlow backend TF's own kernel is used (it lowers to one TFLite
    RESIZE_BILINEAR op); elsewhere an equivalent gather formulation.
    """
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        resized = tf.raw_ops.ResizeBilinear(
            images=images,
            size=ops.convert_to_tensor((height, width), "int32"),
            align_corners=True,
            half_pixel_centers=False,
        )
        return ops.cast(resized, images.dtype)

    def interpolate(x, axis, out_size):
        in_size = ops.shape(x)[axis]
        scale = ops.cast(in_size - 1, "float32") / ops.cast(ops.maximum(out_size - 1, 1), "float32")
        positions = ops.cast(ops.arange(out_size), "float32") * scale
        lower = ops.cast(ops.floor(positions), "int32")
        upper = ops.minimum(lower + 1, in_size - 1)
        frac = positions - ops.cast(lower, "float32")
        frac_shape = [1, 1, 1, 1]
        frac_shape[axis] = -1
        frac = ops.cast(ops.reshape(frac, frac_shape), x.dtype)
        return ops.take(x, lower, axis=axis) * (1 - frac) + ops.take(x, upper, axis=axis) * frac

    return interpolate(interpolate(images, 1, height), 2, width)


@keras.saving.register_keras_serializable(package="keras_mobilevitv2")
class MobileViTv2Block(keras.layers.Layer):
    """MobileViTv2 block (ml-cvnets `MobileViTBlockv2`).

        x [B,H,W,C] -> (resize to a multiple of patch_size if needed)
          -> 3x3 depthwise + BN + SiLU -> 1x1 to `attn_dim` (no bias)
          -> unfold [B,N,P,d] -> LinearAttentionFFN x n -> norm
          -> fold [B,H,W,d] -> 1x1 to C (no bias) + BN

    No residual around the block and no fusion with its input (unlike
    MobileViT v1). When H or W is not a multiple of `patch_size`, the input is
    first resized up to the next multiple with bilinear interpolation,
    `align_corners=True`, and the block output keeps the enlarged size -
    exactly what ml-cvnets and timm do, so odd input sizes match them.

    Args:
        attn_dim: Channels d of the transformer.
        num_blocks: Number of `LinearAttentionFFN` blocks.
        ffn_multiplier: FFN hidden size = `ffn_dim_for(d, ffn_multiplier)`.
        patch_size: Patch height and width (2 in MobileViTv2).
        dilation: Dilation of the local depthwise conv (dilated backbones).
        dropout, attn_dropout, ffn_dropout: Transformer dropout rates.
        attention_norm: Norm before the attention and before the FFN of
            every transformer block: `"layer_norm_2d"` (GroupNorm(1), the
            reference) or `"batch_norm_2d"` (folds away at inference; the
            Edge-TPU- and microcontroller-friendly choice). The norm after
            the last block is GroupNorm(1) either way.
        **kwargs: Standard layer arguments.
    """

    def __init__(
        self,
        attn_dim,
        num_blocks,
        ffn_multiplier=2.0,
        patch_size=2,
        dilation=1,
        dropout=0.0,
        attn_dropout=0.0,
        ffn_dropout=0.0,
        attention_norm="layer_norm_2d",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.attention_norm = validate_attention_norm(attention_norm)
        self.attn_dim = attn_dim
        self.num_blocks = num_blocks
        self.ffn_multiplier = ffn_multiplier
        self.patch_size = patch_size
        self.dilation = dilation
        self.dropout = dropout
        self.attn_dropout = attn_dropout
        self.ffn_dropout = ffn_dropout

        policy = self.dtype_policy
        self.local_depthwise_conv = keras.layers.DepthwiseConv2D(
            3,
            padding="same",
            dilation_rate=dilation,
            use_bias=False,
            name="local_depthwise_conv",
            dtype=policy,
        )
        self.local_bn = batch_norm("local_bn", policy)
        self.local_pointwise_conv = keras.layers.Conv2D(
            attn_dim, 1, use_bias=False, name="local_pointwise_conv", dtype=policy
        )
        self.transformer_blocks = [
            LinearAttentionFFN(
                attn_dim,
                ffn_dim=ffn_dim_for(attn_dim, ffn_multiplier),
                dropout=dropout,
                attn_dropout=attn_dropout,
                ffn_dropout=ffn_dropout,
                attention_norm=attention_norm,
                name=f"transformer_{index}",
                dtype=policy,
            )
            for index in range(num_blocks)
        ]
        # The final norm stays GroupNorm(1) with either choice. ml-cvnets
        # switches it too, but with BatchNorm in all three places the model
        # did not train here (30-step overfit check: loss 2.08 against 1e-4
        # with GroupNorm(1) here; 0.17 top-1 after 10 epochs on the embedded
        # dataset), while BatchNorm in the attention and FFN norms alone
        # trains as well as the reference.
        self.final_norm = attention_norm_layer("layer_norm_2d", name="final_norm", dtype=policy)
        self.project_conv = None  # Needs the input channels: built in build().
        self.project_bn = batch_norm("project_bn", policy)

    def _padded_size(self, size):
        return int(math.ceil(size / self.patch_size)) * self.patch_size

    def build(self, input_shape):
        input_shape = tuple(input_shape)
        if len(input_shape) != 4 or input_shape[-1] is None:
            raise ValueError(
                f"MobileViTv2Block expects [B, H, W, C] inputs with known C. Received: input_shape={input_shape}"
            )
        batch, height, width, channels = input_shape
        self.project_conv = keras.layers.Conv2D(
            channels, 1, use_bias=False, name="project_conv", dtype=self.dtype_policy
        )
        if height is not None:
            height = self._padded_size(height)
        if width is not None:
            width = self._padded_size(width)
        spatial = (batch, height, width, channels)
        self.local_depthwise_conv.build(spatial)
        self.local_bn.build(spatial)
        self.local_pointwise_conv.build(spatial)
        tokens = (batch, None, self.patch_size**2, self.attn_dim)
        for block in self.transformer_blocks:
            block.build(tokens)
        self.final_norm.build(tokens)
        self.project_conv.build((batch, height, width, self.attn_dim))
        self.project_bn.build(spatial)

    def _resize_if_needed(self, x):
        height, width = x.shape[1], x.shape[2]
        if height is not None and width is not None:
            if height % self.patch_size == 0 and width % self.patch_size == 0:
                return x
            return resize_bilinear_align_corners(x, self._padded_size(height), self._padded_size(width))
        # Unknown size while tracing symbolically: resizing an already even
        # size with align_corners=True is an exact identity, so always resize.
        p = self.patch_size
        dynamic_height, dynamic_width = ops.shape(x)[1], ops.shape(x)[2]
        return resize_bilinear_align_corners(
            x,
            (dynamic_height + p - 1) // p * p,
            (dynamic_width + p - 1) // p * p,
        )

    def call(self, inputs, training=None):
        x = self._resize_if_needed(inputs)
        x = fusable_silu(conv_batch_norm(self.local_depthwise_conv, self.local_bn, x, training))
        x = self.local_pointwise_conv(x)  # [B, H, W, d]

        height, width = ops.shape(x)[1], ops.shape(x)[2]
        patches = unfold_patches(x, self.patch_size)  # [B, N, P, d]
        for block in self.transformer_blocks:
            patches = block(patches, training=training)
        final_affine = None
        if folding_norm_affines(training):
            # Folding the patches back is a pure permutation: the norm's
            # per-channel affine commutes with it and folds into the 1x1
            # projection (see layers.folding).
            patches = self.final_norm.normalize(patches)
            final_affine = (self.final_norm.gamma, self.final_norm.beta)
        else:
            patches = self.final_norm(patches, training=training)
        x = fold_patches(patches, height, width, self.patch_size)  # [B, H, W, d]

        return conv_batch_norm(self.project_conv, self.project_bn, x, training, input_affine=final_affine)

    def compute_output_shape(self, input_shape):
        batch, height, width, channels = tuple(input_shape)
        height = None if height is None else self._padded_size(height)
        width = None if width is None else self._padded_size(width)
        return (batch, height, width, channels)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "attn_dim": self.attn_dim,
                "num_blocks": self.num_blocks,
                "ffn_multiplier": self.ffn_multiplier,
                "patch_size": self.patch_size,
                "dilation": self.dilation,
                "dropout": self.dropout,
                "attn_dropout": self.attn_dropout,
                "ffn_dropout": self.ffn_dropout,
                "attention_norm": self.attention_norm,
            }
        )
        return config
