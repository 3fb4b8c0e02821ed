"""Command line of the trainer: `python -m training.train --helpfull`.

    python -m training.train --model=mobilevitv2_100 --data=/data/imagenet \
        --model_dir=runs/v2_100 --strategy=mirrored --batch_size=1024 --epochs=300
    python -m training.train --task=segmentation --model=mobilevitv2_100 --data=/data/VOCdevkit/VOC2012 \
        --init_weights=imagenet --image_size=512 --batch_size=128 --epochs=50 --model_dir=runs/deeplabv3
    python -m training.train --task=detection --model=mobilevitv2_100 --data=/data/coco \
        --init_weights=imagenet --image_size=320 --batch_size=128 --epochs=200 --model_dir=runs/ssdlite
"""

from absl import app
from absl import flags

from training import flags as trainer_flags
from training.flags import config_from_flags  # noqa: F401  (importable from here, as before)
from training.flags import define_flags
from training.flags import run_job


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    from training.detection import DetectionTrainer
    from training.segmentation import SegmentationTrainer
    from training.trainer import Trainer

    def job(config):
        trainer = {"segmentation": SegmentationTrainer, "detection": DetectionTrainer}.get(config.task, Trainer)
        return trainer(config, tpu_address=flags.FLAGS.tpu).run()

    return run_job(job)


def run():
    """Console-script entry point."""
    define_flags()
    # `--help` lists the main module's key flags: the trainer's are this command's.
    flags.adopt_module_key_flags(trainer_flags)
    app.run(main)


if __name__ == "__main__":
    run()
