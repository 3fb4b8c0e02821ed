"""The main job's stages are the documented commands they print: the
printed trainer and QAT flags give exactly the configuration the stage
trains with, and bad stage names are refused with the list of stages."""

import subprocess
import sys

from absl import flags

from quantization.pipeline_stages import STAGES
from quantization.pipeline_stages import PipelineConfig
from quantization.pipeline_stages import float_train_config
from quantization.pipeline_stages import qat_train_config
from quantization.pipeline_stages import trainer_flags
from training.flags import config_from_flags
from training.flags import define_flags


def _parsed(arguments):
    values = flags.FlagValues()
    define_flags(values)
    values(["prog", *arguments])
    return config_from_flags(values)


def test_printed_trainer_commands_train_what_the_stages_train():
    config = PipelineConfig(output_dir="/tmp/runs", float_epochs=3, float_lr=2e-3)
    for train_config in (float_train_config(config), qat_train_config(config)):
        assert _parsed(trainer_flags(train_config)) == train_config


def test_unknown_stage_is_refused_with_the_stages():
    result = subprocess.run(
        [sys.executable, "-m", "quantization.pipeline", "--stages=train,deploy"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode != 0
    assert "Unknown --stages ['deploy']" in result.stderr and ", ".join(STAGES) in result.stderr


def test_printed_pipeline_flags_give_the_same_configuration():
    from quantization.pipeline import config_from_flags as pipeline_config
    from quantization.pipeline import define_pipeline_flags
    from quantization.pipeline_stages import pipeline_flags

    config = PipelineConfig(output_dir="/tmp/x", image_size=48, qat_lr=3e-5, qat_bn_steps=5, targets=("micro", "onnx"))
    values = flags.FlagValues()
    define_pipeline_flags(values)
    values(["prog", *pipeline_flags(config)])
    assert pipeline_config(values) == config
