"""The main job's stages are the documented commands they print: the
printed trainer and QAT flags give exactly the configuration the stage
trains with, and bad stage names are refused with the list of stages; the
report says which int8 model is the more accurate, warning when QAT lost."""

import subprocess
import sys

import pytest
from absl import flags

from quantization.pipeline_report import int8_verdict
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

    config = PipelineConfig(
        output_dir="/tmp/x",
        image_size=48,
        qat_lr=3e-5,
        qat_bn_steps=5,
        qat_distillation=0.25,
        targets=("micro", "onnx"),
    )
    values = flags.FlagValues()
    define_pipeline_flags(values)
    values(["prog", *pipeline_flags(config)])
    assert pipeline_config(values) == config


def test_the_learning_rates_follow_the_width_unless_given():
    from absl import app

    from quantization.pipeline import config_from_flags as pipeline_config
    from quantization.pipeline import define_pipeline_flags
    from quantization.pipeline_stages import pipeline_flags

    def parsed(*arguments):
        values = flags.FlagValues()
        define_pipeline_flags(values)
        values(["prog", *arguments])
        return pipeline_config(values)

    assert (parsed().float_lr, parsed().qat_lr) == (3e-3, 1e-4) == (PipelineConfig().float_lr, PipelineConfig().qat_lr)
    wide = parsed("--model=mobilevitv2_200")  # 3e-3 collapsed width 2.0 to chance
    assert (wide.float_lr, wide.qat_lr) == (1e-3, round(1e-3 / 30, 12))
    given = parsed("--model=mobilevitv2_200", "--float_lr=3e-3", "--qat_lr=2e-5")
    assert (given.float_lr, given.qat_lr) == (3e-3, 2e-5)
    assert parsed(*pipeline_flags(wide)) == wide
    with pytest.raises(app.UsageError, match="Unknown --model 'mobilevitv2_300'"):
        parsed("--model=mobilevitv2_300")
    # Distillation by width too: the labels only up to width 1.0, half the float model's outputs above.
    assert (parsed().qat_distillation, wide.qat_distillation, PipelineConfig().qat_distillation) == (0.0, 0.5, 0.0)
    assert parsed("--model=mobilevitv2_200", "--qat_distillation=0").qat_distillation == 0.0
    with pytest.raises(app.UsageError, match=r"--qat_distillation is the float model's share.*in \[0, 1\]; got 1.5"):
        parsed("--qat_distillation=1.5")


def _rows(float_tflite, ptq, qat, ptq_ms=0.73, qat_ms=0.43):
    return {
        "float_tflite": {"top1": float_tflite, "latency_ms": 0.52},
        "ptq_int8_tflite": {"top1": ptq, "latency_ms": ptq_ms},
        "qat_int8_tflite": {"top1": qat, "latency_ms": qat_ms},
    }


def test_verdict_ships_qat_when_it_is_at_least_as_accurate_as_ptq():
    verdict = int8_verdict(_rows(0.9825, 0.9800, 0.9800), images=400)
    assert verdict["more_accurate"] == "qat_int8" and verdict["meets_the_bar"]
    assert verdict["text"].startswith("Ship tflite/qat_int8.tflite") and "WARNING" not in verdict["text"]


def test_verdict_warns_when_fine_tuning_did_worse_than_ptq():
    """The failure issue 20 reports: the user must not get the worse model silently."""
    verdict = int8_verdict(_rows(0.9825, 0.9850, 0.9825), images=400)
    assert verdict["more_accurate"] == "ptq_int8" and not verdict["meets_the_bar"]
    assert verdict["text"].startswith("WARNING") and "(1 of 400 evaluation images)" in verdict["text"]
    assert "tflite/ptq_int8.tflite" in verdict["text"] and "0.43 against 0.73 ms" in verdict["text"]


def test_verdict_notes_an_int8_model_far_below_float():
    verdict = int8_verdict(_rows(0.93, 0.91, 0.915), images=600)
    assert verdict["more_accurate"] == "qat_int8" and not verdict["meets_the_bar"]  # 1.5 points below float
    assert "1.5 points below float TFLite" in verdict["text"]
    assert "Note" not in int8_verdict(_rows(0.93, 0.91, 0.926), images=600)["text"]
