"""TensorFlow Lite Micro target: real TFLM runs, C source, budgets, refusals."""

import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest

pytest.importorskip("tflite_micro")

import flatbuffers  # noqa: E402
import keras  # noqa: E402
from conftest import randomize_keras_model  # noqa: E402
from tensorflow.lite.python import schema_py_generated as schema  # noqa: E402

from keras_mobilevitv2 import MobileViTv2_050  # noqa: E402
from quantization import calibrate  # noqa: E402
from quantization import quantize_model  # noqa: E402
from quantization.audit import read_structure  # noqa: E402
from quantization.export import convert  # noqa: E402
from quantization.targets import TargetError  # noqa: E402
from quantization.targets.micro import export_flatbuffer  # noqa: E402
from quantization.targets.micro import format_report  # noqa: E402
from quantization.targets.micro_checks import MICRO_CUSTOM_RESOLVER_METHODS  # noqa: E402
from quantization.targets.micro_checks import MICRO_RESOLVER_METHODS  # noqa: E402
from quantization.targets.micro_checks import check_micro_compatibility  # noqa: E402
from quantization.targets.micro_runtime import MicroRuntimeError  # noqa: E402
from quantization.targets.micro_runtime import measure_arena  # noqa: E402
from quantization.targets.micro_runtime import run_micro  # noqa: E402

SIZE = 32  # the smallest input MobileViTv2 takes: the fastest conversion
TINY = 16


@pytest.fixture(scope="module")
def images():
    return np.random.RandomState(0).rand(48, SIZE, SIZE, 3).astype("float32") * 255


@pytest.fixture(scope="module")
def int8_model(images):
    """MobileViTv2-0.5, QAT int8 with int8 I/O (random non-degenerate weights)."""
    model = randomize_keras_model(MobileViTv2_050(weights=None, input_shape=(SIZE, SIZE, 3), classes=10), seed=3)
    qat = calibrate(quantize_model(model), images[:16])
    return convert(qat, "qat_int8", io_type="int8", representative_images=images[:4])


@pytest.fixture(scope="module")
def exported(int8_model, images, tmp_path_factory):
    folder = tmp_path_factory.mktemp("micro")
    report = export_flatbuffer(int8_model, str(folder), "mobilevitv2_050", images, arena_budget_bytes=2 * 2**20)
    return folder, report


@pytest.fixture(scope="module")
def gelu_model():
    """A tiny conv net with a GELU, an op TFLM has no kernel for."""
    inputs = keras.Input((TINY, TINY, 3))
    x = keras.layers.Conv2D(8, 3, strides=2)(inputs)
    x = keras.layers.Activation("gelu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(4, activation="softmax")(x)
    return keras.Model(inputs, outputs)


@pytest.fixture(scope="module")
def tiny_images():
    return np.random.RandomState(1).rand(8, TINY, TINY, 3).astype("float32")


def _rewrite(flatbuffer, edit):
    """`flatbuffer` after `edit(model_object)`: crafts broken models."""
    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(flatbuffer, 0))
    edit(model)
    builder = flatbuffers.Builder(len(flatbuffer) + 1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def _builtin(model, operator):
    code = model.operatorCodes[operator.opcodeIndex]
    return max(code.builtinCode, code.deprecatedBuiltinCode)


def _shrink_softmax_input_scales(model):
    """Softmax logits with scale 1e-10: TFLM's int8 softmax aborts on them."""
    graph = model.subgraphs[0]
    for operator in graph.operators:
        if _builtin(model, operator) == schema.BuiltinOperator.SOFTMAX:
            graph.tensors[operator.inputs[0]].quantization.scale = np.array([1e-10], np.float32)


def test_resolver_table_covers_the_model_ops_and_no_gelu():
    needed = (
        "ADD CONCATENATION CONV_2D DEPTHWISE_CONV_2D FULLY_CONNECTED LOGISTIC MEAN MUL PAD RELU RESHAPE RSQRT "
        "SOFTMAX STRIDED_SLICE SUB SUM TRANSPOSE TRANSPOSE_CONV SPACE_TO_DEPTH DEPTH_TO_SPACE QUANTIZE DEQUANTIZE "
        "HARD_SWISH AVERAGE_POOL_2D MAX_POOL_2D RESIZE_BILINEAR SQUARED_DIFFERENCE BATCH_MATMUL MAXIMUM"
    ).split()
    assert set(needed) <= set(MICRO_RESOLVER_METHODS)
    assert "GELU" not in MICRO_RESOLVER_METHODS
    builtin_names = {name for name in vars(schema.BuiltinOperator) if not name.startswith("_")}
    assert set(MICRO_RESOLVER_METHODS) <= builtin_names
    methods = list(MICRO_RESOLVER_METHODS.values()) + list(MICRO_CUSTOM_RESOLVER_METHODS.values())
    assert len(set(methods)) == len(methods) and all(re.fullmatch(r"Add[A-Za-z0-9]+", m) for m in methods)


def test_micro_export_runs_in_tflm_and_agrees_with_tflite(int8_model, exported):
    folder, report = exported
    assert report["fits"] and report["problems"] == []
    agreement = report["agreement"]
    assert agreement["samples"] == 48 and agreement["top1_agreement"] >= 0.95, agreement
    # More than the 3 KiB input alone; at 32x32 well under 1 MiB (about 190 KiB measured).
    assert 4 * 1024 < report["arena_bytes"] < 2**20, report["arena_bytes"]
    assert report["flash_bytes"] == len(int8_model)
    model_ops = {name for name, _ in read_structure(int8_model)["ops"]}
    assert [op["op"] for op in report["ops_to_register"]] == sorted(model_ops)
    assert report["resolver_methods"] == [MICRO_RESOLVER_METHODS[op] for op in sorted(model_ops)]
    assert sorted(os.listdir(folder)) == sorted(
        [
            "mobilevitv2_050.micro.int8.tflite",
            "mobilevitv2_050.micro.h",
            "mobilevitv2_050.micro.cc",
            "mobilevitv2_050.micro.report.json",
        ]
    )
    assert (folder / "mobilevitv2_050.micro.int8.tflite").read_bytes() == int8_model
    saved = json.loads((folder / "mobilevitv2_050.micro.report.json").read_text())
    assert saved["arena_bytes"] == report["arena_bytes"] and saved["resolver_methods"] == report["resolver_methods"]
    assert "fits" in format_report(report)


def test_measured_arena_is_exactly_enough(int8_model, images, exported):
    arena = exported[1]["arena_bytes"]
    assert measure_arena(int8_model) == arena  # allocation happens at construction: no invoke needed
    outputs, used = run_micro(int8_model, images[:2], arena_size=arena)
    assert used == arena and outputs.shape == (2, 10) and outputs.dtype == np.float32
    # TFLM's own allocator may segfault instead of failing cleanly here: the
    # subprocess turns either outcome into an error naming the shortfall.
    with pytest.raises(MicroRuntimeError) as error:
        run_micro(int8_model, images[:2], arena_size=arena - 1024)
    assert error.value.arena_shortfall and "arena" in str(error.value)


def _methods_to_ops():
    return {
        **{method: op for op, method in MICRO_RESOLVER_METHODS.items()},
        **{method: op for op, method in MICRO_CUSTOM_RESOLVER_METHODS.items()},
    }


def _recording_resolver_main(header_name):
    """A main() registering the model's ops into a resolver that records each Add*() call."""
    recorders = "\n".join(f'  int {m}() {{ return Record("{op}"); }}' for m, op in sorted(_methods_to_ops().items()))
    return f"""
#include <cstdint>
#include <cstdio>
#include "{header_name}"

struct RecordingResolver {{
  int calls = 0;
  int Record(const char* op) {{
    ++calls;
    std::printf("op %s\\n", op);
    return 0;
  }}
{recorders}
}};

int main() {{
#ifdef G_MODEL_HAS_TFLM
  return 99;  // this build must not see TFLM headers
#endif
  RecordingResolver resolver;
  const int status = g_model_micro::RegisterOps(resolver);
  std::printf("status %d\\n", status);
  std::printf("calls %d\\n", resolver.calls);
  std::printf("num_ops %d\\n", g_model_micro::kNumOps);
  std::printf("arena %u\\n", g_model_micro::kArenaBytes);
  std::printf("len %u\\n", g_model_len);
  std::printf("aligned %d\\n", static_cast<int>(reinterpret_cast<std::uintptr_t>(g_model) % 16 == 0));
  std::uint32_t hash = 2166136261u;  // FNV-1a over every byte of the array
  for (unsigned int i = 0; i < g_model_len; ++i) hash = (hash ^ g_model[i]) * 16777619u;
  std::printf("fnv1a %u\\n", hash);
  std::printf("head");
  for (int i = 0; i < 16; ++i) std::printf(" %d", g_model[i]);
  std::printf("\\n");
  return status;
}}
"""


def _stub_tflm_resolver_header():
    """Stands in for tensorflow/lite/micro/micro_mutable_op_resolver.h: a
    MicroMutableOpResolver<N> whose Add*() fail once N ops are registered, as
    the real one does."""
    adders = "\n".join(f'  TfLiteStatus {m}() {{ return Add("{op}"); }}' for m, op in sorted(_methods_to_ops().items()))
    return f"""
#pragma once
#include <cstdio>
typedef enum {{ kTfLiteOk = 0, kTfLiteError = 1 }} TfLiteStatus;
namespace tflite {{
template <unsigned int tOpCount>
class MicroMutableOpResolver {{
 public:
  unsigned int registered = 0;
  TfLiteStatus Add(const char* op) {{
    if (registered >= tOpCount) return kTfLiteError;
    ++registered;
    std::printf("op %s\\n", op);
    return kTfLiteOk;
  }}
{adders}
}};
}}  // namespace tflite
"""


_STUB_TFLM_MAIN = r"""
#include <cstdio>
#include "mobilevitv2_050.micro.h"

int main() {
#ifndef G_MODEL_HAS_TFLM
  return 99;  // the __has_include branch was not taken
#else
  tflite::MicroMutableOpResolver<g_model_micro::kNumOps> resolver;
  const TfLiteStatus status = g_model_micro::RegisterMicroOps(resolver);
  std::printf("status %d\n", static_cast<int>(status));
  std::printf("registered %u\n", resolver.registered);
  tflite::MicroMutableOpResolver<g_model_micro::kNumOps - 1> too_small;
  std::printf("too_small %d\n", g_model_micro::RegisterOps(too_small));
  return 0;
#endif
}
"""


def _fnv1a(data):
    value = 2166136261
    for byte in data:
        value = ((value ^ byte) * 16777619) & 0xFFFFFFFF
    return value


def _compile(compiler, arguments, cwd):
    command = [compiler, "-std=c++17", "-O0", "-Wall", "-Wextra", "-Werror", *arguments]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=cwd)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stderr[-3000:]}"


@pytest.fixture(scope="module")
def compiled_model(exported, tmp_path_factory):
    """The generated .cc compiled once as a translation unit (no TFLM headers)."""
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no C++ compiler")
    folder, _ = exported
    build = tmp_path_factory.mktemp("micro_build")
    _compile(compiler, ["-c", str(folder / "mobilevitv2_050.micro.cc"), "-o", str(build / "model.o")], build)
    return compiler, build / "model.o"


def test_c_source_compiles_and_registers_exactly_the_model_ops(exported, compiled_model, tmp_path):
    compiler, model_object = compiled_model
    folder, report = exported
    model = (folder / "mobilevitv2_050.micro.int8.tflite").read_bytes()
    (tmp_path / "main.cc").write_text(_recording_resolver_main("mobilevitv2_050.micro.h"))
    _compile(compiler, [f"-I{folder}", "main.cc", str(model_object), "-o", "registration_test"], tmp_path)
    run = subprocess.run([str(tmp_path / "registration_test")], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    values = dict(line.split(" ", 1) for line in lines if not line.startswith("op "))
    registered = [line[3:] for line in lines if line.startswith("op ")]
    assert registered == [op["op"] for op in report["ops_to_register"]]
    assert int(values["calls"]) == int(values["num_ops"]) == len(set(registered))
    assert int(values["status"]) == 0 and int(values["arena"]) == report["arena_bytes"]
    assert int(values["len"]) == len(model) and values["aligned"] == "1"
    assert [int(v) for v in values["head"].split()] == list(model[:16])
    assert int(values["fnv1a"]) == _fnv1a(model)


def test_c_header_uses_tflm_resolver_when_its_header_exists(exported, compiled_model, tmp_path):
    compiler, model_object = compiled_model
    folder, report = exported
    stub = tmp_path / "stub" / "tensorflow" / "lite" / "micro"
    stub.mkdir(parents=True)
    (stub / "micro_mutable_op_resolver.h").write_text(_stub_tflm_resolver_header())
    (tmp_path / "main.cc").write_text(_STUB_TFLM_MAIN)
    _compile(
        compiler, [f"-I{folder}", f"-I{tmp_path / 'stub'}", "main.cc", str(model_object), "-o", "with_tflm"], tmp_path
    )
    run = subprocess.run([str(tmp_path / "with_tflm")], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    values = dict(line.split(" ", 1) for line in run.stdout.splitlines() if not line.startswith("op "))
    assert int(values["status"]) == 0 and int(values["registered"]) == report["num_resolver_ops"]
    # A resolver one slot short fails at the last Add*() call, whose position is returned.
    assert int(values["too_small"]) == report["num_resolver_ops"]


@pytest.mark.parametrize("budget", ["arena", "flash"])
def test_budget_too_small_is_refused_and_nothing_written(int8_model, images, exported, budget, tmp_path):
    arena = exported[1]["arena_bytes"]
    limits = {"arena_budget_bytes": 1000} if budget == "arena" else {"flash_budget_bytes": 100_000}
    with pytest.raises(TargetError) as error:
        export_flatbuffer(int8_model, str(tmp_path / "out"), "small", images[:4], **limits)
    message = str(error.value)
    if budget == "arena":
        assert f"needs an arena of {arena:,} bytes; the budget is 1,000 bytes" in message
    else:
        assert f"takes {len(int8_model):,} bytes of flash; the budget is 100,000 bytes" in message
    assert error.value.report["fits"] is False and error.value.report["arena_bytes"] == arena
    assert not (tmp_path / "out").exists()


def test_op_without_tflm_kernel_is_refused(gelu_model, tiny_images, tmp_path):
    flatbuffer = convert(gelu_model, "ptq_int8", io_type="int8", representative_images=tiny_images)
    check = check_micro_compatibility(flatbuffer)
    assert check["unsupported_ops"] == ["GELU"] and not check["compatible"]
    assert "GELU" not in [op["op"] for op in check["ops_to_register"]]
    with pytest.raises(TargetError, match=r"op GELU \(1 node\(s\)\) cannot run on TFLite Micro"):
        export_flatbuffer(flatbuffer, str(tmp_path / "out"), "gelu", tiny_images)
    assert not (tmp_path / "out").exists()


def test_float_model_is_refused(gelu_model, tiny_images, tmp_path):
    flatbuffer = convert(gelu_model, "float32", io_type="float32")
    check = check_micro_compatibility(flatbuffer)
    assert check["float_tensors_inside"] and check["inputs"][0]["dtype"] == "FLOAT32"
    with pytest.raises(TargetError) as error:
        export_flatbuffer(flatbuffer, str(tmp_path / "out"), "float", tiny_images)
    message = str(error.value)
    assert "is FLOAT32; the micro target needs an INT8 input" in message
    assert "is FLOAT32; the micro target needs an INT8 output" in message
    assert "float tensor(s) inside the model" in message
    assert not (tmp_path / "out").exists()


def test_int8_op_with_float_only_kernel_is_flagged(gelu_model, tiny_images):
    # Turn the int8 GELU into NEG: TFLM's NEG kernel is float only.
    flatbuffer = convert(gelu_model, "ptq_int8", io_type="int8", representative_images=tiny_images)

    def gelu_to_neg(model):
        for code in model.operatorCodes:
            if max(code.builtinCode, code.deprecatedBuiltinCode) == schema.BuiltinOperator.GELU:
                code.builtinCode = code.deprecatedBuiltinCode = schema.BuiltinOperator.NEG
                code.version = 1

    check = check_micro_compatibility(_rewrite(flatbuffer, gelu_to_neg))
    assert check["unsupported_ops"] == []
    assert any(
        problem.startswith("NEG reads INT8 tensor") and "only FLOAT32" in problem for problem in check["problems"]
    ), check["problems"]


def test_interpreter_crash_is_a_micro_runtime_error(int8_model, images):
    aborting = _rewrite(int8_model, _shrink_softmax_input_scales)
    problems = check_micro_compatibility(aborting)["problems"]
    assert problems and all("aborts the process" in p for p in problems)
    with pytest.raises(MicroRuntimeError) as error:
        run_micro(aborting, images[:1])
    assert error.value.signal_name == "SIGABRT" and "killed by SIGABRT" in str(error.value)

    garbage = np.random.RandomState(0).bytes(4096)
    with pytest.raises(MicroRuntimeError, match="exit status 1") as error:
        run_micro(garbage, images[:1])
    assert error.value.signal_name is None and error.value.stderr_tail
