"""pneumo_tf: chest X-ray pneumonia detection, from radiographs to a validated, explainable model.

Data flow, one module per stage:
    raw images --(pneumo_tf.data.convert)--> TFRecord shards + manifest.json
    shards --(pneumo_tf.data.pipeline.make_train_dataset / make_eval_dataset)--> uint8 batches
    batches --(pneumo_tf.modeling.model / pneumo_tf.image.augment, on the device)--> pneumonia probability
    pneumo_tf.train --> run directory --> pneumo_tf.evaluate / gradcam / compare / export / predict
    another site's sample --(pneumo_tf.calibrate)--> R/calibrations/NAME.json (--calibration=NAME)
"""

from pneumo_tf.core import quiet_tf

__version__ = "0.1.0"

CLASS_NAMES = ("NORMAL", "PNEUMONIA")  # label 0, label 1
# The three-class task: subtype 0, 1, 2; -1 = unknown (the source does not say).
SUBTYPE_NAMES = ("NORMAL", "BACTERIAL", "VIRAL")

quiet_tf.install()  # TensorFlow's start-up banner stays off the console (see quiet_tf)
