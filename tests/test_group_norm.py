"""GroupNorm with a hand-written backward: flax's values, gradients and parameters; what
model.remat='elementwise' recomputes of it; bad group counts."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from score_sde.models import group_norm as gn
from score_sde.models import remat

CASES = [  # (input shape, groups, epsilon)
    ((4, 8, 8, 64), 16, 1e-6),
    ((2, 5, 7, 12), 3, 1e-6),
    ((3, 6, 16), 4, 1e-5),
    ((5, 8), 2, 1e-6),
    ((2, 4, 4, 32), 32, 1e-6),
]


def _perturbed(variables, key):
  """flax's init (ones / zeros) perturbed, so scale and bias matter in the comparison."""
  leaves, tree = jax.tree.flatten(variables)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(tree, [p + jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])


@pytest.mark.parametrize("shape,groups,eps", CASES)
def test_values_gradients_and_parameters_match_flax(shape, groups, eps):
  kx, kp, kw = jax.random.split(jax.random.PRNGKey(sum(shape)), 3)
  x = 3.0 * jax.random.normal(kx, shape) + 1.5  # mean far from 0: the fast variance's weak spot
  ref = nn.GroupNorm(num_groups=groups, epsilon=eps)
  ours = gn.GroupNorm(num_groups=groups, epsilon=eps)
  v_ref = ref.init(kp, x)
  v_ours = ours.init(kp, x)
  assert jax.tree.map(lambda p: (p.shape, p.dtype), v_ours) == jax.tree.map(
      lambda p: (p.shape, p.dtype), v_ref)
  np.testing.assert_array_equal(v_ours["params"]["scale"], v_ref["params"]["scale"])
  np.testing.assert_array_equal(v_ours["params"]["bias"], v_ref["params"]["bias"])
  v = _perturbed(v_ref, kp)
  w = jax.random.normal(kw, shape)

  def loss(module):
    return lambda v, x: jnp.sum(jnp.sin(module.apply(v, x)) * w)

  np.testing.assert_allclose(ours.apply(v, x), ref.apply(v, x), rtol=1e-5, atol=2e-5)
  g_ref = jax.grad(loss(ref), argnums=(0, 1))(v, x)
  g_ours = jax.grad(loss(ours), argnums=(0, 1))(v, x)
  for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(np.abs(b).max()))


def test_bfloat16_input_float32_statistics_and_flax_output_dtypes():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 6, 16)).astype(jnp.bfloat16)
  for dtype in (None, jnp.bfloat16):
    ref = nn.GroupNorm(num_groups=4, dtype=dtype)
    ours = gn.GroupNorm(num_groups=4, dtype=dtype)
    v = _perturbed(ref.init(jax.random.PRNGKey(1), x), jax.random.PRNGKey(2))
    y_ref, y_ours = ref.apply(v, x), ours.apply(v, x)
    assert y_ours.dtype == y_ref.dtype
    np.testing.assert_allclose(np.float32(y_ours), np.float32(y_ref), rtol=2e-2, atol=2e-2)
    dx = jax.grad(lambda x: jnp.sum(ours.apply(v, x).astype(jnp.float32) ** 2))(x)
    assert dx.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(dx.astype(jnp.float32))))


def _count_full_reductions(jaxpr, size: int) -> int:
  """reduce_sum equations over an operand of ``size`` elements, in sub-jaxprs too."""
  n = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "reduce_sum" and np.prod(eqn.invars[0].aval.shape) == size:
      n += 1
    for sub in _sub_jaxprs(eqn.params.values()):
      n += _count_full_reductions(sub, size)
  return n


def _sub_jaxprs(values):
  for v in values:
    if isinstance(v, (list, tuple)):
      yield from _sub_jaxprs(v)
    elif hasattr(v, "jaxpr") and hasattr(v, "consts"):  # ClosedJaxpr
      yield v.jaxpr
    elif hasattr(v, "eqns"):  # Jaxpr
      yield v


def test_elementwise_remat_keeps_the_statistics_and_recomputes_elementwise_only():
  """Under model.remat='elementwise' the normalized values are recomputed in the backward pass
  from the stored per-group statistics: the gradient program reduces the full input exactly as
  often as without remat, where a policy that stores only the convolutions (the statistics not
  named) reduces it more often (the forward statistics once more); the gradients are the same."""
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 32))
  module = gn.GroupNorm(num_groups=8)
  v = _perturbed(module.init(jax.random.PRNGKey(1), x), jax.random.PRNGKey(2))

  def loss(policy):
    def f(v, x):
      fn = lambda v, x: jax.nn.silu(module.apply(v, x))
      if policy is not None:
        fn = jax.checkpoint(fn, policy=policy)
      return jnp.sum(fn(v, x) ** 2)
    return jax.grad(f, argnums=(0, 1))

  def reductions(policy):
    return _count_full_reductions(jax.make_jaxpr(loss(policy))(v, x).jaxpr, x.size)

  conv_only = jax.checkpoint_policies.save_only_these_names("conv")
  assert reductions(remat.ELEMENTWISE_POLICY) == reductions(None)
  assert reductions(conv_only) == reductions(None) + 2  # sum x and sum x^2 recomputed
  g0, g1 = loss(None)(v, x), loss(remat.ELEMENTWISE_POLICY)(v, x)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_networks_use_it_with_unchanged_parameter_names():
  """DDPM++ / the MNIST U-Net name their GroupNorm layers GroupNorm_k, as with flax's class."""
  from score_sde.models import layerspp
  x = jnp.ones((1, 4, 4, 16))

  class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
      return layerspp.group_norm(layerspp.group_norm(x))

  params = Block().init(jax.random.PRNGKey(0), x)["params"]
  assert sorted(params) == ["GroupNorm_0", "GroupNorm_1"]
  assert sorted(params["GroupNorm_0"]) == ["bias", "scale"]


@pytest.mark.parametrize("groups", [0, 5, -2])
def test_groups_that_do_not_divide_the_channels_fail_with_the_numbers(groups):
  with pytest.raises(ValueError, match=rf"num_groups={groups} does not divide the 16 channels"):
    gn.GroupNorm(num_groups=groups).init(jax.random.PRNGKey(0), jnp.ones((1, 4, 4, 16)))


def test_both_backward_paths_give_flaxs_gradients_and_forward_mode_off_the_custom_one():
  """custom_backward=True (the CPU default) and False (other backends: JAX differentiates the same
  forward) give flax's gradients; forward mode works through the plain path, equal to flax's, and
  the custom_vjp path refuses it."""
  kx, kt = jax.random.split(jax.random.PRNGKey(5))
  x = 2.0 * jax.random.normal(kx, (2, 6, 6, 16)) - 1.0
  ref = nn.GroupNorm(num_groups=4)
  v = _perturbed(ref.init(jax.random.PRNGKey(1), x), jax.random.PRNGKey(2))
  scale, bias = v["params"]["scale"], v["params"]["bias"]
  eps = ref.epsilon
  g_ref = jax.grad(lambda x, v: jnp.sum(jnp.sin(ref.apply(v, x))), argnums=(0, 1))(x, v)
  for custom in (True, False):
    f = lambda x, s, b: gn.normalize(x, s, b, 4, eps, custom_backward=custom)
    g = jax.grad(lambda x, s, b: jnp.sum(jnp.sin(f(x, s, b))), argnums=(0, 1, 2))(x, scale, bias)
    np.testing.assert_allclose(g[0], g_ref[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(g[1], g_ref[1]["params"]["scale"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(g[2], g_ref[1]["params"]["bias"], rtol=1e-4, atol=1e-4)
  dx = jax.random.normal(kt, x.shape)
  _, t_ref = jax.jvp(lambda x: ref.apply(v, x), (x,), (dx,))
  _, t = jax.jvp(lambda x: gn.normalize(x, scale, bias, 4, eps, custom_backward=False), (x,), (dx,))
  np.testing.assert_allclose(t, t_ref, rtol=1e-4, atol=1e-5)
  with pytest.raises(TypeError, match="jvp"):
    jax.jvp(lambda x: gn.normalize(x, scale, bias, 4, eps, custom_backward=True), (x,), (dx,))
