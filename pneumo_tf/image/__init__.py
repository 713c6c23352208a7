"""Image maths: crop, resize and normalise, host (numpy/cv2) and TensorFlow twins side by side
(preprocess), and the on-device training augmentation (augment)."""
