"""The start-up check table (score_sde.config_validation.FIELDS) covers every config field.

Walks every shipped config (configs/**, defaults included): a field without a check fails here,
so a new field cannot go unchecked; a None-valued field must be a typed placeholder, so
``--config.<field>=value`` parses for it. Fast: no network is built, nothing is compiled.
"""
from __future__ import annotations

import importlib.util
import math
import pathlib
import re

import ml_collections
import pytest
from ml_collections.config_dict import FieldReference
from ml_collections.config_flags import config_path

from score_sde import config_validation as cv

REPO = pathlib.Path(__file__).resolve().parents[1]


def _load(path: pathlib.Path) -> ml_collections.ConfigDict:
  spec = importlib.util.spec_from_file_location(f"cfg_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if hasattr(module, "get_config"):
    return module.get_config()
  return module.get_default_configs()


CONFIG_FILES = sorted(p for p in (REPO / "configs").rglob("*.py")
                      if p.name != "__init__.py" and p.name != "default_image_eval.py")
CONFIGS = {str(p.relative_to(REPO)): _load(p) for p in CONFIG_FILES}
RUN_CONFIGS = {k: v for k, v in CONFIGS.items() if "default_" not in k}


def test_every_config_kind_is_walked():
  """The walk reaches the toy, MNIST, CIFAR-10, CelebA and LSUN configs and every paper
  subfolder (vp/ddpm, ve/ncsn, ve/ncsnv2), plus the defaults they build on."""
  names = set(CONFIGS)
  for needle in ("configs/toy/", "configs/mnist/", "configs/vp/ddpm/", "configs/subvp/",
                 "configs/ve/ncsn/", "configs/ve/ncsnv2/", "default_lsun_configs",
                 "default_celeba_configs", "default_cifar10_configs", "default_mnist_configs",
                 "default_toy_configs"):
    assert any(needle in n for n in names), needle
  assert len(RUN_CONFIGS) >= 46


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_field_of_every_shipped_config_has_a_check(name):
  missing = cv.unchecked_fields(CONFIGS[name])
  assert not missing, (
      f"{name}: field(s) {missing} have no start-up check; add each to "
      "score_sde.config_validation.FIELDS (type, range / choices) and to docs/configs.md.")


@pytest.mark.parametrize("name", sorted(RUN_CONFIGS))
def test_every_shipped_value_passes_its_check(name):
  """(The full validate_config of every shipped config, network and sampler builds included, is
  tests/test_networks.py::test_startup_validation_reports_network_errors_with_the_others.)"""
  assert cv.check_fields(RUN_CONFIGS[name]) == {}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_none_fields_are_typed_placeholders(name):
  """ml_collections can only override a field whose type it knows: a bare ``None`` fails at flag
  parsing ("Type NoneType ... not supported for overriding")."""
  config = CONFIGS[name]
  for path in cv.config_leaf_paths(config):
    field_type = config_path.get_type(path, config)
    assert field_type is not type(None), (
        f"{name}: config.{path} is a bare None; declare it "
        f"ml_collections.config_dict.placeholder(<type>) so --config.{path}=... parses.")


def test_placeholders_read_as_none_like_before():
  """Code reading a placeholder sees None through every access path it uses."""
  config = CONFIGS["configs/mnist/vp_continuous.py"]
  assert isinstance(config.data._fields["dim"], FieldReference)
  for path in ("data.dim", "data.data_dir", "eval.stats_path", "eval.inception_weights"):
    group, field = path.split(".")
    assert config[group][field] is None
    assert getattr(config[group], field) is None
    assert config[group].get(field, "default") is None
    assert config[group].to_dict()[field] is None
  assert config.copy_and_resolve_references().data.dim is None
  config.data.dim = 3   # a placeholder takes a value of its type
  assert config.data.dim == 3


def test_required_fields_are_in_every_shipped_config():
  for name, config in RUN_CONFIGS.items():
    paths = set(cv.config_leaf_paths(config))
    absent = [p for p, c in cv.FIELDS.items() if c.required and p not in paths]
    assert not absent, f"{name} lacks required field(s) {absent}"


def test_every_checked_field_is_documented():
  """docs/configs.md names every field of the table (as `field` in its group's section)."""
  text = (REPO / "docs" / "configs.md").read_text()
  sections, current = {}, None
  for line in text.splitlines():
    if line.startswith("## "):
      group = re.search(r"`config\.(\w+)`", line)
      current = group.group(1) if group else ("" if "top level" in line else None)
      sections.setdefault(current, "")
    elif current is not None:
      sections[current] += line + "\n"
  undocumented = []
  for path in cv.FIELDS:
    group, _, field = path.rpartition(".")
    if f"`{field}`" not in sections.get(group, ""):
      undocumented.append(path)
  assert not undocumented, f"docs/configs.md does not document {undocumented}"


@pytest.mark.parametrize("check,good,bad", [
    (cv.Check("int", min=1), [1, 7], [0, -1, 1.0, True, "1", None]),
    (cv.Check("float", gt=0), [1e-5, 3, 2.0], [0, -1.0, math.nan, math.inf, "1", None, True]),
    (cv.Check("float", min=0, lt=1), [0, 0.5], [1.0, -0.1]),
    (cv.Check("bool"), [True, False], [0, 1, "True", None]),
    (cv.Check("str", choices=("a", "B"), lower=True), ["a", "A", "b"], ["c", 1, None]),
    (cv.Check("str", optional=True), [None, "", "/p"], [1]),
    (cv.Check("ints", min=1, nonempty=True), [(1,), [1, 2]], [(), (0,), (1.5,), "12", None]),
    (cv.Check("floats", nonempty=True), [[1, 3, 3, 1]], [[], ["x"], [math.nan]]),
    (cv.Check("dict", optional=True), [{}, {"order": 3}, ml_collections.ConfigDict(), None],
     [3, "x"]),
    (cv.Check("float", rule=(lambda v: v != 0, "non-zero")), [-1.0, 1.0], [0, 0.0]),
])
def test_check_kinds(check, good, bad):
  for v in good:
    assert check.message("f", v) is None, v
  for v in bad:
    message = check.message("g.f", v)
    assert message and message.startswith("config.g.f"), v


def test_registries_define_the_choices():
  """Choices come from the registries the code uses, so a newly registered sampler / SDE /
  parametrization is accepted without touching the table."""
  from score_sde import likelihood, sde_lib
  from score_sde.sampling import available_samplers, ode
  assert cv.FIELDS["sampling.method"].choice_list() == available_samplers()
  assert cv.FIELDS["training.sde"].choice_list() == sorted(sde_lib.SDES)
  assert cv.FIELDS["sampling.ode_method"].choice_list() == sorted(ode.ODE_METHODS)
  assert cv.FIELDS["eval.hutchinson_type"].choice_list() == list(likelihood.HUTCHINSON_TYPES)
  assert set(cv.FIELDS["model.parametrization"].choice_list()) == {""} | set(
      sde_lib.PARAMETRIZATIONS)


def test_network_choice_lists_match_the_networks():
  """ACTIVATIONS / NORMALIZATIONS are written out in the table; the networks must agree."""
  from score_sde.models import layers, normalization
  assert set(cv.ACTIVATIONS) == set(layers._ACTIVATIONS)
  for name in cv.NORMALIZATIONS:
    normalization.get_normalization(ml_collections.ConfigDict({"model": {"normalization": name}}))
  with pytest.raises(ValueError, match="BatchNorm"):
    normalization.get_normalization(
        ml_collections.ConfigDict({"model": {"normalization": "BatchNorm"}}))
