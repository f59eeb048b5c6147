"""Preview image grids written during training."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from torch import Tensor


def save_grid(images: Tensor, path: Path, columns: int | None = None, min_cell: int = 64) -> Path:
    """Save (B, C, H, W) images in [0, 1] as one PNG grid, small images scaled up (nearest)."""
    from PIL import Image

    b, c, h, w = images.shape
    columns = columns or min(b, math.ceil(math.sqrt(b)) if b > 10 else b)
    rows = math.ceil(b / columns)
    scale = max(1, math.ceil(min_cell / max(h, w)))
    pad = 2
    grid = np.ones((rows * (h * scale + pad) + pad, columns * (w * scale + pad) + pad, 3), np.uint8) * 255
    arr = (images.detach().float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
    for i in range(b):
        cell = arr[i].transpose(1, 2, 0).repeat(scale, 0).repeat(scale, 1)
        if c == 1:
            cell = np.repeat(cell, 3, axis=2)
        r, col = divmod(i, columns)
        top, left = pad + r * (h * scale + pad), pad + col * (w * scale + pad)
        grid[top:top + h * scale, left:left + w * scale] = cell[..., :3]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)
    return path
