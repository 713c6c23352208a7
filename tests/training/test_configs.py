"""Every flagfile under configs/ says how to run it and parses with the train command's flags."""

from __future__ import annotations

import re

import pytest

from conftest import REPO, run_command

CONFIGS = sorted((REPO / "configs").glob("*.cfg"))


def test_there_are_configs():
    assert {c.name for c in CONFIGS} >= {"smoke.cfg", "paper.cfg", "cpu_scratch.cfg",
                                         "cpu_best.cfg", "cpu_subtype.cfg"}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_config_starts_with_its_command_and_parses(config, tmp_path):
    first = config.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith(f"# python -m pneumo_tf.train --flagfile=configs/{config.name}"), first
    missing = tmp_path / "no_data"
    proc = run_command("pneumo_tf.train", f"--flagfile={config}", f"--data_dir={missing}",
                      f"--run_dir={tmp_path / 'run'}", "--weights=none")
    # The flags parse and the config validates; the run stops at the missing data dir.
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert re.search(rf"data dir {re.escape(str(missing))} does not exist", proc.stderr), \
        proc.stderr[-2000:]
    assert not (tmp_path / "run").exists()


def test_recipe_configs_name_their_converter_command_and_image_size():
    for name in ("cpu_best.cfg", "cpu_subtype.cfg", "cpu_scratch.cfg"):
        header = [line for line in (REPO / "configs" / name).read_text().splitlines()
                  if line.startswith("#")]
        assert any("tools/make_tfrecords" in line and "--image_size=128" in line
                   for line in header), name


def test_the_lungs_config_names_its_converter_command_with_masks():
    text = (REPO / "configs" / "lungs.cfg").read_text()
    header = [line for line in text.splitlines() if line.startswith("#")]
    command = [line for line in header if "tools/make_tfrecords" in line]
    assert len(command) == 1, header
    assert "--masks=" in command[0] and "--crop=none" in command[0], command
    assert "--task=lungs" in text.splitlines() and "--select_on=val_dice" in text.splitlines()
