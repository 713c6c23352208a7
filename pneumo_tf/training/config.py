"""The training configuration: one dataclass, one source for every option, its flag and its check.

Each field of :class:`TrainConfig` is also a flag of ``python -m pneumo_tf.train`` (same name;
help, choices and bounds live in the field's metadata, see :func:`pneumo_tf.core.cli.option`), so a
new option is one edit here. ``flags.txt`` in a run directory is :func:`flags_file_text` of the
run's config: a flagfile that repeats the run, and what a resumed run is compared with
(:func:`check_resume_flags`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from pneumo_tf.core.cli import option
from pneumo_tf.core.rundir import parse_flags_text
from pneumo_tf.image import preprocess

# This module loads no TensorFlow, so `python -m pneumo_tf.train` parses (and answers a typo in)
# its flags before TensorFlow loads. The choices its flags offer from libraries that do load it
# are spelled here; tests/training/test_config.py keeps each equal to its library's:
TASK_NAMES = ("binary", "subtype", "lungs")  # training.task.TASKS
BACKBONE_NAMES = ("convnext_tiny", "densenet121", "efficientnetv2b0", "resnet50",
                  "small_cnn")  # modeling.model.BACKBONES
FILL_MODES = ("nearest", "constant", "reflect")  # image.augment.FILL_MODES
INTENSITY_KEYS = ("brightness", "contrast", "gamma", "sharpness", "noise")  # image.augment
PRECISIONS = ("auto", "float32", "mixed_float16", "mixed_bfloat16")  # training.distribute
JIT_CHOICES = ("auto", "true", "false", "probe")  # training.distribute
STRATEGIES = ("auto", "default", "one_device", "mirrored", "multi_worker",
              "tpu")  # training.distribute
LOSSES = ("focal", "bce")
OPTIMIZERS = ("adam", "adamw")
LR_SCHEDULES = ("plateau", "cosine")
SELECT_ON = ("val_loss", "val_auc", "val_dice")
RESAMPLERS = ("auto", "native", "gather", "gather_xla")  # "auto" + image.augment.RESAMPLERS
CACHE_CHOICES = ("auto", "true", "false")
CLASS_WEIGHTS = ("balanced", "none")
INPUT_NORMS = ("backbone",) + preprocess.INPUT_NORMS
# Flags that may change when a run resumes: locations (the data manifest is compared instead),
# logging, and housekeeping that does not change what is trained. --epochs may also grow.
RESUME_FREE_FLAGS = frozenset({"data_dir", "run_dir", "log_every_steps", "tb_images", "profile",
                               "profile_steps", "calibrate", "cache", "backup_every_steps",
                               "fit_ood", "ood_val_rate"})


class TrainError(ValueError):
    """A training request that cannot run; the message names the flag/file and the fix."""


@dataclasses.dataclass
class TrainConfig:
    """Everything one training run depends on; every field is a flag of the training app."""

    data_dir: str | None = option(None, "Converter output folder: TFRecord shards + "
                                  "manifest.json (tools/make_tfrecords).")
    run_dir: str | None = option(None, "Run directory: created if missing; an existing one "
                                 "resumes from its backup.")
    seed: int = option(0, "Random seed; same seed and inputs -> same outputs.")
    batch_size: int = option(32, "Batch size per replica; the global batch is this times the "
                             "number of replicas.", lower=1)
    # -- model
    task: str = option("binary", "binary: PNEUMONIA vs NORMAL (a sigmoid); subtype: NORMAL / "
                       "BACTERIAL / VIRAL (a three-way softmax, weighted per subtype; the "
                       "pneumonia probability is 1 - p(NORMAL), so every binary stage works); "
                       "lungs: a lung segmentation U-Net trained on the films whose records "
                       "carry a lung mask (converter --masks; configs/lungs.cfg).",
                       choices=TASK_NAMES)
    backbone: str = option("resnet50", "Backbone from the registry in pneumo_tf.modeling.model.",
                           choices=BACKBONE_NAMES)
    weights: str = option("imagenet", "imagenet (Keras download, cached) | none | PATH of a local "
                          "include_top=False weights file.")
    trainable_layers: int = option(50, "Backbone layers trained, counted from the top; -1 = all.")
    train_bn: bool = option(False, "Also train BatchNorm layers (default: frozen, inference "
                            "mode).")
    input_norm: str = option("backbone", "Pixel normalisation: the backbone's own (backbone), "
                             "unit = [0, 1] as in the paper, or another fixed mode.",
                             choices=INPUT_NORMS)
    dense_units: int = option(128, "Units of the head's hidden Dense layer.", lower=1)
    head_dropout: tuple[float, ...] = option((0.5, 0.3), "The head's two dropout rates "
                                             "(before/after the Dense layer).")
    lung_gate: str = option("", "A --task=lungs run directory: the classifier dims its input "
                            "outside the lungs that model finds (an evidence constraint; the lung "
                            "model is frozen and travels inside model.keras and every export); "
                            "empty = no gate.")
    lung_gate_floor: float = option(0.25, "--lung_gate: what is left of the pixels outside the "
                                    "dilated lungs (0 = black, 1 = no gate).", lower=0, upper=1)
    lung_gate_dilate: float = option(0.04, "--lung_gate: dilation of the lung mask, fraction of "
                                     "the image side.", lower=0, upper=0.45)
    cam_penalty: float = option(0.0, "Weight of the evidence penalty: each training image's "
                                "loss gains this times the share of its Grad-CAM (at the "
                                "backbone's last feature map, explaining its true class) outside "
                                "the lungs a lung model finds in it (right for the right reasons; "
                                "pneumo_tf.training.evidence); 0 = off.", lower=0)
    cam_penalty_lungs: str = option("", "--cam_penalty: the --task=lungs run directory whose "
                                    "model finds the lungs (empty: the --lung_gate run).")
    unet_filters: int = option(16, "--task=lungs: filters of the U-Net's first level, doubled "
                               "at each level down.", lower=1)
    unet_depth: int = option(5, "--task=lungs: levels of the U-Net, the bottom one included "
                             "(the image size must be a multiple of 2^(depth-1)).", lower=1)
    # -- augmentation (on the device, training only)
    augment: bool = option(True, "Random affine augmentation during training.")
    rotation: float = option(20.0, "Max rotation, degrees (+-).", lower=0)
    zoom: float = option(0.2, "Max zoom, fraction (+-).", lower=0, upper=0.95)
    shift: float = option(0.2, "Max width/height shift, fraction of the side (+-).", lower=0)
    shear: float = option(0.1, "Max shear factor (x += factor * y; not degrees).", lower=0)
    flip: bool = option(True, "Random horizontal flips.")
    fill_mode: str = option("nearest", "How augmentation fills pixels outside the image.",
                            choices=FILL_MODES)
    brightness: float = option(0.0, "Max brightness change, fraction of the full scale (+-); "
                               "0 = off.", lower=0)
    contrast: float = option(0.0, "Max contrast change, fraction (+-; 0.3 = 0.7x to 1.3x around "
                             "the image's mean); 0 = off.", lower=0)
    gamma: float = option(0.0, "Max gamma change: exponent exp(+-g); 0 = off.", lower=0)
    sharpness: float = option(0.0, "Max blur/sharpen amount (+-; -1 = a 5x5 binomial blur); "
                              "0 = off.", lower=0)
    noise: float = option(0.0, "Max Gaussian noise standard deviation, fraction of the full "
                          "scale; 0 = off.", lower=0)
    resampler: str = option("auto", "Augmentation resampler: native (ImageProjectiveTransformV3, "
                            "no XLA kernel), gather (XLA-compilable), gather_xla (gather compiled "
                            "on its own); auto = gather inside an XLA-compiled step, else "
                            "gather_xla.", choices=RESAMPLERS)
    # -- loss and optimisation
    loss: str = option("focal", "focal (gamma --focal_gamma) or bce (cross-entropy; categorical "
                       "for --task=subtype).", choices=LOSSES)
    focal_gamma: float = option(2.0, "Focal loss gamma.", lower=0)
    label_smoothing: float = option(0.0, "Label smoothing of the loss: targets become "
                                    "s/2 and 1 - s/2.", lower=0, upper=0.5)
    class_weights: str = option("balanced", "Per-class sample weights from the data manifest.",
                                choices=CLASS_WEIGHTS)
    optimizer: str = option("adam", "adam, or adamw (decoupled weight decay --weight_decay, not "
                            "applied to biases and BatchNorm).", choices=OPTIMIZERS)
    weight_decay: float = option(1e-4, "AdamW weight decay.", lower=0)
    lr: float = option(1e-5, "Peak learning rate.")
    lr_schedule: str = option("plateau", "plateau: multiply by --lr_factor after --lr_patience "
                              "epochs without val_loss improvement; cosine: linear warm-up over "
                              "--warmup_epochs, then cosine decay to --min_lr at the last epoch.",
                              choices=LR_SCHEDULES)
    warmup_epochs: float = option(0.0, "Linear warm-up of the cosine schedule, epochs.", lower=0)
    ema_decay: float = option(0.0, "Exponential moving average of the weights (e.g. 0.999); "
                              "validation, the best epoch and model.keras use the average; "
                              "0 = off.", lower=0, upper=0.99999)
    epochs: int = option(15, "Maximum epochs.", lower=1)
    steps_per_epoch: int = option(0, "Steps per epoch; 0 = train images // global batch.",
                                  lower=0)
    val_batch_size: int = option(64, "Batch size of validation.", lower=1)
    select_on: str = option("val_loss", "Validation metric that picks the best epoch (whose "
                            "weights are kept) and drives early stopping: val_loss (lower is "
                            "better), val_auc (a classifier) or val_dice (--task=lungs; higher "
                            "is better).", choices=SELECT_ON)
    early_stop_patience: int = option(3, "Epochs without improvement of --select_on before "
                                      "stopping (best weights restored); -1 = never stop early.",
                                      lower=-1)
    lr_patience: int = option(2, "Epochs without val_loss improvement before the learning rate "
                              "is multiplied by --lr_factor.", lower=0)
    lr_factor: float = option(0.2, "ReduceLROnPlateau factor.")
    min_lr: float = option(0.0, "Lower bound of the plateau-reduced learning rate.", lower=0)
    ensemble_seeds: str = option("", "Train one member per seed (e.g. 0,1,2) in "
                                 "RUN_DIR/members/seed_N, then make RUN_DIR their ensemble "
                                 "(pneumo_tf.ensemble: mean probability, calibrated on val); "
                                 "empty = one model.")
    # -- execution
    deterministic: bool = option(False, "Op determinism and seeded data order: same flags -> "
                                 "same history (slower).")
    precision: str = option("auto", "auto = mixed_float16 on GPU, mixed_bfloat16 on TPU and on "
                            "CPUs with AMX, else float32.", choices=PRECISIONS)
    jit_compile: str = option("auto", "XLA-compile the train step; auto = on for GPU/TPU, off "
                              "on CPU; probe = time the step with and without XLA on CPU (an "
                              "XLA compile of a big backbone takes minutes).",
                              choices=JIT_CHOICES)
    strategy: str = option("auto", "tf.distribute strategy; multi_worker reads TF_CONFIG.",
                           choices=STRATEGIES)
    cpu_devices: int = option(1, "Split the CPU into N logical devices (so --strategy=mirrored "
                              "runs without GPUs).", lower=1)
    cache: str = option("auto", "Cache decoded images in RAM: auto (if they fit), true, false.",
                        choices=CACHE_CHOICES)
    skip_corrupt: bool = option(False, "Do not fail on a corrupt shard: read it up to its first "
                                "bad record and DROP THE REST OF THAT SHARD (a warning on stderr "
                                "names it and counts the records lost). Default: fail naming the "
                                "corrupt shard.")
    backup_every_steps: int = option(0, "Also back up every N steps within an epoch (0 = at "
                                     "epoch ends only).", lower=0)
    log_every_steps: int = option(10, "TensorBoard batch_loss every N steps.", lower=0)
    tb_images: int = option(8, "Augmented inputs shown in TensorBoard.", lower=0)
    profile_steps: str = option("", "START,END global steps to trace with the TensorFlow "
                                "profiler into tb/train, shown in TensorBoard's Profile tab "
                                "(empty = off). --profile is an alias.")
    calibrate: bool = option(True, "Fit temperature and threshold on val at the end "
                             "(pneumo_tf.evaluation.calibration).")
    fit_ood: bool = option(True, "Fit the out-of-distribution guard at the end: feature "
                           "statistics of the train split, threshold on val (pneumo_tf.ood).")
    ood_val_rate: float = option(0.01, "Fraction of the val images the out-of-distribution "
                                 "threshold flags.", lower=0, upper=0.5)

    def validate(self) -> None:
        """Raise :class:`TrainError` naming the flag for any value out of range."""
        from pneumo_tf.modeling import model as model_lib
        from pneumo_tf.training import task as task_lib

        for field in dataclasses.fields(self):
            choices = field.metadata.get("choices")
            choices = choices() if callable(choices) else choices
            value = getattr(self, field.name)
            if choices is not None and value not in choices:
                if field.name == "backbone":  # the registry's own message lists the names
                    model_lib.get_backbone_spec(value)
                raise TrainError(f"--{field.name}={value!r}; expected one of {tuple(choices)}")
        checks = [
            (self.epochs >= 1, f"--epochs={self.epochs}; must be >= 1"),
            (self.batch_size >= 1, f"--batch_size={self.batch_size}; must be >= 1"),
            (self.lr > 0, f"--lr={self.lr}; must be > 0"),
            (self.steps_per_epoch >= 0, f"--steps_per_epoch={self.steps_per_epoch}; must be >= 0"),
            (len(self.head_dropout) == 2, f"--head_dropout needs two rates, got {self.head_dropout}"),
            (0 < self.lr_factor < 1, f"--lr_factor={self.lr_factor}; must be in (0, 1)"),
            (bool(self.data_dir), "--data_dir is required (a converter output: "
                                  "tools/make_tfrecords)"),
            (bool(self.run_dir), "--run_dir is required (created if missing; an existing one "
                                 "resumes)"),
        ]
        for ok, msg in checks:
            if not ok:
                raise TrainError(msg)
        model_lib.resolve_input_norm(self.backbone, self.input_norm)
        task = task_lib.get_task(self.task)
        if self.select_on not in task.select_on:
            raise TrainError(f"--select_on={self.select_on} does not apply to --task={self.task}; "
                             f"expected one of {task.select_on}")
        if self.lung_gate and not task.classifier:
            raise TrainError(f"--lung_gate applies to classifiers, not --task={self.task}")
        if self.cam_penalty and not task.classifier:
            raise TrainError(f"--cam_penalty applies to classifiers, not --task={self.task}")
        if self.cam_penalty and not self.penalty_lungs():
            raise TrainError("--cam_penalty needs a lung model: --cam_penalty_lungs=LUNGS_RUN "
                             "(or a --lung_gate)")
        if self.cam_penalty_lungs and not self.cam_penalty:
            raise TrainError("--cam_penalty_lungs without --cam_penalty: give the penalty's "
                             "weight, e.g. --cam_penalty=1")
        if self.member_seeds() and not task.classifier:
            raise TrainError(f"--ensemble_seeds: ensembles are of classifiers; --task="
                             f"{self.task} trains one model (drop --ensemble_seeds)")

    def penalty_lungs(self) -> str:
        """The lungs run of ``--cam_penalty``: ``--cam_penalty_lungs``, else ``--lung_gate``."""
        return self.cam_penalty_lungs or self.lung_gate

    def member_seeds(self) -> list[int]:
        """The seeds of ``--ensemble_seeds`` (``[]``: a single model)."""
        if not self.ensemble_seeds:
            return []
        try:
            seeds = [int(v) for v in self.ensemble_seeds.split(",")]
        except ValueError as e:
            raise TrainError(f"--ensemble_seeds={self.ensemble_seeds!r}; expected integers, "
                             f"e.g. 0,1,2") from e
        if len(seeds) < 2 or len(set(seeds)) != len(seeds):
            raise TrainError(f"--ensemble_seeds={self.ensemble_seeds!r}; give two or more "
                             f"different seeds")
        return seeds

    def cache_arg(self) -> bool | None:
        """``--cache`` as the pipeline's argument: None (decide by budget), True or False."""
        return {"auto": None, "true": True, "false": False}[self.cache]

    def profile_range(self) -> tuple[int, int] | None:
        """``(start, end)`` global steps of ``--profile_steps``, or None."""
        if not self.profile_steps:
            return None
        try:
            start, end = (int(v) for v in self.profile_steps.split(","))
        except ValueError as e:
            raise TrainError(f"--profile_steps={self.profile_steps!r}; expected START,END steps, "
                             f"e.g. 5,10") from e
        if not 0 <= start < end:
            raise TrainError(f"--profile_steps={self.profile_steps!r}; need 0 <= START < END")
        return start, end


def augment_kwargs(cfg: TrainConfig, jit_compile: bool) -> dict | None:
    """Keyword arguments of :func:`pneumo_tf.image.augment.make_augment_layer`, or None (no
    augmentation).

    ``resampler=auto`` picks ``gather`` when the whole step is XLA-compiled (the native
    projective-transform op has no XLA kernel), else ``gather_xla``: the same sampler compiled on
    its own, measured 2x the native op's throughput on a 2-core CPU (BUILD.md).
    """
    if not cfg.augment:
        return None
    resampler = cfg.resampler
    if resampler == "auto":
        resampler = "gather" if jit_compile else "gather_xla"
    elif resampler == "native" and jit_compile:
        raise TrainError("--resampler=native cannot be XLA-compiled (no XLA kernel for "
                         "ImageProjectiveTransformV3); use --resampler=gather or --jit_compile=false")
    kwargs = dict(rotation_deg=cfg.rotation, zoom=cfg.zoom, shift=cfg.shift, shear=cfg.shear,
                  flip=cfg.flip, fill_mode=cfg.fill_mode, resampler=resampler, seed=cfg.seed)
    kwargs.update({k: getattr(cfg, k) for k in INTENSITY_KEYS if getattr(cfg, k)})
    return kwargs


def _flag_line(name: str, value) -> str:
    if isinstance(value, bool):
        return f"--{name}" if value else f"--no{name}"
    if isinstance(value, tuple):
        return f"--{name}=" + ",".join(repr(float(v)) if isinstance(v, float) else str(v)
                                       for v in value)
    return "" if value is None else f"--{name}={value}"


def flags_file_text(cfg: TrainConfig, argv0: str = "python -m pneumo_tf.train") -> str:
    """A flagfile holding every option of ``cfg`` (what ``flags.txt`` of a run holds)."""
    lines = [f"# {argv0} --flagfile=THIS_FILE  (written by pneumo_tf.train)"]
    lines += [_flag_line(f.name, getattr(cfg, f.name)) for f in dataclasses.fields(cfg)]
    return "\n".join(line for line in lines if line) + "\n"


def _grows(name: str, old: str, new: str) -> bool:
    """Whether a change of ``--epochs`` or ``--early_stop_patience`` only gives the run more room."""
    if name == "epochs":
        return int(new) > int(old)
    if name == "early_stop_patience":
        return int(new) == -1 or (int(old) != -1 and int(new) > int(old))
    return False


def check_resume_flags(run_flags_text: str, flags_text: str, run_flags_path: Path,
                       finished: bool = False) -> bool:
    """Refuse to resume (or continue) a run with other settings than its ``flags.txt``.

    The backup restores the model, the optimizer (learning rate included) and the callbacks'
    state, so a changed flag would be silently overruled or half applied. Two changes only give
    the run more room and are honoured: a larger ``--epochs`` and a larger (or -1)
    ``--early_stop_patience``.

    Args:
        run_flags_text: the run's ``flags.txt``; flags_text: this invocation's flags.
        run_flags_path: the path of ``flags.txt`` (for the message).
        finished: the run has finished (the message says "continued", not "resumed").

    Returns:
        True when ``--epochs`` or ``--early_stop_patience`` grew (``flags.txt`` should then be
        rewritten).

    Raises:
        TrainError: listing every other differing flag outside :data:`RESUME_FREE_FLAGS`.
    """
    old, new = parse_flags_text(run_flags_text), parse_flags_text(flags_text)
    differ = sorted(name for name in old.keys() & new.keys()
                    if old[name] != new[name] and name not in RESUME_FREE_FLAGS)
    grew = [name for name in differ if _grows(name, old[name], new[name])]
    differ = [name for name in differ if name not in grew]
    if differ:
        changes = "; ".join(f"--{name}: run has {old[name]!r}, now {new[name]!r}"
                            for name in differ)
        how = ("has finished and can only be continued with more --epochs" if finished
               else "is resumed from its backup")
        raise TrainError(f"{run_flags_path.parent} {how}, but these flags differ from "
                         f"{run_flags_path}: {changes}. Resume with the run's flags "
                         f"(--flagfile={run_flags_path}; --epochs may only grow) or train with "
                         f"the new flags in a new --run_dir")
    return bool(grew)
