"""Separable self-attention (MobileViTv2's "linear self-attention")."""

import warnings

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="keras_mobilevitv2")
class SeparableSelfAttention(keras.layers.Layer):
    """Separable self-attention of Mehta & Rastegari (2022), O(N) in tokens.

    Operates on a patch tensor `[B, N, P, C]`: N patches, P pixels per patch,
    C channels. For each pixel position p independently:

        q, K, V = split(qkv_proj(x), [1, C, C])        # [B,N,P,1|C|C]
        scores  = softmax(q, over N)                   # [B,N,P,1]
        context = sum_N(K * scores)                    # [B,1,P,C]
        y       = out_proj(relu(V) * context)          # [B,N,P,C]

    There are no heads and no 1/sqrt(C) scaling, as in ml-cvnets. The
    projections are 1x1 convolutions on the 4-D patch tensor (they lower to
    TFLite CONV_2D with no reshape), and the fused qkv projection keeps the
    ml-cvnets output-channel order `[query | key | value]` so checkpoints
    load without reordering. The softmax runs in float32 under
    mixed precision.

    Args:
        embed_dim: Channels C of the input and output.
        attn_dropout: Dropout rate on the context scores.
        bias: Whether both projections have a bias (True in MobileViTv2).
        **kwargs: Standard layer arguments.

    Example:
    >>> x = keras.random.normal((2, 64, 4, 32))
    >>> keras_mobilevitv2.layers.SeparableSelfAttention(32)(x).shape
    (2, 64, 4, 32)
    """

    def __init__(self, embed_dim, attn_dropout=0.0, bias=True, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(embed_dim, int) or embed_dim < 1:
            raise ValueError(f"`embed_dim` must be a positive integer. Received: embed_dim={embed_dim}")
        self.embed_dim = embed_dim
        self.attn_dropout = attn_dropout
        self.bias = bias
        self.qkv_proj = keras.layers.Conv2D(
            1 + 2 * embed_dim,
            1,
            use_bias=bias,
            name="qkv_proj",
            dtype=self.dtype_policy,
        )
        self.out_proj = keras.layers.Conv2D(embed_dim, 1, use_bias=bias, name="out_proj", dtype=self.dtype_policy)
        self.score_dropout = keras.layers.Dropout(attn_dropout, name="score_dropout", dtype=self.dtype_policy)

    def build(self, input_shape):
        input_shape = tuple(input_shape)
        if len(input_shape) != 4 or input_shape[-1] != self.embed_dim:
            raise ValueError(
                "SeparableSelfAttention expects a patch tensor [B, N, P, "
                f"{self.embed_dim}]. Received: input_shape={input_shape}"
            )
        self.qkv_proj.build(input_shape)
        self.out_proj.build(input_shape)

    def call(self, inputs, training=None):
        qkv = self.qkv_proj(inputs)  # [B, N, P, 1 + 2C]
        query = qkv[..., :1]  # [B, N, P, 1]
        key = qkv[..., 1 : 1 + self.embed_dim]  # [B, N, P, C]
        value = qkv[..., 1 + self.embed_dim :]  # [B, N, P, C]
        return self.attend_projected(query, key, value, training=training)

    def attend_projected(self, query, key, value, training=None):
        """The attention from query [B, N, P, 1], key and value [B, N, P, C]:
        `qkv_proj`'s output channels, split. `LinearAttentionFFN` computes
        them itself, with its norm's affine folded in (see layers.folding)."""
        with warnings.catch_warnings():
            # A single patch (tiny inputs) makes Keras warn that the softmax
            # is constant; it is, and that is the reference behaviour.
            warnings.filterwarnings("ignore", "You are using a softmax over axis")
            scores = ops.softmax(ops.cast(query, "float32"), axis=1)
        scores = ops.cast(scores, self.compute_dtype)
        scores = self.score_dropout(scores, training=training)

        context = ops.sum(key * scores, axis=1, keepdims=True)  # [B,1,P,C]
        return self.out_proj(ops.relu(value) * context)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "embed_dim": self.embed_dim,
                "attn_dropout": self.attn_dropout,
                "bias": self.bias,
            }
        )
        return config
