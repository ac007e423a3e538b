"""Model families and the registry that picks one for a config."""

from thinfer.models.registry import build_model

__all__ = ["build_model"]
