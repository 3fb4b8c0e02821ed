"""TensorBoard scalars written with core TensorFlow only.

`tf.summary.scalar` needs the `tensorboard` package, which TensorFlow 2.21
no longer installs. The scalar plugin reads a plain float32 tensor summary
tagged with plugin name "scalars", which `tf.summary.write` can emit.
"""

import tensorflow as tf

_SCALAR_METADATA = tf.compat.v1.SummaryMetadata(
    plugin_data=tf.compat.v1.SummaryMetadata.PluginData(plugin_name="scalars")
)


class ScalarWriter:
    def __init__(self, logdir):
        self._writer = tf.summary.create_file_writer(logdir)

    def write(self, step, scalars):
        with self._writer.as_default(step=step):
            for name, value in scalars.items():
                tf.summary.write(name, tf.constant(value, tf.float32), metadata=_SCALAR_METADATA.SerializeToString())
        self._writer.flush()
