"""The benchmark's measuring instruments, on small known cases.

MAC counts are checked exactly against hand-computed figures; the TFLite
conversion used for the other implementations is checked on a small model
(the smoke run converts only this package's model).
"""

import os
import sys
import time

import keras
import numpy as np
import pytest

# `benchmarks` is not part of the installed wheel: it is imported from the
# repository. Appended, not prepended, so installed packages keep priority;
# a regular package still wins over the namespace folder tests/benchmarks.
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.append(ROOT)

from benchmarks.macs import count_keras_macs  # noqa: E402
from benchmarks.random_weights import randomize_keras_weights  # noqa: E402
from benchmarks.timing import Timing  # noqa: E402
from benchmarks.timing import time_callable  # noqa: E402
from benchmarks.timing import time_interleaved  # noqa: E402


def small_model(size=8):
    inputs = keras.Input((size, size, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", use_bias=False)(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.DepthwiseConv2D(3, padding="same", use_bias=False)(x)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(4)(x))


def test_timing_statistics():
    timing = Timing.from_samples([4.0, 1.0, 3.0, 2.0, 5.0], first_call_s=0.5)
    assert (timing.median_ms, timing.min_ms, timing.max_ms, timing.runs) == (3.0, 1.0, 5.0, 5)
    assert timing.p25_ms == 2.0 and timing.p75_ms == 4.0


def test_time_callable_counts_calls():
    calls = []
    timing = time_callable(lambda: calls.append(1), warmup=3, repeats=5, max_seconds=10)
    assert timing.runs == 5
    assert len(calls) == 3 + 5  # warm-up (the first call included) + timed


def test_time_callable_stops_after_its_budget():
    timing = time_callable(lambda: sum(range(20000)), warmup=1, repeats=10**6, max_seconds=0.05, min_runs=3)
    assert 3 <= timing.runs < 10**6


def test_time_interleaved_rotates_the_order_every_round():
    calls = []
    runs = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    timings = time_interleaved(runs, warmup=2, repeats=4, max_seconds=10, turn_seconds=0)
    assert {name: timing.runs for name, timing in timings.items()} == {"a": 4, "b": 4, "c": 4}
    # first calls, one warm-up round, then rounds starting one place later each time
    assert "".join(calls) == "abc" + "abc" + "abc" + "bca" + "cab" + "abc"


def test_time_interleaved_times_each_callable_on_its_own():
    calls = {"slow": 0, "fast": 0}

    def run(name, seconds):
        calls[name] += 1
        time.sleep(seconds)

    timings = time_interleaved(
        {"slow": lambda: run("slow", 0.02), "fast": lambda: run("fast", 0)},
        warmup=1,
        repeats=3,
        max_seconds=10,
        turn_seconds=0.01,
    )
    assert timings["slow"].min_ms >= 19 and timings["fast"].max_ms < 5
    assert timings["slow"].runs == timings["fast"].runs == 3  # one sample per turn
    # a turn repeats a call shorter than turn_seconds; a longer one runs once
    assert calls["slow"] == 1 + 3 and calls["fast"] > 1 + 3 * 5


def test_time_interleaved_settle_calls_open_each_turn_untimed():
    calls = {"a": 0}

    def run():
        calls["a"] += 1
        # the first call of every turn (the settling call) is slow
        time.sleep(0.03 if calls["a"] % 2 == 0 else 0.0)

    timings = time_interleaved({"a": run}, warmup=1, repeats=3, max_seconds=10, turn_seconds=0, settle_calls=1)
    assert calls["a"] == 1 + 3 * 2  # first call, then per turn one settling and one timed call
    assert timings["a"].max_ms < 20


def test_time_interleaved_stops_after_its_budget():
    runs = {"a": lambda: sum(range(20000)), "b": lambda: sum(range(20000))}
    timings = time_interleaved(runs, warmup=1, repeats=10**6, max_seconds=0.02, min_runs=3)
    assert 3 <= timings["a"].runs == timings["b"].runs < 10**6


def test_macs_of_convolutions_and_dense():
    counted = count_keras_macs(small_model())
    conv = 8 * 8 * 8 * (3 * 3 * 3)  # output elements x kernel area x input channels
    depthwise = 8 * 8 * 8 * (3 * 3)
    dense = 8 * 4
    assert counted["by_op"] == {"Conv2D": conv, "DepthwiseConv2dNative": depthwise, "MatMul": dense}
    assert counted["macs"] == conv + depthwise + dense


def test_macs_of_multi_head_attention():
    tokens, channels = 16, 32
    inputs = keras.Input((tokens, channels))
    layer = keras.layers.MultiHeadAttention(num_heads=2, key_dim=channels)
    model = keras.Model(inputs, layer(inputs, inputs))
    projections = 4 * tokens * channels * (2 * channels)  # q, k, v, output: C <-> heads x key_dim
    attention = 2 * 2 * tokens * tokens * channels  # scores and weighted sum, per head
    assert count_keras_macs(model)["macs"] == projections + attention


def test_randomized_weights_are_well_scaled():
    model = randomize_keras_weights(small_model(), seed=3)
    by_name = {
        variable.path.rsplit("/", 1)[-1] + str(i): np.asarray(variable) for i, variable in enumerate(model.weights)
    }
    variances = [value for name, value in by_name.items() if name.startswith("moving_variance")]
    assert variances and all(((v >= 0.5) & (v <= 1.5)).all() for v in variances)
    depthwise = np.asarray(model.layers[4].kernel)
    assert depthwise.std() == pytest.approx(1 / 3, rel=0.3)  # fan-in 3x3, not 3x3x8


def test_converted_competitor_model_is_fully_int8():
    pytest.importorskip("ai_edge_litert")
    from benchmarks.runtimes import tflite_runner
    from benchmarks.tflite_export import ROUTE_INT8
    from benchmarks.tflite_export import convert_keras_model
    from benchmarks.tflite_export import float_tensors_inside

    model = randomize_keras_weights(small_model(16))
    images = np.random.default_rng(0).uniform(-1, 1, (4, 16, 16, 3)).astype(np.float32)
    float_model, _ = convert_keras_model(model, "keras3", "float32", batch_size=2)
    int8_model, route = convert_keras_model(model, "keras3", "int8", batch_size=2, representative_images=images)
    assert route == ROUTE_INT8
    assert float_tensors_inside(int8_model) == 0
    assert float_tensors_inside(float_model) > 0
    for flatbuffer in (float_model, int8_model):
        assert tflite_runner(flatbuffer, images[:2], threads=1)().shape == (2, 4)
