"""The CPU-friendly convolution: same values and gradients as lax.conv_general_dilated."""

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from score_sde.models import conv as conv_lib

CASES = [  # (spatial, kernel, strides, padding, dilation)
    ((9, 8), (3, 3), (1, 1), "SAME", (1, 1)),
    ((9, 8), (3, 3), (2, 2), "SAME", (1, 1)),
    ((9, 7), (3, 2), (2, 3), "VALID", (1, 1)),
    ((10, 10), (3, 3), (1, 1), "SAME", (2, 2)),
    ((11, 9), (3, 3), (2, 1), ((2, 0), (1, 3)), (1, 2)),
    ((8, 8), (1, 1), (2, 2), "SAME", (1, 1)),
    ((13,), (4,), (3,), ((1, 2),), (1,)),
]


@pytest.mark.parametrize("spatial,kernel,strides,padding,dilation", CASES)
def test_values_and_gradients_match_lax(spatial, kernel, strides, padding, dilation):
  nd = len(spatial)
  kx, kw, kc = jax.random.split(jax.random.PRNGKey(len(spatial) + sum(spatial)), 3)
  x = jax.random.normal(kx, (3, *spatial, 4))
  w = jax.random.normal(kw, (*kernel, 4, 5))
  sp = "HWD"[:nd]
  dn = ("N" + sp + "C", sp + "IO", "N" + sp + "C")

  def loss(f, x, w):
    y = f(x, w, strides, padding, rhs_dilation=dilation, dimension_numbers=dn)
    return jnp.sum(jnp.sin(y) * jax.random.normal(kc, y.shape)), y

  (l0, y0), g0 = jax.value_and_grad(lambda x, w: loss(lax.conv_general_dilated, x, w),
                                    (0, 1), has_aux=True)(x, w)
  (l1, y1), g1 = jax.value_and_grad(lambda x, w: loss(conv_lib.conv_general_dilated, x, w),
                                    (0, 1), has_aux=True)(x, w)
  np.testing.assert_allclose(y1, y0, rtol=1e-5, atol=1e-5)
  for a, b in zip(g1, g0):
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_inside_a_scan_and_as_a_flax_conv():
  """The flax wrapper keeps the parameter tree of nn.Conv; gradients inside lax.scan match."""
  import flax.linen as nn
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 3))
  ours, ref = conv_lib.Conv(6, (3, 3), strides=(2, 2)), nn.Conv(6, (3, 3), strides=(2, 2))
  params = ref.init(jax.random.PRNGKey(1), x)
  assert jax.tree.map(jnp.shape, ours.init(jax.random.PRNGKey(1), x)) == jax.tree.map(
      jnp.shape, params)

  def run(module):
    def body(p, _):
      g = jax.grad(lambda p: jnp.mean(jnp.tanh(module.apply(p, x)) ** 2))(p)
      return jax.tree.map(lambda a, b: a - 0.1 * b, p, g), None
    return jax.jit(lambda p: lax.scan(body, p, None, length=3)[0])(params)

  for a, b in zip(jax.tree.leaves(run(ours)), jax.tree.leaves(run(ref))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_uncovered_cases_fall_back_to_lax():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 6, 4))
  w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 1, 4))
  dn = ("NHWC", "HWIO", "NHWC")
  for kwargs in ({"feature_group_count": 4}, {"lhs_dilation": (2, 2)}):
    ww = w if "feature_group_count" in kwargs else jnp.tile(w, (1, 1, 4, 1))
    args = (x, ww, (1, 1), ((1, 1), (1, 1)))
    np.testing.assert_array_equal(conv_lib.conv_general_dilated(*args, dimension_numbers=dn,
                                                                **kwargs),
                                  lax.conv_general_dilated(*args, dimension_numbers=dn, **kwargs))


def test_kernel_gradient_with_padding_beyond_the_kernel_and_in_bfloat16():
  """Stride-1 kernel gradient (one matrix product per tap): padding wider than the kernel reach
  (negative offsets into dy's padded frame) and bfloat16 inputs (float32 accumulation)."""
  x = jax.random.normal(jax.random.PRNGKey(3), (2, 7, 6, 3))
  w = jax.random.normal(jax.random.PRNGKey(4), (3, 2, 3, 4))
  dn = ("NHWC", "HWIO", "NHWC")
  pads = ((4, 0), (0, 3))
  for dtype, tol in ((jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)):
    xs, ws = x.astype(dtype), w.astype(dtype)
    ref = jax.grad(lambda w: jnp.sum(jnp.sin(lax.conv_general_dilated(
        xs.astype(jnp.float32), w, (1, 1), pads, dimension_numbers=dn))))(ws.astype(jnp.float32))
    got = jax.grad(lambda w: jnp.sum(jnp.sin(conv_lib.conv_general_dilated(
        xs, w, (1, 1), pads, dimension_numbers=dn).astype(jnp.float32))))(ws)
    assert got.dtype == dtype
    np.testing.assert_allclose(np.asarray(got, np.float32), ref, rtol=tol, atol=tol * 10)


def test_kernel_gradient_products_are_row_major():
  """Each tap's product is [C_in, M] x [M, C_out] (lhs axis 1 contracted with rhs axis 0): the form
  XLA:CPU hands to its YNNPACK GEMM (contracting both leading axes went to Eigen, 1.2-2.5x
  slower)."""
  x = jax.random.normal(jax.random.PRNGKey(5), (2, 6, 6, 3))
  w = jax.random.normal(jax.random.PRNGKey(6), (3, 3, 3, 5))
  dn = ("NHWC", "HWIO", "NHWC")
  grad_w = lambda w: jax.grad(lambda w: jnp.sum(conv_lib.conv_general_dilated(
      x, w, (1, 1), "SAME", dimension_numbers=dn) ** 2))(w)
  dots = []

  def collect(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "dot_general":
        dots.append((eqn.params["dimension_numbers"], eqn.invars[0].aval.shape,
                     eqn.invars[1].aval.shape))
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        collect(sub)

  collect(jax.make_jaxpr(grad_w)(w).jaxpr)
  assert ((((1,), (0,)), ((), ())), (3, 72), (72, 5)) in dots, dots
  assert all(d[0][0] != ((0,), (0,)) for d in dots), dots


def test_benchmark_conv_grad_times_and_checks_both_gradients():
  from absl import app
  from experiments import benchmark_conv_grad as bench
  assert bench.parse_shape("8:4:6") == (8, 4, 6)
  for bad in ("8:4", "8:x:6", "0:4:6"):
    with pytest.raises(app.UsageError, match="--shapes entry"):
      bench.parse_shape(bad)
  result = bench.benchmark([(6, 4, 6)], batch=2, repeats=1)
  (row,) = result["shapes"]
  for side in ("lax", "score_sde"):
    assert all(row[side][k] > 0 for k in ("fwd_ms", "dx_ms", "dw_ms")), row
  assert row["dx_rel_diff"] < 1e-5 and row["dw_rel_diff"] < 1e-5, row
  # --upsample: the convolution of the upsampled copy against the folded one, same values.
  (row,) = bench.benchmark([(4, 3, 5)], batch=2, repeats=1, upsample=True)["shapes"]
  for side in ("upsampled_first", "folded"):
    assert all(row[side][k] > 0 for k in ("fwd_ms", "dx_ms", "dw_ms")), row
  assert max(row[f"{p}_rel_diff"] for p in ("out", "dx", "dw")) < 1e-5, row
  with pytest.raises(ValueError, match="cannot be combined"):
    bench.benchmark([(4, 3, 5)], batch=2, repeats=1, with_torch=True, upsample=True)
