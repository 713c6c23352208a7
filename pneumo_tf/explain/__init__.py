"""Explanations: Grad-CAM maths and overlays (cam) and a run's Grad-CAM grids (grids)."""
