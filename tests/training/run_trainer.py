"""Test harness: runs one Trainer in this process from a JSON config.

Used by the tests that need separate processes (multi-worker, SIGKILL,
logical CPU replicas). Writes the final weights and EMA to --save_weights.
"""

import argparse
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True, help="TrainConfig fields as JSON.")
    parser.add_argument("--logical_cpus", type=int, default=0)
    parser.add_argument("--save_weights", default="")
    args = parser.parse_args()

    import numpy as np
    import tensorflow as tf

    if args.logical_cpus:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * args.logical_cpus
        )
    from training import TrainConfig
    from training import Trainer

    trainer = Trainer(TrainConfig(**json.loads(args.config)))
    try:
        trainer.run()
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.save_weights:
        np.savez(
            args.save_weights,
            *[w.numpy() for w in trainer.model.weights],
            *trainer.ema_weights,
        )
    print(json.dumps({"losses": trainer.step_losses}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
