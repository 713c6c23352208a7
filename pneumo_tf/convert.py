"""Convert a radiograph source into TFRecord shards + manifest.json, or verify an output folder.

Usage::

    python -m pneumo_tf.convert --src=chest_xray --out=data/cxr224 [--image_size=224]
    python -m pneumo_tf.convert --verify --out=data/cxr224

Also ``tools/make_tfrecords``, ``pneumo-make-tfrecords`` and ``python -m pneumo_tf.data.convert``.
Every setting is a field of :class:`pneumo_tf.data.convert.ConvertConfig`; the conversion and
the checks are :mod:`pneumo_tf.data.convert`.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from absl import app

from pneumo_tf.core import cli
from pneumo_tf.core.cli import option
from pneumo_tf.data import convert, records


@dataclasses.dataclass(frozen=True)
class ConvertCommandFlags(convert.ConvertConfig):
    """The flags of ``python -m pneumo_tf.convert``: the converter's settings, source and output."""

    out: str | None = cli.out_option()
    src: str | None = option(
        None, "Source to convert: a Kaggle/Mendeley folder ({train,val,test}/{NORMAL,PNEUMONIA}/"
        "*), a CSV manifest (path,label[,patient_id][,split]) or a MedMNIST "
        "pneumoniamnist[_64|_128|_224].npz.")
    verify: bool = option(
        False, "Check --out: re-read every shard with CRC checks, decode every image, compare "
        "counts with the manifest; exit 1 naming the shard on any mismatch. Without --src only "
        "verifies; with --src verifies right after converting.")


FLAG_HOLDERS = cli.define_config_flags(ConvertCommandFlags, module_name=__name__)


def _convert_from_flags(src: str, out: str) -> int:
    """Convert ``src`` into ``out`` with the flags' settings; exit status 1 for too many rejects."""
    names = {f.name for f in cli.flag_fields(convert.ConvertConfig)}
    config = cli.config_from_flags(convert.ConvertConfig,
                                   {k: v for k, v in FLAG_HOLDERS.items() if k in names})
    manifest = convert.convert_dataset(src, out, config)
    print(convert.format_summary(manifest, out))
    limit = config.max_rejects
    if limit >= 0 and manifest["rejected"] > limit:
        print(f"error: {manifest['rejected']} inputs rejected, more than --max_rejects={limit}; "
              f"the output is complete without them (see {Path(out) / convert.REJECTS_NAME}); "
              f"raise --max_rejects to accept", file=sys.stderr)
        return 1
    return 0


def _verify_from_flags(out: str) -> int:
    """Verify ``out``; print its problems (exit status 1) or one OK line (0)."""
    problems = convert.verify_data_dir(out)
    if problems:
        print(f"verify {out}: {len(problems)} problem(s)", file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        return 1
    m = records.read_manifest(out)
    n = sum(s["count"] for s in m["splits"].values())
    k = sum(len(s["shards"]) for s in m["splits"].values())
    print(f"verify {out}: OK ({n} records in {k} shards match manifest.json)")
    return 0


def main(argv: list[str]) -> int:
    cli.check_args(argv, FLAG_HOLDERS["out"])
    src, out, verify = (FLAG_HOLDERS[k].value for k in ("src", "out", "verify"))
    if not src and not verify:
        raise app.UsageError("--src is required (or use --verify --out=DIR to check an output)")
    status = _convert_from_flags(src, out) if src else 0
    if verify:
        status = max(status, _verify_from_flags(out))
    return status


def run(name: str = "pneumo_tf.data.convert") -> None:
    """Run the converter; ``name`` starts its error lines (the spelling the user ran; the
    old one for tools/make_tfrecords and the console script)."""
    cli.run_app(main, name, errors=(convert.ConvertError, records.DataDirError),
                flag_holders=FLAG_HOLDERS)


if __name__ == "__main__":
    run("pneumo_tf.convert")
