"""The export entry points (CLI and Python) refuse what they cannot do, with
an error that says what was wrong and what is accepted: no TypeError, no
silently ignored --io_type, no calibration on images the model never saw; and
a conversion is reused only for the same model and settings."""

import json
import os
import re

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import tiny_mobilevitv2

from keras_mobilevitv2 import MobileViTv2_050
from quantization import calibrate
from quantization import export
from quantization import export_tflite
from quantization import quantize_model
from quantization import targets

SIZE = 32


@pytest.fixture(scope="module")
def images():
    return np.random.RandomState(0).rand(8, SIZE, SIZE, 3).astype("float32") * 255


@pytest.fixture(scope="module")
def float_model():
    return tiny_mobilevitv2(SIZE)


@pytest.fixture(scope="module")
def qat_model(float_model, images):
    return calibrate(quantize_model(float_model), images)


@pytest.fixture(scope="module")
def saved(float_model, qat_model, tmp_path_factory):
    """.keras files of the float, QAT and a dynamic-size model, in folders
    without a trainer's run_config.json."""
    folder = tmp_path_factory.mktemp("models")
    dynamic = MobileViTv2_050(weights=None, input_shape=(None, None, 3), classes=5)
    paths = {}
    for kind, model in (("float", float_model), ("qat", qat_model), ("dynamic", dynamic)):
        paths[kind] = str(folder / f"{kind}.keras")
        model.save(paths[kind])
    return paths


@pytest.fixture
def no_export(monkeypatch):
    """Replaces every export the CLI can run by one that records its
    arguments: these tests are about what the CLI hands over."""
    calls = []

    def record(name):
        def fake(*args, **kwargs):
            calls.append((name, args, kwargs))
            return {"models": []}

        return fake

    monkeypatch.setattr(export, "export_tflite", record("export_tflite"))
    for target in targets.TARGETS:
        monkeypatch.setattr(targets.target(target), "export", record(target))
        monkeypatch.setattr(targets.target(target), "format_report", lambda report: "")
    return calls


def _cli(capsys, *argv):
    code = export.main([str(arg) for arg in argv])
    out, err = capsys.readouterr()
    return code, out, err


# -- 1. a dynamic input size


def test_cli_dynamic_input_size_is_a_clear_error(saved, tmp_path, capsys, no_export):
    actions = (("--mode", "float32", "--output", tmp_path / "m.tflite"), ("--target", "onnx", "--output_dir", tmp_path))
    for action in actions:
        code, _, err = _cli(capsys, "--model", saved["dynamic"], "--data", "embedded", *action)
        assert code == 2
        assert "needs a static input size" in err and "(None, None, None, 3)" in err
        assert "input_shape=(H, W, 3)" in err
    assert no_export == []


@pytest.mark.parametrize("target", ["tflite", "edgetpu", "micro", "android", "onnx"])
def test_api_dynamic_input_size_is_a_clear_error(target, tmp_path):
    model = MobileViTv2_050(weights=None, input_shape=(None, None, 3), classes=5)
    export_functions = {
        "tflite": lambda: export_tflite(model, str(tmp_path / "m.tflite"), "float32"),
        "edgetpu": lambda: targets.export("edgetpu", model, str(tmp_path)),
        "micro": lambda: targets.export("micro", model, str(tmp_path)),
        "android": lambda: targets.export("android", model, str(tmp_path)),
        "onnx": lambda: targets.export("onnx", model, str(tmp_path)),
    }
    with pytest.raises(ValueError, match=r"static input size; .*\(None, None, None, 3\)"):
        export_functions[target]()
    assert os.listdir(tmp_path) == []


# -- 2. --io_type


@pytest.mark.parametrize(
    "target, io_type, accepted",
    [
        ("micro", "uint8", "int8 input and output only"),
        ("micro", "float32", "int8 input and output only"),
        ("onnx", "int8", "float32 input and output only"),
        ("onnx", "uint8", "float32 input and output only"),
    ],
)
def test_cli_refuses_an_io_type_the_target_cannot_give(target, io_type, accepted, saved, tmp_path, capsys, no_export):
    code, _, err = _cli(
        capsys,
        "--model",
        saved["qat"],
        "--target",
        target,
        "--output_dir",
        tmp_path,
        "--io_type",
        io_type,
        "--data",
        "embedded",
    )
    assert code == 2 and f"{target} target takes {accepted}" in err and f"got io_type={io_type!r}" in err
    assert no_export == []


def test_cli_hands_io_type_to_the_android_int8_model(saved, tmp_path, capsys, no_export):
    code, _, _ = _cli(
        capsys,
        "--model",
        saved["float"],
        "--target",
        "android",
        "--output_dir",
        tmp_path,
        "--io_type",
        "int8",
        "--data",
        "embedded",
        "--num_images",
        4,
    )
    assert code == 0
    [(name, _, kwargs)] = no_export
    assert name == "android" and kwargs["io_type"] == "int8"
    assert kwargs["allow_cpu_fallback"] is False


def test_cli_hands_allow_cpu_fallback_to_the_android_export(saved, tmp_path, capsys, no_export):
    code, _, _ = _cli(
        capsys,
        "--model",
        saved["float"],
        "--target",
        "android",
        "--output_dir",
        tmp_path,
        "--data",
        "embedded",
        "--num_images",
        4,
        "--allow_cpu_fallback",
    )
    assert code == 0
    [(name, _, kwargs)] = no_export
    assert name == "android" and kwargs["allow_cpu_fallback"] is True


def test_cli_hands_min_top1_agreement_to_the_mode_export_only(saved, tmp_path, capsys, no_export):
    mode = ("--model", saved["float"], "--mode", "float32", "--output", tmp_path / "m.tflite", "--data", "embedded")
    code, _, _ = _cli(capsys, *mode, "--num_images", 4, "--min_top1_agreement", 0.5)
    assert code == 0
    [(name, _, kwargs)] = no_export
    assert name == "export_tflite" and kwargs["min_top1_agreement"] == 0.5
    target = ("--model", saved["float"], "--target", "onnx", "--output_dir", tmp_path)
    for argv, expected in (
        ((*mode, "--min_top1_agreement", 80), r"--min_top1_agreement is a fraction, in \[0, 1\]; got 80"),
        ((*target, "--min_top1_agreement", 0.5), "--min_top1_agreement is the audit bar of a --mode export"),
    ):
        with pytest.raises(SystemExit):  # argparse's usage error, before the model is loaded
            _cli(capsys, *argv)
        assert re.search(expected, capsys.readouterr().err)
    assert len(no_export) == 1


def test_api_refuses_an_io_type_the_target_cannot_give(float_model, qat_model, images, tmp_path):
    with pytest.raises(ValueError, match=r"micro target takes int8 input and output only; got io_type='uint8'"):
        targets.export("micro", qat_model, str(tmp_path), sample_images=images, io_type="uint8")
    with pytest.raises(ValueError, match=r"onnx target takes float32 input and output only; got io_type='int8'"):
        targets.export("onnx", float_model, str(tmp_path), io_type="int8")
    with pytest.raises(ValueError, match=r"android target takes float32 or int8 or uint8 input and output \(of its"):
        targets.export("android", float_model, str(tmp_path), io_type="int16")
    assert os.listdir(tmp_path) == []


# -- 3. the micro target without images


def test_micro_without_images_says_which_are_needed(float_model, qat_model, images, tmp_path):
    with pytest.raises(ValueError, match=r"needs sample_images \(or calibration_images\): the model is run"):
        targets.export("micro", qat_model, str(tmp_path))
    # a float model is quantized after training: calibration images too
    with pytest.raises(ValueError, match="needs calibration_images"):
        targets.export("micro", float_model, str(tmp_path), sample_images=images)
    with pytest.raises(ValueError, match=r"sample_images must be float32 images of shape \(N, 32, 32, 3\)"):
        targets.export("micro", qat_model, str(tmp_path), sample_images=images[:, :16])
    assert os.listdir(tmp_path) == []


# -- 4. which images calibrate


@pytest.mark.parametrize(
    "action",
    [
        ("--mode", "ptq_int8", "--output", "m.tflite"),
        ("--target", "edgetpu", "--output_dir", "out"),
        ("--target", "micro", "--output_dir", "out"),
        ("--target", "android", "--output_dir", "out"),
    ],
)
def test_cli_post_training_quantization_needs_data(action, saved, tmp_path, capsys, no_export):
    code, _, err = _cli(capsys, "--model", saved["float"], *action[:3], tmp_path / action[3])
    assert code == 2
    assert "calibrates the int8 ranges on --data" in err and "run_config.json" in err and "Give --data" in err
    assert no_export == []


def _write_image_folder(root, value):
    """An ImageNet-style folder: two classes of flat images of one `value`."""
    for name in ("a", "b"):
        folder = os.path.join(root, "train", name)
        os.makedirs(folder)
        for index in range(2):
            png = tf.io.encode_png(np.full((40, 40, 3), value, np.uint8))
            tf.io.write_file(os.path.join(folder, f"{index}.png"), png)


def _write_run(folder, model, data):
    """A trainer's model_dir: model.keras and run_config.json naming `data`."""
    os.makedirs(folder)
    model.save(os.path.join(folder, "model.keras"))
    with open(os.path.join(folder, "run_config.json"), "w") as f:
        json.dump({"data": str(data), "dataset_dir": "", "num_classes": 2, "tfrecord_label_offset": 0}, f)
    return os.path.join(folder, "model.keras")


def test_cli_calibrates_on_the_data_recorded_beside_the_model(float_model, tmp_path, capsys, no_export):
    _write_image_folder(tmp_path / "data", 200)
    model_path = _write_run(tmp_path / "run", float_model, tmp_path / "data")
    code, out, _ = _cli(
        capsys, "--model", model_path, "--mode", "ptq_int8", "--output", tmp_path / "m.tflite", "--num_images", 4
    )
    assert code == 0
    assert f"the data recorded in {tmp_path / 'run' / 'run_config.json'}" in out
    [(name, _, kwargs)] = no_export
    assert name == "export_tflite"
    np.testing.assert_allclose(kwargs["representative_images"], 200, atol=1)  # the recorded images


def test_cli_recorded_data_that_is_gone_is_a_clear_error(float_model, tmp_path, capsys, no_export):
    model_path = _write_run(tmp_path / "run", float_model, tmp_path / "moved")
    code, _, err = _cli(capsys, "--model", model_path, "--mode", "ptq_int8", "--output", tmp_path / "m.tflite")
    assert code == 2 and "recorded in" in err and "does not exist" in err and "Give --data" in err
    assert no_export == []


@pytest.mark.parametrize(
    "kind, action",
    [
        ("qat", ("--mode", "qat_int8", "--output", "m.tflite")),
        ("qat", ("--target", "micro", "--output_dir", "out")),
        ("float", ("--mode", "float32", "--output", "m.tflite")),
        ("float", ("--target", "onnx", "--output_dir", "out")),
    ],
)
def test_cli_without_calibration_audits_on_synthetic_images_and_says_so(
    kind, action, saved, tmp_path, capsys, no_export
):
    # A QAT model keeps its trained ranges and a float export has none: the
    # images only compare the export with Keras, so synthetic ones do.
    code, out, _ = _cli(capsys, "--model", saved[kind], *action[:3], tmp_path / action[3], "--num_images", 4)
    assert code == 0 and len(no_export) == 1
    assert "synthetic embedded images (no --data given)" in out and "not to calibrate" in out


def color_model(size=8):
    """Predicts the dominant colour of an image: every class occurs, so a
    TFLite model that loses the colours really disagrees with Keras."""
    import keras

    inputs = keras.Input((size, size, 3))
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    dense = keras.layers.Dense(3)
    model = keras.Model(inputs, dense(x))
    dense.set_weights([np.eye(3, dtype="float32") * 4, np.zeros(3, "float32")])
    return model


def colored_images(count, seed, size=8):
    rng = np.random.RandomState(seed)
    colors = rng.rand(count, 1, 1, 3)
    return (np.clip(colors + rng.rand(count, size, size, 3) * 0.1, 0, 1) * 255).astype("float32")


def test_export_disagreeing_with_keras_is_refused_and_not_written(tmp_path):
    model = color_model()
    samples = colored_images(64, seed=1)
    assert len(set(model.predict_on_batch(samples).argmax(-1))) == 3
    path = tmp_path / "m.tflite"
    # Calibrated on [0, 1] images while the model takes [0, 255] pixels: every
    # input saturates the int8 input range, so all images look alike.
    with pytest.raises(
        ValueError,
        match=r"top-1 agreement with Keras 0\.\d+ on 64 sample images is below the "
        r"ptq_int8 minimum 0\.80",
    ) as raised:
        export_tflite(
            model,
            str(path),
            "ptq_int8",
            io_type="float32",
            representative_images=samples / 255,
            sample_images=samples,
            verbose=False,
        )
    assert "min_top1_agreement=" in str(raised.value)
    assert list(tmp_path.iterdir()) == []
    # The override writes it, and records the minimum it was held to.
    report = export_tflite(
        model,
        str(path),
        "ptq_int8",
        io_type="float32",
        representative_images=samples / 255,
        sample_images=samples,
        verbose=False,
        min_top1_agreement=0.2,
    )
    assert report["agreement"]["top1_agreement"] < 0.5 and report["agreement"]["min_top1_agreement"] == 0.2
    assert path.exists()


@pytest.mark.parametrize("mode", ["float32", "float16", "dynamic", "ptq_int8"])
def test_export_agreeing_with_keras_passes(mode, tmp_path):
    from quantization.tflite_export import MIN_TOP1_AGREEMENT

    samples = colored_images(64, seed=1)
    report = export_tflite(
        color_model(),
        str(tmp_path / "m.tflite"),
        mode,
        io_type="float32",
        representative_images=colored_images(32, seed=0),
        sample_images=samples,
        verbose=False,
    )
    assert report["agreement"]["top1_agreement"] == 1.0
    assert report["agreement"]["min_top1_agreement"] == MIN_TOP1_AGREEMENT[mode]
    with open(tmp_path / "m.audit.json") as f:
        assert json.load(f)["agreement"]["min_top1_agreement"] == MIN_TOP1_AGREEMENT[mode]


def test_a_repeated_conversion_is_reused_and_a_changed_model_is_not(qat_model, tmp_path, monkeypatch):
    from quantization import tflite_export

    converted = []
    convert_once = tflite_export._convert_uncached
    monkeypatch.setattr(tflite_export, "_convert_uncached", lambda *a: converted.append(a) or convert_once(*a))
    monkeypatch.setattr(tflite_export, "_CONVERSIONS", type(tflite_export._CONVERSIONS)())
    path = str(tmp_path / "model.keras")
    qat_model.save(path)
    first = tflite_export.convert(qat_model, "qat_int8")
    # The same model loaded again (as a later command of the pipeline does): not converted again.
    assert tflite_export.convert(keras.models.load_model(path, compile=False), "qat_int8") == first
    assert len(converted) == 1
    # Other settings, or changed weights, are converted afresh.
    tflite_export.convert(qat_model, "qat_int8", io_type="float32")
    changed = keras.models.load_model(path, compile=False)
    kernel = [w for w in changed.weights if w.path.endswith("kernel")][-1]
    kernel.assign(kernel.numpy() * 2)
    assert tflite_export.convert(changed, "qat_int8") != first
    assert len(converted) == 3
