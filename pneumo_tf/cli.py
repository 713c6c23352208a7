"""What every command-line app shares: common flags, argument checks, the exit convention.

Flags. absl flags are process-global and every flag defined in a process shows up in its
``--helpfull``, so library modules define none and each app defines only what its ``main`` reads.
Flags used by several apps (``--data_dir``, ``--run_dir``, ...) are defined here on demand by the
apps that want them (:func:`data_dir_flag`, ...): calling a definer twice returns the first
definition, so several apps can still be imported into one process (tests, notebooks).
Configuration dataclasses declare their flags in field metadata (:func:`option`) and
:func:`define_config_flags` turns them into absl flags, so an option is one edit.

Exit convention (:func:`run_app`): bad input (``ValueError``, ``OSError`` and the app's own
error types) ends the process with one line ``<app>: error: <message>`` on stderr and exit
status 1, never a traceback; usage errors (``app.UsageError``) print absl's usage text.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import types
import typing
from typing import Any, Callable, Sequence

from absl import app, flags

from pneumo_tf import quiet_tf

FLAGS = flags.FLAGS
# The errors a user can cause and fix: they end an app with one line, not a traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError)


# ---------------------------------------------------------------------------------------------
# Flags shared by several apps (defined on first use)


def _shared(name: str, define: Callable[[], flags.FlagHolder]) -> flags.FlagHolder:
    """The holder of flag ``name``: defined by ``define()`` unless it already exists."""
    return flags.FlagHolder(FLAGS, FLAGS[name]) if name in FLAGS else define()


def data_dir_flag() -> flags.FlagHolder:
    """``--data_dir``: a converter output (TFRecord shards + manifest.json)."""
    return _shared("data_dir", lambda: flags.DEFINE_string(
        "data_dir", None, "Converter output folder: TFRecord shards + manifest.json."))


def run_dir_flag() -> flags.FlagHolder:
    """``--run_dir``: the run directory of one training run."""
    return _shared("run_dir", lambda: flags.DEFINE_string(
        "run_dir", None, "Run directory of one training run (created by pneumo_tf.train)."))


def split_flag() -> flags.FlagHolder:
    """``--split``: the data split a command reads."""
    return _shared("split", lambda: flags.DEFINE_string(
        "split", "test", "Data split to use: train | val | test."))


def out_flag() -> flags.FlagHolder:
    """``--out``: an output folder."""
    return _shared("out", lambda: flags.DEFINE_string("out", None, "Output folder."))


def seed_flag() -> flags.FlagHolder:
    """``--seed``: the random seed."""
    return _shared("seed", lambda: flags.DEFINE_integer(
        "seed", 0, "Random seed; same seed and inputs -> same outputs."))


def batch_size_flag() -> flags.FlagHolder:
    """``--batch_size``: images per forward pass (per replica when training)."""
    return _shared("batch_size", lambda: flags.DEFINE_integer(
        "batch_size", 32, "Batch size (per replica when training).", lower_bound=1))


def runs_flag() -> flags.FlagHolder:
    """``--runs``: several run directories."""
    return _shared("runs", lambda: flags.DEFINE_list(
        "runs", None, "Comma-separated run directories (two or more)."))


def calibration_flag() -> flags.FlagHolder:
    """``--calibration``: which of a run's calibrations (temperature + threshold) to use."""
    return _shared("calibration", lambda: flags.DEFINE_string(
        "calibration", "val", "The run's calibration to use: val = R/calibration.json (fitted "
        "on the run's validation split); NAME = R/calibrations/NAME.json (re-fitted on a site's "
        "sample by `python -m pneumo_tf.calibrate --name=NAME`). predict with an exported model "
        "uses the calibration baked in at export unless this flag is given."))


def threshold_flag() -> flags.FlagHolder:
    """``--threshold``: how the operating threshold is chosen (evaluate, calibrate)."""
    return _shared("threshold", lambda: flags.DEFINE_string(
        "threshold", None, "Operating threshold method: calibrated:<cut on the calibrated "
        "probability, e.g. 0.5> | val_youden | val_sensitivity:<target, e.g. 0.95> | "
        "val_prevalence:<a site's prevalence, e.g. 0.5> | <fixed value on the raw probability>. "
        "evaluate: chosen on the val split, default the run's stored operating point (another "
        "method never rewrites calibration.json); calibrate: chosen on the site's sample, "
        "default val_youden."))


def num_resamples_flag() -> flags.FlagHolder:
    """``--num_resamples``: stratified bootstrap resamples of the 95 % CIs."""
    return _shared("num_resamples", lambda: flags.DEFINE_integer(
        "num_resamples", 2000, "Stratified bootstrap resamples for the 95 % CIs (>= 1000).",
        lower_bound=1000))


class RunSplitFlags(typing.NamedTuple):
    """The shared flags of an app that scores one split of a run (evaluate, gradcam)."""

    run_dir: flags.FlagHolder
    data_dir: flags.FlagHolder
    split: flags.FlagHolder
    batch_size: flags.FlagHolder
    seed: flags.FlagHolder


def run_split_flags() -> RunSplitFlags:
    """``--run_dir``, ``--data_dir``, ``--split``, ``--batch_size`` and ``--seed`` as one group."""
    return RunSplitFlags(run_dir_flag(), data_dir_flag(), split_flag(), batch_size_flag(),
                         seed_flag())


# ---------------------------------------------------------------------------------------------
# Configuration dataclasses <-> flags


def option(default: Any, help: str, *, choices: Sequence[str] | Callable[[], Sequence[str]] |
           None = None, lower: float | None = None, upper: float | None = None) -> Any:
    """A dataclass field that is also a command-line flag (same name, type from the annotation).

    Args:
        default: the default value (also the flag's default).
        help: the flag's help text.
        choices: allowed strings (an enum flag), or a function returning them (for registries
            filled at import time).
        lower, upper: bounds of an int/float flag.
    """
    meta = {"help": help, "choices": choices, "lower": lower, "upper": upper}
    return dataclasses.field(default=default, metadata=meta)


def choices_of(field: dataclasses.Field) -> tuple[str, ...] | None:
    """The allowed values of an :func:`option` field, or None."""
    choices = field.metadata.get("choices")
    if callable(choices):
        choices = choices()
    return tuple(choices) if choices is not None else None


def flag_fields(cls) -> list[dataclasses.Field]:
    """The fields of dataclass ``cls`` declared with :func:`option`, in declaration order."""
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]


def _define_field(field: dataclasses.Field, kind: Any, module_name: str) -> flags.FlagHolder:
    meta, name, default = field.metadata, field.name, field.default
    common = {"module_name": module_name}
    if kind is bool:
        return flags.DEFINE_boolean(name, default, meta["help"], **common)
    if kind is int:
        return flags.DEFINE_integer(name, default, meta["help"], lower_bound=meta["lower"],
                                    upper_bound=meta["upper"], **common)
    if kind is float:
        return flags.DEFINE_float(name, default, meta["help"], lower_bound=meta["lower"],
                                  upper_bound=meta["upper"], **common)
    if typing.get_origin(kind) is tuple:
        return flags.DEFINE_list(name, [str(v) for v in default], meta["help"], **common)
    choices = choices_of(field)
    if choices is not None:
        return flags.DEFINE_enum(name, default, list(choices), meta["help"], **common)
    return flags.DEFINE_string(name, default, meta["help"], **common)


def define_config_flags(cls, module_name: str) -> dict[str, flags.FlagHolder]:
    """Define one absl flag per :func:`option` field of dataclass ``cls``.

    A flag that already exists (a shared one such as ``--data_dir``, or a second call) is reused.

    Args:
        cls: the configuration dataclass.
        module_name: the app module the flags belong to (what ``--helpfull`` groups them by).

    Returns:
        ``{field name: FlagHolder}``.
    """
    hints = typing.get_type_hints(cls)
    holders = {}
    for field in flag_fields(cls):
        kind = hints[field.name]
        if typing.get_origin(kind) in (typing.Union, types.UnionType):
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        holders[field.name] = _shared(
            field.name, lambda: _define_field(field, kind, module_name))
    return holders


def config_from_flags(cls, holders: dict[str, flags.FlagHolder]):
    """An instance of dataclass ``cls`` from parsed flags (list flags become tuples of floats).

    Raises:
        ValueError: a list flag holds something that is not a number (naming the flag).
    """
    hints = typing.get_type_hints(cls)
    values = {}
    for name, holder in holders.items():
        value = holder.value
        if typing.get_origin(hints[name]) is tuple:
            try:
                value = tuple(float(v) for v in value)
            except ValueError as e:
                raise ValueError(f"--{name}={','.join(value)}: not numbers") from e
        values[name] = value
    return cls(**values)


# ---------------------------------------------------------------------------------------------
# Arguments and the exit convention


def check_args(argv: list[str], *required: flags.FlagHolder) -> None:
    """Refuse stray positional arguments and missing required flags with a usage error.

    Required flags are checked here rather than with ``flags.mark_flag_as_required``, which
    would bind every app loaded into the same process (tests, notebooks) to them.
    """
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    for flag in required:
        if flag.value is None or flag.value == "" or flag.value == []:
            raise app.UsageError(f"--{flag.name} is required")


def run_app(main: Callable[[list[str]], Any], name: str,
            errors: tuple[type[BaseException], ...] = ()) -> None:
    """``app.run(main)`` under the exit convention of the module docstring.

    Args:
        main: the app's main; its return value is the exit status (None = 0).
        name: the app's name in error lines (``pneumo_tf.train``).
        errors: error types of the app beyond :data:`USER_ERRORS` that are the user's to fix.
    """
    caught = USER_ERRORS + tuple(errors)

    def guarded(argv: list[str]):
        quiet_tf.quiet_python_logs()  # after flag parsing, which sets absl's log level
        try:
            return main(argv)
        except app.UsageError:
            raise
        except BrokenPipeError:
            # The reader went away (`... | head`): stop quietly, as shell tools do.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(1)
        except caught as e:
            sys.exit(f"{name}: error: {e}")

    app.run(guarded)
