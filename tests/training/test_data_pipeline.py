"""The input pipeline: augmentation draws that depend on the seed alone, and
evaluation subsets that cover every class."""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from training import TrainConfig
from training.augment import RANDAUGMENT_OPS
from training.augment import TrainAugmentation
from training.augment import rand_augment
from training.data import eval_dataset
from training.data import folder_source
from training.data import train_dataset


def _image(size=40, seed=0):
    return tf.constant(np.random.RandomState(seed).randint(0, 256, (size, size, 3)).astype(np.uint8))


def _seed(a, b):
    return tf.constant([a, b], tf.int64)


def test_rand_augment_is_a_function_of_the_seed():
    image = tf.cast(_image(), tf.float32)
    first = rand_augment(image, _seed(3, 7))
    np.testing.assert_array_equal(first, rand_augment(image, _seed(3, 7)))
    outputs = [rand_augment(image, _seed(3, i)).numpy() for i in range(8)]
    distinct = {output.tobytes() for output in outputs}
    assert len(distinct) >= 6  # two seeds may draw the same two ops
    assert len(RANDAUGMENT_OPS) == 14  # torchvision's list


def test_every_rand_augment_op_keeps_the_range_and_shape():
    image = tf.cast(_image(), tf.float32)
    for name, op in RANDAUGMENT_OPS:
        for sign in (1.0, -1.0):
            out = op(image, 9 / 30, tf.constant(sign)).numpy()
            assert out.shape == (40, 40, 3), name
            assert 0.0 <= out.min() and out.max() <= 255.0, name
            changed = not np.allclose(out, image.numpy())
            assert changed == (name not in ("identity", "autocontrast")), name  # noise spans 0..255


def test_rand_augment_ops_match_torchvision():
    """Each op at magnitude 9 of 31, both signs, against torchvision's
    RandAugment ops (bilinear, fill 0) on uint8: within its rounding."""
    torch = pytest.importorskip("torch")
    autoaugment = pytest.importorskip("torchvision.transforms.autoaugment")
    from torchvision.transforms import InterpolationMode

    y, x = np.mgrid[0:48, 0:48]
    image = np.stack([(x * 5) % 256, (y * 5) % 256, ((x + y) * 3) % 256], -1).astype(np.uint8)
    image[10:30, 15:35] = np.random.RandomState(0).randint(0, 256, (20, 20, 3))
    tensor = torch.from_numpy(image).permute(2, 0, 1).contiguous()
    space = autoaugment.RandAugment()._augmentation_space(31, (48, 48))
    names = dict(zip([name for name, _ in RANDAUGMENT_OPS], space))  # the same order
    for name, op in RANDAUGMENT_OPS:
        magnitudes, signed = space[names[name]]
        for sign in (1.0, -1.0):
            magnitude = float(magnitudes[9]) if magnitudes.ndim > 0 else 0.0
            magnitude = -magnitude if signed and sign < 0 else magnitude
            expected = autoaugment._apply_op(tensor, names[name], magnitude, InterpolationMode.BILINEAR, None)
            expected = expected.permute(1, 2, 0).numpy().astype(np.float32)
            actual = op(tf.constant(image, tf.float32), 9 / 30, tf.constant(sign)).numpy()
            assert np.abs(actual - expected).mean() < 1.0 and np.abs(actual - expected).max() < 2.0, (name, sign)


def test_train_augmentation_draws_only_from_the_seed():
    augmentation = TrainAugmentation(32, randaugment=True, erasing=0.25)
    image = _image()
    np.testing.assert_array_equal(augmentation(image, _seed(1, 2)), augmentation(image, _seed(1, 2)))
    # the same under a parallel tf.data map, where calls run in any order
    seeds = tf.data.Dataset.range(16).map(lambda i: tf.stack([tf.constant(1, tf.int64), i % 2 + 2]))
    images = seeds.map(lambda seed: augmentation(image, seed), num_parallel_calls=8)
    outputs = list(images.as_numpy_iterator())
    assert not np.array_equal(outputs[0], outputs[1])
    for index, output in enumerate(outputs):
        np.testing.assert_array_equal(output, outputs[index % 2])


def _symmetric_folder(root, classes=2, per_class=4, size=40):
    """Identical left-right symmetric images: crop (scale 1) and flip change
    nothing, so only RandAugment makes the images differ."""
    half = np.random.RandomState(0).randint(0, 256, (size, size // 2, 3)).astype(np.uint8)
    image = np.concatenate([half, half[:, ::-1]], axis=1)
    for label in range(classes):
        for i in range(per_class):
            path = root / "train" / f"c{label}" / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            tf.io.write_file(str(path), tf.io.encode_png(image))
    return root


def _train_config(data, **overrides):
    values = dict(
        data=str(data),
        image_size=32,
        batch_size=4,
        crop_min_scale=1.0,
        randaugment=True,
        mixup_alpha=0.0,
        cutmix_alpha=0.0,
        random_erasing=0.0,
    )
    values.update(overrides)
    return TrainConfig(**values)


def _batches(source, config, epoch, count, skip=0):
    context = tf.distribute.InputContext(1, 0, 1)
    dataset = train_dataset(source, config, context, epoch, skip_batches=skip).take(count)
    return [images.numpy() for images, _, _ in dataset]


def test_each_epoch_draws_new_rand_augment_ops(tmp_path):
    source = folder_source(str(_symmetric_folder(tmp_path / "data")))
    config = _train_config(tmp_path / "data")
    epoch0 = np.concatenate(_batches(source, config, epoch=0, count=2))
    epoch1 = np.concatenate(_batches(source, config, epoch=1, count=2))
    assert len({image.tobytes() for image in epoch0}) >= 4  # images differ within an epoch
    differing = sum(not np.array_equal(a, b) for a, b in zip(sorted(epoch0.tolist()), sorted(epoch1.tolist())))
    assert differing >= 4, "epoch 1 repeats the augmentations of epoch 0"


def test_a_resumed_epoch_gets_the_same_batches(tmp_path):
    source = folder_source(str(_symmetric_folder(tmp_path / "data", per_class=6)))
    # every augmentation on, as the recipe
    config = _train_config(
        tmp_path / "data", crop_min_scale=0.08, mixup_alpha=0.2, cutmix_alpha=1.0, random_erasing=0.25
    )
    straight = _batches(source, config, epoch=1, count=3)
    resumed = _batches(source, config, epoch=1, count=1, skip=2)
    np.testing.assert_array_equal(resumed[0], straight[2])


def _class_folder(root, counts):
    for label, count in enumerate(counts):
        for i in range(count):
            path = root / "val" / f"class{label}" / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            tf.io.write_file(str(path), tf.io.encode_png(np.full((8, 8, 3), 10 * label, np.uint8)))
            train = root / "train" / f"class{label}" / f"{i}.png"
            train.parent.mkdir(parents=True, exist_ok=True)
            tf.io.write_file(str(train), tf.io.encode_png(np.full((8, 8, 3), 10 * label, np.uint8)))
    return root


def _eval_labels(source, config):
    return np.concatenate([labels.numpy() for _, labels in eval_dataset(source, config, 4)])


def test_max_eval_images_spreads_over_the_classes(tmp_path):
    source = folder_source(str(_class_folder(tmp_path / "data", [5, 3, 6, 4])))
    config = TrainConfig(data=str(tmp_path / "data"), image_size=32, max_eval_images=10)
    labels = _eval_labels(source, config)
    # 10 of 18 images over 4 classes: 3, 3 (all of class 1), 2, 2 or so; every class is there
    assert len(labels) == 10
    counts = np.bincount(labels, minlength=4)
    assert counts.min() >= 2 and counts.max() <= 3, counts
    np.testing.assert_array_equal(_eval_labels(source, config), labels)  # the same subset each time
    everything = _eval_labels(source, dataclasses.replace(config, max_eval_images=0))
    assert len(everything) == 18
