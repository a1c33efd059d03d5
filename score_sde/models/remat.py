"""Rematerialization (gradient checkpointing) of the networks: ``config.model.remat``.

Reverse-mode differentiation keeps every intermediate activation of the forward pass alive until
the backward pass uses it. Under ``jax.checkpoint`` a function keeps only its inputs; its
intermediates are recomputed in the backward pass (one more forward through it):

  * ``'none'`` (default): everything stored; fastest, most memory.
  * ``'elementwise'``: each block (as for 'blocks') is checkpointed with a policy that keeps the
    outputs of its convolutions and matrix products (:data:`ELEMENTWISE_POLICY`; convolutions are
    named ``'conv'`` by :mod:`score_sde.models.conv`) and GroupNorm's per-group statistics
    (:mod:`score_sde.models.group_norm`), and recomputes only what lies between them, elementwise:
    normalization, activations, dropout masks (from the same keys), additions. No convolution or
    matmul runs twice; the stored activations are about halved (measured: docs/networks.md).
  * ``'blocks'``: each residual block and each attention block of the network (and each unit of a
    scanned run of blocks, :mod:`score_sde.models.scan`) is checkpointed: the stored activations
    are the blocks' inputs and outputs, the inside of one block is recomputed at a time. About one
    extra forward pass of the blocks.
  * ``'full'``: the whole network forward is one checkpoint (:func:`score_sde.models.get_model_fn`):
    only its inputs are stored between the forward and the backward pass, which recomputes the
    forward and then needs all its intermediates at once: for a loss with one network call the
    peak is that of ``'none'`` (measured: same XLA temporaries, docs/networks.md); it saves memory
    only where other work happens between a network call and its backward (several network calls
    in one loss).

Values and gradients are the same as without remat (XLA may reassociate float operations), and the
parameter tree is unchanged: blocks are lifted with ``flax.linen.remat`` applied to a function of
the already named block (``nn.remat(fn)(block, ...)``), not to the block class (which would rename
it ``CheckpointResnetBlock...`` and break loading checkpoints name for name).
Measured memory and speed: docs/networks.md.
"""
from __future__ import annotations

from typing import Any, Callable, Union

import flax.linen as nn
import jax

from score_sde.models import conv, group_norm

REMATS = ("none", "elementwise", "blocks", "full")
# model.remat values that checkpoint every block of the network (each needs a network with blocks).
BLOCK_REMATS = ("elementwise", "blocks")
# Inside a block under 'elementwise': store convolution outputs (named by models.conv), dot
# products and GroupNorm's per-group statistics (models.group_norm; [B, G] each).
ELEMENTWISE_POLICY = jax.checkpoint_policies.save_from_both_policies(
    jax.checkpoint_policies.save_only_these_names(conv.CHECKPOINT_NAME, group_norm.STATS_NAME),
    jax.checkpoint_policies.dots_saveable)
# Networks that checkpoint their blocks with model.remat='blocks' / 'elementwise' (registry names).
_NETWORKS_WITH_BLOCKS = ("ncsnpp", "ddpm", "small_unet", "toy_mlp", "dit")


def remat_of(config) -> str:
  """``config.model.remat`` (absent or None: 'none'); ValueError naming the field if unknown."""
  name = config.model.get("remat", None) or "none"
  if name not in REMATS:
    raise ValueError(f"config.model.remat={name!r} is unknown; choose one of {list(REMATS)}.")
  return str(name)


def has_blocks(model_name: str) -> bool:
  """Whether network ``model_name`` implements ``model.remat='blocks'`` / ``'elementwise'``."""
  return model_name in _NETWORKS_WITH_BLOCKS


def networks_with_blocks() -> list[str]:
  return list(_NETWORKS_WITH_BLOCKS)


BlockRemat = Union[bool, Callable[..., Any]]


def blocks_of(config) -> BlockRemat:
  """How the network checkpoints each block: False (``model.remat`` 'none' / 'full'), True
  ('blocks': nothing inside a block is stored) or the ``jax.checkpoint`` policy of
  'elementwise' (:data:`ELEMENTWISE_POLICY`)."""
  mode = remat_of(config)
  if mode == "elementwise":
    return ELEMENTWISE_POLICY
  return mode == "blocks"


def checkpoint(fn: Callable, enabled: BlockRemat) -> Callable:
  """``fn`` under ``jax.checkpoint`` as :func:`blocks_of` says (unchanged when False)."""
  if enabled is False or enabled is None:
    return fn
  return jax.checkpoint(fn) if enabled is True else jax.checkpoint(fn, policy=enabled)


def call(module: nn.Module, *args: Any, enabled: BlockRemat = True) -> Any:
  """``module(*args)``, under ``nn.remat`` when ``enabled`` (True, or a ``jax.checkpoint`` policy:
  :func:`blocks_of`).

  ``module`` is a submodule declared in the caller's compact method (it keeps its name and
  parameters); array arguments are traced, the others (None, the ``train`` flag) are static.
  """
  if enabled is False or enabled is None:
    return module(*args)
  dynamic = [i for i, a in enumerate(args) if isinstance(a, jax.Array)]

  def fn(mdl, *arrays):
    full = list(args)
    for i, a in zip(dynamic, arrays):
      full[i] = a
    return mdl(*full)

  lifted = nn.remat(fn) if enabled is True else nn.remat(fn, policy=enabled)
  return lifted(module, *[args[i] for i in dynamic])


def model_remat(model: Any) -> str:
  """The remat mode of a network built from a config (``model.config``; a wrapper such as
  :class:`score_sde.conditional.WithClassLabels` is looked through); 'none' without a config."""
  config = getattr(model, "config", None)
  if config is None and hasattr(model, "model"):
    config = getattr(model.model, "config", None)
  if config is None or not hasattr(config, "model"):
    return "none"
  return remat_of(config)
