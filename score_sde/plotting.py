"""Figures written into the workdir: sample scatter plots / image grids and the bits/dim figure."""
from __future__ import annotations

import os
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402


def image_grid(images: np.ndarray, nrow: Optional[int] = None, padding: int = 2) -> np.ndarray:
  """Tiles ``[n, H, W, C]`` images in [0, 1] into one uint8 ``[rows*(H+p), cols*(W+p), C]`` grid."""
  images = np.clip(np.asarray(images, np.float32), 0.0, 1.0)
  n, h, w, c = images.shape
  nrow = nrow or int(np.ceil(np.sqrt(n)))
  ncol = int(np.ceil(n / nrow))
  grid = np.ones((ncol * (h + padding) + padding, nrow * (w + padding) + padding, c), np.float32)
  for i in range(n):
    r, col = divmod(i, nrow)
    y, x = padding + r * (h + padding), padding + col * (w + padding)
    grid[y:y + h, x:x + w] = images[i]
  return (grid * 255 + 0.5).astype(np.uint8)


def save_image_grid(images: np.ndarray, path: str, nrow: Optional[int] = None) -> None:
  grid = image_grid(images, nrow)
  Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path)


def save_scatter(samples: np.ndarray, path: str, reference: Optional[np.ndarray] = None,
                 title: str = "") -> None:
  """Scatter plot of 2-D samples, beside reference data when given."""
  samples = np.asarray(samples)
  panels = [("samples", samples)] + ([("data", np.asarray(reference))] if reference is not None else [])
  fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2), squeeze=False)
  lim = np.percentile(np.abs(np.concatenate([p for _, p in panels])), 99.5) * 1.15
  for ax, (name, pts) in zip(axes[0], panels):
    ax.scatter(pts[:, 0], pts[:, 1], s=2, alpha=0.5)
    ax.set_xlim(-lim, lim); ax.set_ylim(-lim, lim); ax.set_aspect("equal"); ax.set_title(name)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def save_samples(samples: np.ndarray, path_prefix: str, reference: Optional[np.ndarray] = None,
                 title: str = "") -> str:
  """Writes a scatter plot (vector data) or an image grid (images); returns the PNG path."""
  path = path_prefix + ".png"
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  if samples.ndim == 2 and samples.shape[1] == 2:
    save_scatter(samples, path, reference, title)
  else:
    save_image_grid(samples[:256], path)
  return path


def save_bpd_figure(path: str, steps: Sequence[int], bpd: Sequence[float],
                    reference_bpd: Optional[float] = None, density: Optional[np.ndarray] = None,
                    true_density: Optional[np.ndarray] = None, extent=None) -> None:
  """bits/dim over training (and the data's exact bpd), plus model vs true density maps in 2-D."""
  ncols = 1 + (density is not None) + (true_density is not None)
  fig, axes = plt.subplots(1, ncols, figsize=(4.5 * ncols, 4.0), squeeze=False)
  ax = axes[0][0]
  ax.plot(list(steps), list(bpd), "o-", label="model (PF-ODE)")
  if reference_bpd is not None:
    ax.axhline(reference_bpd, color="k", ls="--", label="exact data density")
  ax.set_xlabel("training step"); ax.set_ylabel("test bits/dim"); ax.legend(); ax.grid(alpha=0.3)
  col = 1
  for name, img in (("model density", density), ("true density", true_density)):
    if img is not None:
      axes[0][col].imshow(img, origin="lower", extent=extent, cmap="magma")
      axes[0][col].set_title(name)
      col += 1
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
