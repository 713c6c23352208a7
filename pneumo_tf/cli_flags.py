"""Flags shared by several command-line apps, defined once.

absl flags are process-global, so a flag name used by two apps must be defined here (and
imported by both) or the apps could not be loaded into one process (tests, notebooks). Every
other flag is defined in the module whose ``main`` uses it, under a name no other app uses.
"""

from absl import flags

DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "Converter output folder: TFRecord shards + manifest.json.")
RUN_DIR = flags.DEFINE_string(
    "run_dir", None, "Run directory of one training run (created by pneumo_tf.train).")
SPLIT = flags.DEFINE_string("split", "test", "Data split to use: train | val | test.")
OUT = flags.DEFINE_string("out", None, "Output folder.")
SEED = flags.DEFINE_integer("seed", 0, "Random seed; same seed and inputs -> same outputs.")
BATCH_SIZE = flags.DEFINE_integer(
    "batch_size", 32, "Batch size (per replica when training).", lower_bound=1)


def check_args(argv: list[str], *required: flags.FlagHolder) -> None:
    """Refuse stray positional arguments and missing required flags with a usage error.

    Required flags are checked here rather than with ``flags.mark_flag_as_required``, which
    would bind every app loaded into the same process (tests, notebooks) to them.
    """
    from absl import app

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    for flag in required:
        if not flag.value:
            raise app.UsageError(f"--{flag.name} is required")
