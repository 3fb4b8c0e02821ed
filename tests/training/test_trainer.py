"""The trainer end to end: real data pipeline, real processes, real checkpoints."""

import dataclasses
import glob
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from run_trainer import free_ports

import keras_mobilevitv2  # noqa: F401  (registers the layers for load_model)
from training import TrainConfig
from training import Trainer
from training.data import embedded_source

HARNESS = os.path.join(os.path.dirname(__file__), "run_trainer.py")


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("datasets"))
    embedded_source(path)  # generate once for the module
    return path


def fast_config(model_dir, dataset_dir, **overrides):
    """Small, quick settings: 64x64, light augmentation."""
    values = dict(
        model="mobilevitv2_050",
        data="embedded",
        dataset_dir=dataset_dir,
        model_dir=str(model_dir),
        image_size=64,
        batch_size=16,
        epochs=1,
        steps=6,
        lr=2e-3,
        min_lr=2e-4,
        warmup_steps=2,
        randaugment=False,
        mixup_alpha=0.0,
        cutmix_alpha=0.0,
        random_erasing=0.0,
        max_eval_images=64,
        checkpoint_every=1000,
    )
    values.update(overrides)
    return TrainConfig(**values)


def run_harness(config, *extra, env=None, timeout=600):
    command = [sys.executable, HARNESS, "--config", json.dumps(config.__dict__), *extra]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)


def test_short_run_lowers_the_loss_and_writes_its_outputs(tmp_path, dataset_dir):
    config = fast_config(tmp_path / "run", dataset_dir, steps=40, batch_size=32, checkpoint_every=20)
    trainer = Trainer(config, verbose=False)
    summary = trainer.run()

    losses = trainer.step_losses
    assert len(losses) == 40
    assert np.mean(losses[-8:]) < np.mean(losses[:8]) - 0.1, losses

    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert summary["final_step"] == 40 and summary["images_per_second"] > 0
    assert set(summary["eval"]) >= {"top1", "top5", "ema_top1", "ema_top5"}
    assert sorted(os.path.basename(p) for p in glob.glob(str(tmp_path / "run/checkpoints/*.index"))) == [
        "ckpt-20.index",
        "ckpt-40.index",
    ]
    assert glob.glob(str(tmp_path / "run/logs/train/events.out.tfevents.*"))

    exported = keras.models.load_model(tmp_path / "run" / "model.keras")
    probabilities = exported.predict_on_batch(np.random.rand(2, 64, 64, 3).astype("float32") * 255)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    # the exported model carries the EMA weights
    for exported_weight, ema in zip(exported.weights, trainer.ema_weights):
        np.testing.assert_array_equal(exported_weight.numpy(), ema)


def test_two_workers_train_the_same_steps_to_identical_weights(tmp_path, dataset_dir):
    config = fast_config(tmp_path / "run", dataset_dir, strategy="multi_worker", steps=4, max_eval_images=32)
    workers = [f"127.0.0.1:{port}" for port in free_ports(2)]
    processes = []
    for index in range(2):
        env = dict(os.environ)
        env["TF_CONFIG"] = json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}})
        env["TMPDIR"] = str(tmp_path / f"scratch{index}")  # where a non-chief's collective saves go
        os.makedirs(env["TMPDIR"])
        command = [
            sys.executable,
            HARNESS,
            "--config",
            json.dumps(config.__dict__),
            "--save_weights",
            str(tmp_path / f"worker{index}.npz"),
        ]
        processes.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=600) for p in processes]
    for process, (_out, err) in zip(processes, outputs):
        assert process.returncode == 0, err[-3000:]

    first, second = np.load(tmp_path / "worker0.npz"), np.load(tmp_path / "worker1.npz")
    assert len(first.files) == len(second.files) > 100
    for name in first.files:
        np.testing.assert_array_equal(first[name], second[name], err_msg=name)
    losses = [json.loads(out.strip().splitlines()[-1])["losses"] for out, _ in outputs]
    assert len(losses[0]) == len(losses[1]) == 4
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)  # globally reduced loss
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["final_step"] == 4 and summary["num_replicas"] == 2
    # The non-chief's saves went to its scratch folder and were removed; the
    # model_dir holds the chief's outputs only.
    assert list((tmp_path / "scratch1").iterdir()) == []
    assert not [p for p in (tmp_path / "run").rglob("*") if "worker" in p.name]


def test_mirrored_replicas_and_an_impossible_batch(tmp_path, dataset_dir):
    good = fast_config(tmp_path / "good", dataset_dir, strategy="mirrored", steps=2, max_eval_images=16)
    result = run_harness(good, "--logical_cpus", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "good" / "summary.json").read_text())["num_replicas"] == 2

    bad = fast_config(tmp_path / "bad", dataset_dir, strategy="mirrored", batch_size=15)
    result = run_harness(bad, "--logical_cpus", "2")
    assert result.returncode == 2
    assert "--batch_size 15 cannot be split evenly over 2 replicas" in result.stderr


def _write_png(path, value=128, size=40):
    import tensorflow as tf

    os.makedirs(os.path.dirname(path), exist_ok=True)
    image = np.full((size, size, 3), value, np.uint8)
    tf.io.write_file(str(path), tf.io.encode_png(image))


def _image_folder(root, classes=("a", "b"), per_class=8):
    for split in ("train", "val"):
        for index, name in enumerate(classes):
            for i in range(per_class):
                _write_png(root / split / name / f"{i}.png", value=40 + 150 * index + i)


def test_corrupt_images_are_skipped_and_counted(tmp_path):
    data = tmp_path / "data"
    _image_folder(data)
    (data / "train" / "a" / "broken.png").write_bytes(b"this is not an image")
    config = fast_config(tmp_path / "run", "", data=str(data), batch_size=4, steps=8, max_eval_images=0)
    summary = Trainer(config, verbose=False).run()
    assert summary["final_step"] == 8  # two epochs of 4 steps
    # the undecodable file is met once per pass over the data, and skipped
    assert 1 <= summary["skipped_images"] <= 2


def _write_tfrecords(path, count, label_offset):
    import tensorflow as tf

    with tf.io.TFRecordWriter(str(path)) as writer:
        for i in range(count):
            label = i % 2
            image = np.full((40, 40, 3), 40 + 150 * label, np.uint8)
            features = {
                "image/encoded": tf.train.Feature(
                    bytes_list=tf.train.BytesList(value=[tf.io.encode_png(image).numpy()])
                ),
                "image/class/label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label + label_offset])),
            }
            writer.write(tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString())


def test_imagenet_tfrecords_train_and_evaluate(tmp_path):
    data = tmp_path / "records"
    data.mkdir()
    # 1-based labels, as written by the usual ImageNet-to-TFRecord scripts
    _write_tfrecords(data / "train-00000-of-00002", 12, label_offset=1)
    _write_tfrecords(data / "train-00001-of-00002", 12, label_offset=1)
    _write_tfrecords(data / "validation-00000-of-00001", 8, label_offset=1)
    config = fast_config(
        tmp_path / "run",
        "",
        data=str(data),
        num_classes=2,
        tfrecord_label_offset=1,
        batch_size=8,
        steps=3,
        max_eval_images=0,
    )
    summary = Trainer(config, verbose=False).run()
    assert summary["final_step"] == 3
    assert summary["eval"]["top1"] >= 0.0 and summary["eval"]["top5"] == 1.0  # 2 classes
    with pytest.raises(ValueError, match="give --num_classes"):
        Trainer(fast_config(tmp_path / "run2", "", data=str(data)), verbose=False).run()
    # 1-based labels read as 0-based: label 2 of 2 classes is an error, not a zero vector
    import tensorflow as tf

    wrong_offset = fast_config(tmp_path / "run3", "", data=str(data), num_classes=2, batch_size=8, steps=3)
    with pytest.raises(tf.errors.InvalidArgumentError, match="tfrecord_label_offset"):
        Trainer(wrong_offset, verbose=False).run()


def test_bad_data_gives_clear_errors(tmp_path):
    empty = tmp_path / "empty"
    (empty / "train").mkdir(parents=True)
    with pytest.raises(ValueError, match="no class sub-folders"):
        Trainer(fast_config(tmp_path / "r1", "", data=str(empty)), verbose=False).run()

    no_images = tmp_path / "no_images"
    (no_images / "train" / "cat").mkdir(parents=True)
    with pytest.raises(ValueError, match="no image files"):
        Trainer(fast_config(tmp_path / "r2", "", data=str(no_images)), verbose=False).run()

    mismatch = tmp_path / "mismatch"
    _image_folder(mismatch)
    _write_png(mismatch / "val" / "c" / "0.png")
    with pytest.raises(ValueError, match=r"missing in eval \[\].*not in train \['c'\]"):
        Trainer(fast_config(tmp_path / "r3", "", data=str(mismatch)), verbose=False).run()

    with pytest.raises(ValueError, match="does not exist"):
        Trainer(fast_config(tmp_path / "r4", "", data=str(tmp_path / "nowhere")), verbose=False).run()

    small = tmp_path / "small"
    _image_folder(small, per_class=2)
    with pytest.raises(ValueError, match="fewer than one optimizer step"):
        Trainer(fast_config(tmp_path / "r5", "", data=str(small), batch_size=8), verbose=False).run()


def test_an_incompatible_model_dir_is_refused_and_kept(tmp_path, dataset_dir):
    Trainer(fast_config(tmp_path / "run", dataset_dir, steps=2, max_eval_images=16), verbose=False).run()
    before = sorted(os.listdir(tmp_path / "run" / "checkpoints"))
    with pytest.raises(ValueError, match="holds a different run.*image_size: 64 there, 96 now"):
        Trainer(fast_config(tmp_path / "run", dataset_dir, image_size=96), verbose=False).run()
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == before

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty and has no run_config.json"):
        Trainer(fast_config(foreign, dataset_dir), verbose=False).run()
    assert (foreign / "notes.txt").read_text() == "mine"


def test_command_line_help_and_errors(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "training.train", "--helpfull"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode in (0, 1)  # absl exits 1 after printing help
    for flag in ("--model", "--data", "--strategy", "--batch_size", "--grad_accum_steps", "--init_weights"):
        assert flag in result.stdout
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "training.train",
            "--data",
            str(tmp_path / "missing"),
            "--model_dir",
            str(tmp_path / "run"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2 and "does not exist" in result.stderr


# A user program that imports the libraries keeps every flag name for itself.
_USER_PROGRAM = """
from absl import flags
import quantization.qat
import training.train
flags.DEFINE_integer("batch_size", 7, "the user's own flag")
flags.FLAGS(["program", "--batch_size=3"])
print("flags:", flags.FLAGS.batch_size, "tpu" in flags.FLAGS, "calibration_images" in flags.FLAGS)
"""


def test_command_line_flags_are_defined_by_the_command_lines_only():
    result = subprocess.run([sys.executable, "-c", _USER_PROGRAM], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "flags: 3 False False" in result.stdout
    result = subprocess.run(
        [sys.executable, "-m", "quantization.qat", "--helpfull"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode in (0, 1)  # absl exits 1 after printing help
    for flag in ("--calibration_images", "--io_type", "--batch_size", "--init_weights", "--tpu"):
        assert flag in result.stdout


def test_defining_the_flags_twice_is_harmless():
    from absl import flags as absl_flags

    from training.flags import define_flags

    flag_values = absl_flags.FlagValues()
    define_flags(flag_values)
    define_flags(flag_values)
    assert flag_values["batch_size"].default == TrainConfig().batch_size and "tpu" in flag_values


# ------------------------------------------------- silent wrong answers (#15)


def _tiny_model_fn():
    from run_trainer import tiny_model_fn

    return tiny_model_fn


def test_undecodable_eval_images_are_counted_and_reported(tmp_path):
    import io

    data = tmp_path / "data"
    _image_folder(data, per_class=4)
    (data / "val" / "a" / "broken.png").write_bytes(b"this is not an image")
    config = fast_config(tmp_path / "run", "", data=str(data), image_size=32, batch_size=4, steps=2, max_eval_images=0)
    log = io.StringIO()
    summary = Trainer(config, progress_stream=log, model_fn=_tiny_model_fn()).run()
    assert summary["skipped_eval_images"] == 1 and summary["skipped_images"] == 0
    assert "Evaluation: 1 undecodable images skipped" in log.getvalue()


def test_a_model_dir_of_the_other_attention_norm_is_refused(tmp_path):
    _image_folder(tmp_path / "data", per_class=4)
    config = fast_config(
        tmp_path / "run", "", data=str(tmp_path / "data"), image_size=32, batch_size=4, steps=1, max_eval_images=0
    )
    Trainer(config, verbose=False, model_fn=_tiny_model_fn()).run()
    other = dataclasses.replace(config, attention_norm="batch_norm_2d")
    message = "holds a different run.*attention_norm: 'layer_norm_2d' there, 'batch_norm_2d' now"
    with pytest.raises(ValueError, match=message):
        Trainer(other, verbose=False, model_fn=_tiny_model_fn()).run()
    # a run configuration written before the field existed had the default
    run_config = tmp_path / "run" / "run_config.json"
    fields = json.loads(run_config.read_text())
    del fields["attention_norm"]
    run_config.write_text(json.dumps(fields))
    with pytest.raises(ValueError, match=message):
        Trainer(other, verbose=False, model_fn=_tiny_model_fn()).run()


def test_the_tpu_flag_reaches_the_cluster_resolver(tmp_path, monkeypatch):
    import importlib

    import tensorflow as tf
    from absl import flags

    from training.distribution import make_strategy

    cli = importlib.import_module("training.train")  # `training.train` is also the API function
    asked = []

    class Resolver:
        def __init__(self, tpu=None):
            asked.append(tpu)
            raise ConnectionError("no TPU here")

    monkeypatch.setattr(tf.distribute.cluster_resolver, "TPUClusterResolver", Resolver)
    argv = ["train", "--strategy=tpu", "--tpu=grpc://10.1.2.3:8470", f"--model_dir={tmp_path / 'run'}"]
    cli.define_flags()  # what the command line does before parsing
    flags.FLAGS(argv)
    try:
        with pytest.raises(ConnectionError):
            cli.main(["train"])
    finally:
        flags.FLAGS.unparse_flags()
    assert asked == ["grpc://10.1.2.3:8470"]
    with pytest.raises(ConnectionError):
        make_strategy("tpu")
    assert asked[-1] is None  # no --tpu: the resolver looks for it (TPU_NAME, metadata)
    with pytest.raises(ValueError, match="--tpu 'x' is only used with --strategy=tpu"):
        make_strategy("one_device", tpu_address="x")


def test_workers_that_see_different_model_dirs_are_refused():
    from training.distribution import shared_model_dir_error

    assert shared_model_dir_error([[4, 1], [4, 1]], "runs/x") is None
    message = shared_model_dir_error([[4, 1], [-1, 0]], "runs/x")
    assert "--model_dir runs/x" in message
    assert "replica 1: latest checkpoint none, run configuration absent" in message
    assert "filesystem that every worker reads and writes" in message


def test_a_worker_without_the_chiefs_checkpoints_fails_clearly(tmp_path):
    data = tmp_path / "data"
    _image_folder(data, per_class=4)
    chief_dir, other_dir = tmp_path / "chief", tmp_path / "elsewhere"
    config = fast_config(chief_dir, "", data=str(data), image_size=32, batch_size=4, steps=4, max_eval_images=0)
    Trainer(dataclasses.replace(config, steps=2), verbose=False, model_fn=_tiny_model_fn()).run()
    workers = [f"127.0.0.1:{port}" for port in free_ports(2)]
    processes = []
    try:
        for index, model_dir in enumerate((chief_dir, other_dir)):
            env = dict(os.environ)
            env["TF_CONFIG"] = json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}})
            worker_config = dataclasses.replace(config, strategy="multi_worker", model_dir=str(model_dir))
            command = [sys.executable, HARNESS, "--tiny_model", "--config", json.dumps(worker_config.__dict__)]
            processes.append(
                subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            )
        outputs = [p.communicate(timeout=180) for p in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    for process, (_, err) in zip(processes, outputs):
        assert process.returncode == 2, err[-3000:]
        assert "The workers see different contents in --model_dir" in err
        assert "latest checkpoint 2, run configuration present" in err
        assert "latest checkpoint none, run configuration absent" in err


def _tiny_mobilevitv2(classes, width=0.5):
    from keras_mobilevitv2.mobilevitv2 import MobileViTv2

    return MobileViTv2(width, weights=None, input_shape=(32, 32, 3), classes=classes, classifier_activation=None)


@pytest.mark.parametrize("suffix", [".weights.h5", ".keras"])
def test_init_weights_with_another_classifier_keep_the_backbone(tmp_path, caplog, suffix):
    from training.trainer import build_model

    source = _tiny_mobilevitv2(classes=3)
    for variable in source.weights:
        variable.assign(np.random.RandomState(len(variable.path)).rand(*variable.shape).astype("float32"))
    path = str(tmp_path / f"three_classes{suffix}")
    source.save_weights(path) if suffix == ".weights.h5" else source.save(path)
    config = fast_config(tmp_path / "run", "", image_size=32)

    with caplog.at_level("WARNING"):
        model = build_model(config, 5, weights=path)
    assert "its classifier is not for 5 classes; it is dropped" in caplog.text
    for loaded, original in zip(model.weights, source.weights):
        if "logits" not in loaded.path:
            np.testing.assert_array_equal(loaded.numpy(), original.numpy(), err_msg=loaded.path)
    logits = model.get_layer("logits").get_weights()
    assert logits[0].shape == (256, 5) and np.isfinite(logits[0]).all() and np.isfinite(logits[1]).all()

    same = build_model(config, 3, weights=path)  # the same size: the classifier is loaded too
    for loaded, original in zip(same.weights, source.weights):
        np.testing.assert_array_equal(loaded.numpy(), original.numpy(), err_msg=loaded.path)

    with pytest.raises(ValueError, match="does not fit mobilevitv2_075.*backbone weights"):
        build_model(fast_config(tmp_path / "run", "", image_size=32, model="mobilevitv2_075"), 3, weights=path)


def test_deterministic_runs_give_bitwise_the_same_weights(tmp_path, dataset_dir):
    # Separate processes: the setting must precede every TensorFlow op. With
    # the default (concurrent ops) two such runs drift apart within 20 steps.
    saved = []
    for run in ("first", "second"):
        config = fast_config(tmp_path / run, dataset_dir, deterministic=True, steps=20, batch_size=32)
        weights = tmp_path / f"{run}.npz"
        result = run_harness(config, "--save_weights", str(weights))
        assert result.returncode == 0, result.stderr[-3000:]
        saved.append(np.load(weights))
    assert saved[0].files == saved[1].files and saved[0].files
    for key in saved[0].files:
        np.testing.assert_array_equal(saved[0][key], saved[1][key], err_msg=key)


def _tiny_run(tmp_path, **overrides):
    _image_folder(tmp_path / "data", per_class=4)
    values = dict(data=str(tmp_path / "data"), image_size=32, batch_size=4, steps=2, max_eval_images=0)
    return fast_config(tmp_path / "run", "", **(values | overrides))


def test_a_finished_run_is_not_handed_back_for_other_training_settings(tmp_path):
    import io

    config = _tiny_run(tmp_path)
    Trainer(config, verbose=False, model_fn=_tiny_model_fn()).run()
    run_dir = tmp_path / "run"
    exported = (run_dir / "model.keras").read_bytes()
    checkpoints = sorted(os.listdir(run_dir / "checkpoints"))

    # The user asks for another learning rate: the finished run would train
    # nothing and its model is not what was asked for.
    message = r"holds a finished run \(step 2 of 2\).*lr: 0.002 there, 0.001 now"
    with pytest.raises(ValueError, match=message):
        Trainer(dataclasses.replace(config, lr=1e-3), verbose=False, model_fn=_tiny_model_fn()).run()
    assert (run_dir / "model.keras").read_bytes() == exported
    assert sorted(os.listdir(run_dir / "checkpoints")) == checkpoints

    # How it is run (here: checkpoint frequency) is not what it trains.
    same = dataclasses.replace(config, checkpoint_every=7, keep_checkpoints=5)
    assert Trainer(same, verbose=False, model_fn=_tiny_model_fn()).run()["final_step"] == 2

    # More steps at another rate continue the run, say so, and record the rate.
    log = io.StringIO()
    longer = dataclasses.replace(config, steps=3, lr=1e-3)
    assert Trainer(longer, progress_stream=log, model_fn=_tiny_model_fn()).run()["final_step"] == 3
    assert "Resuming with changed settings, which apply from step 2 on: lr: 0.002 there, 0.001 now" in log.getvalue()
    recorded = json.loads((run_dir / "run_config.json").read_text())
    assert (recorded["lr"], recorded["steps"]) == (1e-3, 3)
    Trainer(longer, verbose=False, model_fn=_tiny_model_fn()).run()  # now the run's own settings


def test_a_run_from_init_weights_that_changed_since_is_another_run(tmp_path):
    weights = tmp_path / "start.weights.h5"
    weights.write_bytes(b"the float model of the first training")
    config = _tiny_run(tmp_path, init_weights=str(weights))
    Trainer(config, verbose=False, model_fn=_tiny_model_fn()).run()
    recorded = json.loads((tmp_path / "run" / "run_config.json").read_text())
    assert len(recorded["init_weights_sha256"]) == 64

    weights.write_bytes(b"the float model, retrained")  # same path, other weights
    with pytest.raises(ValueError, match="holds a different run.*init_weights_sha256"):
        Trainer(config, verbose=False, model_fn=_tiny_model_fn()).run()


class _DistillingTinyModels:
    """tiny_model_fn with a teacher that says class "a" for every image."""

    teacher = None

    def __init__(self, teacher_weight=1.0):
        self.teacher_weight = teacher_weight

    def __call__(self, config, num_classes, source, classifier_activation, initialize):
        model = _tiny_model_fn()(config, num_classes, source, classifier_activation, initialize)
        if initialize:
            inputs = keras.Input((config.image_size, config.image_size, 3))
            pooled = keras.layers.GlobalAveragePooling2D()(inputs)
            logits = keras.layers.Dense(num_classes, kernel_initializer="zeros", name="says_a")(pooled)
            self.teacher = keras.Model(inputs, logits)
            self.teacher.get_layer("says_a").bias.assign([4.0, -4.0])
        return model


def _class_a_probability(model_dir, pixel_values):
    model = keras.models.load_model(os.path.join(model_dir, "model.keras"), compile=False)
    images = np.stack([np.full((32, 32, 3), value, np.float32) for value in pixel_values])
    return model.predict(images, verbose=0)[:, 0]


def test_a_teacher_replaces_the_labels(tmp_path):
    """QAT's --distillation: the trainer fits the teacher's probabilities, in
    the share `teacher_weight`, the labels the rest."""
    config = _tiny_run(tmp_path, steps=30, lr=0.05, min_lr=0.05, warmup_steps=0, ema_decay=0.5)
    Trainer(config, verbose=False, model_fn=_DistillingTinyModels()).run()
    class_b = [190, 191, 192, 193]  # val/b's images (_image_folder)
    assert np.all(_class_a_probability(config.model_dir, class_b) > 0.99)

    # The same run on the labels tells b from a.
    labels = dataclasses.replace(config, model_dir=str(tmp_path / "labels"))
    Trainer(labels, verbose=False, model_fn=_tiny_model_fn()).run()
    assert np.all(_class_a_probability(labels.model_dir, class_b) < 0.01)

    # Half and half: for b's images, the targets are a and b in equal parts.
    half = dataclasses.replace(config, model_dir=str(tmp_path / "half"))
    Trainer(half, verbose=False, model_fn=_DistillingTinyModels(teacher_weight=0.5)).run()
    assert np.all(np.abs(_class_a_probability(half.model_dir, class_b) - 0.5) < 0.15)
