"""Controllable generation in one namespace (``from score_sde import controllable as C``).

The code lives in four modules, one concern each; this module only re-exports their public names:

  * :mod:`score_sde.guidance`: classifier-free and classifier guidance (score combinators);
  * :mod:`score_sde.conditional`: class labels and class-conditional score models;
  * :mod:`score_sde.classifier`: noise-conditional classifiers, trained by the regular Trainer
    (:func:`score_sde.train.train_classifier`);
  * :mod:`score_sde.sampling.constrained`: inpainting and colorization on the PC / ODE samplers.
"""
from score_sde.classifier import (classifier_config, create_classifier, get_classifier_logits_fn,
                                  get_classifier_logp_grad_fn, get_classifier_loss_fn)
from score_sde.conditional import (bind_labels, check_labels, get_conditional_model_fn,
                                   get_conditional_score_fn, label_dropout_of, num_classes_of)
from score_sde.guidance import (classifier_free_guidance, classifier_guidance,
                                logp_grad_from_logits, mixture_classifier)
from score_sde.sampling.constrained import (colorization_matrix, get_colorizer, get_inpainter,
                                            load_array, load_grayscale, load_mask)
from score_sde.train import train_classifier

__all__ = [
    "classifier_free_guidance", "classifier_guidance", "logp_grad_from_logits",
    "mixture_classifier", "check_labels", "num_classes_of", "label_dropout_of",
    "get_conditional_model_fn", "get_conditional_score_fn", "bind_labels",
    "get_classifier_logits_fn", "get_classifier_logp_grad_fn", "create_classifier",
    "classifier_config", "get_classifier_loss_fn", "train_classifier", "get_inpainter",
    "get_colorizer", "colorization_matrix", "load_array", "load_mask", "load_grayscale",
]
