"""Models of MegaTransformer. `build_model(config)` builds any family; `load_pretrained(dir)` /
`save_pretrained(model, dir)` handle checkpoint directories of every family (model/families.py says which)."""

from model.families import build_model
from model.pretrained import load_pretrained, save_pretrained

__all__ = ["build_model", "load_pretrained", "save_pretrained"]
