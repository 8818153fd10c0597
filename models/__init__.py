"""ViTFreeze models: the model registry and, on import, every registered model.

Registry after timm's ``register_model`` / ``create_model``; models from MAE (He et al., CVPR 2022) and LocalMIM
(Wang et al., CVPR 2023), see ``models/mim.py``.
"""
from models.registry import MODELS, create_model, list_models, register_model

from models import mim  # noqa: E402,F401  (importing registers the MAE and LocalMIM factories)
from models import vit  # noqa: E402,F401  (classification backbones)
from models import adapter  # noqa: E402,F401  (ViT-Adapter backbones for dense tasks, adapter_*)

__all__ = ["MODELS", "create_model", "list_models", "register_model"]
