"""score-sde: score-based generative modeling through SDEs in JAX (Song et al., ICLR 2021)."""
from score_sde import prng as _prng

# Same random bits, faster on CPU (score_sde/prng.py).
_prng.use_unrolled_threefry_on_cpu()
