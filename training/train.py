"""Command line of the trainer: `python -m training.train --helpfull`.

    python -m training.train --model=mobilevitv2_100 --data=/data/imagenet \
        --model_dir=runs/v2_100 --strategy=mirrored --batch_size=1024 --epochs=300
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
    from training.trainer import Trainer

    return run_job(lambda config: Trainer(config, tpu_address=flags.FLAGS.tpu).run())


def run():
    """Console-script entry point."""
    define_flags()
    # `--help` lists the main module's key flags: the trainer's are this command's.
    flags.adopt_module_key_flags(trainer_flags)
    app.run(main)


if __name__ == "__main__":
    run()
