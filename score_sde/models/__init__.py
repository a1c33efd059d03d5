"""Score networks. Importing this package registers every network by name."""
from score_sde.models.utils import (count_params, create_model, get_model, get_model_fn,
                                    get_network_fn, get_score_fn, param_shapes, register_model)

__all__ = ["count_params", "create_model", "get_model", "get_model_fn", "get_network_fn",
           "get_score_fn", "param_shapes", "register_model"]
