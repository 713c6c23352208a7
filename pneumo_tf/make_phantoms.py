"""Write a synthetic chest-radiograph phantom data set (lungs, lesions, optional confounder tags).

Usage::

    python -m pneumo_tf.make_phantoms --out=/tmp/phantoms --num_train=200 --num_test=50

Also ``tools/make_phantoms``, ``pneumo-make-phantoms`` and ``python -m pneumo_tf.data.phantoms``.
Every setting is a field of :class:`pneumo_tf.data.phantoms.PhantomConfig`; what is drawn:
:mod:`pneumo_tf.data.phantoms`.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from pneumo_tf.core import cli
from pneumo_tf.data import phantoms

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PhantomFlags(phantoms.PhantomConfig):
    """The flags of ``python -m pneumo_tf.make_phantoms``: the phantom settings and the output."""

    out: str | None = cli.out_option()


FLAG_HOLDERS = cli.define_config_flags(PhantomFlags, module_name=__name__)


def _parse_images_per_patient(values: list[str]) -> tuple[int, int]:
    try:
        lo, hi = (int(v) for v in values)
    except ValueError:
        raise ValueError(f"--images_per_patient must be two integers MIN,MAX (e.g. 1,4), got "
                         f"{','.join(values)}") from None
    return lo, hi


def config_from_flags() -> phantoms.PhantomConfig:
    """The :class:`PhantomConfig` the parsed flags describe."""
    names = {f.name for f in cli.flag_fields(phantoms.PhantomConfig)}
    holders = {k: v for k, v in FLAG_HOLDERS.items() if k in names}
    pair = _parse_images_per_patient(holders.pop("images_per_patient").value)
    return dataclasses.replace(cli.config_from_flags(phantoms.PhantomConfig, holders),
                               images_per_patient=pair)


def main(argv: list[str]) -> None:
    cli.check_args(argv, FLAG_HOLDERS["out"])
    summary = phantoms.write_phantom_dataset(FLAG_HOLDERS["out"].value, config_from_flags())
    for split in phantoms.SPLIT_NAMES:
        c, p = summary["counts"][split], summary["patients"][split]
        k = summary["confounders"][split]
        log.info("%s: NORMAL %d images / %d patients, PNEUMONIA %d / %d; tags %d N, %d P",
                 split, c["NORMAL"], p["NORMAL"], c["PNEUMONIA"], p["PNEUMONIA"],
                 k["NORMAL"], k["PNEUMONIA"])
    print(f"phantoms of site {summary['site']['name']} written to {summary['out']} "
          f"(summary: {Path(summary['out']) / phantoms.PHANTOMS_JSON})")


def run(name: str = "pneumo_tf.data.phantoms") -> None:
    """Write phantoms; ``name`` starts its error lines (the spelling the user ran; the old
    one for tools/make_phantoms and the console script)."""
    cli.run_app(main, name, flag_holders=FLAG_HOLDERS)


if __name__ == "__main__":
    run("pneumo_tf.make_phantoms")
