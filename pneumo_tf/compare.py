"""Compare evaluated runs side by side: the paper's Table I, generalised, with bootstrap CIs.

Usage::

    python -m pneumo_tf.compare --runs=R1,R2 --split=test --out=DIR [--data_dir=D] \
        [--allow_unpaired]

What it reads, writes and how runs are compared: :mod:`pneumo_tf.evaluation.comparison`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from pneumo_tf.core import cli
from pneumo_tf.core.cli import option
from pneumo_tf.evaluation import comparison


@dataclasses.dataclass
class CompareFlags:
    """The flags of ``python -m pneumo_tf.compare``."""

    runs: tuple[str, ...] | None = cli.runs_option()
    split: str = cli.split_option()
    out: str | None = cli.out_option()
    data_dir: str | None = cli.data_dir_option()
    batch_size: int = cli.batch_size_option()
    seed: int = cli.seed_option()
    diff_resamples: int = option(2000, "Bootstrap resamples of the differences between runs "
                                 "(>= 1000).", lower=1000)
    allow_unpaired: bool = option(
        False, "Compare runs evaluated on different images (another data dir or split "
        "content), unpaired; without it such runs are refused.")


FLAG_HOLDERS = cli.define_config_flags(CompareFlags, module_name=__name__)


def main(argv: list[str]) -> None:
    cli.check_args(argv, FLAG_HOLDERS["runs"], FLAG_HOLDERS["out"])
    f = cli.config_from_flags(CompareFlags, FLAG_HOLDERS)
    comparison.compare_runs(list(f.runs), f.split, f.out, f.data_dir, f.batch_size, f.seed,
                            f.diff_resamples, f.allow_unpaired)
    print((Path(f.out) / comparison.COMPARISON_MD).read_text(encoding="utf-8"))


def run() -> None:
    cli.run_app(main, "pneumo_tf.compare", flag_holders=FLAG_HOLDERS)


if __name__ == "__main__":
    run()
