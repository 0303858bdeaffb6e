"""Predictions: the cached batch runner for both stages and the fusion of their probabilities."""
