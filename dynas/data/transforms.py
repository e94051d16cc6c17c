"""Batch-wise image transforms written with torch: one vectorized call per batch, no PIL.

All take and return ``(B, C, H, W)`` tensors; the random ones draw from an explicit
:class:`torch.Generator` so that a seed fixes every crop and flip.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["normalize", "random_crop", "random_hflip", "resize"]


def resize(images: torch.Tensor, size: int, chunk: int = 2048) -> torch.Tensor:
    """Resize uint8 ``images`` (N, C, H, W) to ``size`` x ``size`` (bilinear, antialiased).

    Done once when a dataset is loaded, in chunks so a large dataset never becomes one float copy.
    """
    if images.shape[2:] == (size, size):
        return images
    out = torch.empty(images.shape[0], images.shape[1], size, size, dtype=torch.uint8)
    for start in range(0, images.shape[0], chunk):
        x = images[start : start + chunk].float()
        y = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        out[start : start + chunk] = y.round_().clamp_(0, 255).to(torch.uint8)
    return out


def random_crop(images: torch.Tensor, padding: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Zero-pad by ``padding`` pixels, then crop each image back to its size at a random offset."""
    if padding <= 0:
        return images
    b, c, h, w = images.shape
    hp, wp = h + 2 * padding, w + 2 * padding
    padded = F.pad(images, (padding, padding, padding, padding)).reshape(b, c * hp * wp)
    dev = images.device
    # Random numbers come from a CPU generator whatever the device, so a seed gives the same
    # crops on CPU and CUDA.
    dy = torch.randint(0, 2 * padding + 1, (b,), generator=generator).to(dev)
    dx = torch.randint(0, 2 * padding + 1, (b,), generator=generator).to(dev)
    # Flat index of every output pixel in the padded image at offset (0, 0): (C*H*W,)
    base = (
        torch.arange(c, device=dev)[:, None, None] * (hp * wp)
        + torch.arange(h, device=dev)[None, :, None] * wp
        + torch.arange(w, device=dev)[None, None, :]
    ).reshape(-1)
    index = base[None, :] + (dy * wp + dx)[:, None]  # (B, C*H*W)
    return torch.gather(padded, 1, index).reshape(b, c, h, w)  # one gather, not B slices


def random_hflip(images: torch.Tensor, generator: torch.Generator | None = None, p: float = 0.5) -> torch.Tensor:
    """Flip each image left-right with probability ``p``."""
    flip = (torch.rand(images.shape[0], generator=generator) < p).to(images.device)  # (B,)
    out = images.clone()
    out[flip] = images[flip].flip(3)  # copies only the flipped half, not a flipped whole batch
    return out


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 ``images`` -> float32 ``(x / 255 - mean) / std`` per channel, on the images' device."""
    s = torch.tensor(std, dtype=torch.float64)
    # (x / 255 - m) / s == x * scale - shift: two in-place passes over one float copy.
    scale = (1.0 / (255.0 * s)).to(torch.float32).to(images.device).view(1, -1, 1, 1)
    shift = (torch.tensor(mean, dtype=torch.float64) / s).to(torch.float32).to(images.device).view(1, -1, 1, 1)
    return images.float().mul_(scale).sub_(shift)
