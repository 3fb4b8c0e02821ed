"""Linear warm-up then epoch-wise cosine decay (ml-cvnets `cosine` scheduler)."""

import math

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="keras_mobilevitv2")
class WarmupCosine(keras.optimizers.schedules.LearningRateSchedule):
    """lr(step): linear from `warmup_init_lr` to `max_lr` over `warmup_steps`,
    then `min + (max - min)/2 * (1 + cos(pi * epoch / epochs))` where
    `epoch = step // steps_per_epoch`, as ml-cvnets (`is_iteration_based:
    false`): the rate changes once per epoch after warm-up."""

    def __init__(self, max_lr, min_lr, warmup_steps, warmup_init_lr, steps_per_epoch, epochs):
        self.max_lr = float(max_lr)
        self.min_lr = float(min_lr)
        self.warmup_steps = int(warmup_steps)
        self.warmup_init_lr = float(warmup_init_lr)
        self.steps_per_epoch = int(steps_per_epoch)
        self.epochs = int(epochs)

    def __call__(self, step):
        step = ops.cast(step, "float32")
        warmup = self.warmup_init_lr + (self.max_lr - self.warmup_init_lr) * step / max(self.warmup_steps, 1)
        epoch = ops.floor(step / self.steps_per_epoch)
        progress = ops.minimum(epoch / max(self.epochs, 1), 1.0)
        cosine = self.min_lr + 0.5 * (self.max_lr - self.min_lr) * (1.0 + ops.cos(math.pi * progress))
        return ops.where(step < self.warmup_steps, warmup, cosine)

    def get_config(self):
        return {
            "max_lr": self.max_lr,
            "min_lr": self.min_lr,
            "warmup_steps": self.warmup_steps,
            "warmup_init_lr": self.warmup_init_lr,
            "steps_per_epoch": self.steps_per_epoch,
            "epochs": self.epochs,
        }
