"""Schedule, recipe presets and augmentations."""

import math

import numpy as np
import pytest
import tensorflow as tf

from training import RECIPES
from training import TrainConfig
from training.augment import mixup_or_cutmix
from training.augment import random_erasing
from training.augment import random_resized_crop
from training.schedule import WarmupCosine


def test_warmup_then_epochwise_cosine():
    schedule = WarmupCosine(max_lr=1e-2, min_lr=1e-3, warmup_steps=10, warmup_init_lr=1e-6, steps_per_epoch=5, epochs=10)
    assert float(schedule(0)) == pytest.approx(1e-6)
    assert float(schedule(5)) == pytest.approx(1e-6 + (1e-2 - 1e-6) * 0.5)
    # after warm-up: constant within an epoch, cosine across epochs
    assert float(schedule(10)) == float(schedule(14))
    expected = 1e-3 + 0.5 * (1e-2 - 1e-3) * (1 + math.cos(math.pi * 2 / 10))
    assert float(schedule(10)) == pytest.approx(expected)
    assert float(schedule(50)) == pytest.approx(1e-3)


def test_recipe_presets_follow_ml_cvnets():
    assert RECIPES["mobilevitv2_200"] == dict(width=2.0, lr=0.002, min_lr=0.0002, weight_decay=0.05)
    config = TrainConfig(model="mobilevitv2_100")
    assert (config.lr, config.min_lr, config.weight_decay) == (0.0075, 0.00075, 0.013)
    assert TrainConfig(model="mobilevitv2_100", lr=0.001).lr == 0.001
    with pytest.raises(ValueError, match="Unknown --model"):
        TrainConfig(model="resnet50")
    with pytest.raises(ValueError, match="Unknown --strategy"):
        TrainConfig(strategy="horovod")
    with pytest.raises(ValueError, match="Unknown --attention_norm"):
        TrainConfig(attention_norm="group_norm")
    assert TrainConfig(attention_norm="batch_norm_2d").attention_norm == "batch_norm_2d"


def test_mixup_and_cutmix_keep_labels_a_distribution():
    images = tf.random.uniform((8, 32, 32, 3), 0, 255)
    labels = tf.one_hot(tf.range(8) % 4, 4)
    for seed in range(12):
        mixed, mixed_labels = mixup_or_cutmix(images, labels, tf.constant([seed, 1], tf.int64))
        assert mixed.shape == images.shape
        np.testing.assert_allclose(tf.reduce_sum(mixed_labels, -1).numpy(), 1.0, rtol=1e-5)
    same, same_labels = mixup_or_cutmix(images, labels, tf.constant([0, 0], tf.int64), 0.0, 0.0)
    assert same is images and same_labels is labels


def test_crop_and_erasing():
    image = tf.cast(tf.random.uniform((50, 70, 3), 0, 255, tf.int32), tf.uint8)
    crop = random_resized_crop(image, 32, tf.constant([1, 2], tf.int64))
    assert crop.shape == (32, 32, 3) and crop.dtype == tf.float32
    x = tf.ones((32, 32, 3)) * 100
    assert float(tf.reduce_min(random_erasing(x, 0.0, tf.constant([3, 4], tf.int64)))) == 100.0
    erased = random_erasing(x, 1.0, tf.constant([3, 4], tf.int64))
    assert 0 < float(tf.reduce_mean(tf.cast(erased == 0, tf.float32))) < 0.5


def test_prepare_digits_writes_a_real_image_folder(tmp_path):
    pytest.importorskip("sklearn")
    from training.data import folder_source
    from training.prepare_digits import write_digits

    counts = write_digits(str(tmp_path / "digits"), size=16)
    assert counts == {"train": 1438, "val": 359}
    source = folder_source(str(tmp_path / "digits"))
    assert source.class_names == [str(i) for i in range(10)]
    assert source.train.num_examples == 1438 and source.eval.num_examples == 359
    with pytest.raises(SystemExit, match="not empty"):
        write_digits(str(tmp_path / "digits"))
