"""Small helpers shared across the library."""
from __future__ import annotations


def data_shape(config) -> tuple[int, ...]:
  """Shape of one example: ``(dim,)`` for vector (toy) data, ``(H, W, C)`` for images.

  Vector data sets ``config.data.dim``; image data sets ``config.data.image_size`` and
  ``config.data.num_channels``.
  """
  data = config.data
  if data.get("dim", None):
    return (int(data.dim),)
  return (int(data.image_size), int(data.image_size), int(data.num_channels))
