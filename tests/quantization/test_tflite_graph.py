"""The shared flatbuffer reader against TensorFlow's own interpreter."""

import dataclasses
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from quantization.tflite_graph import read_graph

SIZE = 16


def _model():
    """Convolutions (per-channel int8 weights), a fused ReLU, a strided
    depthwise, a reduction with int32 axes, a dense layer and a softmax."""
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inputs)
    x = keras.layers.DepthwiseConv2D(3, strides=2, padding="same")(x)
    x = keras.layers.Conv2D(12, 1)(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(5, activation="softmax")(x)
    model = keras.Model(inputs, outputs)
    rng = np.random.default_rng(0)
    for variable in model.weights:
        variable.assign(rng.normal(0, 0.3, variable.shape).astype("float32"))
    return model


def _convert(int8):
    converter = tf.lite.TFLiteConverter.from_keras_model(_model())
    if int8:
        images = np.random.default_rng(1).random((4, 1, SIZE, SIZE, 3), np.float32)
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([image] for image in images)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    return converter.convert()


@pytest.fixture(scope="module")
def int8_flatbuffer():
    return _convert(int8=True)


@pytest.fixture(scope="module", params=["float32", "int8"])
def flatbuffer(request):
    return request.getfixturevalue("int8_flatbuffer") if request.param == "int8" else _convert(int8=False)


@pytest.fixture(scope="module")
def interpreter(flatbuffer):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        interpreter = tf.lite.Interpreter(
            model_content=flatbuffer,
            experimental_op_resolver_type=tf.lite.experimental.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
        )
    interpreter.allocate_tensors()
    return interpreter


def test_tensors_match_the_interpreter(flatbuffer, interpreter):
    graph = read_graph(flatbuffer)
    # The interpreter appends its own scratch tensors after the model's.
    details = {d["index"]: d for d in interpreter.get_tensor_details() if d["index"] < len(graph.tensors)}
    assert len(details) == len(graph.tensors) > 0
    for tensor in graph.tensors:
        detail = details[tensor.index]
        assert tensor.name == detail["name"]
        assert tensor.dtype == np.dtype(detail["dtype"]).name.upper()
        assert tensor.shape == tuple(detail["shape"])
        assert tensor.shape_signature == tuple(detail["shape_signature"])
        expected = detail["quantization_parameters"]
        if tensor.quantization is None:
            assert len(expected["scales"]) == 0
        else:
            np.testing.assert_array_equal(tensor.quantization.scale, expected["scales"])
            np.testing.assert_array_equal(tensor.quantization.zero_point, expected["zero_points"])
            assert tensor.quantization.quantized_dimension == expected["quantized_dimension"]


def test_int8_model_has_per_channel_weights_and_per_tensor_activations(int8_flatbuffer):
    graph = read_graph(int8_flatbuffer)
    assert graph.tensors[graph.inputs[0]].dtype == "INT8"
    conv = next(op for op in graph.operators if op.name == "CONV_2D")
    source, kernel = graph.input_tensors(conv)[:2]
    assert not source.quantization.per_channel and source.data is None
    assert kernel.quantization.per_channel and len(kernel.quantization.scale) == kernel.shape[0]


def test_constant_data_equals_the_interpreter_tensors(flatbuffer, interpreter):
    graph = read_graph(flatbuffer)
    constants = [t for t in graph.tensors if t.data is not None]
    assert any(t.dtype in ("FLOAT32", "INT8") and t.rank == 4 for t in constants)  # the conv kernels
    assert any(t.dtype == "INT32" for t in constants)  # shapes, axes
    for tensor in constants:
        assert tensor.is_constant and tensor.buffer_size == tensor.data.nbytes
        expected = interpreter.get_tensor(tensor.index)
        assert tensor.data.dtype == expected.dtype and tensor.data.shape == expected.shape
        np.testing.assert_array_equal(tensor.data, expected)
    for tensor in graph.tensors:
        if tensor.data is None:
            assert not tensor.is_constant and tensor.buffer_size == 0


def test_operators_follow_the_execution_plan(flatbuffer, interpreter):
    graph = read_graph(flatbuffer)
    ops = interpreter._get_ops_details()
    assert [op.name for op in graph.operators] == [op["op_name"] for op in ops]
    assert [op.index for op in graph.operators] == [op["index"] for op in ops]
    for op, expected in zip(graph.operators, ops):
        assert op.inputs == tuple(int(i) for i in expected["inputs"])
        assert op.outputs == tuple(int(i) for i in expected["outputs"])
    assert graph.inputs == tuple(d["index"] for d in interpreter.get_input_details())
    assert graph.outputs == tuple(d["index"] for d in interpreter.get_output_details())
    assert graph.subgraph == 0 and graph.subgraph_count == 1


def test_builtin_options_are_plain_snake_case_fields(flatbuffer):
    from tensorflow.lite.python import schema_py_generated as schema

    graph = read_graph(flatbuffer)
    depthwise = next(op for op in graph.operators if op.name == "DEPTHWISE_CONV_2D")
    assert depthwise.options_type == "DepthwiseConv2DOptions"
    assert [depthwise.option(field) for field in ("stride_h", "stride_w", "depth_multiplier")] == [2, 2, 1]
    first_conv = next(op for op in graph.operators if op.name == "CONV_2D")
    assert first_conv.option("fused_activation_function") == schema.ActivationFunctionType.RELU
    softmax = next(op for op in graph.operators if op.name == "SOFTMAX")
    assert dict(softmax.options) == {"beta": 1.0}
    assert first_conv.option("no_such_field", "default") == "default"
    assert all(op.version >= 1 for op in graph.operators)


def test_records_are_immutable(flatbuffer):
    graph = read_graph(flatbuffer)
    kernel = next(t for t in graph.tensors if t.data is not None and t.rank == 4)
    op = graph.operators[0]
    for record, field in ((graph, "tensors"), (kernel, "shape"), (op, "name"), (op, "inputs")):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(record, field, None)
    with pytest.raises(ValueError):
        kernel.data[(0,) * kernel.rank] = 1
    with pytest.raises(TypeError):
        op.options["extra"] = 1
    quantized = [t.quantization for t in graph.tensors if t.quantization is not None]
    for quantization in quantized:
        assert not quantization.scale.flags.writeable and not quantization.zero_point.flags.writeable
    assert isinstance(graph.tensors, tuple) and isinstance(graph.operators, tuple)


def test_parsed_once_per_model_and_refuses_other_bytes(flatbuffer):
    assert read_graph(flatbuffer) is read_graph(bytearray(flatbuffer))
    with pytest.raises(ValueError, match="TFL3"):
        read_graph(b"not a model at all")
    with pytest.raises(ValueError, match="subgraph"):
        read_graph(flatbuffer, subgraph=1)


def test_custom_ops_are_named_by_their_code(int8_flatbuffer):
    import flatbuffers
    from tensorflow.lite.python import schema_py_generated as schema

    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(int8_flatbuffer, 0))
    code = model.operatorCodes[model.subgraphs[0].operators[-1].opcodeIndex]
    code.builtinCode = code.deprecatedBuiltinCode = schema.BuiltinOperator.CUSTOM
    code.customCode = "MyOp"
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    assert read_graph(bytes(builder.Output())).operators[-1].name == "CUSTOM:MyOp"
