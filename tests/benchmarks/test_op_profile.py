"""The op-by-op profile: a cut-out operator computes what it computes inside the model."""

import keras
import numpy as np
import tensorflow as tf

from benchmarks import op_profile


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
    model = op_profile.load_model(flatbuffer)
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
    profile = op_profile.profile_model(flatbuffer, config)
    assert len(profile["operators"]) == len(op_profile.load_model(flatbuffer).subgraphs[0].operators)
    assert profile["whole_ms"] > 0 and all(op["ms"] > 0 for op in profile["operators"])
    kinds = op_profile.by_kind(profile["operators"])
    assert sum(count for _, count, _ in kinds) == len(profile["operators"])
    assert abs(sum(ms for _, _, ms in kinds) - sum(op["ms"] for op in profile["operators"])) < 1e-9
    profiles = {variant: profile for variant, _ in op_profile.VARIANTS}
    table = op_profile.kind_table(profiles)
    assert "CONV_2D" in table and "**whole model**" in table
