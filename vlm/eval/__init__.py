"""Evaluating a model on a labelled set (answers generated with `vlm.generate`, then scored). Layer 3."""
