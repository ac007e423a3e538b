"""DynTS: the learned importance predictor (training lives here in a later step)."""

from thinfer.dynts.predictor import ImportancePredictor, load_predictor, save_predictor

__all__ = ["ImportancePredictor", "load_predictor", "save_predictor"]
