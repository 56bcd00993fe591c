"""Fixed 2D sine-cosine position embedding for the encoder's flattened feature maps.

With ``D = embed_dim / 4`` frequencies ``omega_d = 1 / temperature ** (d / D)``, a token whose two grid
coordinates are ``(a, b)`` gets

    [sin(a * omega), cos(a * omega), sin(b * omega), cos(b * omega)]     (each block D wide)

Feature maps are flattened row-major, token ``n = y * W + x`` of an ``H x W`` map. Which ``(a, b)``
token ``n`` gets depends on ``token_order``:

- ``'rtdetr'`` (the published RT-DETR / RT-DETRv2 code): ``a = n // H``, ``b = n % H``. For square
  maps this is ``(a, b) = (y, x)``; for non-square maps (e.g. 1280x736 inputs) the coordinates do not
  match the token's real position (a known quirk of the reference code). Official checkpoints give
  official outputs with this order at any size.
- ``'row_major'``: ``(a, b) = (y, x)`` for every map. Identical to ``'rtdetr'`` on square maps (so the
  official 640x640 weights are unaffected there) and geometrically correct on non-square ones.
"""
from __future__ import annotations

import torch

TOKEN_ORDERS = ("rtdetr", "row_major")


def sincos_position_embedding_2d(height: int, width: int, embed_dim: int = 256, temperature: float = 10000.0,
                                 token_order: str = "rtdetr", device: torch.device | None = None) -> torch.Tensor:
    """Position embedding of the ``height * width`` row-major tokens of a feature map.

    Args:
        height, width: feature-map size H, W (cells).
        embed_dim: C, divisible by 4.
        temperature: frequency base.
        token_order: 'rtdetr' or 'row_major' (see the module docstring).
        device: where the result is built.
    Returns:
        [1, H * W, C] float32.
    """
    if embed_dim % 4 != 0:
        raise ValueError(f"sincos_position_embedding_2d: embed_dim={embed_dim} must be divisible by 4")
    if token_order not in TOKEN_ORDERS:
        raise ValueError(f"sincos_position_embedding_2d: token_order={token_order!r} is not one of {TOKEN_ORDERS}")
    height, width = int(height), int(width)
    token = torch.arange(height * width, device=device)
    period = height if token_order == "rtdetr" else width
    coord_a = torch.div(token, period, rounding_mode="floor").to(torch.float32)  # [N]
    coord_b = (token % period).to(torch.float32)  # [N]
    num_freq = embed_dim // 4
    omega = 1.0 / temperature ** (torch.arange(num_freq, dtype=torch.float32, device=device) / num_freq)  # [D]
    angle_a = coord_a[:, None] * omega[None]  # [N, D]
    angle_b = coord_b[:, None] * omega[None]
    return torch.cat([angle_a.sin(), angle_a.cos(), angle_b.sin(), angle_b.cos()], dim=1)[None]
