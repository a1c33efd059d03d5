"""score_sde.prng: on CPU, threefry lowered straight-line gives the same bits as JAX's loop."""

import os
import subprocess
import sys

import jax
import numpy as np

import score_sde  # noqa: F401  (installs the lowering)
from score_sde import prng

# Draws of the kinds the framework makes: keys split and folded, bits of odd sizes, uniform /
# normal noise, dropout masks, a permutation.
DRAWS = """
import jax, jax.numpy as jnp, numpy as np
key = jax.random.PRNGKey(1234)
k1, k2, k3 = jax.random.split(key, 3)
draws = {
    "split": jax.random.key_data(jax.random.split(jax.random.fold_in(k1, 7), 5)),
    "bits": jax.jit(lambda k: jax.random.bits(k, (3, 37)))(k2),
    "normal": jax.jit(lambda k: jax.random.normal(k, (2, 9, 9, 3)))(k3),
    "uniform": jax.random.uniform(k1, (1001,)),
    "bernoulli": jax.jit(lambda k: jax.random.bernoulli(k, 0.9, (4, 8, 8, 5)))(k2),
    "permutation": jax.random.permutation(k3, 50),
}
hlo = jax.jit(lambda k: jax.random.bits(k, (1000,))).lower(key).as_text()
"""


def test_draws_are_bitwise_those_of_jaxs_loop_lowering(tmp_path):
  assert jax.default_backend() == "cpu"
  assert prng.use_unrolled_threefry_on_cpu()  # in effect on this JAX
  scope: dict = {}
  exec(DRAWS, scope)  # pylint: disable=exec-used
  assert "while" not in scope["hlo"]  # straight-line here
  out = tmp_path / "loop.npz"
  script = "import score_sde\n" + DRAWS + (  # the variable set: import keeps JAX's loop
      f"\nassert 'while' in hlo\n"
      f"np.savez({str(out)!r}, **{{k: np.asarray(v) for k, v in draws.items()}})\n")
  env = dict(os.environ, **{prng.ENV_VAR: "loop"})
  subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=300)
  reference = np.load(out)
  assert sorted(reference.files) == sorted(scope["draws"])
  for name, value in scope["draws"].items():
    np.testing.assert_array_equal(np.asarray(value), reference[name], err_msg=name)


def test_the_environment_variable_keeps_the_loop():
  os.environ[prng.ENV_VAR] = "loop"
  try:
    assert prng.use_unrolled_threefry_on_cpu() is False
  finally:
    del os.environ[prng.ENV_VAR]
  assert prng.use_unrolled_threefry_on_cpu() is True
  assert "while" not in jax.jit(lambda k: jax.random.bits(k, (10,))).lower(
      jax.random.PRNGKey(0)).as_text()
