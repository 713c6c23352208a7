from pneumo_tf.training.config import TrainConfig
def lungs_config(data_dir, run_dir, **overrides) -> TrainConfig:
    """A tiny lungs run: 4 base filters, 3 levels, a few epochs on 64 px phantoms."""
    settings = dict(data_dir=str(data_dir), run_dir=str(run_dir), task="lungs", unet_filters=8,
                    unet_depth=3, batch_size=8, val_batch_size=32, epochs=4, lr=3e-3,
                    optimizer="adamw", select_on="val_dice", early_stop_patience=-1,
                    rotation=5.0, zoom=0.1, shift=0.05, shear=0.0, flip=False,
                    fill_mode="constant", precision="float32", strategy="default",
                    tb_images=2, seed=0)
    settings.update(overrides)
    return TrainConfig(**settings)
