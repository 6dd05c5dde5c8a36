"""Planning a recipe from a data set's fingerprint (``python -m unet3d_dist.plan``)."""
