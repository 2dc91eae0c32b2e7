"""Models of MegaTransformer. `load_pretrained(dir)` / `save_pretrained(model, dir)` handle checkpoint directories."""

from model.pretrained import build_model, load_pretrained, save_pretrained

__all__ = ["build_model", "load_pretrained", "save_pretrained"]
