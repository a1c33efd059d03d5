"""Time (noise-level) conditional Wide-ResNet classifier for class-conditional sampling.

The classifier of the original score_sde (``wideresnet_noise_conditional.py``, WRN-28-10 on
CIFAR-10): ``logits = WRN(standardize(x), sigma)``, where ``x`` is the (VE-)perturbed image and the
noise level enters every block as ``Dense(swish(temb))`` added after the first conv, with
``temb`` an MLP of Gaussian Fourier features of ``log sigma`` (128 features, scale 16).

``WideResnet(...).apply({'params': p}, x [B, H, W, 3], sigmas [B], train=False) -> [B, classes]``.
Normalization is GroupNorm(min(C // 4, 32), eps 1e-5) (no batch statistics). Names match the
original tree (``init_conv``, ``WideResnetGroup_i/WideResnetBlock_j/{init_bn,conv1,bn_2,conv2}``,
``pre-pool-bn``).
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from score_sde.models.conv import Conv
from score_sde.models.group_norm import GroupNorm

Array = jax.Array

# Kaiming normal, fan_out, gain 2 for conv kernels.
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def dense_layer_init(key, shape, dtype=jnp.float32):
  """U[-1/sqrt(n_out), 1/sqrt(n_out)] initialization of the final dense layer."""
  bound = 1.0 / np.sqrt(shape[1])
  return jax.random.uniform(key, shape, dtype, -bound, bound)


def _norm_act(x: Array, name: str, apply_relu: bool = True) -> Array:
  x = GroupNorm(num_groups=min(x.shape[-1] // 4, 32), epsilon=1e-5, name=name)(x)
  return jax.nn.relu(x) if apply_relu else x


def _output_add(block_x: Array, orig_x: Array) -> Array:
  """``block_x + orig_x``; ``orig_x`` mean-pooled and zero-padded in channels when shapes differ."""
  stride = orig_x.shape[-2] // block_x.shape[-2]
  if block_x.shape[-1] != orig_x.shape[-1]:
    orig_x = nn.avg_pool(orig_x, (stride, stride), (stride, stride))
    orig_x = jnp.pad(orig_x, [(0, 0)] * 3 + [(0, block_x.shape[-1] - orig_x.shape[-1])])
  return block_x + orig_x


class WideResnetBlock(nn.Module):
  """Pre-activation WRN block with an additive noise-level embedding after ``conv1``."""
  channels: int
  strides: Sequence[int] = (1, 1)
  activate_before_residual: bool = False

  @nn.compact
  def __call__(self, x: Array, temb: Array | None = None, train: bool = False) -> Array:
    if self.activate_before_residual:
      x = _norm_act(x, "init_bn")
      orig_x = block_x = x
    else:
      orig_x = x
      block_x = _norm_act(x, "init_bn")
    block_x = Conv(self.channels, (3, 3), tuple(self.strides), padding="SAME", use_bias=False,
                      kernel_init=conv_kernel_init, name="conv1")(block_x)
    if temb is not None:
      block_x = block_x + nn.Dense(self.channels)(nn.swish(temb))[:, None, None, :]
    block_x = _norm_act(block_x, "bn_2")
    block_x = Conv(self.channels, (3, 3), padding="SAME", use_bias=False,
                      kernel_init=conv_kernel_init, name="conv2")(block_x)
    return _output_add(block_x, orig_x)


class WideResnetGroup(nn.Module):
  """``blocks_per_group`` WRN blocks; the first one carries the stride."""
  blocks_per_group: int
  channels: int
  strides: Sequence[int] = (1, 1)
  activate_before_residual: bool = False

  @nn.compact
  def __call__(self, x: Array, temb: Array | None = None, train: bool = False) -> Array:
    for i in range(self.blocks_per_group):
      x = WideResnetBlock(self.channels, self.strides if i == 0 else (1, 1),
                          activate_before_residual=self.activate_before_residual and i == 0)(
                              x, temb, train)
    return x


class WideResnet(nn.Module):
  """Noise-conditional WRN-(6 blocks_per_group + 4)-channel_multiplier."""
  blocks_per_group: int = 4
  channel_multiplier: int = 10
  num_outputs: int = 10

  @nn.compact
  def __call__(self, x: Array, sigmas: Array, train: bool = False) -> Array:
    from score_sde.models.embeddings import GaussianFourierProjection
    n = np.prod(x.shape[1:])
    x = (x - jnp.mean(x, axis=(1, 2, 3), keepdims=True)) / jnp.maximum(
        jnp.std(x, axis=(1, 2, 3), keepdims=True), 1.0 / np.sqrt(n))
    temb = GaussianFourierProjection(embedding_size=128, scale=16)(jnp.log(sigmas))
    temb = nn.Dense(128 * 4)(temb)
    temb = nn.Dense(128 * 4)(nn.swish(temb))
    x = Conv(16, (3, 3), padding="SAME", name="init_conv", kernel_init=conv_kernel_init,
                use_bias=False)(x)
    k = self.channel_multiplier
    x = WideResnetGroup(self.blocks_per_group, 16 * k, activate_before_residual=True)(x, temb, train)
    x = WideResnetGroup(self.blocks_per_group, 32 * k, (2, 2))(x, temb, train)
    x = WideResnetGroup(self.blocks_per_group, 64 * k, (2, 2))(x, temb, train)
    x = _norm_act(x, "pre-pool-bn")
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_outputs, kernel_init=dense_layer_init)(x)


def cifar10_classifier() -> WideResnet:
  """The WRN-28-10 classifier the reference uses for class-conditional CIFAR-10 sampling."""
  return WideResnet(blocks_per_group=4, channel_multiplier=10, num_outputs=10)
