"""The conv/BN/ReLU model of the tfmot comparison, for either Keras.

`build(keras_module)` takes `tf_keras` (in the tfmot process) or Keras 3.
"""

SIZE = 32


def build(keras_module):
    layers = keras_module.layers
    inputs = keras_module.Input((SIZE, SIZE, 3))
    x = layers.Conv2D(8, 3, strides=2, padding="same", use_bias=False, name="conv1")(inputs)
    x = layers.BatchNormalization(epsilon=1e-5, name="bn1")(x)
    x = layers.ReLU(name="relu1")(x)
    x = layers.DepthwiseConv2D(3, padding="same", use_bias=False, name="dw")(x)
    x = layers.BatchNormalization(epsilon=1e-5, name="bn2")(x)
    x = layers.ReLU(name="relu2")(x)
    x = layers.Conv2D(16, 1, use_bias=False, name="conv2")(x)
    x = layers.BatchNormalization(epsilon=1e-5, name="bn3")(x)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    return keras_module.Model(inputs, layers.Dense(5, name="dense")(x))
