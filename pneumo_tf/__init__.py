"""pneumo_tf: chest X-ray pneumonia detection, from radiographs to a validated, explainable model.

Layout (BUILD.md, "Architecture"): every module directly in this package is a command a user runs
(``python -m pneumo_tf.train``, ``evaluate``, ``calibrate``, ``gradcam``, ``compare``, ``ensemble``,
``export``, ``predict``, ``ood``, ``convert``, ``make_phantoms``): its flags and its ``main``.
Every folder is the library of one stage; arrows point down the data flow:

    raw images --(data: convert)--> TFRecord shards + manifest.json
    shards --(data.pipeline: make_train_dataset / make_eval_dataset)--> uint8 batches
    batches --(image: preprocess, augment; modeling: model)--> pneumonia probability
    training (task, trainer, loop, resume, session) --> run directory (core.rundir.Run)
    run directory --> evaluation (scoring, metrics, calibration, evaluator, comparison, ensemble),
                      explain (cam, anatomy, grids), serving (runtime, export, ood, predictor)
    another site's sample --(evaluation.site_calibration)--> R/calibrations/NAME.json

``core`` holds what every stage shares: the command-line convention (cli), quiet TensorFlow
start-up (quiet_tf), progress lines, atomic files and the run directory (rundir).
"""

from pneumo_tf.core import quiet_tf

__version__ = "0.1.0"

CLASS_NAMES = ("NORMAL", "PNEUMONIA")  # label 0, label 1
# The three-class task: subtype 0, 1, 2; -1 = unknown (the source does not say).
SUBTYPE_NAMES = ("NORMAL", "BACTERIAL", "VIRAL")

quiet_tf.install()  # TensorFlow's start-up banner stays off the console (see quiet_tf)
