"""Toy 2-D data, rectified flow (Liu et al. 2023; flow matching, Lipman et al. 2023):
x_t = (1 - t) x_0 + t n, the network predicts the velocity u = n - x_0, flow-matching loss with
t ~ U(eps, T); sampled with DPM-Solver++(2M) at 35 NFE (sigma / alpha spans up to 999, so Heun
needs about 50 NFE for the same accuracy: docs/processes.md)."""
from configs.default_toy_configs import get_default_configs


def get_config():
  config = get_default_configs()
  config.training.sde = "rectified_flow"
  config.training.loss = "flow_matching"
  config.model.parametrization = "flow"
  config.sampling.method = "dpm_solver_pp"   # 2M, logSNR steps (Heun needs ~50 NFE here)
  config.sampling.nfe = 35
  return config
