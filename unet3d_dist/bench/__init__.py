"""Benchmarks: ``python -m unet3d_dist.bench <part> [options]``; each part prints a table and writes JSON.

Every figure is a ratio against a reference measured in the same run, so numbers from different machines compare.
"""
