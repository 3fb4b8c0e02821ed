"""`--task segmentation`: VOC-layout data, the joint image/mask pipeline, the
per-pixel loss, mean IoU, and a real training run of DeepLabV3."""

import dataclasses
import json
import os
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_mobilevitv2  # noqa: F401  (registers the layers for load_model)
from training import SegmentationTrainer
from training import TrainConfig
from training.segmentation import build_segmenter
from training.segmentation import evaluate_segmentation
from training.segmentation_data import IGNORE_LABEL
from training.segmentation_data import embedded_segmentation_source
from training.segmentation_data import resolve_segmentation_source
from training.segmentation_data import segmentation_eval_dataset
from training.segmentation_data import segmentation_train_dataset
from training.segmentation_data import voc_source

# benchmarks/ (not installed; its random weights) is found in the checkout, after the installed packages.
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.append(ROOT)

SIZE = 64


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("datasets"))
    embedded_segmentation_source(path)
    return path


def seg_config(tmp_path, dataset_dir, **overrides):
    values = dict(
        task="segmentation",
        data="embedded",
        dataset_dir=dataset_dir,
        model_dir=str(tmp_path / "run"),
        image_size=SIZE,
        batch_size=8,
        epochs=1,
        steps=4,
        warmup_steps=1,
        max_eval_images=16,
        checkpoint_every=1000,
    )
    values.update(overrides)
    return TrainConfig(**values)


class _Context:
    """One input pipeline, one replica (what `distribute_datasets_from_function` passes)."""

    num_input_pipelines, input_pipeline_id, num_replicas_in_sync = 1, 0, 1

    def get_per_replica_batch_size(self, batch_size):
        return batch_size


def test_embedded_data_is_a_voc_folder_of_index_masks(dataset_dir):
    source = resolve_segmentation_source("embedded", dataset_dir)
    assert source.num_classes == 11 and source.class_names[0] == "background"
    assert (source.train.num_examples, source.eval.num_examples) == (800, 200)
    mask = tf.io.decode_png(tf.io.read_file(source.eval.mask_paths[3]), channels=0).numpy()
    assert mask.shape[-1] == 1
    # image 3 holds shape class 3 (label 4), the background, and its ignored outline.
    assert set(np.unique(mask)) == {0, 4, IGNORE_LABEL}
    assert os.path.basename(os.path.dirname(source.eval.mask_paths[0])) == "SegmentationClassAug"


def test_augmentation_moves_image_and_mask_together(tmp_path):
    """Images whose pixels encode their mask (colour = 20 x class): after the
    random scale, crop and flip the two still agree away from the edges."""
    root = tmp_path / "voc"
    for folder in ("JPEGImages", "SegmentationClassAug", "ImageSets/Segmentation"):
        (root / folder).mkdir(parents=True)
    rng = np.random.RandomState(0)
    for i in range(4):
        mask = np.zeros((48, 80), np.uint8)
        top, left = rng.randint(0, 24), rng.randint(0, 50)
        mask[top : top + 20, left : left + 26] = 1 + i
        image = np.repeat(mask[..., None] * 20, 3, -1)
        tf.io.write_file(str(root / f"JPEGImages/{i}.png"), tf.io.encode_png(image))
        tf.io.write_file(str(root / f"SegmentationClassAug/{i}.png"), tf.io.encode_png(mask[..., None]))
    for split in ("train", "val"):
        (root / f"ImageSets/Segmentation/{split}.txt").write_text("0\n1\n2\n3\n")
    source = voc_source(str(root))
    config = TrainConfig(task="segmentation", image_size=40, batch_size=4)
    images, masks, _ = next(iter(segmentation_train_dataset(source, config, _Context(), epoch=0)))
    assert images.shape == (4, 40, 40, 3) and masks.shape == (4, 40, 40) and masks.dtype == tf.int32
    labelled = masks.numpy() != IGNORE_LABEL
    expected = masks.numpy() * 20
    agree = np.abs(images.numpy()[..., 0] - expected) < 1
    assert labelled.any() and agree[labelled].mean() > 0.9
    # The crop's padding beyond the image is ignored, and black.
    assert np.all(images.numpy()[..., 0][~labelled] == 0)


def test_bad_folders_and_palette_masks_are_refused(tmp_path):
    with pytest.raises(ValueError, match="VOC-layout"):
        resolve_segmentation_source(str(tmp_path))
    root = tmp_path / "voc"
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / folder).mkdir(parents=True)
    image = np.zeros((16, 16, 3), np.uint8)
    tf.io.write_file(str(root / "JPEGImages/a.jpg"), tf.io.encode_jpeg(image))
    tf.io.write_file(str(root / "SegmentationClass/a.png"), tf.io.encode_png(image))  # an RGB mask
    for split in ("train", "val"):
        (root / f"ImageSets/Segmentation/{split}.txt").write_text("a\n")
    source = voc_source(str(root))
    dataset = segmentation_train_dataset(
        source, TrainConfig(task="segmentation", image_size=32, batch_size=1), _Context(), 0
    )
    with pytest.raises(tf.errors.InvalidArgumentError, match="one-channel PNG of class indices"):
        next(iter(dataset))


def test_undecodable_files_are_skipped_and_counted(tmp_path):
    root = tmp_path / "voc"
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / folder).mkdir(parents=True)
    for name in ("a", "b", "c"):
        tf.io.write_file(str(root / f"JPEGImages/{name}.jpg"), tf.io.encode_jpeg(np.zeros((16, 16, 3), np.uint8)))
        tf.io.write_file(str(root / f"SegmentationClass/{name}.png"), tf.io.encode_png(np.ones((16, 16, 1), np.uint8)))
    (root / "JPEGImages/b.jpg").write_bytes(b"not an image")
    for split in ("train", "val"):
        (root / f"ImageSets/Segmentation/{split}.txt").write_text("a\nb\nc\n")
    source = voc_source(str(root))
    config = TrainConfig(task="segmentation", image_size=32, batch_size=2)
    # Two passes over the 3 records (they repeat) give 2 batches; the count is cumulative.
    batches = list(segmentation_train_dataset(source, config, _Context(), 0, num_batches=2))
    images, masks, skipped = batches[1]
    assert images.shape == (2, 32, 32, 3) and 1 <= int(skipped) <= 2
    assert set(np.unique(masks.numpy())) <= {1, IGNORE_LABEL}
    evaluated = [m for _, m in segmentation_eval_dataset(source, config, 8)]
    assert sum(len(m) for m in evaluated) == 2  # the evaluation skips it too


def test_mean_iou_ignores_label_255_and_matches_a_confusion_matrix(tmp_path, dataset_dir):
    config = seg_config(tmp_path, dataset_dir, max_eval_images=12)
    source = resolve_segmentation_source("embedded", dataset_dir)
    model = build_segmenter(config, source.num_classes, aux_head=False)
    result = evaluate_segmentation(model, source, config, batch_size=5)

    images, masks = zip(*segmentation_eval_dataset(source, config, 12))
    truth = masks[0].numpy().ravel()
    predicted = np.argmax(model.predict_on_batch(images[0]), -1).ravel()
    keep = truth != IGNORE_LABEL
    confusion = np.zeros((11, 11))
    np.add.at(confusion, (truth[keep], predicted[keep]), 1)
    union = confusion.sum(0) + confusion.sum(1) - np.diag(confusion)
    present = union > 0
    assert result["miou"] == pytest.approx((np.diag(confusion)[present] / union[present]).mean(), abs=1e-5)
    assert result["pixel_accuracy"] == pytest.approx(np.diag(confusion).sum() / keep.sum(), abs=1e-6)


def test_training_lowers_the_loss_and_exports_the_inference_model(tmp_path, dataset_dir):
    config = seg_config(tmp_path, dataset_dir, steps=8, lr=2e-3, min_lr=2e-4)
    trainer = SegmentationTrainer(config, verbose=False)
    summary = trainer.run()
    assert np.mean(trainer.step_losses[-3:]) < np.mean(trainer.step_losses[:3]), trainer.step_losses
    for key in ("miou", "pixel_accuracy", "loss", "ema_miou"):
        assert 0 <= summary["eval"][key] and np.isfinite(summary["eval"][key])
    with open(os.path.join(config.model_dir, "summary.json")) as f:
        assert json.load(f)["eval"]["miou"] == summary["eval"]["miou"]
    exported = keras.models.load_model(os.path.join(config.model_dir, "model.keras"), compile=False)
    assert not any(layer.name.startswith("aux_") for layer in exported.layers)  # inference: no auxiliary head
    assert exported.output_shape == (None, SIZE, SIZE, 11)
    # The exported model is the EMA weights: it scores what the trainer's EMA evaluation scored.
    again = evaluate_segmentation(exported, resolve_segmentation_source("embedded", dataset_dir), config)
    assert again["miou"] == pytest.approx(summary["eval"]["ema_miou"], abs=1e-6)


class Interrupted(Exception):
    pass


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(tmp_path, dataset_dir, monkeypatch):
    # 800 images / batch 8 = 100 steps an epoch; interrupted after step 2 of 4.
    settings = dict(steps=4, epochs=1, max_eval_images=8, checkpoint_every=2, seed=3)
    straight = SegmentationTrainer(seg_config(tmp_path / "a", dataset_dir, **settings), verbose=False)
    straight.run()
    save = tf.train.CheckpointManager.save

    def save_then_die(manager, checkpoint_number=None, **kwargs):
        path = save(manager, checkpoint_number=checkpoint_number, **kwargs)
        if checkpoint_number == 2:
            raise Interrupted(path)
        return path

    monkeypatch.setattr(tf.train.CheckpointManager, "save", save_then_die)
    with pytest.raises(Interrupted):
        SegmentationTrainer(seg_config(tmp_path / "b", dataset_dir, **settings), verbose=False).run()
    monkeypatch.setattr(tf.train.CheckpointManager, "save", save)
    resumed = SegmentationTrainer(seg_config(tmp_path / "b", dataset_dir, **settings), verbose=False)
    resumed.run()
    # Not bitwise: concurrent ops reorder float sums from run to run (the loss of
    # step 4 differed by 3.6e-5 relative between two runs of this test on a 2-core
    # Xeon). Resuming at a wrong data position moves it by percents.
    np.testing.assert_allclose(resumed.step_losses, straight.step_losses[2:], rtol=1e-4)
    for x, y in zip(straight.ema_weights, resumed.ema_weights):
        np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-6)


def test_a_classification_config_is_refused():
    with pytest.raises(ValueError, match="--task segmentation"):
        SegmentationTrainer(TrainConfig())
    with pytest.raises(ValueError, match="Unknown --task"):
        TrainConfig(task="tracking")


def test_qat_fine_tunes_the_trained_segmenter_to_a_fully_int8_model(tmp_path, dataset_dir):
    from benchmarks.random_weights import randomize_keras_weights
    from quantization.qat import run_qat
    from quantization.quantize import quantizers

    # What a segmentation run exports (model.keras: DeepLabV3 without the auxiliary head), with
    # random weights of a trained model's spread (an untrained one predicts near-ties everywhere).
    float_model = randomize_keras_weights(
        build_segmenter(seg_config(tmp_path, dataset_dir), 11, aux_head=False), seed=5
    )
    float_model.save(tmp_path / "float.keras")
    config = seg_config(
        tmp_path / "qat", dataset_dir, steps=3, lr=1e-5, min_lr=1e-6, init_weights=str(tmp_path / "float.keras")
    )
    summary, report = run_qat(config, calibration_images=16, verbose=False)
    selection = summary["selection"]
    assert selection["metric"] == "miou" and selection["chosen"] in ("start", "fine-tuned")
    assert selection["evaluation_images"] == 200  # the whole split
    kept = keras.models.load_model(os.path.join(config.model_dir, "model.keras"), compile=False)
    assert quantizers(kept) and not any(layer.name.startswith("aux_") for layer in kept.layers)
    assert report["errors"] == [] and report["float_tensors_inside"] == [] and report["max_tensor_rank"] <= 4
    # The int8 TFLite model computes the QAT Keras model: the audit's per-pixel top-1 agreement
    # (>= 0.8 or no export), and logits a few output steps apart (the rounding of ~40 int8 layers).
    agreement = report["agreement"]
    assert agreement["top1_agreement"] >= 0.8
    assert agreement["mean_abs_error"] <= 5 * agreement["output_quantization_step"], agreement
    whole_split = dataclasses.replace(config, max_eval_images=0)
    again = evaluate_segmentation(kept, resolve_segmentation_source("embedded", dataset_dir), whole_split)
    assert again["miou"] == pytest.approx(selection[selection["chosen"].replace("-", "_")]["miou"], abs=1e-6)


def test_two_mirrored_replicas_take_the_one_device_steps(tmp_path, dataset_dir):
    """MirroredStrategy over 2 logical CPUs (a subprocess: devices are fixed
    at start-up) with the global batch of one device: the same per-step loss
    (the mean over the global batch's labelled pixels)."""
    import subprocess

    harness = os.path.join(os.path.dirname(__file__), "run_trainer.py")
    settings = dict(steps=2, max_eval_images=8, seed=3)
    mirrored = seg_config(tmp_path / "mirrored", dataset_dir, strategy="mirrored", **settings)
    command = [sys.executable, harness, "--config", json.dumps(mirrored.__dict__), "--logical_cpus", "2"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    losses = json.loads(result.stdout.strip().splitlines()[-1])["losses"]
    with open(os.path.join(mirrored.model_dir, "summary.json")) as f:
        summary = json.load(f)
    assert summary["num_replicas"] == 2 and 0 <= summary["eval"]["miou"] <= 1
    one_device = SegmentationTrainer(seg_config(tmp_path / "one", dataset_dir, **settings), verbose=False)
    one_device.run()
    # Not bitwise: each replica draws its own dropout masks (ASPP and auxiliary head, rate 0.1); a
    # loss averaged per replica instead of over the global batch would be off by far more.
    np.testing.assert_allclose(losses, one_device.step_losses, rtol=1e-2)
