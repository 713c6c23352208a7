"""Make an ensemble run directory of finished runs: ``--runs=A,B,C --out=E``.

Usage::

    python -m pneumo_tf.ensemble --runs=A,B,C --out=E [--data_dir=D]

What an ensemble run directory holds: :mod:`pneumo_tf.evaluation.ensemble`.
"""

from __future__ import annotations

import dataclasses

from pneumo_tf.core import cli


@dataclasses.dataclass
class EnsembleFlags:
    """The flags of ``python -m pneumo_tf.ensemble``."""

    runs: tuple[str, ...] | None = cli.runs_option()
    out: str | None = cli.out_option()
    data_dir: str | None = cli.data_dir_option()


FLAG_HOLDERS = cli.define_config_flags(EnsembleFlags, module_name=__name__)


def main(argv: list[str]) -> None:
    cli.check_args(argv, FLAG_HOLDERS["runs"], FLAG_HOLDERS["out"])
    f = cli.config_from_flags(EnsembleFlags, FLAG_HOLDERS)
    from pneumo_tf.evaluation import ensemble  # loads TensorFlow: after the flags are parsed

    summary = ensemble.create_ensemble(list(f.runs), f.out, f.data_dir)
    print(f"ensemble of {len(summary['ensemble']['members'])} runs -> {f.out} "
          f"(calibration: {summary['calibration']})")


def run() -> None:
    cli.run_app(main, "pneumo_tf.ensemble", flag_holders=FLAG_HOLDERS)


if __name__ == "__main__":
    run()
