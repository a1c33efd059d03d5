"""The command line and the experiments of score-sde, run as modules of this package:

  python -m experiments.main --config configs/toy/vp.py --workdir runs/toy_vp
  python -m experiments.benchmark_samplers --help

Scripts (each has ``define_flags(flag_values)`` and an absl ``main``): ``main`` (train / eval /
sample), ``import_checkpoint``, ``param_counts``; benchmarks ``benchmark`` (training and sampling
cost), ``benchmark_networks``, ``benchmark_scaling``, ``benchmark_conv_loop``,
``benchmark_conv_grad``, ``benchmark_inception``, ``benchmark_samplers`` (exact score),
``benchmark_samplers_mnist`` (trained network), ``benchmark_start_time``; comparisons with Hugging
Face diffusers ``compare_reference_samplers`` and ``compare_reference_samplers_mnist``.

Shared modules, imported and never run: ``common`` (SDE names, the exact-score source and
distances, the sampler grid, output helpers), ``mnist_setup`` (the settings, trained model,
feature classifier and prior noise of the two MNIST scripts), ``diffusers_reference`` (driving
diffusers schedulers with our score). Scripts import these, never each other. A script defines
its flags only when it runs (``main`` excepted), so every module here imports into one process.
"""
