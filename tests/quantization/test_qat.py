"""QAT and TFLite export: fully int8, audited, agreeing with Keras."""

import dataclasses
import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import randomize_keras_model

from keras_mobilevitv2 import MobileViTv2_050
from quantization import calibrate
from quantization import export_tflite
from quantization import quantize_model
from quantization.audit import make_interpreter
from quantization.audit import run_tflite
from quantization.quantize import quantizers
from quantization.quantize import uncalibrated_quantizers
from quantization.tflite_export import convert
from quantization.tflite_graph import read_graph

SIZE = 64


@pytest.fixture(scope="module")
def float_model():
    model = MobileViTv2_050(weights=None, input_shape=(SIZE, SIZE, 3), classes=10)
    return randomize_keras_model(model, seed=3)


@pytest.fixture(scope="module")
def images():
    return np.random.RandomState(0).rand(48, SIZE, SIZE, 3).astype("float32") * 255


@pytest.fixture(scope="module")
def qat_model(float_model, images):
    return calibrate(quantize_model(float_model), images[:32])


@pytest.mark.parametrize("output_stride", [32, 8])
def test_folded_qat_model_computes_the_float_function(output_stride):
    # 96x96 reaches an odd map at stage 5: the resize is part of the QAT graph
    # too; output stride 8 puts dilated inverted residuals and blocks in it.
    model = randomize_keras_model(
        MobileViTv2_050(weights=None, input_shape=(96, 96, 3), classifier_activation=None, output_stride=output_stride)
    )
    qat = quantize_model(model)
    x = np.random.RandomState(1).rand(4, 96, 96, 3).astype("float32") * 255
    for quantizer in quantizers(qat):
        quantizer.calibrating = True  # quantization off: the folded float function
    np.testing.assert_allclose(qat(x, training=False).numpy(), model.predict_on_batch(x), atol=1e-4)


def _op_counts(flatbuffer):
    counts = {}
    for operator in read_graph(flatbuffer).operators:
        counts[operator.name] = counts.get(operator.name, 0) + 1
    return counts


def test_qat_graph_has_the_fast_export_form(float_model, qat_model, images):
    # The int8 graph users ship is the merged one: q/k/v as three convolutions
    # (ReLU fused into the values), no MAXIMUM on the norms, and the three
    # linear 1x1 projections that feed only the next expansion merged into it.
    unmerged = calibrate(quantize_model(float_model, merge_pointwise=False), images[:32])
    merged_ops, unmerged_ops = _op_counts(convert(qat_model, "qat_int8")), _op_counts(convert(unmerged, "qat_int8"))
    assert not {"STRIDED_SLICE", "MAXIMUM", "RELU"} & set(merged_ops), merged_ops
    assert unmerged_ops["CONV_2D"] - merged_ops["CONV_2D"] == 3
    names = {layer.name: layer.get_config().get("project") for layer in qat_model.layers}
    assert [name for name, project in names.items() if project is False] == ["stage1_ir1", "stage3_mvit", "stage4_mvit"]

    # Merging removes one int8 rounding of each merged intermediate; the two
    # int8 models then differ by int8 noise only: same top-1, and a mean
    # difference within two output steps (measured: 1.2 steps; each differs
    # from the float model by about as much).
    merged_interpreter = make_interpreter(convert(qat_model, "qat_int8"))
    merged = run_tflite(merged_interpreter, images[32:])
    reference = run_tflite(make_interpreter(convert(unmerged, "qat_int8")), images[32:])
    step = merged_interpreter.get_output_details()[0]["quantization"][0]
    np.testing.assert_array_equal(merged.argmax(-1), reference.argmax(-1))
    assert np.abs(merged - reference).mean() <= 2 * step
    expected = float_model.predict_on_batch(images[32:])
    assert np.abs(merged - expected).mean() <= np.abs(reference - expected).mean() + step


@pytest.mark.parametrize("io_type", ["int8", "uint8"])
def test_qat_export_is_fully_int8_and_agrees_with_keras(qat_model, images, io_type, tmp_path):
    path = tmp_path / f"model_{io_type}.tflite"
    report = export_tflite(
        qat_model,
        str(path),
        "qat_int8",
        io_type=io_type,
        representative_images=images[:8],
        sample_images=images,
        verbose=False,
    )
    assert path.exists() and report["errors"] == []
    assert report["float_tensors_inside"] == []
    assert set(report["tensor_dtypes"]) <= {"INT8", "INT32", "UINT8"}
    assert report["max_tensor_rank"] <= 4
    assert report["input"]["dtype"] == io_type.upper() and report["input"]["shape"] == [1, SIZE, SIZE, 3]
    assert not any(op.startswith(("CUSTOM", "FLEX", "DEQUANTIZE")) for op in report["ops"])
    agreement = report["agreement"]
    assert agreement["top1_agreement"] >= 0.95
    # the mean error is a few int8 steps of the output
    assert agreement["mean_abs_error"] <= 3 * agreement["output_quantization_step"], agreement
    saved = json.loads((tmp_path / f"model_{io_type}.audit.json").read_text())
    assert saved["tensor_dtypes"] == report["tensor_dtypes"]


def test_uint8_input_takes_raw_pixels(qat_model, tmp_path):
    report = export_tflite(qat_model, str(tmp_path / "m.tflite"), "qat_int8", io_type="uint8", verbose=False)
    from quantization.audit import make_interpreter

    interpreter = make_interpreter((tmp_path / "m.tflite").read_bytes())
    scale, zero_point = interpreter.get_input_details()[0]["quantization"]
    assert (scale, zero_point) == (1.0, 0)  # the [0, 255] rescaling is folded into the stem
    assert report["errors"] == []


@pytest.mark.parametrize("mode", ["float32", "float16", "dynamic", "ptq_int8"])
def test_float_model_exports(float_model, images, mode, tmp_path):
    report = export_tflite(
        float_model,
        str(tmp_path / f"{mode}.tflite"),
        mode,
        representative_images=images[:16] if mode == "ptq_int8" else None,
        sample_images=images[:16],
        verbose=False,
    )
    assert report["errors"] == [] and report["max_tensor_rank"] <= 4
    assert report["agreement"]["top1_agreement"] >= (0.9 if mode == "ptq_int8" else 1.0)
    if mode == "ptq_int8":
        assert report["float_tensors_inside"] == []
    if mode == "float32":
        assert report["agreement"]["max_abs_error"] < 1e-4


def test_unknown_layers_are_named(float_model):
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Conv2D(8, 3, name="my_conv")(inputs)
    x = keras.layers.LayerNormalization(name="my_norm")(x)
    with pytest.raises(ValueError, match="layer 'my_norm' of type LayerNormalization.*Supported:"):
        quantize_model(keras.Model(inputs, x))
    dynamic = MobileViTv2_050(weights=None)
    with pytest.raises(ValueError, match="static input size"):
        quantize_model(dynamic)
    for steps in (-1, 2.5, True):
        with pytest.raises(ValueError, match="batch_statistics_steps must be None or an integer >= 0"):
            quantize_model(float_model, batch_statistics_steps=steps)


def test_export_errors(float_model, qat_model, images, tmp_path):
    with pytest.raises(ValueError, match=r"representative_images must be float32 images of shape \(N, 64, 64, 3\)"):
        export_tflite(float_model, str(tmp_path / "a.tflite"), "ptq_int8", representative_images=images[:, :32])
    with pytest.raises(ValueError, match="representative_images must be float32 images.*got dtype bool"):
        export_tflite(float_model, str(tmp_path / "a.tflite"), "ptq_int8", representative_images=images > 100)
    with pytest.raises(ValueError, match="needs representative_images"):
        export_tflite(float_model, str(tmp_path / "a.tflite"), "ptq_int8")
    with pytest.raises(ValueError, match="never set.*calibrate"):
        export_tflite(quantize_model(float_model), str(tmp_path / "a.tflite"), "qat_int8")
    with pytest.raises(ValueError, match="needs a model from quantization.quantize_model"):
        export_tflite(float_model, str(tmp_path / "a.tflite"), "qat_int8")
    with pytest.raises(ValueError, match="this is a QAT model"):
        export_tflite(qat_model, str(tmp_path / "a.tflite"), "ptq_int8", representative_images=images[:4])
    with pytest.raises(ValueError, match="needs an int8 mode"):
        export_tflite(float_model, str(tmp_path / "a.tflite"), "float32", io_type="uint8")
    with pytest.raises(ValueError, match=r"Calibration images must have shape \(N, 64, 64, 3\)"):
        calibrate(quantize_model(float_model), images[:, :, :, :1])
    assert not list(tmp_path.iterdir())


def test_float_islands_fail_the_audit_and_write_nothing(images, tmp_path):
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Conv2D(8, 3, strides=2)(inputs)
    x = keras.layers.LayerNormalization()(x)  # lowers with a float NEG between DEQUANTIZE/QUANTIZE
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(4)(x))
    with pytest.raises(ValueError, match="failed its audit.*float tensors inside an int8 model"):
        export_tflite(model, str(tmp_path / "g.tflite"), "ptq_int8", representative_images=images[:8], verbose=False)
    assert not (tmp_path / "g.tflite").exists()
    report = export_tflite(
        model, str(tmp_path / "g.tflite"), "ptq_int8", representative_images=images[:8], allow_float=True, verbose=False
    )
    assert report["float_tensors_inside"]  # allowed, but still reported


def _assert_within_int8_noise(agreement):
    # measured: a mean difference of 1.2 and 0.7 output steps (1/256)
    assert agreement["min_top1_agreement"] == 0.0
    assert agreement["mean_abs_error"] <= 2 * agreement["output_quantization_step"], agreement


def test_qat_fine_tuning_with_the_trainer(float_model, tmp_path):
    from quantization.qat import run_qat
    from training import TrainConfig
    from training.data import embedded_source

    dataset_dir = str(tmp_path / "datasets")
    embedded_source(dataset_dir)
    weights = str(tmp_path / "float.weights.h5")
    float_model.save_weights(weights)
    config = TrainConfig(
        model="mobilevitv2_050",
        data="embedded",
        dataset_dir=dataset_dir,
        model_dir=str(tmp_path / "qat"),
        image_size=SIZE,
        batch_size=16,
        steps=3,
        lr=1e-4,
        min_lr=1e-5,
        warmup_steps=0,
        randaugment=False,
        mixup_alpha=0.0,
        cutmix_alpha=0.0,
        random_erasing=0.0,
        max_eval_images=32,
        init_weights=weights,
    )
    with pytest.raises(ValueError, match=r"min_top1_agreement is a fraction .* in \[0, 1\].*got 80"):
        run_qat(config, verbose=False, min_top1_agreement=80)  # refused before any training
    assert not (tmp_path / "qat").exists()
    # This random model's 10 softmax outputs lie within a few int8 steps of
    # one another, so which class is top-1 in TFLite is decided by rounding
    # (measured: agreement 0.59 for the distilled run below, with a mean
    # difference of 0.7 steps): its fidelity is asserted in output steps, and
    # the audit's top-1 bar is turned off as a user would (--min_top1_agreement).
    summary, report = run_qat(config, calibration_images=32, verbose=False, min_top1_agreement=0.0)
    assert summary["final_step"] == 3
    # the safeguard compared the fine-tuned model with its calibrated start
    assert summary["selection"]["chosen"] in ("start", "fine-tuned")
    assert (tmp_path / "qat" / "qat_selection.json").exists()
    assert report["errors"] == [] and report["float_tensors_inside"] == []
    _assert_within_int8_noise(report["agreement"])
    assert (tmp_path / "qat" / "mobilevitv2_050_qat_int8.tflite").exists()
    # A resume builds the QAT model uncalibrated and restores the checkpoint:
    # every quantizer's range must come back, the transformer blocks' too
    # (held in lists, which TF's object graph does not reach).
    resumed = quantize_model(MobileViTv2_050(weights=None, input_shape=(SIZE, SIZE, 3), classes=10))
    latest = tf.train.latest_checkpoint(str(tmp_path / "qat" / "checkpoints"))
    tf.train.Checkpoint(weights=list(resumed.weights)).restore(latest).expect_partial()
    assert uncalibrated_quantizers(resumed) == []
    # Run again into the same directory with another recipe: refused, not the
    # finished run's model handed back as if fine-tuned with it.
    with pytest.raises(ValueError, match=r"holds a finished run.*lr: 0.0001 there, 0.0005 now"):
        run_qat(dataclasses.replace(config, lr=5e-4), calibration_images=32, verbose=False)
    with pytest.raises(ValueError, match="holds a different run.*qat_calibration_images: 32 there, 64 now"):
        run_qat(config, calibration_images=64, verbose=False)
    with pytest.raises(ValueError, match="give --init_weights"):
        run_qat(TrainConfig(model_dir=str(tmp_path / "other")), verbose=False)
    # Distillation is another run: its setting is recorded and kept.
    distilled = dataclasses.replace(config, model_dir=str(tmp_path / "distilled"), steps=2)
    summary, report = run_qat(distilled, calibration_images=32, verbose=False, distillation=0.5, min_top1_agreement=0)
    assert summary["final_step"] == 2 and report["errors"] == []
    _assert_within_int8_noise(report["agreement"])
    assert json.loads((tmp_path / "distilled" / "run_config.json").read_text())["qat_distillation"] == 0.5
    with pytest.raises(ValueError, match="holds a different run.*qat_distillation: 0.5 there, 0.0 now"):
        run_qat(distilled, calibration_images=32, verbose=False)
    with pytest.raises(ValueError, match="--distillation fits a classifier's outputs; a segmentation model"):
        run_qat(dataclasses.replace(config, task="segmentation"), verbose=False, distillation=1.0)
    with pytest.raises(ValueError, match=r"share of the QAT targets, in \[0, 1\]; got 1.5"):
        run_qat(distilled, verbose=False, distillation=1.5)


def test_qat_model_keras_roundtrip_is_exact(qat_model, images, tmp_path):
    qat_model.save(tmp_path / "qat.keras")
    restored = keras.models.load_model(tmp_path / "qat.keras")
    assert len(restored.weights) == len(qat_model.weights)
    np.testing.assert_array_equal(restored.predict_on_batch(images[:4]), qat_model.predict_on_batch(images[:4]))


def test_sample_images_are_a_mixed_subset_with_matching_labels(tmp_path):
    import tensorflow as tf

    from quantization.qat import sample_images
    from training import TrainConfig
    from training.data import folder_source

    for split in ("train", "val"):
        for label, value in ((0, 30), (1, 220)):
            folder = tmp_path / split / str(label)
            folder.mkdir(parents=True)
            for i in range(10):
                tf.io.write_file(str(folder / f"{i}.png"), tf.io.encode_png(np.full((36, 36, 3), value, np.uint8)))
    source = folder_source(str(tmp_path))
    config = TrainConfig(image_size=32)
    images, labels = sample_images(source, config, 8, split="eval", with_labels=True)
    assert images.shape == (8, 32, 32, 3) and set(labels) == {0, 1}  # not the first class only
    np.testing.assert_array_equal(images.mean(axis=(1, 2, 3)) > 128, labels == 1)


def test_qat_command_takes_the_trainer_flags(tmp_path):
    import subprocess
    import sys

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "quantization.qat",
            "--model_dir",
            str(tmp_path / "run"),
            "--batch_size",
            "8",
            "--batch_statistics_steps",
            "10",
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "give --init_weights" in result.stderr


def test_trainer_evaluation_takes_a_qat_model(qat_model, tmp_path):
    # The per-epoch evaluation of `python -m quantization.qat`: a QAT model
    # needs static image sizes, whatever the evaluation pipeline's shapes.
    from training.data import embedded_source
    from training.recipe import TrainConfig
    from training.trainer import evaluate

    source = embedded_source(str(tmp_path))
    config = TrainConfig(image_size=SIZE, max_eval_images=40)
    result = evaluate(qat_model, source, config, batch_size=16)  # batches of 16, 16 and 8
    assert 0.0 <= result["top1"] <= 1.0 and result["skipped_images"] == 0
    assert np.isfinite(result["loss"])


def test_fine_tuning_that_does_worse_than_its_start_is_not_kept(float_model, tmp_path, capsys):
    import keras

    from quantization.qat import keep_best
    from quantization.qat import qat_model_fn
    from training import TrainConfig
    from training.data import embedded_source
    from training.trainer import evaluate

    dataset_dir = str(tmp_path / "datasets")
    source = embedded_source(dataset_dir)
    weights = str(tmp_path / "float.weights.h5")
    float_model.save_weights(weights)
    model_dir = tmp_path / "qat"
    model_dir.mkdir()
    config = TrainConfig(
        data="embedded", dataset_dir=dataset_dir, model_dir=str(model_dir), image_size=SIZE, init_weights=weights
    )
    start = qat_model_fn(32)(config, source.num_classes, source, None, True)
    # A fine-tune that diverged: its logits are NaN, no image is right.
    ruined = qat_model_fn(32)(config, source.num_classes, source, None, True)
    kernel = ruined.get_layer("logits").kernel
    kernel.assign(np.full(kernel.shape, np.nan, "float32"))
    ruined.save(str(model_dir / "model.keras"))

    selection = keep_best(config, source, start.get_weights())
    assert selection["chosen"] == "start", selection
    assert selection["fine_tuned"]["top1"] == 0.0 < selection["start"]["top1"]
    assert selection["evaluation_images"] == 400  # the whole validation split
    assert "fine-tuning did not beat its starting point" in capsys.readouterr().out
    assert (model_dir / "model.finetuned.keras").exists() and (model_dir / "qat_selection.json").exists()
    kept = keras.models.load_model(str(model_dir / "model.keras"), compile=False)
    for a, b in zip(kept.weights, start.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    assert evaluate(kept, source, TrainConfig(image_size=SIZE))["top1"] == selection["start"]["top1"]


def test_qat_keeps_the_best_epoch_on_the_whole_split(float_model, tmp_path, capsys):
    import tensorflow as tf

    from quantization.qat import BEST_WEIGHTS_NAME
    from quantization.qat import read_epoch_records
    from quantization.qat import run_qat
    from training import TrainConfig
    from training.trainer import evaluate

    rng = np.random.RandomState(7)
    for split, count in (("train", 2), ("val", 2)):
        for label in range(10):
            folder = tmp_path / "data" / split / f"class{label}"
            folder.mkdir(parents=True)
            for i in range(count):
                image = rng.randint(0, 256, (SIZE, SIZE, 3)).astype(np.uint8)
                image[..., label % 3] //= 2
                tf.io.write_file(str(folder / f"{i}.png"), tf.io.encode_png(image))
    weights = str(tmp_path / "float.weights.h5")
    float_model.save_weights(weights)
    model_dir = tmp_path / "qat"
    config = TrainConfig(
        model="mobilevitv2_050",
        data=str(tmp_path / "data"),
        model_dir=str(model_dir),
        image_size=SIZE,
        batch_size=10,
        epochs=2,
        lr=1e-3,
        min_lr=1e-4,
        warmup_steps=0,
        ema_decay=0.5,
        randaugment=False,
        mixup_alpha=0.0,
        cutmix_alpha=0.0,
        random_erasing=0.0,
        max_eval_images=4,  # the safeguard evaluates the whole split anyway
        init_weights=weights,
    )
    summary, _ = run_qat(config, calibration_images=8)
    records, selection = read_epoch_records(str(model_dir)), summary["selection"]
    assert [entry["epoch"] for entry in records["epochs"]] == [1, 2] == [e["epoch"] for e in selection["epochs"]]
    assert selection["evaluation_images"] == 20
    best = max(max(entry["raw"], entry["ema"]) for entry in records["epochs"])
    assert records["best"]["value"] == best == pytest.approx(selection["fine_tuned"]["top1"])
    out = capsys.readouterr().out
    assert "QAT epoch 2 (step 4)" in out and "QAT selection on 20 validation images" in out
    # The choice is confirmed on what is shipped: both candidates as int8 TFLite.
    int8 = selection["int8_top1"]
    assert int8["images"] == 20 and "as int8 TFLite on 20 images" in out
    if int8["fine_tuned"] != int8["start"]:
        assert selection["chosen"] == ("fine-tuned" if int8["fine_tuned"] > int8["start"] else "start")
    kept = keras.models.load_model(str(model_dir / "model.keras"), compile=False)
    if selection["chosen"] == "fine-tuned":  # the best epoch's weights, not the last ones
        expected = keras.models.load_model(str(model_dir / "model.keras"), compile=False)
        expected.load_weights(str(model_dir / BEST_WEIGHTS_NAME))
        for a, b in zip(kept.weights, expected.weights):
            np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    whole_split = TrainConfig(data=config.data, image_size=SIZE)
    from training.data import folder_source

    kept_top1 = evaluate(kept, folder_source(config.data), whole_split)["top1"]
    assert kept_top1 == pytest.approx(selection[selection["chosen"].replace("-", "_")]["top1"])


def test_batch_statistics_qat_normalizes_by_the_batch_then_freezes(float_model, qat_model, images):
    # tfmot's BatchNorm scheme: the QAT model keeps each BatchNorm; before any
    # training it is the model folded from the start (same int8 graph), the
    # first N training steps normalize by the batch and move the statistics,
    # then the statistics freeze.
    model = calibrate(quantize_model(float_model, batch_statistics_steps=2), images[:32])
    folded = qat_model(images[32:], training=False).numpy()
    np.testing.assert_array_equal(model(images[32:], training=False).numpy().argmax(-1), folded.argmax(-1))
    # The kernel folds in float32 at run time instead of float64 once: int8 roundings differ, within a step.
    assert np.abs(model(images[32:], training=False).numpy() - folded).mean() <= 1 / 256  # softmax output step
    assert _op_counts(convert(model, "qat_int8")) == _op_counts(convert(qat_model, "qat_int8"))

    conv = model.get_layer("stem_conv")
    assert conv.batch_statistics_steps == 2
    x = images[:8]
    stem_input = keras.Model(model.input, conv.input)(x)
    before = conv.moving_mean.numpy()
    y = conv(stem_input, training=True).numpy()
    # One batch-statistics step: the output is the batch-normalized convolution, int8 rounded.
    z = (tf.nn.conv2d(stem_input, conv.kernel, conv.strides, conv.padding.upper()) + conv.bias).numpy()
    normalized = (z - z.mean((0, 1, 2))) / np.sqrt(z.var((0, 1, 2)) + conv.bn_epsilon) * conv.gamma.numpy()
    expected = conv.output_quantizer(normalized + conv.beta.numpy(), training=False).numpy()
    if conv.activation == "silu":
        expected = conv.activation_quantizer(expected * tf.sigmoid(expected), training=False).numpy()
    assert np.abs(y - expected).mean() < 0.05 * np.abs(expected).mean()
    moved = conv.moving_mean.numpy()
    np.testing.assert_allclose(moved, 0.99 * before + 0.01 * z.mean((0, 1, 2)), rtol=1e-4, atol=1e-5)
    conv(stem_input, training=True)
    assert conv.bn_steps.numpy() == 2
    frozen = conv.moving_mean.numpy()
    conv(stem_input, training=True)  # step 3: frozen statistics, the inference form
    assert conv.bn_steps.numpy() == 2
    np.testing.assert_array_equal(conv.moving_mean.numpy(), frozen)
    np.testing.assert_allclose(conv(stem_input, training=True), conv(stem_input, training=False), atol=1e-5)


def test_norm_mean_keeps_the_scale_ratio_xnnpack_runs_fast():
    # XNNPACK's int8 SUB needs each input scale >= 2^-10 of the output's; a
    # norm whose inputs have (almost) zero mean would otherwise quantize the
    # mean so finely that the SUB falls back to the slow reference kernel.
    from quantization.fake_quant import ActivationQuantizer
    from quantization.layers import QuantizedNormalize

    inputs = keras.Input((8, 8, 16), batch_size=1)
    x = ActivationQuantizer(name="input_quantizer")(inputs)
    model = keras.Model(inputs, QuantizedNormalize(name="norm")(x))
    data = np.random.RandomState(0).randn(16, 8, 8, 16).astype("float32") * 20
    data -= data.mean(axis=(1, 2, 3), keepdims=True)  # zero mean: the mean's own range is ~1e-6
    calibrate(model, data)
    graph = read_graph(convert(model, "qat_int8", representative_images=data[:2]))
    (sub,) = [op for op in graph.operators if op.name == "SUB"]
    scales = [float(graph.tensors[i].quantization.scale[0]) for i in (*sub.present_inputs, sub.outputs[0])]
    assert min(scales[0], scales[1]) / scales[2] >= 2**-10, scales
