"""The deployment contract every target keeps: one `export` signature, one
report layout (`<name>.<target>.report.json` beside the files it lists), one
`TargetError` for refusals, and a refused export leaves the output folder
exactly as it was. Run through the command line, as a user does."""

import inspect
import json
import os

import numpy as np
import pytest

pytest.importorskip("tflite_micro")
pytest.importorskip("onnxruntime")

import keras  # noqa: E402
from conftest import tiny_mobilevitv2  # noqa: E402

from quantization import calibrate  # noqa: E402
from quantization import export  # noqa: E402
from quantization import quantize_model  # noqa: E402
from quantization import targets  # noqa: E402
from quantization.tflite_export import convert  # noqa: E402

SIZE = 32


@pytest.fixture(scope="module")
def images():
    return np.random.RandomState(0).rand(16, SIZE, SIZE, 3).astype("float32") * 255


@pytest.fixture(scope="module")
def saved(images, tmp_path_factory):
    """The float and QAT .keras files of a tiny MobileViTv2."""
    float_model = tiny_mobilevitv2(SIZE)
    qat_model = calibrate(quantize_model(float_model), images)
    folder = tmp_path_factory.mktemp("models")
    paths = {"float": str(folder / "tiny.keras"), "qat": str(folder / "tiny_qat.keras")}
    float_model.save(paths["float"])
    qat_model.save(paths["qat"])
    return paths


def _snapshot(folder):
    """Every file below `folder` with its bytes."""
    found = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, folder)] = f.read()
    return found


def test_every_target_has_the_same_export_signature():
    for name in targets.TARGETS:
        module = targets.target(name)
        parameters = list(inspect.signature(module.export).parameters.values())
        assert [p.name for p in parameters[:3]] == ["model", "output_dir", "name"], name
        keyword_only = {p.name for p in parameters if p.kind is p.KEYWORD_ONLY}
        assert {"calibration_images", "sample_images", "io_type"} <= keyword_only, name
        assert callable(module.format_report)
    with pytest.raises(ValueError, match="Unknown deployment target 'tpu'; the targets are edgetpu, micro"):
        targets.target("tpu")


@pytest.mark.parametrize("target", targets.TARGETS)
def test_cli_writes_each_target_with_one_report_layout(target, saved, tmp_path, capsys):
    model = saved["float"] if target == "android" else saved["qat"]
    extra = ["--qat_model", saved["qat"]] if target == "android" else []
    out = tmp_path / "out"
    code = export.main(
        [
            "--model",
            model,
            "--target",
            target,
            "--output_dir",
            str(out),
            "--data",
            "embedded",
            "--num_images",
            "8",
            *extra,
        ]
    )
    printed = capsys.readouterr()
    assert code == 0, printed.err
    name = os.path.splitext(os.path.basename(model))[0]
    with open(out / f"{name}.{target}.report.json") as f:
        report = json.load(f)
    assert report["target"] == target and report["name"] == name
    assert report["files"]["report"] == str(out / f"{name}.{target}.report.json")
    # Every file the report names is in the folder, and nothing else is.
    assert sorted(os.path.basename(path) for path in report["files"].values()) == sorted(os.listdir(out))
    assert all(os.path.dirname(path) == str(out) for path in report["files"].values())
    assert f"wrote report: {out / f'{name}.{target}.report.json'}" in printed.out


def _refuse_edgetpu(model, out):
    float_flatbuffer = convert(model, "float32", io_type="float32")  # float I/O: the Edge TPU refuses it
    return targets.target("edgetpu").export_flatbuffer(float_flatbuffer, out, "tiny")


def _refuse_micro(qat_model, out, images):
    return targets.export("micro", qat_model, out, sample_images=images[:2], flash_budget_bytes=1000)


def _refuse_android(out, images):
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 1)(inputs)
    x = keras.layers.Lambda(lambda t: keras.ops.flip(t, axis=1))(x)  # REVERSE_V2: not on the GPU delegate
    model = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.GlobalAveragePooling2D()(x)))
    return targets.export("android", model, out, name="tiny", calibration_images=images[:4, :8, :8])


def _refuse_onnx(qat_model, out, images, monkeypatch):
    onnx_target = targets.target("onnx")
    run = onnx_target._run_onnxruntime
    monkeypatch.setattr(onnx_target, "_run_onnxruntime", lambda *args: run(*args) + 1.0)  # a wrong runtime
    return targets.export("onnx", qat_model, out, sample_images=images[:4])


@pytest.mark.parametrize("target", targets.TARGETS)
def test_a_refused_export_leaves_the_folder_as_it_was(target, saved, images, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / f"tiny.{target}.report.json").write_text("an earlier export's report")
    (out / "notes.txt").write_text("the user's own file")
    before = _snapshot(out)
    float_model = keras.models.load_model(saved["float"], compile=False)
    qat_model = keras.models.load_model(saved["qat"], compile=False)
    refuse = {
        "edgetpu": lambda: _refuse_edgetpu(float_model, str(out)),
        "micro": lambda: _refuse_micro(qat_model, str(out), images),
        "android": lambda: _refuse_android(str(out), images),
        "onnx": lambda: _refuse_onnx(qat_model, str(out), images, monkeypatch),
    }
    with pytest.raises(targets.TargetError) as raised:
        refuse[target]()
    assert raised.value.report, "the refusal carries the report of what did not fit"
    assert _snapshot(out) == before
    leftovers = [name for name in os.listdir(tmp_path) if name.startswith(f".{target}-")]
    assert leftovers == [], "the staging folder is removed"
