"""DynTS: the learned importance predictor, its labels (features.py, label.py) and training
(train.py); `thinfer dynts` commands in cli.py."""

from thinfer.dynts.predictor import ImportancePredictor, load_predictor, save_predictor

__all__ = ["ImportancePredictor", "load_predictor", "save_predictor"]
