"""MNIST, small U-Net, rectified flow: x_t = (1 - t) x_0 + t n, velocity output, flow-matching loss
with logit-normal t (SD3, m = 0, s = 1), DPM-Solver++(2M) sampling at 35 NFE."""
from configs.default_mnist_configs import get_default_configs


def get_config():
  config = get_default_configs()
  config.training.sde = "rectified_flow"
  config.training.loss = "flow_matching"
  config.training.t_sampling = "logit_normal"
  config.model.parametrization = "flow"
  config.sampling.method = "dpm_solver_pp"   # 2M, logSNR steps (Heun needs ~50 NFE here)
  config.sampling.nfe = 35
  return config
