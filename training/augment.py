"""Training augmentations of the ml-cvnets recipe, as tf.data-friendly ops.

Per image: random resized crop (bicubic), horizontal flip, RandAugment,
random erasing. Per batch: mixup or cutmix. Images are float32 RGB in
[0, 255] throughout (the models rescale internally).

Every draw is a stateless function of the seed the pipeline gives each image
(or batch): an image gets the same augmentation however the pipeline is
parallelised and whether or not the run was resumed.
"""

import math

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
    log_ratio = tf.random.stateless_uniform((), seeds[1], tf.math.log(ratio[0]), tf.math.log(ratio[1]))
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
        tf.random.stateless_uniform((), seeds[1]) < 0.5 if len(choices) == 2 else tf.constant(choices[0] == "cutmix")
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
        center = tf.random.stateless_uniform((2,), tf.random.experimental.stateless_fold_in(seeds[3], 1), 0.0, 1.0)
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
        kept = 1.0 - tf.cast((bottom - top) * (right - left), tf.float32) / tf.cast(height * width, tf.float32)
        return mixed, kept * labels + (1 - kept) * partner_labels

    mixed_images, mixed_labels = tf.cond(use_cutmix, cutmix, mixup)
    return (
        tf.where(apply, mixed_images, images),
        tf.where(apply, mixed_labels, labels),
    )


# ------------------------------------------------------------- RandAugment
# torchvision's RandAugment, which ml-cvnets uses (bilinear, fill 0): each of
# `num_ops` rounds applies one of 14 ops drawn uniformly, at the fixed
# magnitude `level` (bin m of num_bins - 1, as a fraction of the op's maximum);
# the geometric and enhance ops get a random sign.

_GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale


def _blend(image, degenerate, factor):
    return tf.clip_by_value(degenerate + factor * (image - degenerate), 0.0, 255.0)


def _grayscale(image):
    return tf.reduce_sum(image * tf.constant(_GRAY), axis=-1, keepdims=True)


def _affine(image, transform):
    """`transform` maps output to input pixel coordinates, as (a0..a2, b0..b2, 0, 0)."""
    transform = tf.cast(tf.reshape(tf.stack(transform), (1, 8)), tf.float32)
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=image[None],
        transforms=transform,
        output_shape=tf.shape(image)[:2],
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="CONSTANT",
    )[0]


def _shear(image, amount, axis):
    # About the top-left corner (half a pixel before the first pixel centre), as torchvision.
    return _affine(
        image,
        [1.0, amount, 0.5 * amount, 0.0, 1.0, 0.0, 0.0, 0.0]
        if axis == 1
        else [1.0, 0.0, 0.0, amount, 1.0, 0.5 * amount, 0.0, 0.0],
    )


def _translate(image, fraction, axis):
    # Whole pixels (torchvision: int(magnitude)) of 150/331 of the side at most.
    pixels = tf.cast(tf.shape(image)[axis], tf.float32) * fraction
    shift = -tf.math.sign(pixels) * tf.floor(tf.abs(pixels))
    return _affine(
        image, [1.0, 0.0, shift, 0.0, 1.0, 0.0, 0.0, 0.0] if axis == 1 else [1.0, 0.0, 0.0, 0.0, 1.0, shift, 0.0, 0.0]
    )


def _rotate(image, degrees):
    angle = degrees * math.pi / 180.0
    cos, sin = tf.cos(angle), tf.sin(angle)
    h = tf.cast(tf.shape(image)[0] - 1, tf.float32)
    w = tf.cast(tf.shape(image)[1] - 1, tf.float32)
    x_offset = (w - (cos * w - sin * h)) / 2.0  # about the image centre
    y_offset = (h - (sin * w + cos * h)) / 2.0
    return _affine(image, [cos, -sin, x_offset, sin, cos, y_offset, 0.0, 0.0])


def _sharpness(image, factor):
    kernel = tf.constant([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0
    kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
    blurred = tf.nn.depthwise_conv2d(image[None], kernel, [1, 1, 1, 1], "VALID")[0]
    inside = tf.pad(tf.ones_like(blurred), [[1, 1], [1, 1], [0, 0]])
    degenerate = inside * tf.pad(blurred, [[1, 1], [1, 1], [0, 0]]) + (1.0 - inside) * image
    return _blend(image, degenerate, factor)  # the border keeps its pixels, as PIL


def _posterize(image, bits):
    step = 2.0 ** (8 - bits)
    return tf.floor(tf.round(image) / step) * step


def _autocontrast(image):
    low = tf.reduce_min(image, axis=(0, 1), keepdims=True)
    high = tf.reduce_max(image, axis=(0, 1), keepdims=True)
    flat = high <= low  # a flat channel is left as it is
    low = tf.where(flat, 0.0, low)
    high = tf.where(flat, 255.0, high)
    return tf.clip_by_value((image - low) * (255.0 / (high - low)), 0.0, 255.0)


def _equalize_channel(channel):
    values = tf.cast(tf.clip_by_value(tf.round(channel), 0.0, 255.0), tf.int32)
    histogram = tf.math.bincount(values, minlength=256, maxlength=256)
    # PIL / torchvision: the step ignores the highest occupied bin.
    step = (tf.reduce_sum(histogram) - histogram[tf.reduce_max(values)]) // 255
    lut = (tf.cumsum(histogram) + step // 2) // tf.maximum(step, 1)
    lut = tf.clip_by_value(tf.concat([[0], lut[:-1]], 0), 0, 255)
    return tf.where(step == 0, channel, tf.cast(tf.gather(lut, values), tf.float32))


def _equalize(image):
    return tf.stack([_equalize_channel(image[..., c]) for c in range(3)], axis=-1)


# (name, op(image, level, sign)); sign is +-1 (unsigned ops ignore it).
RANDAUGMENT_OPS = (
    ("identity", lambda image, level, sign: image),
    ("shear_x", lambda image, level, sign: _shear(image, 0.3 * level * sign, axis=1)),
    ("shear_y", lambda image, level, sign: _shear(image, 0.3 * level * sign, axis=0)),
    ("translate_x", lambda image, level, sign: _translate(image, 150.0 / 331.0 * level * sign, axis=1)),
    ("translate_y", lambda image, level, sign: _translate(image, 150.0 / 331.0 * level * sign, axis=0)),
    ("rotate", lambda image, level, sign: _rotate(image, 30.0 * level * sign)),
    ("brightness", lambda image, level, sign: _blend(image, tf.zeros_like(image), 1.0 + 0.9 * level * sign)),
    ("color", lambda image, level, sign: _blend(image, _grayscale(image), 1.0 + 0.9 * level * sign)),
    ("contrast", lambda image, level, sign: _blend(image, tf.reduce_mean(_grayscale(image)), 1.0 + 0.9 * level * sign)),
    ("sharpness", lambda image, level, sign: _sharpness(image, 1.0 + 0.9 * level * sign)),
    ("posterize", lambda image, level, sign: _posterize(image, 8 - int(round(4 * level)))),
    ("solarize", lambda image, level, sign: tf.where(image >= 255.0 * (1.0 - level), 255.0 - image, image)),
    ("autocontrast", lambda image, level, sign: _autocontrast(image)),
    ("equalize", lambda image, level, sign: _equalize(image)),
)


def rand_augment(image, seed, num_ops=2, magnitude=9, num_bins=31):
    """torchvision RandAugment of a float [0, 255] HxWx3 image: a pure
    function of (image, seed)."""
    if not 0 <= magnitude < num_bins:
        raise ValueError(f"RandAugment magnitude {magnitude} is outside [0, {num_bins - 1}] (bins of {num_bins}).")
    level = magnitude / (num_bins - 1)
    seeds = tf.random.experimental.stateless_split(seed, 2 * num_ops)
    for round_index in range(num_ops):
        choice = tf.random.stateless_uniform((), seeds[2 * round_index], 0, len(RANDAUGMENT_OPS), dtype=tf.int32)
        negative = tf.random.stateless_uniform((), seeds[2 * round_index + 1]) < 0.5
        sign = tf.where(negative, -1.0, 1.0)
        branches = [lambda op=op, image=image, sign=sign: op(image, level, sign) for _, op in RANDAUGMENT_OPS]
        image = tf.switch_case(choice, branches)
        image = tf.ensure_shape(image, (None, None, 3))
    return image


class TrainAugmentation:
    """The per-image training transform, from decoded uint8 to float32."""

    def __init__(self, image_size, randaugment=True, magnitude=9, num_bins=31, erasing=0.25, crop_min_scale=0.08):
        self.image_size = image_size
        self.crop_scale = (crop_min_scale, 1.0)
        self.erasing = erasing
        self.randaugment = randaugment
        self.magnitude = magnitude
        self.num_bins = num_bins
        if randaugment and not 0 <= magnitude < num_bins:
            raise ValueError(
                f"--randaugment_magnitude {magnitude} is outside [0, {num_bins - 1}] "
                f"(torchvision's {num_bins} bins; 9 is the recipe's)."
            )

    def __call__(self, image, seed):
        seeds = tf.random.experimental.stateless_split(seed, 4)
        image = random_resized_crop(image, self.image_size, seeds[0], scale=self.crop_scale)
        image = tf.ensure_shape(image, (self.image_size, self.image_size, 3))
        image = tf.image.stateless_random_flip_left_right(image, seeds[1])
        if self.randaugment:
            image = rand_augment(image, seeds[3], magnitude=self.magnitude, num_bins=self.num_bins)
            image = tf.ensure_shape(image, (self.image_size, self.image_size, 3))
        if self.erasing > 0:
            image = random_erasing(image, self.erasing, seeds[2])
        return image
