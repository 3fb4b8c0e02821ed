"""Training augmentations of the ml-cvnets recipe, as tf.data-friendly ops.

Per image: random resized crop (bicubic), horizontal flip, RandAugment,
random erasing. Per batch: mixup or cutmix. Images are float32 RGB in
[0, 255] throughout (the models rescale internally).
"""

import keras
import tensorflow as tf


def random_resized_crop(image, size, seed, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision RandomResizedCrop: crop a random area/aspect, resize bicubic."""
    begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image),
        bounding_boxes=tf.zeros((1, 0, 4)),
        seed=seed,
        min_object_covered=0.0,
        aspect_ratio_range=ratio,
        area_range=scale,
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    crop = tf.slice(image, begin, crop_size)
    resized = tf.image.resize(tf.cast(crop, tf.float32), (size, size), method="bicubic")
    return tf.clip_by_value(resized, 0.0, 255.0)


def random_erasing(image, probability, seed, scale=(0.02, 0.33), ratio=(0.3, 3.3)):
    """torchvision RandomErasing (value=0): erase one random rectangle."""
    seeds = tf.random.experimental.stateless_split(seed, 5)
    height = tf.shape(image)[0]
    width = tf.shape(image)[1]
    area = tf.cast(height * width, tf.float32)
    target_area = area * tf.random.stateless_uniform((), seeds[0], scale[0], scale[1])
    log_ratio = tf.random.stateless_uniform(
        (), seeds[1], tf.math.log(ratio[0]), tf.math.log(ratio[1])
    )
    aspect = tf.exp(log_ratio)
    erase_h = tf.cast(tf.round(tf.sqrt(target_area * aspect)), tf.int32)
    erase_w = tf.cast(tf.round(tf.sqrt(target_area / aspect)), tf.int32)
    erase_h = tf.clip_by_value(erase_h, 1, height)
    erase_w = tf.clip_by_value(erase_w, 1, width)
    top = tf.random.stateless_uniform((), seeds[2], 0, height - erase_h + 1, dtype=tf.int32)
    left = tf.random.stateless_uniform((), seeds[3], 0, width - erase_w + 1, dtype=tf.int32)
    rows = tf.range(height)[:, None]
    cols = tf.range(width)[None, :]
    inside = (rows >= top) & (rows < top + erase_h) & (cols >= left) & (cols < left + erase_w)
    apply = tf.random.stateless_uniform((), seeds[4]) < probability
    mask = tf.cast(inside & apply, image.dtype)[..., None]
    return image * (1.0 - mask)


def _beta(alpha, seed):
    seeds = tf.random.experimental.stateless_split(seed, 2)
    a = tf.random.stateless_gamma((), seeds[0], alpha)
    b = tf.random.stateless_gamma((), seeds[1], alpha)
    return a / (a + b)


def mixup_or_cutmix(images, labels, seed, mixup_alpha=0.2, cutmix_alpha=1.0, probability=0.5):
    """One of mixup / cutmix chosen at random per batch, applied with `probability`.

    As ml-cvnets: `random.choice` between the two, each with its own p=0.5.
    The partner of each image is its neighbour (batch rolled by one).
    `labels` are one-hot (or soft) float vectors.
    """
    choices = [name for name, alpha in (("mixup", mixup_alpha), ("cutmix", cutmix_alpha)) if alpha > 0]
    if not choices:
        return images, labels
    seeds = tf.random.experimental.stateless_split(seed, 4)
    apply = tf.random.stateless_uniform((), seeds[0]) < probability
    use_cutmix = (
        tf.random.stateless_uniform((), seeds[1]) < 0.5
        if len(choices) == 2
        else tf.constant(choices[0] == "cutmix")
    )
    partner_images = tf.roll(images, 1, axis=0)
    partner_labels = tf.roll(labels, 1, axis=0)

    def mixup():
        lam = _beta(mixup_alpha, seeds[2]) if mixup_alpha > 0 else 1.0
        return (
            lam * images + (1 - lam) * partner_images,
            lam * labels + (1 - lam) * partner_labels,
        )

    def cutmix():
        lam = _beta(cutmix_alpha, seeds[3]) if cutmix_alpha > 0 else 1.0
        height = tf.shape(images)[1]
        width = tf.shape(images)[2]
        cut = tf.sqrt(1.0 - lam)
        cut_h = tf.cast(tf.cast(height, tf.float32) * cut, tf.int32)
        cut_w = tf.cast(tf.cast(width, tf.float32) * cut, tf.int32)
        center = tf.random.stateless_uniform(
            (2,), tf.random.experimental.stateless_fold_in(seeds[3], 1), 0.0, 1.0
        )
        cy = tf.cast(center[0] * tf.cast(height, tf.float32), tf.int32)
        cx = tf.cast(center[1] * tf.cast(width, tf.float32), tf.int32)
        top = tf.clip_by_value(cy - cut_h // 2, 0, height)
        bottom = tf.clip_by_value(cy + cut_h // 2, 0, height)
        left = tf.clip_by_value(cx - cut_w // 2, 0, width)
        right = tf.clip_by_value(cx + cut_w // 2, 0, width)
        rows = tf.range(height)[:, None]
        cols = tf.range(width)[None, :]
        box = tf.cast((rows >= top) & (rows < bottom) & (cols >= left) & (cols < right), images.dtype)
        box = box[None, :, :, None]
        mixed = images * (1 - box) + partner_images * box
        kept = 1.0 - tf.cast((bottom - top) * (right - left), tf.float32) / tf.cast(
            height * width, tf.float32
        )
        return mixed, kept * labels + (1 - kept) * partner_labels

    mixed_images, mixed_labels = tf.cond(use_cutmix, cutmix, mixup)
    return (
        tf.where(apply, mixed_images, images),
        tf.where(apply, mixed_labels, labels),
    )


class TrainAugmentation:
    """The per-image training transform, from decoded uint8 to float32."""

    def __init__(self, image_size, randaugment=True, magnitude=9, num_bins=31, erasing=0.25, seed=None,
                 crop_min_scale=0.08):
        self.image_size = image_size
        self.crop_scale = (crop_min_scale, 1.0)
        self.erasing = erasing
        # torchvision magnitude m of `num_bins` bins -> Keras' normalised factor.
        self.randaugment = (
            keras.layers.RandAugment(
                value_range=(0, 255), num_ops=2, factor=magnitude / (num_bins - 1), seed=seed
            )
            if randaugment
            else None
        )

    def __call__(self, image, seed):
        seeds = tf.random.experimental.stateless_split(seed, 3)
        image = random_resized_crop(image, self.image_size, seeds[0], scale=self.crop_scale)
        image = tf.ensure_shape(image, (self.image_size, self.image_size, 3))
        image = tf.image.stateless_random_flip_left_right(image, seeds[1])
        if self.randaugment is not None:
            image = tf.clip_by_value(tf.cast(self.randaugment(image), tf.float32), 0.0, 255.0)
            image = tf.ensure_shape(image, (self.image_size, self.image_size, 3))
        if self.erasing > 0:
            image = random_erasing(image, self.erasing, seeds[2])
        return image
