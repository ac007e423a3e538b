"""Structured pruning (`thinfer prune`, see docs/pruning.md): remove whole decoder blocks
(depth) or attention groups and MLP channels (width), score them on real calibration text,
and save a checkpoint that thinfer and, for uniform shapes, HF transformers load."""
