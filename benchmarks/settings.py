"""What a benchmark run measures: one settings object, shared with workers.

Worker processes (see `isolation.py`) receive the settings as JSON, so every
field is a plain number, string, bool or tuple of those.
"""

import argparse
import dataclasses
import json
import os

ALL_WIDTHS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0)
SECTIONS = ("latency", "attention", "size", "training", "converters", "v1_v2")
# "converters" creates virtual environments of several GiB on first use
# (converter_peers.py) and "v1_v2" converts four more models (about 10
# minutes), so a run includes them only when asked for.
DEFAULT_SECTIONS = ("latency", "attention", "size", "training")


@dataclasses.dataclass(frozen=True)
class Settings:
    sections: tuple = DEFAULT_SECTIONS
    widths: tuple = (0.5, 1.0)  # latency section
    batch_sizes: tuple = (1, 16)
    image_size: int = 256  # MobileViTv2 implementations
    reference_image_size: int = 224  # keras.applications MobileNets
    repeats: int = 20  # timed runs per measurement, at most
    warmup: int = 3  # untimed runs, the first (tracing/compiling) included
    max_seconds: float = 6.0  # stop repeating once a measurement took this long
    threads: int = os.cpu_count() or 1
    calibration_images: int = 8  # int8 representative dataset (speed does not depend on it)
    implementations: tuple = ()  # empty: every implementation in competitors.IMPLEMENTATIONS
    competitor_runtimes: tuple = ()  # runtimes measured for the other implementations; empty: all
    qat: bool = True  # also time our QAT int8 model
    tokens: tuple = (64, 256, 1024, 4096, 16384)  # attention section
    attention_channels: int = 128
    size_widths: tuple = ALL_WIDTHS
    size_tflite: bool = True  # convert every size width (not only those timed in the latency section)
    # Set by the latency section: where every implementation's TFLite models
    # are written, to be timed together afterwards (latency.time_pending_tflite).
    tflite_dir: str = ""
    # Converters section: where the converters' environments live (empty:
    # converter_peers.DEFAULT_ENVS_DIR) and where its models and worker logs
    # are kept (empty: a temporary directory).
    peer_envs_dir: str = ""
    peer_work_dir: str = ""
    # Keep the conversions an earlier run left in peer_work_dir (the same
    # seeded timm weights): the conversions took 50 of the section's 65 min.
    peer_reuse: bool = False
    tiny: bool = False

    def to_json(self):
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text):
        values = json.loads(text)
        return cls(**{key: tuple(value) if isinstance(value, list) else value for key, value in values.items()})


# A configuration that exercises every code path in about a minute (the smoke
# test): tiny images, one width, one batch, two timed runs. Figures from it
# are not benchmarks. A TFLite conversion costs 10-40 s and an XLA compilation
# 5-10 s whatever the model size, and the other implementations take the same
# code paths as ours, so they are only run in graph mode (PyTorch: eager).
TINY = dict(
    widths=(0.5,),
    batch_sizes=(1,),
    image_size=64,
    reference_image_size=64,
    repeats=2,
    warmup=1,
    max_seconds=1.0,
    calibration_images=2,
    competitor_runtimes=("graph", "torch"),
    qat=False,
    tokens=(64, 256),
    size_widths=(0.5, 0.75),
    size_tflite=False,
    tiny=True,
)


def parse_settings(argv=None, description="Benchmarks of keras_mobilevitv2."):
    """(Settings, output_dir) from `python -m benchmarks.run`'s command line."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--output_dir", default="benchmark_results")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, help="Default: all but converters and v1_v2.")
    parser.add_argument("--widths", type=float, nargs="+", help="Latency section widths (default 0.5 1.0).")
    parser.add_argument("--batch_sizes", type=int, nargs="+", help="Default: 1 16.")
    parser.add_argument("--image_size", type=int, help="MobileViTv2 input size (default 256).")
    parser.add_argument("--repeats", type=int, help="Timed runs per measurement, at most (default 20).")
    parser.add_argument("--warmup", type=int, help="Untimed calls, the first included (default 3).")
    parser.add_argument("--threads", type=int, help="Threads for every framework (default: all CPUs).")
    parser.add_argument("--implementations", nargs="+", help="Subset of the latency section's implementations.")
    parser.add_argument("--tokens", type=int, nargs="+", help="Attention section token counts.")
    parser.add_argument("--size_widths", type=float, nargs="+", help="Size section widths (default: all 7).")
    parser.add_argument("--peer_envs_dir", help="Converters section: the converters' virtual environments.")
    parser.add_argument("--peer_work_dir", help="Converters section: keep its models and logs here.")
    parser.add_argument(
        "--peer_reuse",
        action="store_true",
        default=None,
        help="Converters section: keep the conversions an earlier run left in --peer_work_dir.",
    )
    parser.add_argument("--tiny", action="store_true", help="Tiny smoke configuration (not a benchmark).")
    args = parser.parse_args(argv)

    values = dict(TINY) if args.tiny else {}
    for field in dataclasses.fields(Settings):
        given = getattr(args, field.name, None)
        if given is not None and field.name != "tiny":
            values[field.name] = tuple(given) if isinstance(given, list) else given
    settings = Settings(**values)
    if settings.threads < 1 or settings.repeats < 1:
        parser.error("--threads and --repeats must be at least 1")
    if settings.peer_reuse and not settings.peer_work_dir:
        parser.error("--peer_reuse needs --peer_work_dir (the directory of the earlier run's conversions)")
    return settings, args.output_dir
