"""Building blocks shared by the backbone and the hybrid encoder.

- ``get_activation(name)``: activation module from a config string.
- ``ConvNormLayer``: conv (no bias) -> BatchNorm2d -> activation, keys ``conv.weight``, ``norm.*``.
- ``fold_norm(conv_weight, conv_bias, norm)``: the weight and bias of one conv that equals conv -> norm in
  inference; ``fold_conv_norm(module)`` applies it in place to a conv + norm pair for deployment.
- ``FrozenBatchNorm2d`` and ``freeze_batch_norm2d``: BatchNorm with fixed statistics and affine
  parameters, with the same state-dict keys as ``nn.BatchNorm2d`` (``num_batches_tracked`` included),
  so checkpoints load into a model whether or not its norms are frozen.
"""
from __future__ import annotations

import torch
from torch import nn

from src.nn.activation import get_activation  # noqa: F401  (re-exported for the backbone and encoder)



def fold_norm(weight: torch.Tensor, bias: torch.Tensor | None, norm: nn.Module) -> tuple:
    """(weight, bias) of the conv equal to ``norm(conv(x))`` with the norm's running statistics (inference form).

    weight [C_out, C_in, kh, kw], bias [C_out] or None; ``norm`` a BatchNorm2d or FrozenBatchNorm2d over C_out.
    ``norm(y) = (y - mean) * s + beta`` with ``s = gamma / sqrt(var + eps)`` per channel, so the folded conv has
    ``weight * s`` and ``(bias - mean) * s + beta``.
    """
    if norm.running_mean is None:
        raise ValueError("fold_norm: the norm keeps no running statistics (track_running_stats=False); it "
                         "normalises by batch statistics and cannot be folded into a conv")
    scale = (norm.running_var + norm.eps).rsqrt()
    if norm.weight is not None:
        scale = scale * norm.weight
    shift = -norm.running_mean * scale
    if norm.bias is not None:
        shift = shift + norm.bias
    if bias is not None:
        shift = shift + bias * scale
    return weight * scale.reshape(-1, 1, 1, 1), shift


class FoldedNorm(nn.Identity):
    """What a norm becomes once ``fold_conv_norm`` has folded it into its conv: the identity in inference, an
    error in training (the layer would train with no normalisation at all, silently)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            raise RuntimeError("this conv-norm layer was folded for deployment (fuse_for_inference): it cannot "
                               "train; build the model again from its config and checkpoint to train it")
        return x


def can_fold_conv_norm(module: nn.Module) -> bool:
    """Whether ``module`` has a ``conv`` (Conv2d) followed by a ``norm`` with running statistics (BatchNorm2d,
    SyncBatchNorm, FrozenBatchNorm2d) that ``fold_conv_norm`` would fold."""
    conv, norm = getattr(module, "conv", None), getattr(module, "norm", None)
    return isinstance(conv, nn.Conv2d) and isinstance(norm, NORMS) and norm.running_mean is not None


@torch.no_grad()
def fold_conv_norm(module: nn.Module) -> bool:
    """Deployment only: a module whose children ``conv`` (Conv2d) and ``norm`` (a BatchNorm with running
    statistics, or FrozenBatchNorm2d) run in that order (``ConvNormLayer``, the encoder's and decoder's
    ``input_proj`` Sequentials) gets the norm folded into the conv: the conv gains a bias, the norm becomes
    ``FoldedNorm``; the same outputs in inference within float rounding, one pass over the feature map less.
    Returns whether it folded (False: not such a module, or already folded). Refuses a module in training mode
    (a folded layer no longer normalises by batch statistics); a folded module refuses to train."""
    if not can_fold_conv_norm(module):
        return False
    if module.training:
        raise RuntimeError(f"fold_conv_norm: {type(module).__name__} is in training mode; call .eval() first "
                           f"(folding uses the running statistics, for inference only)")
    conv = module.conv
    weight, bias = fold_norm(conv.weight, conv.bias, module.norm)
    folded = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                       conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode).to(weight)
    folded.weight.copy_(weight)
    folded.bias.copy_(bias)
    module.conv, module.norm = folded.eval(), FoldedNorm().eval()
    return True


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

    def fold_norm(self) -> bool:
        """Deployment only: fold the norm into the conv (``fold_conv_norm``); whether it folded."""
        return fold_conv_norm(self)


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


NORMS = (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm2d)  # the norms fold_conv_norm folds (SyncBatchNorm too)
