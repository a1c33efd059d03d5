"""MNIST, VP SDE: consistency distillation (CD) from the MNIST score model of
configs/mnist/vp_continuous.py (train it first: ``--config configs/mnist/vp_continuous.py
--workdir runs/mnist_vp --mode train``; set ``--config.consistency.teacher_workdir`` to that
workdir). Heun teacher steps on N = 18 times, target EMA 0.95, l2; one-step sampling.
The student is the teacher's U-Net with the 'consistency' parametrization (sigma_data = 0.5 for
images in [-1, 1]), initialized from scratch.
"""
from configs.default_consistency import add_consistency_fields
from configs.default_mnist_configs import get_default_configs


def get_config():
  config = get_default_configs()
  config.training.sde = "vpsde"
  config.model.sigma_data = 0.5
  config.optim.lr = 1e-4
  add_consistency_fields(config, "consistency_distillation",
                         teacher="configs/mnist/vp_continuous.py", teacher_workdir="runs/mnist_vp",
                         solver="heun", num_scales=18, target_ema=0.95, metric="l2")
  return config
