"""One-batch inference callables per runtime, and thread settings per framework.

Each `*_runner` returns a zero-argument callable that runs one batch and
returns its output as a host numpy array, so the time measured covers the
whole computation (nothing is left queued). Frameworks are imported inside
the functions: a process imports only what it runs, and PyTorch is never
imported after TensorFlow (torchvision then crashes in this stack).
"""

import numpy as np

KERAS_MODES = ("eager", "graph", "xla")


def configure_tensorflow_threads(threads):
    """`threads` intra-op threads and one inter-op thread.

    With one inter-op thread TensorFlow runs one op at a time on `threads`
    workers, as PyTorch eager and the TFLite interpreter do, so every
    framework uses the same number of cores. Must run before TensorFlow
    executes its first op.
    """
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)


def configure_torch_threads(threads):
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set once in this process
        pass


def keras_runner(model, images, mode):
    """Keras 3 or tf_keras model: "eager" (op by op), "graph" (`tf.function`)
    or "xla" (`tf.function(jit_compile=True)`)."""
    import tensorflow as tf

    if mode not in KERAS_MODES:
        raise ValueError(f"mode must be one of {KERAS_MODES}; got {mode!r}")
    inputs = tf.constant(images)
    if mode == "eager":
        return lambda: np.asarray(model(inputs, training=False))
    # A fixed input signature: one trace, and the XLA cluster is compiled once.
    compiled = tf.function(
        lambda x: model(x, training=False),
        input_signature=[tf.TensorSpec(inputs.shape, inputs.dtype)],
        jit_compile=(mode == "xla"),
    )
    return lambda: np.asarray(compiled(inputs))


def torch_runner(model, images_nchw):
    """PyTorch eager in `inference_mode` (no autograd bookkeeping)."""
    import torch

    inputs = torch.from_numpy(np.ascontiguousarray(images_nchw))

    def run():
        with torch.inference_mode():
            return model(inputs).numpy()

    return run


def make_tflite_interpreter(flatbuffer, threads):
    """The default TFLite CPU runtime: LiteRT's interpreter with its default
    op resolver, which applies the XNNPACK delegate."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:  # TensorFlow's bundled copy of the same runtime
        import tensorflow as tf

        Interpreter = tf.lite.Interpreter
    interpreter = Interpreter(model_content=flatbuffer, num_threads=threads)
    interpreter.allocate_tensors()
    return interpreter


def quantize_for_input(interpreter, images):
    """`images` in the input tensor's dtype (int8 models take int8 pixels)."""
    detail = interpreter.get_input_details()[0]
    if detail["dtype"] == np.float32:
        return np.asarray(images, np.float32)
    scale, zero_point = detail["quantization"]
    info = np.iinfo(detail["dtype"])
    quantized = np.round(np.asarray(images, np.float32) / scale + zero_point)
    return np.clip(quantized, info.min, info.max).astype(detail["dtype"])


def tflite_runner(flatbuffer, images, threads):
    """Set input, invoke, read output: what an application does per batch."""
    interpreter = make_tflite_interpreter(flatbuffer, threads)
    input_index = interpreter.get_input_details()[0]["index"]
    output_index = interpreter.get_output_details()[0]["index"]
    inputs = quantize_for_input(interpreter, images)

    def run():
        interpreter.set_tensor(input_index, inputs)
        interpreter.invoke()
        return interpreter.get_tensor(output_index)

    return run
