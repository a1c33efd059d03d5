"""score-sde: score-based generative modeling through SDEs in JAX (Song et al., ICLR 2021)."""
from score_sde import host_memory as _host_memory
from score_sde import prng as _prng

# XLA:CPU programs ordered for memory, not concurrency (score_sde/host_memory.py); first, as XLA
# reads its flags when the first backend is made.
_host_memory.use_memory_ordered_schedule_on_cpu()
# Same random bits, faster on CPU (score_sde/prng.py).
_prng.use_unrolled_threefry_on_cpu()
