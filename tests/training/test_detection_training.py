"""`--task detection`: COCO-format data, box-aware augmentation, anchor
matching, the multibox loss, COCO mAP, and real training runs of SSDLite."""

import dataclasses
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_mobilevitv2  # noqa: F401  (registers the layers for load_model)
from keras_mobilevitv2.detection import SSDLite
from keras_mobilevitv2.detection import model_anchors
from keras_mobilevitv2.detection.anchors import input_anchors
from keras_mobilevitv2.detection.box_coding import decode_boxes
from keras_mobilevitv2.detection.box_coding import match_anchors
from training import DetectionTrainer
from training import TrainConfig
from training.detection import coco_map
from training.detection import coco_results
from training.detection import evaluate_detection
from training.detection import multibox_loss
from training.detection_data import coco_source
from training.detection_data import embedded_detection_source
from training.detection_data import resolve_detection_source
from training.detection_pipeline import detection_train_dataset
from training.detection_pipeline import random_iou_crop

SIZE = 64


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("datasets"))
    embedded_detection_source(path)
    return path


def det_config(tmp_path, dataset_dir, **overrides):
    values = dict(
        task="detection",
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


def _write_coco(root, split, images, annotations, categories):
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / split).mkdir(exist_ok=True)
    for image in images:
        pixels = np.zeros((image["height"], image["width"], 3), np.uint8)
        tf.io.write_file(str(root / split / image["file_name"]), tf.io.encode_png(pixels))
    payload = {"images": images, "annotations": annotations, "categories": categories}
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(payload))


def _coco_folder(root):
    categories = [{"id": 7, "name": "cat"}, {"id": 3, "name": "ant"}]
    images = [{"id": i, "file_name": f"{i}.png", "height": 40, "width": 80} for i in (1, 2, 3)]
    annotations = [
        {"id": 1, "image_id": 1, "category_id": 7, "bbox": [8, 4, 40, 20], "iscrowd": 0, "area": 800},
        {"id": 2, "image_id": 1, "category_id": 3, "bbox": [0, 0, 80, 40], "iscrowd": 1, "area": 3200},
        {"id": 3, "image_id": 2, "category_id": 3, "bbox": [10, 10, 0.5, 9], "iscrowd": 0, "area": 4},
        {"id": 4, "image_id": 3, "category_id": 3, "bbox": [40, 20, 40, 20], "iscrowd": 0, "area": 800},
    ]
    _write_coco(root, "train", images, annotations, categories)
    # The evaluation's truth is what pycocotools reads: no sub-pixel box there.
    _write_coco(root, "val", images, [a for a in annotations if a["id"] != 3], categories)
    return coco_source(str(root))


def test_coco_folder_classes_boxes_and_left_out_annotations(tmp_path):
    source = _coco_folder(tmp_path / "coco")
    # Categories in ascending id order become 1, 2; 0 is the background.
    assert source.class_names == ["background", "ant", "cat"] and source.category_ids == [None, 3, 7]
    # Training: the crowd and the sub-pixel box are left out, and image 2 (no box left) with them.
    assert source.train.image_ids == [1, 3]
    np.testing.assert_allclose(source.train.boxes[0], [[0.1, 0.1, 0.6, 0.6]])
    assert source.train.labels[0].tolist() == [2] and source.train.labels[1].tolist() == [1]
    assert source.eval.image_ids == [1, 2, 3]  # the evaluation keeps every image


def test_bad_folders_are_refused(tmp_path):
    with pytest.raises(ValueError, match="COCO-format folder"):
        resolve_detection_source(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="instances_train"):
        coco_source(str(tmp_path))
    root = tmp_path / "coco"
    _coco_folder(root)
    payload = json.loads((root / "annotations/instances_val.json").read_text())
    payload["categories"] = payload["categories"][:1]
    (root / "annotations/instances_val.json").write_text(json.dumps(payload))
    with pytest.raises(ValueError, match="different categories"):
        coco_source(str(root))


def test_embedded_data_is_a_coco_folder_of_shapes(dataset_dir):
    source = resolve_detection_source("embedded", dataset_dir)
    assert source.num_classes == 11 and source.class_names[0] == "background"
    assert (source.train.num_examples, source.eval.num_examples) == (800, 200)
    counts = [len(labels) for labels in source.train.labels]
    assert min(counts) >= 1 and max(counts) <= 3
    boxes = np.concatenate(source.train.boxes)
    assert np.all(boxes[:, 2:] > boxes[:, :2]) and boxes.min() >= 0 and boxes.max() <= 1


@pytest.mark.parametrize("size", [96, 100])
def test_input_anchors_are_the_models(size):
    model = SSDLite(0.5, num_classes=3, input_shape=(size, size, 3))
    np.testing.assert_array_equal(input_anchors(size), model_anchors(model))


def test_matching_follows_ml_cvnets():
    anchors = np.array([[0.25, 0.25, 0.5, 0.5], [0.3, 0.3, 0.4, 0.4], [0.75, 0.75, 0.5, 0.5], [0.5, 0.5, 0.1, 0.1]])
    boxes = np.array([[0.0, 0.0, 0.5, 0.5], [0.45, 0.45, 0.6, 0.6]])
    deltas, classes = (t.numpy() for t in match_anchors(anchors.astype(np.float32), boxes, [3, 5]))
    # Anchor 0 covers box 0 exactly, anchor 1 overlaps it at IoU 0.64; anchor 3 is box 1's best
    # (IoU ~0.44 < 0.5: kept only because every box keeps its best anchor); anchor 2 is background.
    assert classes.tolist() == [3, 3, 0, 5]
    cx, cy, w, h = anchors[1]
    expected = [(0.25 - cx) / w / 0.1, (0.25 - cy) / h / 0.1, np.log(0.5 / w) / 0.2, np.log(0.5 / h) / 0.2]
    np.testing.assert_allclose(deltas[1], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(decode_boxes(anchors, deltas).numpy()[[0, 1, 3]], boxes[[0, 0, 1]], atol=1e-6)
    assert np.all(deltas[2] == 0)
    empty_deltas, empty_classes = match_anchors(anchors.astype(np.float32), np.zeros((0, 4)), np.zeros((0,)))
    assert not np.any(empty_classes.numpy()) and not np.any(empty_deltas.numpy())


def _loss_oracle(deltas, classes, box_deltas, logits, ratio=3):
    """ml-cvnets' SSDLoss, one image and one anchor at a time."""
    log_softmax = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    box_loss = class_loss = 0.0
    for b in range(len(classes)):
        positive = classes[b] > 0
        background = np.where(positive, -np.inf, -log_softmax[b, :, 0])
        hardest = np.argsort(-background, kind="stable")[: ratio * positive.sum()]
        chosen = positive.copy()
        chosen[hardest] = True
        class_loss -= sum(log_softmax[b, i, classes[b, i]] for i in np.nonzero(chosen)[0])
        error = np.abs(box_deltas[b] - deltas[b])[positive]
        box_loss += np.where(error < 1, 0.5 * error**2, error - 0.5).sum()
    return box_loss, class_loss


def test_multibox_loss_mines_three_negatives_per_positive():
    rng = np.random.default_rng(0)
    classes = np.zeros((2, 40), np.int32)
    classes[0, [3, 9]] = [1, 4]
    classes[1, [0, 5, 6, 30]] = [2, 2, 3, 1]
    deltas = rng.normal(size=(2, 40, 4)).astype(np.float32) * (classes[..., None] > 0)
    outputs = {
        "box_deltas": rng.normal(size=(2, 40, 4)).astype(np.float32),
        "class_logits": rng.normal(size=(2, 40, 5)).astype(np.float32) * 3,
    }
    box_loss, class_loss = multibox_loss(deltas, classes, outputs)
    expected = _loss_oracle(deltas, classes, outputs["box_deltas"], outputs["class_logits"])
    np.testing.assert_allclose([float(box_loss), float(class_loss)], expected, rtol=1e-5)


def test_iou_crop_keeps_each_box_on_its_pixels():
    """Boxes painted in their own grey level: after any crop, each kept box's
    centre pixel still has its level, and the kept boxes lie in [0, 1]."""
    image = np.zeros((60, 90, 3), np.float32)
    boxes = np.array([[0.1, 0.1, 0.4, 0.5], [0.5, 0.2, 0.9, 0.9], [0.2, 0.6, 0.45, 0.95]], np.float32)
    for k, (x0, y0, x1, y1) in enumerate(boxes):
        image[int(y0 * 60) : int(y1 * 60), int(x0 * 90) : int(x1 * 90)] = 50 * (k + 1)
    cropped_any = False
    for seed in range(30):
        crop, kept, labels = random_iou_crop(tf.constant(image), tf.constant(boxes), tf.constant([1, 2, 3]), [seed, 7])
        crop, kept, labels = crop.numpy(), kept.numpy(), labels.numpy()
        cropped_any |= crop.shape != image.shape
        assert len(kept) >= 1 and kept.min() >= 0 and kept.max() <= 1
        height, width = crop.shape[:2]
        for (x0, y0, x1, y1), label in zip(kept, labels):
            pixel = crop[int((y0 + y1) / 2 * height), int((x0 + x1) / 2 * width), 0]
            assert pixel == 50 * label
    assert cropped_any


def test_training_batches_hold_each_anchors_target(dataset_dir):
    source = resolve_detection_source("embedded", dataset_dir)
    config = TrainConfig(task="detection", image_size=SIZE, batch_size=4)
    images, (deltas, classes), skipped = next(iter(detection_train_dataset(source, config, _Context(), 0)))
    anchors = len(input_anchors(SIZE))
    assert images.shape == (4, SIZE, SIZE, 3) and deltas.shape == (4, anchors, 4) and classes.shape == (4, anchors)
    assert int(skipped) == 0 and tf.reduce_all(tf.reduce_any(classes > 0, 1))  # every image has an object
    assert int(tf.reduce_max(classes)) <= 10


def test_coco_map_of_the_truth_is_one(tmp_path):
    source = _coco_folder(tmp_path / "coco")
    split = source.eval
    boxes = np.zeros((3, 2, 4), np.float32)
    classes = np.ones((3, 2), np.int32)
    counts = np.array([len(b) for b in split.boxes])  # image 2 has none: no detection
    for i, (image_boxes, labels) in enumerate(zip(split.boxes, split.labels)):
        boxes[i, : len(image_boxes)], classes[i, : len(labels)] = image_boxes, labels
    scores = np.ones((3, 2), np.float32)
    results = coco_results(split, source.category_ids, split.image_ids, boxes, classes, scores, counts)
    assert {k: results[0][k] for k in ("image_id", "category_id", "score")} == {
        "image_id": 1,
        "category_id": 7,
        "score": 1,
    }
    np.testing.assert_allclose(results[0]["bbox"], [8, 4, 40, 20], rtol=1e-6)  # pixels, [x, y, w, h]
    assert coco_map(split, results, split.image_ids)[0] == pytest.approx(1.0)
    shifted = [dict(r, bbox=[r["bbox"][0] + 8] + r["bbox"][1:]) for r in results]
    assert 0 < coco_map(split, shifted, split.image_ids)[0] < 0.7


# One short run serves three tests: training and export, resume, mirrored replicas.
STRAIGHT = dict(steps=4, max_eval_images=8, checkpoint_every=2, seed=3, lr=2e-3, min_lr=2e-4)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, dataset_dir):
    trainer = DetectionTrainer(det_config(tmp_path_factory.mktemp("straight"), dataset_dir, **STRAIGHT), verbose=False)
    return trainer, trainer.run()


def test_training_lowers_the_loss_and_exports_the_detector(straight, dataset_dir):
    trainer, summary = straight
    assert np.mean(trainer.step_losses[2:]) < np.mean(trainer.step_losses[:2]), trainer.step_losses
    for key in ("map", "map50", "ema_map", "ema_map50"):
        assert 0 <= summary["eval"][key] <= 1
    model_dir = trainer.config.model_dir
    with open(os.path.join(model_dir, "summary.json")) as f:
        assert json.load(f)["eval"]["map"] == summary["eval"]["map"]
    exported = keras.models.load_model(os.path.join(model_dir, "model.keras"), compile=False)
    assert set(exported.output) == {"box_deltas", "class_logits"}
    # The exported model is the EMA weights: it scores what the trainer's EMA evaluation scored.
    again = evaluate_detection(exported, resolve_detection_source("embedded", dataset_dir), trainer.config)
    assert again["map"] == pytest.approx(summary["eval"]["ema_map"], abs=1e-9)


class Interrupted(Exception):
    pass


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(straight, tmp_path, dataset_dir, monkeypatch):
    save = tf.train.CheckpointManager.save

    def save_then_die(manager, checkpoint_number=None, **kwargs):
        path = save(manager, checkpoint_number=checkpoint_number, **kwargs)
        if checkpoint_number == 2:
            raise Interrupted(path)
        return path

    monkeypatch.setattr(tf.train.CheckpointManager, "save", save_then_die)
    with pytest.raises(Interrupted):
        DetectionTrainer(det_config(tmp_path, dataset_dir, **STRAIGHT), verbose=False).run()
    monkeypatch.setattr(tf.train.CheckpointManager, "save", save)
    resumed = DetectionTrainer(det_config(tmp_path, dataset_dir, **STRAIGHT), verbose=False)
    resumed.run()
    np.testing.assert_allclose(resumed.step_losses, straight[0].step_losses[2:], rtol=1e-5)
    for x, y in zip(straight[0].ema_weights, resumed.ema_weights):
        np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-6)


def test_two_mirrored_replicas_take_the_one_device_steps(straight, tmp_path, dataset_dir):
    """MirroredStrategy over 2 logical CPUs with the global batch of one
    device: the same per-step loss (the global batch's loss per positive
    anchor, the hard negatives mined per image)."""
    harness = os.path.join(os.path.dirname(__file__), "run_trainer.py")
    mirrored = det_config(tmp_path, dataset_dir, strategy="mirrored", **STRAIGHT)
    command = [sys.executable, harness, "--config", json.dumps(mirrored.__dict__), "--logical_cpus", "2"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    losses = json.loads(result.stdout.strip().splitlines()[-1])["losses"]
    with open(os.path.join(mirrored.model_dir, "summary.json")) as f:
        assert json.load(f)["num_replicas"] == 2
    np.testing.assert_allclose(losses, straight[0].step_losses, rtol=1e-4)


def test_init_weights_load_a_detector_or_a_classifiers_backbone(straight, tmp_path):
    from training.detection import build_detector
    from training.trainer import build_model

    trainer, _ = straight
    exported = os.path.join(trainer.config.model_dir, "model.keras")
    detector = build_detector(trainer.config, 11, init_weights=exported)
    for x, y in zip(detector.weights, keras.models.load_model(exported, compile=False).weights):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    classifier = build_model(trainer.config, 10)
    classifier.save(tmp_path / "classifier.keras")
    detector = build_detector(trainer.config, 11, init_weights=str(tmp_path / "classifier.keras"))
    stem = classifier.get_layer("stem_conv").kernel
    np.testing.assert_array_equal(np.asarray(detector.get_layer("stem_conv").kernel), np.asarray(stem))
    with pytest.raises(ValueError, match="another width"):
        build_detector(dataclasses.replace(trainer.config, model="mobilevitv2_075"), 11, init_weights=exported)


@pytest.mark.slow  # about 160 s on 2 cores: `make test-slow` (CI runs it)
def test_qat_fine_tunes_the_trained_detector_to_a_fully_int8_model(straight, tmp_path, dataset_dir):
    from quantization.qat import run_qat
    from quantization.quantize import quantizers

    trained = os.path.join(straight[0].config.model_dir, "model.keras")
    config = det_config(tmp_path, dataset_dir, steps=2, lr=1e-5, min_lr=1e-6, init_weights=trained)
    summary, report = run_qat(config, calibration_images=16, verbose=False)
    selection = summary["selection"]
    assert selection["metric"] == "map" and selection["chosen"] in ("start", "fine-tuned")
    assert selection["evaluation_images"] == 200  # the whole split
    kept = keras.models.load_model(os.path.join(config.model_dir, "model.keras"), compile=False)
    assert quantizers(kept) and set(kept.output) == {"box_deltas", "class_logits"}
    # The int8 TFLite detector: int8 up to TFLite's own post-processing op, which ends it.
    assert report["errors"] == [] and report["float_tensors_inside"] == [] and report["max_tensor_rank"] <= 4
    assert report["postprocess_ops"] == 1 and report["input"]["dtype"] == "INT8" and os.path.exists(report["path"])
    whole_split = dataclasses.replace(config, max_eval_images=0)
    again = evaluate_detection(kept, resolve_detection_source("embedded", dataset_dir), whole_split)
    assert again["map"] == pytest.approx(selection[selection["chosen"].replace("-", "_")]["map"], abs=1e-9)


def test_other_tasks_are_refused():
    with pytest.raises(ValueError, match="--task detection"):
        DetectionTrainer(TrainConfig())
