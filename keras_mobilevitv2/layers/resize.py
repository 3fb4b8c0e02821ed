"""Bilinear resizing of a feature map to the spatial size of another."""

import keras
from keras import ops

from keras_mobilevitv2.layers.mobilevit_block import resize_bilinear_align_corners


@keras.saving.register_keras_serializable(package="keras_mobilevitv2")
class ResizeLike(keras.layers.Layer):
    """`[x, reference]` -> x resized bilinearly to reference's height, width.

    `align_corners=False` is PyTorch's `F.interpolate(mode="bilinear")`
    default and TFLite's RESIZE_BILINEAR with half-pixel centers (what
    DeepLabV3 uses to upsample); `align_corners=True` is the grid mapping of
    the MobileViTv2 block's odd-size enlargement. When both sizes are known
    and equal the layer is the identity and adds no op to the graph.
    """

    def __init__(self, align_corners=False, **kwargs):
        super().__init__(**kwargs)
        self.align_corners = bool(align_corners)

    def call(self, inputs):
        x, reference = inputs
        static = (x.shape[1], x.shape[2])
        target = (reference.shape[1], reference.shape[2])
        if None not in static and static == target:
            return x
        if None in target:
            target = (ops.shape(reference)[1], ops.shape(reference)[2])
        if self.align_corners:
            return resize_bilinear_align_corners(x, *target)
        return ops.cast(ops.image.resize(x, target, interpolation="bilinear", antialias=False), x.dtype)

    def compute_output_shape(self, input_shapes):
        x_shape, reference_shape = input_shapes
        return (x_shape[0], reference_shape[1], reference_shape[2], x_shape[3])

    def get_config(self):
        config = super().get_config()
        config["align_corners"] = self.align_corners
        return config
