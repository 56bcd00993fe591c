"""The one MLP of the repo (decoder heads, query position head, pruner importance predictor)."""
from torch import nn

from src.nn.activation import get_activation


class MLP(nn.Module):
    """Linear layers with an activation between them; keys ``layers.{i}.weight`` as in RT-DETR."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int, act: str = "relu"):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.act = get_activation(act)

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = self.act(x)
        return x
