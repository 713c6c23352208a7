"""Keep TensorFlow's start-up banner off the console unless the user asks for it.

Importing TensorFlow on a CPU machine prints a dozen lines (oneDNN notices, "Could not find cuda
drivers", the CPU-instructions note, each twice, and ``failed call to cuInit: ... CUDA error``
at the first device query) through C++ logging that runs before ``absl::InitializeLog``, so
``TF_CPP_MIN_LOG_LEVEL`` cannot silence all of them. :func:`install` (called by
``pneumo_tf/__init__.py``, cheap: it imports nothing heavy) hooks the first ``import tensorflow``
of the process: file descriptor 2 is pointed at a temporary file while TensorFlow loads and
lists its devices, then every captured line that is not one of those known notices is written
back to stderr, so real errors still show.

While it is quiet, TensorFlow's own informational lines stay quiet too (C++ ``I`` lines such as
"XLA service ... initialized" or "The default buffer size is 262144", and Python INFO lines such as
"Sharding callback duration", which TensorFlow logs through absl): ``TF_CPP_MIN_LOG_LEVEL``
defaults to 1, and the ``tensorflow`` and ``absl`` loggers to WARNING (:func:`quiet_python_logs`,
called by :func:`pneumo_tf.core.cli.run_app` once flags are parsed). pneumo_tf's own INFO lines (its
loggers are ``pneumo_tf.*``) and every warning and error still show.

Everything comes back with ``PNEUMO_TF_TF_BANNER=1``, with a ``TF_CPP_MIN_LOG_LEVEL`` the user set
(they are managing TensorFlow's logs), or with ``--verbosity=1`` (or higher) on the command line.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import logging
import importlib.util
import os
import re
import sys
import tempfile
from typing import Iterator

# Lines TensorFlow prints at start-up on machines without a GPU, none of them actionable.
NOISE = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|[IW]\d{4} [\d:. ]+\d+ (port|cudart_stub|cpu_feature_guard)\.cc:\d+\] .*"
    r"|E\d{4} [\d:. ]+\d+ cuda_platform\.cc:\d+\] failed call to cuInit: .*"
    r"|To enable the following instructions: .*in other operations, rebuild TensorFlow with the "
    r"appropriate compiler flags\."
    # The TFLite converter and interpreter (pneumo_tf.export): internals, nothing to act on.
    r"|W\d{4} [\d:. ]+\d+ tf_tfl_flatbuffer_helpers\.cc:\d+\] Ignored "
    r"(output_format|drop_control_dependency)\."
    r"|E\d{4} [\d:. ]+\d+ node_def_util\.cc:\d+\] NodeDef mentions attribute Truncate which "
    r"is not in the op definition: .*"
    r"|INFO: Created TensorFlow Lite XNNPACK delegate for CPU\.)$")
# Marks a TF_CPP_MIN_LOG_LEVEL that install() set, so child processes do not take it for the user's.
DEFAULTED = "PNEUMO_TF_TF_LOG_LEVEL_DEFAULTED"


def banner_wanted(argv: list[str] | None = None, environ: dict | None = None) -> bool:
    """Whether the user asked to see TensorFlow's start-up lines (see the module docstring)."""
    environ = os.environ if environ is None else environ
    argv = sys.argv if argv is None else argv
    if environ.get("PNEUMO_TF_TF_BANNER") == "1":
        return True
    if "TF_CPP_MIN_LOG_LEVEL" in environ and environ.get(DEFAULTED) != "1":
        return True
    for arg in argv[1:]:
        m = re.fullmatch(r"--?(?:verbosity|v)=(-?\d+)", arg)
        if m and int(m[1]) >= 1:
            return True
    return False


class _OwnInfoOnly(logging.Filter):
    """Passes every warning and error, and INFO/DEBUG records of pneumo_tf's own loggers only.

    TensorFlow logs its Python INFO lines through absl and resets absl's logger level when it
    loads, so a level cannot keep them out; a filter on the handler can.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return (record.levelno >= logging.WARNING or record.name == "__main__"
                or record.name.startswith("pneumo_tf"))


_OWN_INFO_ONLY = _OwnInfoOnly()


def quiet_python_logs() -> None:
    """TensorFlow's (and absl's) Python INFO lines off, pneumo_tf's own on, unless the user asked
    for everything (:func:`banner_wanted`). Call it once the app's flags are parsed."""
    if banner_wanted():
        return
    from absl import logging as absl_logging

    for handler in {absl_logging.get_absl_handler(), *logging.root.handlers}:
        if _OWN_INFO_ONLY not in handler.filters:
            handler.addFilter(_OWN_INFO_ONLY)


def filtered(text: str) -> str:
    """``text`` without the lines :data:`NOISE` matches."""
    kept = [line for line in text.splitlines() if line.strip() and not NOISE.match(line)]
    return "".join(line + "\n" for line in kept)


@contextlib.contextmanager
def captured_fd(fd: int) -> Iterator[list[str]]:
    """Capture file descriptor ``fd`` (C++ and Python writes alike) while the body runs.

    Yields a list that holds the captured text once the body has ended (also when it raised).
    """
    def flush() -> None:  # Python's buffered writes to that descriptor, before it moves
        stream = {1: sys.stdout, 2: sys.stderr}.get(fd)
        if stream is not None:
            stream.flush()

    text: list[str] = []
    flush()
    saved = os.dup(fd)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), fd)
        try:
            yield text
        finally:
            flush()
            os.dup2(saved, fd)
            os.close(saved)
            capture.seek(0)
            text.append(capture.read().decode("utf-8", "replace"))


@contextlib.contextmanager
def stderr_filtered() -> Iterator[None]:
    """Capture file descriptor 2 (C++ and Python writes alike); replay it without the noise.

    If the body raises, everything captured is replayed, so nothing that explains the error is
    lost.
    """
    failed, text = False, []
    try:
        with captured_fd(2) as text:
            try:
                yield
            except BaseException:
                failed = True
                raise
    finally:
        if text:  # empty only if the capture itself could not start
            sys.stderr.write(text[0] if failed else filtered(text[0]))
            sys.stderr.flush()


class _QuietLoader(importlib.abc.Loader):
    """Runs TensorFlow's own loader, and its first device query, under :func:`stderr_filtered`."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        with stderr_filtered():
            self._loader.exec_module(module)
            # The "failed call to cuInit" error comes with the first device query: do it here.
            module.config.list_physical_devices("GPU")
        logging.getLogger("tensorflow").setLevel(logging.WARNING)


class _TensorFlowFinder(importlib.abc.MetaPathFinder):
    """Finds ``tensorflow`` once, handing it a :class:`_QuietLoader`; then steps aside."""

    def find_spec(self, name, path, target=None):
        if name != "tensorflow":
            return None
        uninstall()
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader)
        return spec


_FINDER = _TensorFlowFinder()


def install() -> None:
    """Hook the process's first ``import tensorflow`` (no-op if it is done or not wanted)."""
    if "tensorflow" in sys.modules or banner_wanted() or _FINDER in sys.meta_path:
        return
    if "TF_CPP_MIN_LOG_LEVEL" not in os.environ:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "1"
        os.environ[DEFAULTED] = "1"
    sys.meta_path.insert(0, _FINDER)


def uninstall() -> None:
    """Remove the hook (TensorFlow imports normally from then on)."""
    if _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)
