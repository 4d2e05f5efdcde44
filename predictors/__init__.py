"""Trainable parts of l2c: the embedded teacher and the predictors of learned caching policies."""
