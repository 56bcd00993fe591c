"""Building blocks shared by the backbone and the hybrid encoder.

- ``get_activation(name)``: activation module from a config string.
- ``ConvNormLayer``: conv (no bias) -> BatchNorm2d -> activation, keys ``conv.weight``, ``norm.*``.
- ``FrozenBatchNorm2d`` and ``freeze_batch_norm2d``: BatchNorm with fixed statistics and affine
  parameters, with the same state-dict keys as ``nn.BatchNorm2d`` (``num_batches_tracked`` included),
  so checkpoints load into a model whether or not its norms are frozen.
"""
from __future__ import annotations

import torch
from torch import nn

from src.nn.activation import get_activation  # noqa: F401  (re-exported for the backbone and encoder)



class ConvNormLayer(nn.Module):
    """``act(norm(conv(x)))`` with 'same' padding ``(kernel_size - 1) // 2`` unless ``padding`` is given.

    x [B, ch_in, H, W] -> [B, ch_out, ceil(H / stride), ceil(W / stride)] (odd kernels).
    """

    def __init__(self, ch_in: int, ch_out: int, kernel_size: int, stride: int, padding: int | None = None,
                 bias: bool = False, act: str | None = None):
        super().__init__()
        self.conv = nn.Conv2d(ch_in, ch_out, kernel_size, stride,
                              padding=(kernel_size - 1) // 2 if padding is None else padding, bias=bias)
        self.norm = nn.BatchNorm2d(ch_out)
        self.act = get_activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d in inference form whose statistics and affine terms are buffers (never trained).

    ``y = (x - running_mean) / sqrt(running_var + eps) * weight + bias`` per channel, x [B, C, H, W].
    Buffers: weight, bias, running_mean, running_var [C] and num_batches_tracked (0-d long, unused,
    kept so the state-dict keys equal those of ``nn.BatchNorm2d``). Loading a state dict without
    ``num_batches_tracked`` (e.g. a checkpoint saved from the official FrozenBatchNorm2d, which drops
    it) keeps the current counter instead of reporting a missing key.
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    @classmethod
    def from_batch_norm(cls, bn: nn.BatchNorm2d) -> "FrozenBatchNorm2d":
        """Frozen copy of ``bn`` (same eps, statistics and affine values; device and dtype kept)."""
        frozen = cls(bn.num_features, bn.eps).to(bn.running_mean.device if bn.running_mean is not None
                                                 else bn.weight.device)
        with torch.no_grad():
            if bn.affine:
                frozen.weight.copy_(bn.weight)
                frozen.bias.copy_(bn.bias)
            if bn.track_running_stats:
                frozen.running_mean.copy_(bn.running_mean)
                frozen.running_var.copy_(bn.running_var)
                frozen.num_batches_tracked.copy_(bn.num_batches_tracked)
        return frozen

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        key = prefix + "num_batches_tracked"
        if key not in state_dict:
            state_dict[key] = self.num_batches_tracked.clone()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


def freeze_batch_norm2d(module: nn.Module) -> nn.Module:
    """Replace every ``nn.BatchNorm2d`` in ``module`` (recursively, in place) by a FrozenBatchNorm2d
    carrying the same values. Returns ``module`` (or the frozen replacement if ``module`` is a BN)."""
    if isinstance(module, nn.BatchNorm2d):
        return FrozenBatchNorm2d.from_batch_norm(module)
    for name, child in module.named_children():
        new_child = freeze_batch_norm2d(child)
        if new_child is not child:
            setattr(module, name, new_child)
    return module
