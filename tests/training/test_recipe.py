"""Schedule, recipe presets and augmentations."""

import json
import math
import os

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
    schedule = WarmupCosine(
        max_lr=1e-2, min_lr=1e-3, warmup_steps=10, warmup_init_lr=1e-6, steps_per_epoch=5, epochs=10
    )
    assert float(schedule(0)) == pytest.approx(1e-6)
    assert float(schedule(5)) == pytest.approx(1e-6 + (1e-2 - 1e-6) * 0.5)
    # after warm-up: constant within an epoch, cosine across epochs
    assert float(schedule(10)) == float(schedule(14))
    expected = 1e-3 + 0.5 * (1e-2 - 1e-3) * (1 + math.cos(math.pi * 2 / 10))
    assert float(schedule(10)) == pytest.approx(expected)
    assert float(schedule(50)) == pytest.approx(1e-3)


REFERENCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "ml_cvnets_recipe.json")


@pytest.fixture(scope="module")
def reference():
    """ml-cvnets' published values, each with the file it was read from."""
    with open(REFERENCE) as f:
        recipe = json.load(f)
    for name, entry in recipe["values"].items():
        assert entry["source"] in recipe["sources"], name
    for source in recipe["sources"].values():
        assert source["path"]
    return recipe


def _value(reference, name):
    return reference["values"][name]["value"]


def test_per_width_presets_match_the_ml_cvnets_readme(reference):
    widths = reference["per_width"]["widths"]
    assert len(RECIPES) == len(widths) == 7
    for name, preset in RECIPES.items():
        published = {float(width): values for width, values in widths.items()}[preset["width"]]
        assert preset["lr"] == pytest.approx(published["max_lr"], rel=1e-12), name
        assert preset["min_lr"] == pytest.approx(published["min_lr"], rel=1e-12), name
        assert preset["weight_decay"] == pytest.approx(published["weight_decay"], rel=1e-12), name
        config = TrainConfig(model=name)  # fields left None take the preset
        assert (config.lr, config.min_lr, config.weight_decay) == (
            preset["lr"],
            preset["min_lr"],
            preset["weight_decay"],
        )
    # the yaml itself is the 2.0 configuration: the readme agrees with it
    in_yaml = reference["per_width"]["width_2.0_in_yaml"]
    assert (in_yaml["max_lr"], in_yaml["min_lr"], in_yaml["weight_decay"]) == tuple(
        widths["2.0"][k] for k in ("max_lr", "min_lr", "weight_decay")
    )


def test_run_defaults_match_the_ml_cvnets_config(reference):
    from training.recipe import RECIPE_BATCH_SIZE

    config = TrainConfig()
    assert RECIPE_BATCH_SIZE == _value(reference, "effective_batch_size")
    assert config.epochs == _value(reference, "epochs")
    assert config.warmup_init_lr == _value(reference, "warmup_init_lr")
    assert config.warmup_steps is None  # the trainer's default: min(warmup_iterations, total // 10)
    assert config.label_smoothing == _value(reference, "label_smoothing")
    assert config.ema_decay == pytest.approx(1.0 - _value(reference, "ema_momentum"), abs=1e-15)
    assert config.grad_clip_norm == _value(reference, "grad_clip")
    assert config.mixup_alpha == _value(reference, "mixup_alpha")
    assert config.cutmix_alpha == _value(reference, "cutmix_alpha")
    assert config.random_erasing == _value(reference, "random_erase_p")
    assert config.randaugment is _value(reference, "rand_augment")
    assert config.randaugment_magnitude == _value(reference, "rand_augment_magnitude")
    assert config.crop_min_scale == _value(reference, "random_resized_crop_scale")[0]
    assert config.image_size == _value(reference, "train_image_size")
    assert int(round(config.image_size / config.eval_resize_ratio)) == _value(reference, "eval_resize")
    assert config.attention_norm == _value(reference, "attention_norm")


def test_augmentation_defaults_match_the_ml_cvnets_code(reference):
    import inspect

    from training import augment

    def default(function, name):
        return inspect.signature(function).parameters[name].default

    assert list(default(augment.random_resized_crop, "scale")) == _value(reference, "random_resized_crop_scale")
    assert list(default(augment.random_resized_crop, "ratio")) == pytest.approx(
        _value(reference, "random_resized_crop_aspect_ratio"), rel=1e-12
    )
    assert list(default(augment.random_erasing, "scale")) == _value(reference, "random_erase_scale")
    assert list(default(augment.random_erasing, "ratio")) == _value(reference, "random_erase_ratio")
    assert default(augment.mixup_or_cutmix, "mixup_alpha") == _value(reference, "mixup_alpha")
    assert default(augment.mixup_or_cutmix, "cutmix_alpha") == _value(reference, "cutmix_alpha")
    assert default(augment.mixup_or_cutmix, "probability") == _value(reference, "mixup_cutmix_p")
    assert default(augment.rand_augment, "num_ops") == _value(reference, "rand_augment_num_ops")
    assert default(augment.rand_augment, "num_bins") == _value(reference, "rand_augment_num_magnitude_bins")
    assert default(augment.TrainAugmentation, "num_bins") == _value(reference, "rand_augment_num_magnitude_bins")


def test_batch_norm_momentum_matches_the_ml_cvnets_config(reference):
    import keras

    from keras_mobilevitv2.mobilevitv2 import MobileViTv2

    model = MobileViTv2(0.5, weights=None, input_shape=(64, 64, 3), classes=10)
    norms = [layer for layer in model._flatten_layers() if isinstance(layer, keras.layers.BatchNormalization)]
    assert len(norms) > 10
    for layer in norms:  # PyTorch momentum m is Keras momentum 1 - m
        assert layer.momentum == pytest.approx(1.0 - _value(reference, "batch_norm_momentum"), abs=1e-12), layer.name


def test_trainer_optimizer_matches_the_ml_cvnets_config(tmp_path, reference):
    """AdamW betas / eps, weight decay off for 1-D parameters (BN, biases)."""
    import sys

    import keras

    from training import Trainer

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import equivalence_worker

    for split in ("train", "val"):
        for label in range(2):
            folder = tmp_path / "data" / split / f"c{label}"
            folder.mkdir(parents=True)
            for i in range(4):
                image = np.full((36, 36, 3), 60 + 120 * label + i, np.uint8)
                tf.io.write_file(str(folder / f"{i}.png"), tf.io.encode_png(image))
    config = TrainConfig(
        data=str(tmp_path / "data"),
        model_dir=str(tmp_path / "run"),
        strategy="one_device",
        image_size=32,
        batch_size=4,
        steps=1,
        randaugment=False,
        max_eval_images=4,
        model="mobilevitv2_100",
    )
    trainer = Trainer(config, verbose=False, model_fn=equivalence_worker.model_fn("tiny"))
    trainer.run()
    optimizer = trainer.optimizer
    assert _value(reference, "optimizer") == "adamw" and isinstance(optimizer, keras.optimizers.AdamW)
    assert optimizer.beta_1 == _value(reference, "adamw_beta1")
    assert optimizer.beta_2 == _value(reference, "adamw_beta2")
    assert optimizer.epsilon == _value(reference, "adamw_eps")
    assert optimizer.weight_decay == pytest.approx(RECIPES["mobilevitv2_100"]["weight_decay"])
    assert _value(reference, "no_decay_bn_filter_bias") is True
    for variable in trainer.model.trainable_variables:
        assert optimizer._use_weight_decay(variable) == (len(variable.shape) > 1), variable.path


def test_config_errors():
    assert TrainConfig(model="mobilevitv2_100", lr=0.001).lr == 0.001
    with pytest.raises(ValueError, match="Unknown --model"):
        TrainConfig(model="resnet50")
    with pytest.raises(ValueError, match="Unknown --strategy"):
        TrainConfig(strategy="horovod")
    with pytest.raises(ValueError, match="Unknown --attention_norm"):
        TrainConfig(attention_norm="group_norm")
    assert TrainConfig(attention_norm="batch_norm_2d").attention_norm == "batch_norm_2d"
    with pytest.raises(ValueError, match="--warmup_steps must be >= 0"):
        TrainConfig(warmup_steps=-1)  # the pipeline's --qat_warmup_steps ends here too
    assert TrainConfig(warmup_steps=0).warmup_steps == 0


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


def test_prepare_photos_keeps_validation_pixels_out_of_training(tmp_path):
    pytest.importorskip("skimage")
    from training.data import folder_source
    from training.prepare_photos import PHOTOGRAPHS
    from training.prepare_photos import VAL_FRACTION
    from training.prepare_photos import load_photograph
    from training.prepare_photos import patch_boxes
    from training.prepare_photos import write_photos

    counts = write_photos(str(tmp_path / "photos"), size=16, train_per_class=3, val_per_class=2)
    assert counts == {"train": 3 * len(PHOTOGRAPHS), "val": 2 * len(PHOTOGRAPHS)}
    source = folder_source(str(tmp_path / "photos"))
    assert source.class_names == sorted(PHOTOGRAPHS) and source.eval.num_examples == 24
    patch = next((tmp_path / "photos" / "val" / "moon").iterdir())  # a grayscale photograph, as RGB
    assert tf.io.decode_png(tf.io.read_file(str(patch))).shape == (16, 16, 3)
    for name in PHOTOGRAPHS:
        height, width = load_photograph(name).shape[:2]
        boundary = round(width * (1 - VAL_FRACTION))
        rng = np.random.RandomState(0)
        assert all(left + side <= boundary for _, left, side in patch_boxes(height, width, 50, "train", rng))
        assert all(
            left >= boundary and left + side <= width for _, left, side in patch_boxes(height, width, 50, "val", rng)
        )
        assert all(top + side <= height for top, _, side in patch_boxes(height, width, 50, "val", rng))
    with pytest.raises(SystemExit, match="not empty"):
        write_photos(str(tmp_path / "photos"))
