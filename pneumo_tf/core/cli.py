"""What every command shares: one way to declare flags, argument checks, the exit convention.

Flags. Every command declares its flags the same way: a dataclass whose fields are made with
:func:`option` (help, choices and bounds in the field's metadata), turned into absl flags by
:func:`define_config_flags` when the command module is imported, and read back into one instance
by :func:`config_from_flags`. An option is one edit. Options several commands share are made by
the ``*_option`` functions here (one definition of each help text); a flag that already exists
in the process (a second command imported into a test or a notebook) is reused, never defined
twice. Library modules define no flags.

absl groups ``--helpfull`` by module and shows the main module's flags for ``--helpshort``; under
``python -m pneumo_tf.X`` the command's module is ``__main__``, which absl files under
``sys.argv[0]`` (:func:`flags_module`), and as a console script :func:`run_app` registers the
command's flags as key flags of ``sys.argv[0]`` too, so both spellings list the command's own
flags.

Exit convention (:func:`run_app`): bad input (``ValueError``, ``OSError`` and the app's own
error types) ends the process with one line ``<app>: error: <message>`` on stderr and exit
status 1, never a traceback; so does a usage error (``app.UsageError``: a missing required flag,
a stray argument), whose line also points to ``--helpshort``.

Help: ``--helpshort`` (and ``--help``) print the command's first docstring line, its usage and
its own flags, one line each (:func:`short_help`); ``--helpfull`` is absl's full text.

Start-up: flags are parsed before TensorFlow is imported, so a typo is answered at once
(``Unknown command line flag 'epoch'. Did you mean: epochs ?``). A command therefore imports at
module level only what its flags need, and the libraries that load TensorFlow inside ``main``;
its own error types may be named as ``"module.Class"`` strings (:func:`run_app`), resolved only
when an error is raised.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import types
import typing
from typing import Any, Callable, Sequence

from absl import app, flags

from pneumo_tf.core import quiet_tf

FLAGS = flags.FLAGS
# The errors a user can cause and fix: they end an app with one line, not a traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError)


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


def flags_module(module_name: str) -> str:
    """The name absl files a command's flags under: ``sys.argv[0]`` for ``__main__``."""
    return sys.argv[0] if module_name == "__main__" else module_name


def _shared(name: str, define: Callable[[], flags.FlagHolder]) -> flags.FlagHolder:
    """The holder of flag ``name``: defined by ``define()`` unless it already exists."""
    return flags.FlagHolder(FLAGS, FLAGS[name]) if name in FLAGS else define()


def _element_type(kind: Any) -> Any:
    """``float`` for ``tuple[float, ...]``; ``str`` for ``tuple[str, ...]``."""
    args = typing.get_args(kind)
    return args[0] if args else str


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
        values = None if default is None else [str(v) for v in default]
        return flags.DEFINE_list(name, values, meta["help"], **common)
    choices = choices_of(field)
    if choices is not None:
        return flags.DEFINE_enum(name, default, list(choices), meta["help"], **common)
    return flags.DEFINE_string(name, default, meta["help"], **common)


def define_config_flags(cls, module_name: str) -> dict[str, flags.FlagHolder]:
    """Define one absl flag per :func:`option` field of dataclass ``cls``.

    A flag that already exists (a shared one such as ``--data_dir``, or a second call) is reused.

    Args:
        cls: the configuration dataclass.
        module_name: the command module the flags belong to (its ``__name__``; what
            ``--helpfull`` groups them by, see :func:`flags_module`).

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
            field.name, lambda: _define_field(field, kind, flags_module(module_name)))
        # A shared flag defined by another command first is still this command's (--helpshort).
        FLAGS.register_key_flag_for_module(flags_module(module_name), FLAGS[field.name])
    return holders


def config_from_flags(cls, holders: dict[str, flags.FlagHolder]):
    """An instance of dataclass ``cls`` from parsed flags (list flags become tuples).

    Raises:
        ValueError: a list flag holds something that is not a number (naming the flag).
    """
    hints = typing.get_type_hints(cls)
    values = {}
    for name, holder in holders.items():
        value, kind = holder.value, hints[name]
        if typing.get_origin(kind) in (typing.Union, types.UnionType):
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        if typing.get_origin(kind) is tuple and value is not None:
            try:
                value = tuple(_element_type(kind)(v) for v in value)
            except ValueError as e:
                raise ValueError(f"--{name}={','.join(value)}: not numbers") from e
        values[name] = value
    return cls(**values)


# ---------------------------------------------------------------------------------------------
# Options shared by several commands (one definition each; a command's flag dataclass uses them)

def data_dir_option(help: str = "Converter output folder: TFRecord shards + manifest.json."
                    ) -> Any:
    """``--data_dir``: a converter output (TFRecord shards + manifest.json)."""
    return option(None, help)


def run_dir_option(help: str = "Run directory of one training run (created by pneumo_tf.train)."
                   ) -> Any:
    """``--run_dir``: the run directory of one training run."""
    return option(None, help)


def split_option() -> Any:
    """``--split``: the data split a command reads."""
    return option("test", "Data split to use: train | val | test.")


def out_option() -> Any:
    """``--out``: an output folder."""
    return option(None, "Output folder.")


def seed_option() -> Any:
    """``--seed``: the random seed."""
    return option(0, "Random seed; same seed and inputs -> same outputs.")


def batch_size_option(help: str = "Batch size (per replica when training).") -> Any:
    """``--batch_size``: images per forward pass."""
    return option(32, help, lower=1)


def runs_option() -> Any:
    """``--runs``: several run directories."""
    return option(None, "Comma-separated run directories (two or more).")


def calibration_option() -> Any:
    """``--calibration``: which of a run's calibrations (temperature + threshold) to use."""
    return option("val", "The run's calibration to use: val = R/calibration.json (fitted on the "
                  "run's validation split); NAME = R/calibrations/NAME.json (re-fitted on a "
                  "site's sample by `python -m pneumo_tf.calibrate --name=NAME`). predict with "
                  "an exported model uses the calibration baked in at export unless this flag "
                  "is given.")


def lung_model_option(help: str) -> Any:
    """``--lung_model``: a lung segmentation run (``--task=lungs``)."""
    return option(None, "A lungs run directory (python -m pneumo_tf.train "
                  "--flagfile=configs/lungs.cfg). " + help)


def min_lung_fraction_option() -> Any:
    """``--min_lung_fraction``: the lung share under which the lung model found no lungs."""
    return option(0.1, "Lung share of the whole film (pixels the lung model calls lung) below "
                  "which it found no lungs: convert --crop=lungs then takes the fixed crop "
                  "(counted as lungs_fallback); predict and export refer the film "
                  "(no_lungs_found).", lower=0.0, upper=1.0)


def min_lung_confidence_option() -> Any:
    """``--min_lung_confidence``: the lung confidence under which the lung model found no lungs."""
    return option(None, "Mean lung probability over the pixels the lung model calls lung below "
                  "which it found no lungs (no_lungs_found): a film gets a crisp map, a photo, "
                  "a page or noise a blurred one. Default: the lungs run's own, fitted on its "
                  "val films (R/lung_guard.json; python -m pneumo_tf.ood --run_dir=LUNGS_RUN "
                  "fits it).", lower=0.0, upper=1.0)


def num_resamples_option() -> Any:
    """``--num_resamples``: stratified bootstrap resamples of the 95 % CIs."""
    return option(2000, "Stratified bootstrap resamples for the 95 % CIs (>= 1000).",
                  lower=1000)


# The --lung_model help of the commands that measure Grad-CAM evidence (gradcam, evaluate).
EVIDENCE_LUNG_MODEL_HELP = (
    "Grad-CAM evidence is measured against its lung masks, computed on the very images the "
    "classifier sees. Records that carry true lung masks (converter --masks) win over it; "
    "without either, the adaptive lung box (or a phantom set's own masks) is used. The output's "
    "lung_source says which.")


@dataclasses.dataclass
class RunSplitFlags:
    """The flags of a command that scores one split of a run (evaluate, gradcam, calibrate)."""

    run_dir: str | None = run_dir_option()
    data_dir: str | None = data_dir_option()
    split: str = split_option()
    batch_size: int = batch_size_option()
    seed: int = seed_option()


def shared_flag(name: str, module_name: str) -> flags.FlagHolder:
    """One option of :class:`RunSplitFlags` as a flag of a script (the tools/ benchmarks).

    Args:
        name: ``run_dir``, ``data_dir``, ``split``, ``batch_size`` or ``seed``.
        module_name: the script's ``__name__``.
    """
    field = next(f for f in dataclasses.fields(RunSplitFlags) if f.name == name)
    kind = typing.get_type_hints(RunSplitFlags)[name]
    one = dataclasses.make_dataclass("One", [(name, kind, field)])
    return define_config_flags(one, module_name)[name]


# ---------------------------------------------------------------------------------------------
# Arguments and the exit convention


HELP_ARGS = ("--helpshort", "-helpshort", "--help", "-help", "-?")
HELP_WIDTH = 100


def _first_sentence(text: str) -> str:
    """The first sentence of a help text (up to ``. `` or the end), on one line."""
    text = " ".join(text.split())
    end = text.find(". ")
    return text if end < 0 else text[:end + 1]


def _shortened(text: str, width: int) -> str:
    if len(text) <= width:
        return text
    return text[:max(width - 3, 10)].rsplit(" ", 1)[0] + " ..."


def _usage_lines(doc: str) -> list[str]:
    """The ``Usage::`` block of a command's docstring, its continuation lines joined."""
    lines = doc.splitlines()
    if "Usage::" not in (line.strip() for line in lines):
        return []
    start = next(i for i, line in enumerate(lines) if line.strip() == "Usage::") + 1
    block = []
    for line in lines[start:]:
        if line.strip() and not line.startswith(" "):
            break
        block.append(line.strip())
    text = "\n".join(block).replace("\\\n", " ").strip()
    return [" ".join(line.split()) for line in text.splitlines() if line.strip()]


def _flag_spelling(flag) -> str:
    """``--name=<default>``, ``--[no]name`` for a boolean, ``--name`` without a default."""
    if flag.boolean:
        return f"--[no]{flag.name}"
    default = flag.default_as_str if flag.default is not None else None
    if default in (None, "''", '""'):
        return f"--{flag.name}"
    return f"--{flag.name}={default.strip(chr(39))}"


def short_help(doc: str | None, holders: dict[str, flags.FlagHolder],
               width: int = HELP_WIDTH) -> str:
    """What ``--helpshort`` prints: the docstring's first line, its usage and one line per flag
    of ``holders`` (spelling with default, first sentence of the help)."""
    doc = doc or ""
    lines = [doc.strip().splitlines()[0]] if doc.strip() else []
    usage = _usage_lines(doc)
    if usage:
        lines += ["", "usage:"] + [f"  {u}" for u in usage]
    lines += ["", "flags (--helpfull: every flag, with its full help):"]
    spelled = [(_flag_spelling(FLAGS[h.name]), FLAGS[h.name].help) for h in holders.values()]
    column = min(max((len(s) for s, _ in spelled), default=0), 30)
    for spelling, help_text in spelled:
        room = width - 2 - max(column, len(spelling)) - 2
        lines.append(f"  {spelling:<{column}}  {_shortened(_first_sentence(help_text), room)}")
    return "\n".join(lines) + "\n"


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


def _error_types(errors: Sequence[type[BaseException] | str]) -> tuple[type[BaseException], ...]:
    """The types of ``errors``; a ``"module.Class"`` string names a type of a module that is
    imported by now, or of none (then it cannot have been raised)."""
    types_ = []
    for error in errors:
        if isinstance(error, str):
            module, _, cls = error.rpartition(".")
            error = getattr(sys.modules.get(module), cls, None)
        if error is not None:
            types_.append(error)
    return tuple(types_)


def run_app(main: Callable[[list[str]], Any], name: str,
            errors: Sequence[type[BaseException] | str] = (),
            flag_holders: dict[str, flags.FlagHolder] | None = None) -> None:
    """``app.run(main)`` under the exit and help conventions of the module docstring.

    Args:
        main: the app's main; its return value is the exit status (None = 0).
        name: the app's name in error lines (``pneumo_tf.train``).
        errors: error types of the app beyond :data:`USER_ERRORS` that are the user's to fix;
            ``"pneumo_tf.serving.export.ExportError"`` names one of a library the command
            imports inside ``main`` (so the command starts without it).
        flag_holders: the command's flags (:func:`define_config_flags`): what ``--helpshort``
            lists, also when the command runs as a console script.
    """
    holders = flag_holders or {}
    for holder in holders.values():
        FLAGS.register_key_flag_for_module(sys.argv[0], FLAGS[holder.name])
    if holders and any(arg in HELP_ARGS for arg in sys.argv[1:]):
        sys.stdout.write(short_help(sys.modules[main.__module__].__doc__, holders))
        sys.exit(0)

    def guarded(argv: list[str]):
        quiet_tf.quiet_python_logs()  # after flag parsing, which sets absl's log level
        try:
            return main(argv)
        except app.UsageError as e:
            sys.exit(f"{name}: error: {e} (--helpshort lists the flags)")
        except BrokenPipeError:
            # The reader went away (`... | head`): stop quietly, as shell tools do.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(1)
        except Exception as e:
            if isinstance(e, USER_ERRORS + _error_types(errors)):
                sys.exit(f"{name}: error: {e}")
            raise

    app.run(guarded)
