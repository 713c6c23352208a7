"""Train a model: ``python -m pneumo_tf.train --flagfile=configs/paper.cfg``.

Every flag is a field of :class:`pneumo_tf.training.config.TrainConfig`; ``--task`` picks the
task (:data:`pneumo_tf.training.task.TASKS`). The request is
:func:`pneumo_tf.training.session.train` (a run or an ensemble, then calibration and the OOD
fit), the run itself :func:`pneumo_tf.training.loop.train` (resume, run directory, the loop).
"""

from __future__ import annotations

from absl import flags

from pneumo_tf.core import cli, rundir
from pneumo_tf.training.config import TrainConfig, flags_file_text

FLAG_HOLDERS = cli.define_config_flags(TrainConfig, module_name=__name__)
if "profile" not in flags.FLAGS:  # the flag's earlier name, still accepted
    flags.DEFINE_alias("profile", "profile_steps", module_name=cli.flags_module(__name__))


def main(argv: list[str]) -> None:
    # The trainer's libraries load TensorFlow: imported once the flags are parsed.
    from pneumo_tf.training import distribute, loop, resume, session

    cli.check_args(argv)
    # Logical CPUs must exist before TensorFlow initialises its devices: first thing.
    distribute.configure_cpu_devices(FLAG_HOLDERS["cpu_devices"].value)
    cfg = cli.config_from_flags(TrainConfig, FLAG_HOLDERS)
    cfg.validate()
    # Fail fast, before a strategy or model is built.
    resume.check_run_dir(rundir.RunPaths(cfg.run_dir))
    loop.check_data(cfg)
    setup = distribute.setup_distribution(cfg.strategy, cfg.precision, cfg.jit_compile,
                                          cfg.cpu_devices)
    session.train(cfg, setup, flags_text=flags_file_text(cfg))


def run() -> None:
    cli.run_app(main, "pneumo_tf.train",
                errors=("pneumo_tf.training.loop.TrainingDivergedError",),
                flag_holders=FLAG_HOLDERS)


if __name__ == "__main__":
    run()
