"""Evaluation: calibration of both stages and of the fused pool, and its stored fits."""
