"""The op-by-op profile: a cut-out operator computes what it computes inside the model."""

import keras
import numpy as np
import tensorflow as tf

from benchmarks import op_profile
from quantization.tflite_graph import load_object_model


def _small_tflite():
    inputs = keras.Input((8, 8, 3), batch_size=1)
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(inputs)
    y = keras.layers.DepthwiseConv2D(3, padding="same")(x)
    x = keras.layers.Add()([x, y])
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(5)(x))
    return tf.lite.TFLiteConverter.from_keras_model(model).convert()


def test_cut_out_operators_compute_their_tensors_of_the_whole_model():
    from ai_edge_litert.interpreter import Interpreter

    flatbuffer = _small_tflite()
    whole = Interpreter(model_content=flatbuffer, experimental_preserve_all_tensors=True)
    whole.allocate_tensors()
    image = np.random.RandomState(0).rand(1, 8, 8, 3).astype("float32")
    whole.set_tensor(whole.get_input_details()[0]["index"], image)
    whole.invoke()
    model = load_object_model(flatbuffer)
    operators = model.subgraphs[0].operators
    assert len(operators) >= 4
    for index, operator in enumerate(operators):
        single = Interpreter(model_content=op_profile.single_operator_model(model, index))
        single.allocate_tensors()
        details = single.get_input_details()
        tensors = model.subgraphs[0].tensors
        runtime_inputs = [i for i in operator.inputs if i >= 0 and not op_profile.has_data(model, tensors[i])]
        assert len(details) == len(dict.fromkeys(runtime_inputs))
        for detail, tensor_index in zip(details, dict.fromkeys(runtime_inputs)):
            single.set_tensor(detail["index"], whole.get_tensor(tensor_index))
        single.invoke()
        expected = whole.get_tensor(operator.outputs[0])
        np.testing.assert_allclose(single.get_tensor(single.get_output_details()[0]["index"]), expected, atol=1e-5)


def test_profile_has_every_operator_and_the_report_sums_them():
    flatbuffer = _small_tflite()
    config = op_profile.Config(min_seconds=0.001, max_runs=3, whole_seconds=0.01)
    profile, copies = op_profile.profile_model(flatbuffer, config)
    assert copies is None  # float: XNNPACK takes every operator
    op_profile.time_wholes({"tflite_float": profile}, {"tflite_float": flatbuffer}, {"tflite_float": copies}, config)
    assert len(profile["operators"]) == len(load_object_model(flatbuffer).subgraphs[0].operators)
    assert profile["whole_ms"] > 0 and all(op["ms"] > 0 for op in profile["operators"])
    kinds = op_profile.by_kind(profile["operators"])
    assert sum(count for _, count, _ in kinds) == len(profile["operators"])
    assert abs(sum(ms for _, _, ms in kinds) - sum(op["ms"] for op in profile["operators"])) < 1e-9
    profiles = {variant: profile for variant, _ in op_profile.VARIANTS}
    table = op_profile.kind_table(profiles)
    assert "CONV_2D" in table and "**whole model**" in table


def _int8_with_softmax():
    # TFLite int8 SOFTMAX is one of the operators XNNPACK does not take (float SOFTMAX it does).
    inputs = keras.Input((8, 8, 3), batch_size=1)
    x = keras.layers.Conv2D(4, 1)(inputs)
    x = keras.layers.Softmax(axis=-1)(x)
    model = keras.Model(inputs, keras.layers.Conv2D(4, 1)(x))
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    float_model = converter.convert()
    images = np.random.RandomState(0).rand(8, 1, 8, 8, 3).astype("float32")
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([image] for image in images)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = converter.inference_output_type = tf.int8
    return float_model, converter.convert()


def test_profile_names_the_operators_xnnpack_leaves_to_tflite():
    float_model, int8_model = _int8_with_softmax()
    config = op_profile.Config(min_seconds=0.001, max_runs=3, whole_seconds=0.01)
    (int8_profile, copies), (float_profile, no_copies) = (
        op_profile.profile_model(int8_model, config),
        op_profile.profile_model(float_model, config),
    )
    op_profile.time_wholes(
        {"int8": int8_profile, "float": float_profile},
        {"int8": int8_model, "float": float_model},
        {"int8": copies, "float": no_copies},
        config,
    )
    assert op_profile.not_delegated(int8_profile) == [("SOFTMAX", 1)]
    assert int8_profile["xnnpack_partitions"] == 2  # the convolution before the softmax and the one after it
    assert op_profile.not_delegated(float_profile) == [] and float_profile["xnnpack_partitions"] == 1
    # The what-if: the softmax replaced by a copy runs in one partition and gives the copy's numbers.
    assert int8_profile["all_delegated_partitions"] == 1 and int8_profile["all_delegated_ms"] > 0
    assert float_profile["all_delegated_ms"] is None
    profiles = dict(zip([variant for variant, _ in op_profile.VARIANTS], (float_profile, int8_profile, int8_profile)))
    lines = op_profile.delegation_lines(profiles)
    assert lines[0].endswith("in 1 partition(s); left to TFLite's own kernels: none")
    assert "in 2 partition(s); left to TFLite's own kernels: SOFTMAX 1. With those replaced by copies" in lines[1]
    # A profile from before delegation was recorded renders without the lines.
    del int8_profile["operators"][0]["delegated"]
    assert len(op_profile.delegation_lines(profiles)) == 1


def test_the_copies_replace_only_the_refused_operators():
    from ai_edge_litert.interpreter import Interpreter

    from quantization.tflite_graph import read_graph

    _, int8_model = _int8_with_softmax()
    before = [operator.name for operator in read_graph(int8_model).operators]
    index = before.index("SOFTMAX")
    copies = op_profile.with_copies_for(load_object_model(int8_model), [index])
    after = [operator.name for operator in read_graph(copies).operators]
    assert after[index] == "QUANTIZE" and "SOFTMAX" not in after
    assert after[:index] + after[index + 1 :] == before[:index] + before[index + 1 :]
    interpreter = Interpreter(model_content=copies)
    interpreter.allocate_tensors()
    interpreter.invoke()
