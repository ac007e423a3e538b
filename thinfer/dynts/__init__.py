"""DynTS tooling: labels (features.py, label.py) and training
(train.py), `thinfer dynts` commands in cli.py; the inference head lives in
thinfer.compression.predictor."""

from thinfer.compression.predictor import ImportancePredictor, load_predictor, save_predictor

__all__ = ["ImportancePredictor", "load_predictor", "save_predictor"]
