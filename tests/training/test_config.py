"""training/config.py: the flag choices it spells so train parses flags before TensorFlow loads
are the libraries' own."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

from conftest import REPO
from pneumo_tf.training import config


def test_the_choices_spelled_for_the_flags_are_the_libraries():
    from pneumo_tf.image import augment
    from pneumo_tf.modeling import model
    from pneumo_tf.training import distribute, task

    assert config.TASK_NAMES == tuple(task.TASKS)
    assert config.BACKBONE_NAMES == tuple(sorted(model.BACKBONES))
    assert config.RESAMPLERS == ("auto",) + augment.RESAMPLERS
    assert config.FILL_MODES == augment.FILL_MODES
    assert config.INTENSITY_KEYS == augment.INTENSITY_KEYS
    assert (distribute.PRECISIONS, distribute.JIT_CHOICES, distribute.STRATEGIES) == (
        config.PRECISIONS, config.JIT_CHOICES, config.STRATEGIES)
    fields = {f.name: f.metadata.get("choices") for f in dataclasses.fields(config.TrainConfig)}
    assert fields["task"] == config.TASK_NAMES and fields["backbone"] == config.BACKBONE_NAMES


def test_importing_the_config_loads_no_tensorflow():
    code = ("import sys, pneumo_tf.training.config; "
            "print(sorted(m for m in ('tensorflow', 'keras') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr[-2000:]
