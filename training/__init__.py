"""tf.distribute trainer for keras_mobilevitv2 models (ml-cvnets recipe)."""

from training.detection import DetectionTrainer
from training.recipe import RECIPES
from training.recipe import TrainConfig
from training.segmentation import SegmentationTrainer
from training.trainer import Trainer
from training.trainer import train

__all__ = ["RECIPES", "DetectionTrainer", "SegmentationTrainer", "TrainConfig", "Trainer", "train"]
