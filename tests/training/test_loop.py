"""Tests of pneumo_tf.train: callback state machines, run directory, resume, NaN, distribution.

Everything runs small_cnn on tiny synthetic data (32 px); subprocess tests are marked slow.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, run_command, write_tiny_dataset
from pneumo_tf.core import atomic_files, rundir
from pneumo_tf.evaluation import metrics
from pneumo_tf.training import config as train_config
from pneumo_tf.training import loop, session
from pneumo_tf.training import task as task_lib
from pneumo_tf.training import trainer as trainer_lib
from pneumo_tf.data import pipeline, records

TINY_FLAGS = ["--backbone=small_cnn", "--weights=none", "--trainable_layers=-1", "--train_bn",
              "--batch_size=4", "--precision=float32", "--nocalibrate", "--nofit_ood",
              "--tb_images=2", "--val_batch_size=16"]


def tiny_config(data_dir, run_dir, **overrides) -> train_config.TrainConfig:
    kwargs = dict(data_dir=str(data_dir), run_dir=str(run_dir), backbone="small_cnn",
                  weights="none", trainable_layers=-1, train_bn=True, batch_size=4, epochs=2,
                  steps_per_epoch=3, precision="float32", strategy="default", calibrate=False,
                  fit_ood=False, tb_images=2, val_batch_size=16, lr=1e-3)
    kwargs.update(overrides)
    return train_config.TrainConfig(**kwargs)


@pytest.fixture(autouse=True)
def _float32_policy():
    import keras

    yield
    keras.mixed_precision.set_global_policy("float32")


# ---------------------------------------------------------------------------------------------
# Pure pieces


def test_early_stopping_matches_keras_semantics():
    es = loop.EarlyStopping(patience=3)
    seq = [1.0, 0.8, 0.9, 0.85, 0.81, 0.7]
    out = [es.update(e, v) for e, v in enumerate(seq[:5])]
    assert [o[0] for o in out] == [True, True, False, False, False]
    assert [o[1] for o in out] == [False, False, False, False, True]  # 3 epochs without gain
    assert es.best == 0.8 and es.best_epoch == 1


def test_reduce_lr_on_plateau_matches_keras_semantics():
    plateau = loop.ReduceLROnPlateau(patience=2, factor=0.2)
    lrs, lr = [], 1e-3
    for v in [1.0, 1.0, 0.99995, 0.5, 0.6, 0.7, 0.8]:  # 0.99995: below min_delta, no gain
        lr = plateau.update(v, lr)
        lrs.append(lr)
    np.testing.assert_allclose(lrs, [1e-3, 1e-3, 2e-4, 2e-4, 2e-4, 4e-5, 4e-5])


def test_binary_metrics_known_values():
    labels = [0, 0, 1, 1]
    probs = [0.1, 0.6, 0.4, 0.9]
    m = metrics.binary_metrics(labels, probs)
    assert m["accuracy"] == 0.5
    assert m["precision"] == 0.5 and m["recall"] == 0.5
    assert m["auc"] == 0.75
    assert m["pr_auc"] == pytest.approx(0.8333333)
    one_class = metrics.binary_metrics([1, 1], [0.3, 0.7])
    assert math.isnan(one_class["auc"]) and one_class["accuracy"] == 0.5


def test_history_csv_round_trip(tmp_path):
    rows = [{k: (i if k == "epoch" else 0.1 * i + 1 / 3) for k in loop.HISTORY_COLUMNS}
            for i in range(3)]
    path = tmp_path / "history.csv"
    rundir.write_history_csv(path, rows, loop.HISTORY_COLUMNS)
    assert path.read_text().splitlines()[0] == ",".join(loop.HISTORY_COLUMNS)
    assert rundir.read_history_csv(path) == rows


def test_epoch_seed_depends_on_seed_and_epoch_only():
    assert trainer_lib.epoch_seed(0, 3) == trainer_lib.epoch_seed(0, 3)
    assert len({trainer_lib.epoch_seed(s, e, k) for s in (0, 1) for e in (0, 1) for k in (0, 1)}) == 8
    assert 0 <= trainer_lib.epoch_seed(123, 456) < 2**31


def test_augment_kwargs_picks_resampler_for_xla():
    cfg = train_config.TrainConfig(data_dir="d", run_dir="r")
    assert train_config.augment_kwargs(cfg, jit_compile=False)["resampler"] == "gather_xla"
    assert train_config.augment_kwargs(cfg, jit_compile=True)["resampler"] == "gather"
    cfg.resampler = "native"
    with pytest.raises(train_config.TrainError, match="--resampler=native cannot be XLA-compiled"):
        train_config.augment_kwargs(cfg, jit_compile=True)
    cfg.augment = False
    assert train_config.augment_kwargs(cfg, jit_compile=False) is None


@pytest.mark.parametrize("field,value,message", [
    ("loss", "hinge", "--loss='hinge'"),
    ("epochs", 0, "--epochs=0"),
    ("backbone", "vgg", "unknown backbone 'vgg'"),
    ("profile_steps", "5", "--profile_steps='5'"),
])
def test_config_errors_name_the_flag(tmp_path, field, value, message):
    cfg = tiny_config(tmp_path / "d", tmp_path / "r", **{field: value})
    with pytest.raises(ValueError, match=message):
        cfg.validate()
        cfg.profile_range()


# ---------------------------------------------------------------------------------------------
# Errors before training


def _assert_nothing_trained(run_dir: Path):
    assert not (run_dir / "backup").exists()
    assert not (run_dir / "model.keras").exists()


def test_data_dir_without_manifest_fails_before_training(tmp_path):
    data = write_tiny_dataset(tmp_path / "data")
    (data / "manifest.json").unlink()
    with pytest.raises(records.DataDirError, match="manifest.json is missing"):
        session.train(tiny_config(data, tmp_path / "run"))
    _assert_nothing_trained(tmp_path / "run")


def test_empty_split_fails_before_training(tmp_path):
    data = write_tiny_dataset(tmp_path / "data", counts={"train": (6, 6), "val": (0, 0)})
    with pytest.raises(records.DataDirError, match="split 'val' .* is empty"):
        session.train(tiny_config(data, tmp_path / "run"))
    _assert_nothing_trained(tmp_path / "run")


def test_resume_with_mismatched_manifest_fails_before_training(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    old = write_tiny_dataset(tmp_path / "old", image_size=32, crop="fixed")
    atomic_files.write_json_atomic(run / "data_manifest.json", records.read_manifest(old))
    new = write_tiny_dataset(tmp_path / "new", image_size=40, crop="none")
    with pytest.raises(rundir.RunDirError, match="image_size: run has 32, data dir has 40; "
                                                 "crop: run has 'fixed', data dir has 'none'"):
        session.train(tiny_config(new, run))
    _assert_nothing_trained(run)


# ---------------------------------------------------------------------------------------------
# In-process training


@pytest.mark.slow
def test_train_writes_a_complete_run_dir_and_a_rerun_says_complete(tmp_path, caplog,
                                                                    monkeypatch):
    from pneumo_tf.evaluation import calibration

    data = write_tiny_dataset(tmp_path / "data")
    run = tmp_path / "run"
    # What the steps after training are given, and every model.keras loaded meanwhile.
    given, loads = [], []
    calibrate_run, load = calibration.calibrate_run, rundir._load_keras_model
    monkeypatch.setattr(calibration, "calibrate_run",
                        lambda r, *a, **k: given.append(r) or calibrate_run(r, *a, **k))
    monkeypatch.setattr(rundir, "_load_keras_model", lambda path: loads.append(path) or load(path))
    summary = session.train(tiny_config(data, run, calibrate=True), flags_text="--epochs=2\n")
    # The loop opens the finished run once and hands the steps its model: nothing is reloaded.
    assert len(given) == 1 and isinstance(given[0], rundir.Run) and given[0].root == run
    assert "model" in vars(given[0]) and loads == []
    paths = rundir.RunPaths(run)
    for p in (paths.flags, paths.data_manifest, paths.best_weights, paths.model, paths.history,
              paths.summary):
        assert p.is_file(), p
    assert list(paths.backup.glob("ckpt-*.index"))
    assert {p.name for p in paths.tb.iterdir()} >= {"train", "val"}
    hist = rundir.read_history_csv(paths.history)
    assert [r["epoch"] for r in hist] == [0, 1]
    assert list(hist[0]) == list(loop.HISTORY_COLUMNS)
    assert hist[0]["lr"] == 1e-3
    on_disk = json.loads(paths.summary.read_text())
    for key in ("precision_policy", "jit_compile", "strategy", "num_replicas", "epochs_run",
                "best_epoch", "best_val_loss", "train_images_per_sec", "config"):
        assert key in on_disk, key
    assert on_disk["epochs_run"] == 2 and on_disk["strategy"] == "default"
    assert on_disk["precision_policy"] == "float32" and on_disk["num_replicas"] == 1
    assert on_disk["best_val_loss"] == min(r["val_loss"] for r in hist)
    assert on_disk["config"]["backbone"] == "small_cnn"
    assert on_disk["config"]["image_size"] == 32 and on_disk["config"]["crop"] == "fixed"
    assert on_disk["train_images_per_sec"] > 0
    assert summary["calibration"] == on_disk["calibration"] == "ok"
    assert json.loads(paths.calibration.read_text())["source"] == "val"
    # TensorBoard: augmented inputs once per process start, the learning rate, the hparams.
    events = _tb_events(paths.tb)
    assert events["train"]["augmented_inputs"] == ("images", 1)
    assert events["train"]["learning_rate"] == ("scalars", 2)
    assert "hparams" in {plugin for plugin, _ in events["hparams"].values()}
    # model.keras holds the best epoch's weights and loads in safe mode.
    model = rundir.load_model(run)
    import keras

    best = trainer_lib.Trainer(tiny_config(data, run), _default_setup(),
                               records.read_manifest(data)).model
    best.load_weights(paths.best_weights)
    for a, b in zip(model.get_weights(), best.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert isinstance(model, keras.Model)
    # The same run dir again: complete, nothing retrained; a calibration that did not finish
    # (summary.json is written first) is redone.
    mtime = paths.model.stat().st_mtime_ns
    paths.calibration.unlink()
    again = session.train(tiny_config(data, run, calibrate=True))
    assert again["epochs_run"] == 2 and paths.model.stat().st_mtime_ns == mtime
    # ... on a Run of its own, which loads model.keras when the step asks for it.
    assert len(given) == 2 and given[1] is not given[0] and given[1].root == run
    assert loads[-1] == paths.model
    assert again["calibration"] == "ok"
    assert json.loads(paths.calibration.read_text())["source"] == "val"


def _tb_events(tb_dir: Path) -> dict:
    """``{writer dir: {tag: (plugin name, number of events)}}`` of a run's ``tb/``."""
    import tensorflow as tf

    out = {}
    for path in sorted(tb_dir.glob("*/events.out.tfevents.*")):
        tags = out.setdefault(path.parent.name, {})
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                plugin, count = tags.get(value.tag, (None, 0))
                tags[value.tag] = (value.metadata.plugin_data.plugin_name or plugin, count + 1)
    return out


def test_logging_augmented_images_leaves_the_models_seed_state_alone(tmp_path):
    import tensorflow as tf

    data = write_tiny_dataset(tmp_path / "data")
    trainer = trainer_lib.Trainer(tiny_config(data, tmp_path / "run"), _default_setup(),
                                  records.read_manifest(data))
    assert trainer.augment is not None and trainer.seed_states
    before = [v.numpy().copy() for v in trainer.seed_states]
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 1), dtype=np.uint8)
    writer = tf.summary.create_file_writer(str(tmp_path / "tb" / "train"))
    loop.log_augmented_images(trainer, tf.constant(images), writer, step=0, max_images=2)
    writer.close()
    for a, b in zip(before, trainer.seed_states):
        np.testing.assert_array_equal(a, b.numpy())
    assert _tb_events(tmp_path / "tb")["train"]["augmented_inputs"] == ("images", 1)


def test_every_fill_mode_flag_choice_is_accepted_by_the_augment_layer():
    from absl import flags

    import pneumo_tf.train  # noqa: F401  (the command defines the training flags)
    from pneumo_tf.image import augment

    assert flags.FLAGS["fill_mode"].parser.enum_values == list(augment.FILL_MODES)
    for mode in flags.FLAGS["fill_mode"].parser.enum_values:
        assert augment.RandomAffine(fill_mode=mode).fill_mode == mode


def test_resume_flags_must_match_except_logging_and_more_epochs(tmp_path):
    run_flags = "# comment\n--lr=0.001\n--epochs=3\n--train_bn\n--tb_images=8\n--data_dir=a\n"
    path = tmp_path / "run" / "flags.txt"
    same = train_config.check_resume_flags(run_flags, run_flags, path)
    assert same is False
    harmless = "--lr=0.001\n--epochs=5\n--train_bn\n--tb_images=0\n--data_dir=b\n"
    assert train_config.check_resume_flags(run_flags, harmless, path) is True  # epochs grew
    changed = "--lr=0.0001\n--epochs=2\n--notrain_bn\n--tb_images=8\n--data_dir=a\n"
    with pytest.raises(train_config.TrainError) as e:
        train_config.check_resume_flags(run_flags, changed, path)
    assert str(e.value) == (
        f"{path.parent} is resumed from its backup, but these flags differ from {path}: "
        "--epochs: run has '3', now '2'; --lr: run has '0.001', now '0.0001'; "
        "--train_bn: run has 'true', now 'false'. Resume with the run's flags "
        f"(--flagfile={path}; --epochs may only grow) or train with the new flags in a new "
        "--run_dir")


def _default_setup():
    from pneumo_tf.training import distribute

    return distribute.setup_distribution("default", "float32", "false")


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    data = write_tiny_dataset(tmp_path / "data")
    run = tmp_path / "run"
    # Steps 0-2 are epoch 0 (backed up); global step 4 is inside epoch 1.
    real_step = trainer_lib.Trainer.train_step

    def nan_at_step_4(self, *batch):
        nan = int(self.optimizer.iterations.numpy()) == 4
        loss, scores, labels = real_step(self, *batch)
        return (loss * float("nan") if nan else loss), scores, labels

    monkeypatch.setattr(trainer_lib.Trainer, "train_step", nan_at_step_4)
    cfg = tiny_config(data, run, epochs=3)
    with pytest.raises(loop.TrainingDivergedError,
                       match=r"loss is nan at epoch 1 step 1 .*last good checkpoint is kept: "
                             r".*ckpt-3.*new --run_dir with a lower --lr \(now 0.001\); this "
                             r"run dir resumes only with the same flags"):
        session.train(cfg, flags_text="--lr=0.001\n--epochs=3\n")
    import tensorflow as tf

    assert tf.train.latest_checkpoint(str(run / "backup")).endswith("ckpt-3")
    assert not (run / "model.keras").exists() and not (run / "summary.json").exists()
    assert [r["epoch"] for r in rundir.read_history_csv(run / "history.csv")] == [0]
    # Resuming with a lower --lr would be overruled by the backup's optimizer: refused.
    with pytest.raises(train_config.TrainError, match=r"--lr: run has '0.001', now '0.0001'"):
        session.train(tiny_config(data, run, epochs=3, lr=1e-4),
                      flags_text="--lr=0.0001\n--epochs=3\n")
    assert (run / "flags.txt").read_text() == "--lr=0.001\n--epochs=3\n"


@pytest.mark.slow
def test_same_flags_give_identical_history_with_deterministic(tmp_path):
    data = write_tiny_dataset(tmp_path / "data")
    histories = []
    for name in ("a", "b"):
        session.train(tiny_config(data, tmp_path / name, deterministic=True))
        histories.append(rundir.read_history_csv(tmp_path / name / "history.csv"))
    assert histories[0] == histories[1]
    assert histories[0][0]["loss"] != histories[0][1]["loss"]  # it did train


# ---------------------------------------------------------------------------------------------
# Subprocess: kill -9 and resume, mirrored, multi-worker


def _env(**extra) -> dict:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(REPO))
    env.update(extra)
    return env


def _train_cmd(data, run, *extra) -> list[str]:
    return [sys.executable, "-m", "pneumo_tf.train", f"--data_dir={data}", f"--run_dir={run}",
            *TINY_FLAGS, *extra]


@pytest.mark.slow
def test_kill_9_mid_epoch_then_resume_equals_uninterrupted_run(tmp_path):
    data = write_tiny_dataset(tmp_path / "data")
    extra = ["--epochs=4", "--steps_per_epoch=30", "--deterministic", "--lr=1e-3"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(data, killed, *extra), env=_env(), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    ref = subprocess.Popen(_train_cmd(data, tmp_path / "ref", *extra), env=_env(), cwd=REPO,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not (killed / "backup" / "checkpoint").is_file():
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        assert time.monotonic() < deadline, "no backup within 240 s"
        time.sleep(0.02)
    time.sleep(0.2)  # into the next epoch's steps
    assert proc.poll() is None, "run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    rows = rundir.read_history_csv(killed / "history.csv")
    assert 1 <= len(rows) < 4
    again = subprocess.run(_train_cmd(data, killed, *extra), env=_env(), cwd=REPO,
                           capture_output=True, text=True, timeout=300)
    out = again.stdout + again.stderr
    assert again.returncode == 0, out[-3000:]
    resumed = [int(line.split("resumed from epoch ")[1].split()[0])
               for line in out.splitlines() if line.startswith("resumed from epoch ")]
    assert resumed and resumed[0] >= 1, out[-3000:]
    assert "epoch 0:" not in out  # no restart from the first epoch
    assert ref.wait(timeout=300) == 0
    got = rundir.read_history_csv(killed / "history.csv")
    want = rundir.read_history_csv(tmp_path / "ref" / "history.csv")
    assert [r["epoch"] for r in got] == [0, 1, 2, 3]
    assert got == want
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["resumed_from_epochs"] == resumed[:1]


MIRRORED_SCRIPT = textwrap.dedent("""
    import json, sys
    from pneumo_tf.training import distribute
    distribute.configure_cpu_devices(2)
    from pneumo_tf.evaluation import metrics
    from pneumo_tf.training import config as train_config
    from pneumo_tf.training import loop, session
    from pneumo_tf.training import task as task_lib
    from pneumo_tf.training import trainer as trainer_lib
    from pneumo_tf.data import pipeline, records
    data, run = sys.argv[1], sys.argv[2]
    manifest = records.read_manifest(data)
    batch = next(iter(pipeline.make_eval_dataset(data, "train", 8)))
    images, labels, weights = batch["image"], batch["label"], batch["weight"]
    out = {}
    for name, per_replica in (("default", 8), ("mirrored", 4)):
        setup = distribute.setup_distribution(name, "float32", "false", cpu_devices=2)
        cfg = train_config.TrainConfig(data_dir=data, run_dir=run, backbone="small_cnn", weights="none",
                                       trainable_layers=-1, augment=False, head_dropout=(0.0, 0.0),
                                       batch_size=per_replica, lr=1e-2, seed=7)
        trainer = trainer_lib.Trainer(cfg, setup, manifest)
        losses = [trainer.step_on_global_batch(images, labels, weights) for _ in range(2)]
        out[name] = {"replicas": setup.num_replicas, "losses": losses}
    print("RESULT " + json.dumps(out))
""")


@pytest.mark.slow
def test_mirrored_on_two_cpu_devices_matches_default_first_step_loss(tmp_path):
    data = write_tiny_dataset(tmp_path / "data")
    proc = subprocess.run([sys.executable, "-c", MIRRORED_SCRIPT, str(data), str(tmp_path / "r")],
                          env=_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT ")[1])
    assert result["default"]["replicas"] == 1 and result["mirrored"]["replicas"] == 2
    d, m = result["default"]["losses"], result["mirrored"]["losses"]
    assert m[0] == pytest.approx(d[0], rel=1e-5)
    # Gradients summed over replicas = the full-batch gradient: the second step agrees too.
    assert m[1] == pytest.approx(d[1], rel=1e-4)
    assert d[1] != pytest.approx(d[0], rel=1e-4)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_multi_worker_two_local_processes_train_and_only_the_chief_writes(tmp_path):
    data = write_tiny_dataset(tmp_path / "data")
    run = tmp_path / "run"
    ports = [_free_port(), _free_port()]
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    procs = []
    for index in range(2):
        tmpdir = tmp_path / f"tmp{index}"
        tmpdir.mkdir()
        tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        procs.append(subprocess.Popen(
            _train_cmd(data, run, "--strategy=multi_worker", "--epochs=2", "--steps_per_epoch=3"),
            env=_env(TF_CONFIG=tf_config, TMPDIR=str(tmpdir)), cwd=REPO,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=400)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    # Both logs on failure: the worker that fails first is often not the one that reports it.
    assert [p.returncode for p in procs] == [0, 0], "\n--- worker 1:\n".join(
        out[-3000:] for out in outs)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["strategy"] == "multi_worker" and summary["num_replicas"] == 2
    assert summary["epochs_run"] == 2
    assert summary["global_batch_size"] == 8
    assert (run / "model.keras").is_file()
    rundir.load_model(run)
    assert [r["epoch"] for r in rundir.read_history_csv(run / "history.csv")] == [0, 1]
    # Both workers trained every epoch; only the chief's run dir holds the model.
    for out in outs:
        assert "epoch 0: loss=" in out and "epoch 1: loss=" in out, out[-3000:]
    assert list(tmp_path.rglob("model*.keras")) == [run / "model.keras"]
    assert sorted(p.name for p in run.iterdir()) == sorted(
        ["backup", "best.weights.h5", "data_manifest.json", "flags.txt", "history.csv",
         "model.keras", "summary.json", "tb"])


@pytest.mark.slow
@pytest.mark.parametrize("precision,jit", [("mixed_bfloat16", "false"), ("mixed_float16", "true")])
def test_mixed_precision_and_xla_steps_train_on_cpu(tmp_path, precision, jit):
    """The GPU default (fp16 + loss scaling + XLA, gather resampler) and the bf16 path, on CPU."""
    import numpy as np

    from pneumo_tf.training import distribute

    data = write_tiny_dataset(tmp_path / "data")
    cfg = tiny_config(data, tmp_path / "run", epochs=1, steps_per_epoch=2, precision=precision,
                      jit_compile=jit)
    setup = distribute.setup_distribution("default", precision, jit)
    summary = session.train(cfg, setup=setup)
    assert summary["precision_policy"] == precision
    assert summary["jit_compile"] is (jit == "true")
    assert summary["config"]["augment"]["resampler"] == ("gather" if jit == "true" else "gather_xla")
    rows = rundir.read_history_csv(tmp_path / "run" / "history.csv")
    assert len(rows) == 1 and np.isfinite(float(rows[0]["loss"]))
    assert rundir.load_model(tmp_path / "run").output.dtype == "float32"


# ---------------------------------------------------------------------------------------------
# Recipe levers: selection metric, schedules, weight averaging, label smoothing, the probe


def test_early_stopping_on_a_score_and_never():
    es = loop.EarlyStopping(patience=2, best=-math.inf, mode="max")
    out = [es.update(e, v) for e, v in enumerate([0.90, 0.95, 0.94, 0.93])]
    assert [o[0] for o in out] == [True, True, False, False]
    assert out[-1][1] is True and es.best == 0.95 and es.best_epoch == 1
    never = loop.EarlyStopping(patience=-1)
    assert not any(never.update(e, 1.0 + e)[1] for e in range(20))


def test_label_smoothing_and_the_optimizers(tmp_path):
    smooth = task_lib.get_task(tiny_config("d", "r", loss="bce", label_smoothing=0.2).task).make_loss(tiny_config("d", "r", loss="bce", label_smoothing=0.2))
    plain = task_lib.get_task(tiny_config("d", "r", loss="bce").task).make_loss(tiny_config("d", "r", loss="bce"))
    y, p = np.array([[1.0], [0.0]], np.float32), np.array([[0.999], [0.001]], np.float32)
    assert float(np.mean(plain(y, p))) < 0.01 < float(np.mean(smooth(y, p)))
    adamw = trainer_lib.make_optimizer(tiny_config("d", "r", optimizer="adamw", weight_decay=0.01,
                                                   lr_schedule="cosine", warmup_epochs=1, epochs=4,
                                                   lr=1e-2), steps_per_epoch=10,
                                 precision_policy="float32")
    assert isinstance(adamw, trainer_lib.AdamW) and adamw.weight_decay == 0.01
    assert isinstance(trainer_lib.make_optimizer(tiny_config("d", "r"), 10, "float32"),
                      trainer_lib.Adam)
    schedule = adamw._learning_rate  # warm-up 10 steps from 0 to 1e-2, then cosine to 0 at 40
    assert float(schedule(0)) == 0.0
    assert float(schedule(10)) == pytest.approx(1e-2)
    assert float(schedule(25)) == pytest.approx(0.5e-2, rel=1e-3)
    assert float(schedule(40)) == pytest.approx(0.0, abs=1e-7)


def test_weight_averages_are_swapped_in_and_out(tmp_path):
    data = write_tiny_dataset(tmp_path / "data")
    trainer = trainer_lib.Trainer(tiny_config(data, tmp_path / "run", ema_decay=0.9, augment=False),
                                  _default_setup(), records.read_manifest(data))
    batch = next(iter(pipeline.make_eval_dataset(data, "train", 4)))
    images, labels, weights = batch["image"], batch["label"], batch["weight"]
    for _ in range(3):
        trainer.step_on_global_batch(images, labels, weights)
    raw = [v.numpy().copy() for v in trainer.model.trainable_variables]
    with trainer.averaged_weights():
        inside = [v.numpy().copy() for v in trainer.model.trainable_variables]
    after = [v.numpy() for v in trainer.model.trainable_variables]
    assert any(np.abs(a - b).max() > 1e-6 for a, b in zip(raw, inside))
    for a, b in zip(raw, after):
        np.testing.assert_array_equal(a, b)


def test_validation_builds_each_splits_pipeline_once_per_run(tmp_path, monkeypatch):
    data = write_tiny_dataset(tmp_path / "data")
    trainer = trainer_lib.Trainer(tiny_config(data, tmp_path / "run", cache="true"),
                                  _default_setup(), records.read_manifest(data))
    built, make = [], trainer.task.eval_dataset
    monkeypatch.setattr(trainer.task, "eval_dataset",
                        lambda cfg, split: built.append(split) or make(cfg, split))
    first = trainer.predict_split("val")
    # The second pass reads the RAM cache the first one filled: the shards are not read again.
    for shard in records.read_manifest(data)["splits"]["val"]["shards"]:
        (data / shard).write_bytes(b"")
    second = trainer.predict_split("val")
    trainer.predict_split("train")
    assert built == ["val", "train"]
    assert len(first["probability"]) == 12 and list(first) == list(second)
    for key in first:
        np.testing.assert_array_equal(first[key], second[key])


@pytest.mark.slow
def test_cosine_ema_val_auc_run_keeps_the_best_auc_epoch(tmp_path):
    data = write_tiny_dataset(tmp_path / "data")
    run = tmp_path / "run"
    summary = session.train(tiny_config(data, run, epochs=3, optimizer="adamw", lr_schedule="cosine",
                                        warmup_epochs=1, ema_decay=0.5, select_on="val_auc",
                                        early_stop_patience=-1, loss="bce", label_smoothing=0.1,
                                        contrast=0.2, sharpness=0.5))
    hist = rundir.read_history_csv(run / "history.csv")
    assert [r["lr"] for r in hist][0] == 0.0 and hist[1]["lr"] == pytest.approx(1e-3, rel=1e-4)
    assert hist[2]["lr"] < hist[1]["lr"]
    aucs = [r["val_auc"] for r in hist]
    assert summary["selected_on"] == "val_auc" and summary["best_epoch"] == int(np.argmax(aucs))
    assert summary["config"]["augment"]["contrast"] == 0.2
    assert summary["precision_probe"] is None  # --precision=float32 was given
    # model.keras holds the best epoch's averaged weights (the ones validated).
    best = trainer_lib.Trainer(tiny_config(data, run), _default_setup(), records.read_manifest(data))
    best.model.load_weights(run / "best.weights.h5")
    for a, b in zip(rundir.load_model(run).get_weights(), best.model.get_weights()):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_auto_precision_is_probed_once_then_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("PNEUMO_TF_CACHE", str(tmp_path / "cache"))
    data = write_tiny_dataset(tmp_path / "data")
    first = session.train(tiny_config(data, tmp_path / "a", epochs=1, precision="auto"))
    probe = first["precision_probe"]
    assert probe["cached"] is False
    assert set(probe["candidates"]) == {"float32", "mixed_bfloat16"}
    assert all(v > 0 for v in probe["candidates"].values())
    assert first["precision_policy"] == probe["chosen"]
    again = session.train(tiny_config(data, tmp_path / "b", epochs=1, precision="auto"))
    assert again["precision_probe"] == {**probe, "cached": True}
    assert again["precision_policy"] == probe["chosen"]
    forced = session.train(tiny_config(data, tmp_path / "c", epochs=1,
                                       precision="mixed_bfloat16"))
    assert forced["precision_probe"] is None and forced["precision_policy"] == "mixed_bfloat16"


@pytest.mark.slow
def test_profiler_trace_lands_in_the_runs_tensorboard_folder(tmp_path):
    data = write_tiny_dataset(tmp_path / "data")
    run = tmp_path / "run"
    session.train(tiny_config(data, run, epochs=1, steps_per_epoch=4, profile_steps="1,3"))
    traces = list((run / "tb" / "train" / "plugins" / "profile").rglob("*.xplane.pb"))
    assert traces and traces[0].stat().st_size > 0


@pytest.mark.slow
def test_ensemble_seeds_train_members_and_average_them(tmp_path, monkeypatch):
    from pneumo_tf.evaluation import scoring

    data = write_tiny_dataset(tmp_path / "data")
    run = tmp_path / "run"
    loaded, load = [], rundir._load_keras_model
    monkeypatch.setattr(rundir, "_load_keras_model",
                        lambda path: loaded.append(path.parent) or load(path))
    summary = session.train(tiny_config(data, run, epochs=1, ensemble_seeds="0,1", calibrate=True),
                            flags_text="--epochs=1\n--ensemble_seeds=0,1\n")
    members = [run / "members" / "seed_0", run / "members" / "seed_1"]
    # The members' models are read to build the ensemble; its calibration and OOD fit use the
    # ensemble model just built, never reloading it.
    assert loaded == members
    monkeypatch.setattr(rundir, "_load_keras_model", load)
    assert summary["ensemble"]["members"] == [str(m.resolve()) for m in members]
    assert summary["ensemble"]["member_seeds"] == [0, 1]
    assert (run / "calibration.json").is_file() and summary["calibration"] == "ok"
    probs = [scoring.predict_split(rundir.load_model(r), data, "val")["probability"]
             for r in (*members, run)]
    np.testing.assert_allclose(probs[2], (probs[0] + probs[1]) / 2, atol=1e-6)
    assert session.train(tiny_config(data, run, epochs=1, ensemble_seeds="0,1"))["ensemble"]


@pytest.mark.slow
def test_a_finished_run_continues_with_more_epochs_and_refuses_other_changes(tmp_path):
    data = write_tiny_dataset(tmp_path / "data")
    run = tmp_path / "run"
    cfg = tiny_config(data, run, epochs=2, early_stop_patience=-1)
    session.train(cfg, flags_text=train_config.flags_file_text(cfg))
    changed = tiny_config(data, run, epochs=2, early_stop_patience=-1, lr=1e-4)
    with pytest.raises(train_config.TrainError, match=r"has finished and can only be continued with "
                                               r"more --epochs, but these flags differ .*"
                                               r"--lr: run has '0.001', now '0.0001'"):
        session.train(changed, flags_text=train_config.flags_file_text(changed))
    same = session.train(cfg, flags_text=train_config.flags_file_text(cfg))
    assert same["epochs_run"] == 2  # nothing to do
    longer = tiny_config(data, run, epochs=3, early_stop_patience=-1)
    summary = session.train(longer, flags_text=train_config.flags_file_text(longer))
    assert summary["status"] == "complete" and summary["epochs_run"] == 3
    assert [r["epoch"] for r in rundir.read_history_csv(run / "history.csv")] == [0, 1, 2]
    assert summary["resumed_from_epochs"] == [2]
    assert "--epochs=3" in (run / "flags.txt").read_text()


@pytest.mark.slow
def test_unreachable_imagenet_weights_fail_before_the_run_dir_is_written(tmp_path):
    data = write_tiny_dataset(tmp_path / "data")
    run = tmp_path / "run"
    env = _env(KERAS_HOME=str(tmp_path / "keras_home"), HTTPS_PROXY="http://127.0.0.1:9",
               HTTP_PROXY="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9")
    env.pop("TF_CPP_MIN_LOG_LEVEL")  # the default console: no TensorFlow banner either
    base = [sys.executable, "-m", "pneumo_tf.train", f"--data_dir={data}", f"--run_dir={run}",
            "--backbone=resnet50", "--precision=float32", "--epochs=1"]
    offline = subprocess.run(base + ["--weights=imagenet"], env=env, cwd=REPO,
                             capture_output=True, text=True, timeout=300)
    err = offline.stderr
    assert offline.returncode != 0 and "Traceback" not in err, err[-3000:]
    assert "--weights=PATH" in err and "--weights=none" in err, err[-3000:]
    assert str(tmp_path / "keras_home" / "models") in err
    assert err.count("pneumo_tf.train: error:") == 1 and len(err.splitlines()) <= 3, err[-3000:]
    assert not run.exists()
    bad = run_command("pneumo_tf.train", *base[3:], f"--weights={tmp_path / 'missing.h5'}")
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert "missing.h5: no such file" in bad.stderr and not run.exists()


def test_a_random_mostly_frozen_backbone_gets_a_warning(caplog):
    trainer_lib.check_weights(tiny_config("d", "r", weights="none", trainable_layers=5), 32)
    assert "the backbone starts random" in caplog.text
    caplog.clear()
    trainer_lib.check_weights(tiny_config("d", "r", weights="none", trainable_layers=-1), 32)
    assert caplog.text == ""


@pytest.mark.slow
def test_subtype_task_trains_a_three_way_head_and_keeps_the_binary_score(tmp_path):
    import tensorflow as tf

    from pneumo_tf.modeling import model as model_lib

    data = write_tiny_dataset(tmp_path / "data")
    run = tmp_path / "run"
    summary = session.train(tiny_config(data, run, epochs=2, task="subtype", calibrate=True))
    assert summary["config"]["task"] == "subtype"
    events = _tb_events(run / "tb")["val"]
    for name in ("NORMAL", "BACTERIAL", "VIRAL"):
        assert events[f"subtype_recall_{name}"] == ("scalars", 2)
        assert events[f"subtype_auc_{name}"][1] == 2
    model = rundir.load_model(run)
    assert model_lib.is_subtype_model(model)
    images = next(iter(pipeline.make_eval_dataset(data, "val", 8)))["image"]
    probs3 = model_lib.class_probability_model(model)(images).numpy()
    np.testing.assert_allclose(probs3.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(model(images).numpy()[:, 0], 1.0 - probs3[:, 0], atol=1e-6)
    assert json.loads((run / "calibration.json").read_text())["source"] == "val"
    trainer = trainer_lib.Trainer(tiny_config(data, run, task="subtype"), _default_setup(),
                                  records.read_manifest(data))
    assert trainer.pipeline_class_weights() == "balanced_subtype"
    # An unknown subtype (-1) contributes no loss.
    y = trainer.task.loss_targets(trainer.cfg, None, tf.constant([1, -1]))
    assert y.numpy().tolist() == [[0, 1, 0], [0, 0, 0]]
