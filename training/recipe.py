"""The ml-cvnets ImageNet-1k recipe of MobileViTv2, and the run configuration."""

import dataclasses
import json

from keras_mobilevitv2.config import WIDTHS
from keras_mobilevitv2.layers.normalization import ATTENTION_NORMS

# Per width (ml-cvnets README-mobilevit-v2): max lr, min lr, weight decay.
# "We linearly increase the learning rate and decay the weight decay with
# respect to the MobileViTv2-2.0 configuration." Effective batch 1024.
RECIPES = {
    "mobilevitv2_050": dict(width=0.5, lr=0.0090, min_lr=0.00090, weight_decay=0.004),
    "mobilevitv2_075": dict(width=0.75, lr=0.0090, min_lr=0.00090, weight_decay=0.008),
    "mobilevitv2_100": dict(width=1.0, lr=0.0075, min_lr=0.00075, weight_decay=0.013),
    "mobilevitv2_125": dict(width=1.25, lr=0.0049, min_lr=0.00049, weight_decay=0.020),
    "mobilevitv2_150": dict(width=1.5, lr=0.0035, min_lr=0.00035, weight_decay=0.029),
    "mobilevitv2_175": dict(width=1.75, lr=0.0026, min_lr=0.00026, weight_decay=0.039),
    "mobilevitv2_200": dict(width=2.0, lr=0.0020, min_lr=0.00020, weight_decay=0.050),
}
assert {r["width"] for r in RECIPES.values()} == set(WIDTHS.values())
# The effective batch (batch_size x grad_accum_steps) the RECIPES learning
# rates are for: 128 images per GPU x 8 GPUs in ml-cvnets.
RECIPE_BATCH_SIZE = 1024

# ml-cvnets' DeepLabV3 MobileViTv2 recipe on PASCAL VOC
# (config/segmentation/pascal_voc/deeplabv3_mobilevitv2.yaml): AdamW, cosine
# over 50 epochs of batch 128 (32 x 4 GPUs) at 512x512, 500 warm-up
# iterations from 5e-5, auxiliary loss weight 0.4, EMA momentum 0.0005.
SEGMENTATION_RECIPE = dict(lr=0.0005, min_lr=1e-6, weight_decay=0.05)
# ml-cvnets' SSDLite MobileViTv2 recipe on COCO
# (config/detection/ssd_coco/mobilevit_v2.yaml): AdamW, cosine over 200
# epochs of batch 128 (32 x 4 GPUs) at 320x320, 500 warm-up iterations,
# EMA momentum 0.0005.
DETECTION_RECIPE = dict(lr=0.0009, min_lr=1e-6, weight_decay=0.05)
TASK_RECIPES = {"segmentation": SEGMENTATION_RECIPE, "detection": DETECTION_RECIPE}

TASKS = ("classification", "segmentation", "detection")
STRATEGIES = ("auto", "one_device", "mirrored", "multi_worker", "tpu")
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")


@dataclasses.dataclass
class TrainConfig:
    """Everything a training run depends on. Defaults follow ml-cvnets.

    `batch_size` is the global batch of one forward/backward pass over all
    replicas; with `grad_accum_steps = k` each optimizer step sees
    `k * batch_size` images (the recipe's effective batch is 1024).
    Fields left `None` take the model's recipe value.
    """

    model: str = "mobilevitv2_050"
    task: str = "classification"  # or segmentation (DeepLabV3), detection (SSDLite)
    attention_norm: str = "layer_norm_2d"  # or batch_norm_2d (Edge TPU / MCU friendly)
    data: str = "embedded"
    model_dir: str = "runs/mobilevitv2"
    strategy: str = "auto"
    batch_size: int = 128
    grad_accum_steps: int = 1
    epochs: int = 300
    steps: int = 0  # optimizer steps; 0 = derived from `epochs`
    image_size: int = 256
    num_classes: int = 0  # 0 = from the data
    mixed_precision: str = "float32"
    init_weights: str = ""
    lr: float = None
    min_lr: float = None
    weight_decay: float = None
    warmup_steps: int = None  # None: min(20000, total_steps // 10)
    warmup_init_lr: float = 1e-6
    label_smoothing: float = 0.1
    ema_decay: float = 0.9995  # ml-cvnets EMA momentum 0.0005
    grad_clip_norm: float = 10.0
    crop_min_scale: float = 0.08  # random resized crop area range (min, 1)
    randaugment: bool = True
    randaugment_magnitude: int = 9  # of 31 bins, torchvision's default
    mixup_alpha: float = 0.2
    cutmix_alpha: float = 1.0
    random_erasing: float = 0.25
    eval_resize_ratio: float = 0.888  # resize 288 -> crop 256
    checkpoint_every: int = 500  # optimizer steps
    keep_checkpoints: int = 3
    seed: int = 0
    deterministic: bool = False  # bitwise-repeatable runs on one machine
    tfrecord_label_offset: int = 0
    max_eval_images: int = 0  # 0 = all
    dataset_dir: str = ""  # where the embedded dataset is generated

    def __post_init__(self):
        if self.model not in RECIPES:
            raise ValueError(f"Unknown --model {self.model!r}; choose one of {sorted(RECIPES)}.")
        if self.attention_norm not in ATTENTION_NORMS:
            raise ValueError(f"Unknown --attention_norm {self.attention_norm!r}; choose one of {ATTENTION_NORMS}.")
        if self.task not in TASKS:
            raise ValueError(f"Unknown --task {self.task!r}; choose one of {TASKS}.")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"Unknown --strategy {self.strategy!r}; choose one of {STRATEGIES}.")
        if self.mixed_precision not in PRECISIONS:
            raise ValueError(f"Unknown --mixed_precision {self.mixed_precision!r}; choose one of {PRECISIONS}.")
        for name in ("batch_size", "grad_accum_steps", "image_size", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1; got {getattr(self, name)}.")
        if self.seed < 0:
            raise ValueError(f"--seed must be >= 0; got {self.seed}.")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError(f"--warmup_steps must be >= 0 (0: no warm-up); got {self.warmup_steps}.")
        if self.image_size < 32:
            raise ValueError(f"--image_size must be >= 32; got {self.image_size}.")
        if self.epochs < 1 and self.steps < 1:
            raise ValueError("Give --epochs >= 1 or --steps >= 1.")
        recipe = TASK_RECIPES.get(self.task, RECIPES[self.model])
        for name in ("lr", "min_lr", "weight_decay"):
            if getattr(self, name) is None:
                setattr(self, name, recipe[name])

    @property
    def width(self):
        return RECIPES[self.model]["width"]

    @property
    def effective_batch_size(self):
        return self.batch_size * self.grad_accum_steps

    # The fields that make a checkpoint in model_dir unusable when changed.
    ARCHITECTURE_FIELDS = ("model", "task", "image_size", "num_classes")

    def to_json(self):
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)
