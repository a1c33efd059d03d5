"""Score networks. Importing this package registers every network by name."""
from score_sde.models.utils import (create_model, get_model, get_model_fn, get_score_fn,
                                    register_model)

__all__ = ["create_model", "get_model", "get_model_fn", "get_score_fn", "register_model"]
