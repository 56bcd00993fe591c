"""Mixture-of-experts feed-forward block (DSET), a drop-in for the dense ``linear1 -> act -> linear2`` FFN.

Each expert is the dense FFN ``y = W2 · dropout(act(W1 x + b1)) + b2``. A linear router scores the
experts per token; the top-k experts run and their outputs are mixed with the softmax of the selected
logits (the k weights sum to 1). In training, Gaussian noise N(0, noise_std^2) is added to the router
logits before the top-k choice (noisy top-k gating); in eval the routing is deterministic.

Parameters (names are fixed, checkpoints and optimiser regexes rely on them):
    gate: nn.Linear(d_model, num_experts)
    w1 [E, F, D], b1 [E, F], w2 [E, D, F], b2 [E, D]   (E experts, F = dim_feedforward, D = d_model)

Load balancing (Switch Transformer, Fedus et al. 2021): ``E * sum_e f_e * P_e`` with f_e the fraction
of the T * top_k routed assignments that go to expert e and P_e the mean (full, over E) softmax router
probability. It equals 1 for perfectly uniform routing; it is stored in ``last_aux`` after each forward.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from src.nn.activation import get_activation
from src.nn.tracing import tracing_graph

_ACTIVATIONS = ("relu", "gelu", "silu")  # built with src.nn.activation.get_activation
# how tokens reach their experts (same outputs within float rounding; dset.moe_dispatch):
#   sorted: tokens grouped by expert, each expert runs on its own tokens (top_k / E of the dense work), but the
#           group sizes are read on the host (one device sync per layer) and the shapes depend on the data;
#   dense:  every expert runs on every token, the top-k weights select (E / top_k x the expert work, static
#           shapes, no host read): what graph export needs, and what keeps a GPU step free of syncs;
#   auto:   dense on CUDA, sorted elsewhere (on a CPU a host read costs nothing, FLOPs do).
# Graph export (tracing) cannot keep the sorted form (its group sizes would become constants): it traces
#   gather: the sorted form with its group bounds as tensors (ONNX Slice with computed bounds): the tokens
#           gathered in expert order, each expert on its slice, the outputs gathered back (top_k / E of the
#           dense work), unless dispatch is explicitly dense (runtimes that want static shapes, e.g. TensorRT).
MOE_DISPATCHES = ("auto", "sorted", "dense")
_EXPERT_PARAMS = (("w1", "linear1.weight"), ("b1", "linear1.bias"), ("w2", "linear2.weight"), ("b2", "linear2.bias"))


def switch_balance_loss(expert_fraction: torch.Tensor, router_prob: torch.Tensor) -> torch.Tensor:
    """Switch-style load-balancing loss ``E * sum_e f_e * P_e``.

    Args:
        expert_fraction: [E] fraction of routed assignments per expert (sums to 1, no gradient needed).
        router_prob: [E] mean softmax router probability per expert (sums to 1, carries the gradient).
    Returns:
        scalar; 1.0 when both are uniform (1/E each), up to E when everything goes to one expert.
    """
    num_experts = expert_fraction.shape[-1]
    return num_experts * (expert_fraction * router_prob).sum(-1)


class MoEFFN(nn.Module):
    """Top-k routed mixture of ``num_experts`` FFN experts. ``forward(x [..., D]) -> y [..., D]``."""

    def __init__(self, d_model: int, dim_feedforward: int, num_experts: int = 4, top_k: int = 2,
                 noise_std: float = 0.1, activation: str = "relu", dropout: float = 0.0, dispatch: str = "auto"):
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"MoEFFN: num_experts must be >= 1, got num_experts={num_experts}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"MoEFFN: top_k must be in [1, num_experts], got top_k={top_k}, "
                             f"num_experts={num_experts}; lower top_k or raise num_experts")
        if noise_std < 0:
            raise ValueError(f"MoEFFN: noise_std must be >= 0, got noise_std={noise_std}")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"MoEFFN: activation={activation!r} is not one of {sorted(_ACTIVATIONS)}")
        if dispatch not in MOE_DISPATCHES:
            raise ValueError(f"MoEFFN: dispatch={dispatch!r} is not one of {list(MOE_DISPATCHES)}")
        self.d_model, self.dim_feedforward = d_model, dim_feedforward
        self.num_experts, self.top_k, self.noise_std = num_experts, top_k, noise_std
        self.activation_name = activation
        self.activation = get_activation(activation)
        self.dropout = nn.Dropout(dropout)

        self.gate = nn.Linear(d_model, num_experts)
        self.w1 = nn.Parameter(torch.empty(num_experts, dim_feedforward, d_model))
        self.b1 = nn.Parameter(torch.empty(num_experts, dim_feedforward))
        self.w2 = nn.Parameter(torch.empty(num_experts, d_model, dim_feedforward))
        self.b2 = nn.Parameter(torch.empty(num_experts, d_model))
        self.reset_parameters()
        self.last_aux: dict | None = None  # set by every forward
        self.dispatch = dispatch           # see MOE_DISPATCHES; deploy.set_moe_dispatch switches it for export
        self.record_statistics = True      # last_aux in eval too; DeployModel turns it off (training always records)

    @torch.no_grad()
    def reset_parameters(self):
        """Initialise every expert exactly as nn.Linear would (kaiming-uniform weights, uniform biases)."""
        for weight, bias in ((self.w1, self.b1), (self.w2, self.b2)):
            for e in range(self.num_experts):  # init only: per-expert fan-in as nn.Linear computes it
                nn.init.kaiming_uniform_(weight[e], a=math.sqrt(5))
                bound = 1.0 / math.sqrt(weight.shape[-1])
                nn.init.uniform_(bias[e], -bound, bound)

    @torch.no_grad()
    def load_from_dense(self, linear1: nn.Linear, linear2: nn.Linear):
        """Copy a dense FFN (linear1: D -> F, linear2: F -> D) into every expert.

        Since the top-k weights sum to 1, the MoE then computes the dense FFN output whatever the router
        says (up to float rounding); the router keeps its own initialisation.
        """
        expected = {"linear1.weight": tuple(self.w1.shape[1:]), "linear2.weight": tuple(self.w2.shape[1:])}
        got = {"linear1.weight": tuple(linear1.weight.shape), "linear2.weight": tuple(linear2.weight.shape)}
        if expected != got or linear1.bias is None or linear2.bias is None:
            raise ValueError(f"MoEFFN.load_from_dense: dense FFN shapes {got} (biases required) do not match "
                             f"the experts' {expected}; build MoEFFN with the dense layer's d_model/dim_feedforward")
        self.w1.copy_(linear1.weight.unsqueeze(0).expand_as(self.w1))
        self.b1.copy_(linear1.bias.unsqueeze(0).expand_as(self.b1))
        self.w2.copy_(linear2.weight.unsqueeze(0).expand_as(self.w2))
        self.b2.copy_(linear2.bias.unsqueeze(0).expand_as(self.b2))

    def route(self, x: torch.Tensor):
        """Router for flat tokens.

        Args:
            x: [T, D]
        Returns:
            probs [T, E] full softmax of the (noisy in training) router logits,
            top_idx [T, K] long, the chosen experts (descending logit),
            top_weight [T, K] softmax over the chosen logits (rows sum to 1).
        """
        logits = self.gate(x)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # float32+ under autocast
        if self.training and self.noise_std > 0:
            logits = logits + torch.randn_like(logits) * self.noise_std
        top_logit, top_idx = logits.topk(self.top_k, dim=-1)
        return logits.softmax(-1), top_idx, top_logit.softmax(-1)

    def _expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``e``'s FFN on its tokens x [A, D] -> [A, D]."""
        h = self.dropout(self.activation(F.linear(x, self.w1[e], self.b1[e])))
        return F.linear(h, self.w2[e], self.b2[e])

    def _experts(self, x_sorted: torch.Tensor, counts: list) -> torch.Tensor:
        """Run expert e on its contiguous slice of ``x_sorted`` [A, D] (slices sized ``counts``) -> [A, D]."""
        outputs = [self._expert(e, x_e) for e, x_e in enumerate(torch.split(x_sorted, counts))  # per expert
                   if x_e.shape[0] > 0]
        return torch.cat(outputs, 0)

    def _dense(self, flat: torch.Tensor, top_idx: torch.Tensor, top_weight: torch.Tensor) -> torch.Tensor:
        """Every expert on every token [T, D], weighted by the top-k routing weights (zero for experts not
        chosen) -> [T, D]. Static shapes, no host read; ``num_experts / top_k`` times the expert FLOPs.

        The hidden activations of the experts a token did not choose are zeroed before the activation, so an
        overflow there (float16) reaches neither the output (0 * inf) nor the weight gradients."""
        combine = torch.zeros(flat.shape[0], self.num_experts, dtype=top_weight.dtype, device=flat.device)
        combine = combine.scatter(1, top_idx, top_weight)                                  # [T, E]
        chosen = combine > 0  # the top-k (a softmax weight that underflowed to 0 contributes nothing either way)
        h = torch.einsum("td,efd->tef", flat, self.w1)                                     # [T, E, F]
        h = h + self.b1.to(h.dtype)                  # under autocast: stay in the autocast dtype (memory)
        h = torch.where(chosen.unsqueeze(-1), h, torch.zeros((), dtype=h.dtype, device=h.device))
        h = self.dropout(self.activation(h))
        y = torch.einsum("tef,edf->ted", h, self.w2)                                       # [T, E, D]
        y = y + self.b2.to(y.dtype)
        return (combine.unsqueeze(-1).to(y.dtype) * y).sum(1)

    def _sorted(self, flat: torch.Tensor, top_idx: torch.Tensor, top_weight: torch.Tensor) -> torch.Tensor:
        """Tokens grouped by expert, each expert on its own group [T, D] -> [T, D]; reads the group sizes on
        the host (one device sync)."""
        num_tokens, k = flat.shape[0], self.top_k
        expert_of_assignment = top_idx.reshape(-1)                                   # [T*K]
        order = torch.argsort(expert_of_assignment, stable=True)                     # group by expert
        counts = torch.bincount(expert_of_assignment, minlength=self.num_experts)    # [E]
        token_of_assignment = order // k                                             # assignment a = t*K + j
        y_sorted = self._experts(flat[token_of_assignment], counts.tolist())         # the host read
        y_assign = torch.empty_like(y_sorted)
        y_assign[order] = y_sorted                                                   # back to [T*K] order
        return (top_weight.unsqueeze(-1).to(y_assign.dtype) * y_assign.view(num_tokens, k, -1)).sum(1)

    def _gathered(self, flat: torch.Tensor, top_idx: torch.Tensor, top_weight: torch.Tensor) -> torch.Tensor:
        """The sorted dispatch with shapes a graph computes at run time (what graph export traces) -> [T, D].

        The T*K assignments are sorted by expert; expert e runs on its slice ``[end_{e-1}, end_e)`` of the
        sorted tokens, with the slice bounds kept as tensors (ONNX Slice with computed starts / ends, not
        constants); the outputs are put back in assignment order by one row gather with the inverse
        permutation and mixed with the top-k weights. No scatter-add over [T, D] elements (onnxruntime's
        ScatterElements is an element-by-element loop, about 1 % of a 640x640 DSET graph's time)."""
        num_tokens, k = flat.shape[0], self.top_k
        expert_of = top_idx.reshape(-1)                                                # [T*K]
        order = torch.argsort(expert_of)                                               # [T*K], grouped by expert
        experts = torch.arange(self.num_experts, device=flat.device)
        ends = (expert_of.unsqueeze(0) <= experts.unsqueeze(1)).sum(1)                 # [E] end of each group
        x_sorted = flat.index_select(0, torch.div(order, k, rounding_mode="floor"))    # token of assignment t*K+j
        starts = torch.cat([ends.new_zeros(1), ends[:-1]])
        y_sorted = torch.cat([self._expert(e, x_sorted[starts[e]:ends[e]])           # loop over experts only
                              for e in range(self.num_experts)], 0)                     # [T*K, D]
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.shape[0], device=order.device))
        y = y_sorted.index_select(0, inverse).view(num_tokens, k, -1)                  # assignment order
        return (top_weight.unsqueeze(-1).to(y.dtype) * y).sum(1)

    def resolved_dispatch(self, device: torch.device) -> str:
        """``sorted``, ``dense`` or (graph export / tracing only) ``gather``: what ``dispatch`` means for
        inputs on ``device``."""
        if tracing_graph():
            # the sorted form's group sizes would be frozen into the graph as constants
            return "dense" if self.dispatch == "dense" else "gather"
        if self.dispatch != "auto":
            return self.dispatch
        return "dense" if device.type == "cuda" else "sorted"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., D] -> y [..., D]; sets ``self.last_aux`` (balance_loss scalar with graph,
        expert_fraction [E], router_prob [E]; None under graph export, or in eval with ``record_statistics`` off)."""
        if x.shape[-1] != self.d_model:
            raise ValueError(f"MoEFFN: input last dim {x.shape[-1]} != d_model {self.d_model}")
        flat = x.reshape(-1, self.d_model)
        num_tokens, num_experts = flat.shape[0], self.num_experts
        if num_tokens == 0:
            zero = self.gate.weight.sum() * 0
            self.last_aux = {"balance_loss": zero, "expert_fraction": flat.new_zeros(num_experts),
                             "router_prob": flat.new_zeros(num_experts)}
            return x.clone()

        probs, top_idx, top_weight = self.route(flat)
        dispatch = self.resolved_dispatch(flat.device)
        run = {"dense": self._dense, "sorted": self._sorted, "gather": self._gathered}[dispatch]
        out = run(flat, top_idx, top_weight)
        deployed = not self.training and not self.record_statistics  # training always needs its balance loss
        if deployed or tracing_graph():
            self.last_aux = None  # no balance statistics when deployed or in an exported graph
            return out.view_as(x)
        # assignments per expert by a scatter-add: static shape, on the device, no host read (one_hot and
        # bincount check / size by the largest index, a read)
        assigned = top_idx.reshape(-1)
        counts = torch.zeros(num_experts, dtype=probs.dtype, device=flat.device).scatter_add_(
            0, assigned, torch.ones_like(assigned, dtype=probs.dtype))                # [E]
        expert_fraction = counts / (num_tokens * self.top_k)
        router_prob = probs.mean(0)
        self.last_aux = {"balance_loss": switch_balance_loss(expert_fraction, router_prob),
                         "expert_fraction": expert_fraction, "router_prob": router_prob}
        return out.view_as(x)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, dim_feedforward={self.dim_feedforward}, num_experts={self.num_experts}, "
                f"top_k={self.top_k}, noise_std={self.noise_std}, activation={self.activation_name}, "
                f"dispatch={self.dispatch}")


def expand_dense_ffn_state(state_dict: dict, model_state_dict: dict):
    """Checkpoint adapter: turn dense FFN weights into stacked MoE expert weights.

    For every key ``P.moe.w1`` of the model (and b1/w2/b2) whose layer prefix P has all of
    ``P.linear1.weight``, ``P.linear1.bias``, ``P.linear2.weight``, ``P.linear2.bias`` in ``state_dict``
    (and no ``P.moe.*`` expert weights of its own), the dense tensors are copied into each of the model's
    E experts (``[F, D] -> [E, F, D]`` etc.) and the dense keys are dropped. The router ``P.moe.gate.*``
    is not in a dense checkpoint: it keeps the model's initialisation (reported as missing by
    ``load_state_dict(strict=False)``).

    Args:
        state_dict: checkpoint weights (not modified).
        model_state_dict: ``model.state_dict()`` of the MoE model (gives E and the expected shapes).
    Returns:
        (new_state_dict, messages): a shallow-copied dict with the expansions applied, and one message
        per layer expanded or skipped (shape mismatch, incomplete dense weights).
    """
    new_state, messages = dict(state_dict), []
    for key in sorted(model_state_dict):
        if not key.endswith(".moe.w1"):
            continue
        layer, moe = key[: -len(".moe.w1")], key[: -len(".w1")]
        dense_keys = {name: f"{layer}.{dense}" for name, dense in _EXPERT_PARAMS}
        present = [k for k in dense_keys.values() if k in state_dict]
        if not present or any(f"{moe}.{name}" in state_dict for name in dense_keys):
            continue
        if len(present) < len(dense_keys):
            messages.append(f"{layer}: dense FFN incomplete in checkpoint (has {present}); MoE experts of "
                            f"'{moe}' keep their initialisation")
            continue
        expanded = {}
        for name, dense in dense_keys.items():
            target = model_state_dict[f"{moe}.{name}"]
            source = state_dict[dense]
            if tuple(source.shape) != tuple(target.shape[1:]):
                expanded = None
                messages.append(f"{layer}: cannot expand {dense} {tuple(source.shape)} into {moe}.{name} "
                                f"{tuple(target.shape)} (expert shape {tuple(target.shape[1:])}); left as is")
                break
            expanded[f"{moe}.{name}"] = source.unsqueeze(0).expand(target.shape[0], *source.shape).clone()
        if expanded is None:
            continue
        for dense in dense_keys.values():
            del new_state[dense]
        new_state.update(expanded)
        num_experts = model_state_dict[key].shape[0]
        messages.append(f"{layer}: expanded dense linear1/linear2 into {num_experts} experts of '{moe}' "
                        f"(router '{moe}.gate' keeps its initialisation)")
    return new_state, messages


class _ExpertFFN:
    """Mixin of the layer classes ``replace_ffn_with_moe`` makes: the FFN is the layer's MoE."""

    def forward_ffn(self, x: torch.Tensor) -> torch.Tensor:
        return self.moe(x)


_EXPERT_CLASSES: dict = {}


def expert_layer_class(cls: type) -> type:
    """``cls`` with ``forward_ffn`` routed through ``self.moe`` (one class per layer class, made once)."""
    if issubclass(cls, _ExpertFFN):
        return cls
    if cls not in _EXPERT_CLASSES:
        _EXPERT_CLASSES[cls] = type(f"MoE{cls.__name__}", (_ExpertFFN, cls),
                                    {"__module__": cls.__module__, "__doc__": f"{cls.__name__} whose FFN is a "
                                                                              f"mixture of experts (layer.moe)."})
    return _EXPERT_CLASSES[cls]


def replace_ffn_with_moe(layer: nn.Module, num_experts: int, top_k: int, noise_std: float,
                         activation: str, dispatch: str = "auto") -> nn.Module:
    """Swap a transformer layer's dense FFN (``linear1``/``linear2``) for ``layer.moe = MoEFFN(...)``.

    The dense Linear modules are removed (so the state dict has ``moe.*`` instead of ``linear1/2.*``) and the
    layer becomes an instance of ``expert_layer_class(type(layer))``, whose ``forward_ffn`` is ``self.moe``. Experts start with
    independent random initialisation; tuning from a dense checkpoint copies the dense FFN into every
    expert (``expand_dense_ffn_state``).
    """
    d_model, dim_ff = layer.linear1.in_features, layer.linear1.out_features
    dropout = getattr(layer, "dropout3", None) or getattr(layer, "dropout", None)
    p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
    layer.moe = MoEFFN(d_model, dim_ff, num_experts, top_k, noise_std, activation, p, dispatch)
    del layer.linear1
    del layer.linear2
    layer.__class__ = expert_layer_class(type(layer))  # its forward_ffn is now the MoE; the layer's own code
    return layer                                        # (an official module) knows nothing of experts
