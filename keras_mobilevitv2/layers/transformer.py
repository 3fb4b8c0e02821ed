"""The pre-norm transformer block of MobileViTv2 (ml-cvnets `LinearAttnFFN`)."""

import keras

from keras_mobilevitv2.layers.attention import SeparableSelfAttention
from keras_mobilevitv2.layers.folding import norm_then_pointwise
from keras_mobilevitv2.layers.normalization import attention_norm_layer
from keras_mobilevitv2.layers.normalization import validate_attention_norm


def ffn_dim_for(embed_dim, ffn_multiplier=2.0):
    """Hidden width of the FFN, rounded down to a multiple of 16 as ml-cvnets."""
    return int((ffn_multiplier * embed_dim // 16) * 16)


@keras.saving.register_keras_serializable(package="keras_mobilevitv2")
class LinearAttentionFFN(keras.layers.Layer):
    """Pre-norm separable attention and pointwise FFN, each with a residual.

        x = x + dropout(attention(norm1(x)))
        x = x + dropout(fc2(dropout(silu(fc1(norm2(x))))))

    Input and output are patch tensors `[B, N, P, C]`. The norms are
    GroupNorm(1) (`LayerNorm2D`) by default, the FFN layers are 1x1
    convolutions with bias.

    Args:
        embed_dim: Channels C.
        ffn_dim: Hidden channels of the FFN; `None` gives ml-cvnets' default
            `ffn_dim_for(embed_dim)` (2 x C rounded down to a multiple of 16).
        dropout: Dropout after the attention and after the FFN output.
        attn_dropout: Dropout on the attention scores.
        ffn_dropout: Dropout after the FFN activation.
        norm_epsilon: Epsilon of both norms.
        attention_norm: `"layer_norm_2d"` (GroupNorm(1), the reference) or
            `"batch_norm_2d"` (folds away at inference; see
            `attention_norm_layer`).
        **kwargs: Standard layer arguments.
    """

    def __init__(
        self,
        embed_dim,
        ffn_dim=None,
        dropout=0.0,
        attn_dropout=0.0,
        ffn_dropout=0.0,
        norm_epsilon=1e-5,
        attention_norm="layer_norm_2d",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.attention_norm = validate_attention_norm(attention_norm)
        self.embed_dim = embed_dim
        self.ffn_dim = ffn_dim if ffn_dim is not None else ffn_dim_for(embed_dim)
        self.dropout = dropout
        self.attn_dropout = attn_dropout
        self.ffn_dropout = ffn_dropout
        self.norm_epsilon = norm_epsilon

        policy = self.dtype_policy
        self.attn_norm = attention_norm_layer(attention_norm, norm_epsilon, name="attn_norm", dtype=policy)
        self.attention = SeparableSelfAttention(embed_dim, attn_dropout=attn_dropout, name="attention", dtype=policy)
        self.attn_output_dropout = keras.layers.Dropout(dropout, name="attn_output_dropout", dtype=policy)
        self.ffn_norm = attention_norm_layer(attention_norm, norm_epsilon, name="ffn_norm", dtype=policy)
        self.ffn_expand = keras.layers.Conv2D(self.ffn_dim, 1, activation="silu", name="ffn_expand", dtype=policy)
        self.ffn_hidden_dropout = keras.layers.Dropout(ffn_dropout, name="ffn_hidden_dropout", dtype=policy)
        self.ffn_project = keras.layers.Conv2D(embed_dim, 1, name="ffn_project", dtype=policy)
        self.ffn_output_dropout = keras.layers.Dropout(dropout, name="ffn_output_dropout", dtype=policy)

    def build(self, input_shape):
        input_shape = tuple(input_shape)
        if len(input_shape) != 4 or input_shape[-1] != self.embed_dim:
            raise ValueError(
                "LinearAttentionFFN expects a patch tensor [B, N, P, "
                f"{self.embed_dim}]. Received: input_shape={input_shape}"
            )
        self.attn_norm.build(input_shape)
        self.attention.build(input_shape)
        self.ffn_norm.build(input_shape)
        self.ffn_expand.build(input_shape)
        self.ffn_project.build(input_shape[:-1] + (self.ffn_dim,))

    def call(self, inputs, training=None):
        # Each norm feeds one 1x1 convolution; at export its affine folds
        # into that convolution (layers.folding).
        query, key, value = norm_then_pointwise(
            self.attn_norm,
            self.attention.qkv_proj,
            inputs,
            training,
            output_splits=(1, self.embed_dim, self.embed_dim),
        )
        attended = self.attention.attend_projected(query, key, value, training=training)
        x = inputs + self.attn_output_dropout(attended, training=training)

        hidden = norm_then_pointwise(self.ffn_norm, self.ffn_expand, x, training)
        hidden = self.ffn_hidden_dropout(hidden, training=training)
        projected = self.ffn_project(hidden)
        return x + self.ffn_output_dropout(projected, training=training)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "embed_dim": self.embed_dim,
                "ffn_dim": self.ffn_dim,
                "dropout": self.dropout,
                "attn_dropout": self.attn_dropout,
                "ffn_dropout": self.ffn_dropout,
                "norm_epsilon": self.norm_epsilon,
                "attention_norm": self.attention_norm,
            }
        )
        return config
