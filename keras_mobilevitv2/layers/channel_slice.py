"""A slice of the last axis, as a layer that saves with the model."""

import keras


@keras.saving.register_keras_serializable(package="keras_mobilevitv2")
class ChannelSlice(keras.layers.Layer):
    """`x[..., start:stop]`: one STRIDED_SLICE in TFLite. It only moves
    values, so an int8 model keeps the input's quantization."""

    def __init__(self, start, stop, **kwargs):
        super().__init__(**kwargs)
        self.start = int(start)
        self.stop = int(stop)

    def call(self, inputs):
        return inputs[..., self.start : self.stop]

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.stop - self.start,)

    def get_config(self):
        config = super().get_config()
        config.update({"start": self.start, "stop": self.stop})
        return config
