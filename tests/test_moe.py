"""MoEFFN: routing vs a dense per-expert oracle, balance loss, dense initialisation, checkpoint expansion."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from src.zoo.rtdetr.moe import MoEFFN, expand_dense_ffn_state, switch_balance_loss


def dense_reference(moe: MoEFFN, x: torch.Tensor) -> torch.Tensor:
    """Every expert on every token (loop over experts), mixed with the top-k renormalised gate weights."""
    flat = x.reshape(-1, moe.d_model)
    logits = flat @ moe.gate.weight.T + moe.gate.bias
    top_logit, top_idx = logits.topk(moe.top_k, dim=-1)
    weights = torch.zeros_like(logits).scatter(1, top_idx, top_logit.softmax(-1))   # [T, E], 0 off the top-k
    out = torch.zeros_like(flat)
    act = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}[moe.activation_name]
    for e in range(moe.num_experts):
        y_e = act(flat @ moe.w1[e].T + moe.b1[e]) @ moe.w2[e].T + moe.b2[e]
        out = out + weights[:, e:e + 1] * y_e
    return out.view_as(x)


@pytest.mark.parametrize("shape,num_experts,top_k,activation", [
    ((2, 7, 16), 4, 2, "relu"),
    ((33, 16), 3, 1, "gelu"),
    ((1, 3, 5, 16), 5, 5, "silu"),
    ((4, 50, 16), 8, 3, "relu"),
])
def test_top_k_routing_equals_dense_per_expert_reference(shape, num_experts, top_k, activation):
    torch.manual_seed(0)
    moe = MoEFFN(16, 24, num_experts=num_experts, top_k=top_k, noise_std=0.5, activation=activation).eval()
    x = torch.randn(shape)
    with torch.no_grad():
        y = moe(x)
        ref = dense_reference(moe, x)
    assert y.shape == x.shape
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)


def test_expert_fraction_and_router_prob_match_counts():
    torch.manual_seed(1)
    moe = MoEFFN(8, 16, num_experts=4, top_k=2).eval()
    x = torch.randn(3, 10, 8)
    moe(x)
    logits = moe.gate(x.reshape(-1, 8))
    chosen = logits.topk(2, -1).indices.reshape(-1)
    expected_fraction = torch.stack([(chosen == e).float().mean() for e in range(4)])
    torch.testing.assert_close(moe.last_aux["expert_fraction"], expected_fraction)
    torch.testing.assert_close(moe.last_aux["router_prob"], logits.softmax(-1).mean(0))
    expected_loss = 4 * sum(expected_fraction[e] * logits.softmax(-1).mean(0)[e] for e in range(4))
    torch.testing.assert_close(moe.last_aux["balance_loss"], expected_loss)


def test_balance_loss_is_one_for_uniform_routing_and_num_experts_when_collapsed():
    for num_experts in (2, 4, 7):
        uniform = torch.full((num_experts,), 1.0 / num_experts)
        assert switch_balance_loss(uniform, uniform).item() == pytest.approx(1.0, abs=1e-6)
        collapsed = F.one_hot(torch.tensor(0), num_experts).float()
        assert switch_balance_loss(collapsed, collapsed).item() == pytest.approx(num_experts)
    # hand-computed: E=2, f=(0.75, 0.25), P=(0.6, 0.4) -> 2 * (0.45 + 0.1) = 1.1
    assert switch_balance_loss(torch.tensor([0.75, 0.25]), torch.tensor([0.6, 0.4])).item() == pytest.approx(1.1)


def test_balance_loss_is_one_when_routing_is_uniform_in_the_module():
    # 4 experts, top_k=2, router = identity on the first 4 features: tokens crafted so that every expert
    # gets exactly half of the tokens' assignments and the mean probability is uniform.
    moe = MoEFFN(4, 8, num_experts=4, top_k=2, noise_std=0.0).eval()
    with torch.no_grad():
        moe.gate.weight.copy_(torch.eye(4))
        moe.gate.bias.zero_()
    x = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0], [1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0]])
    moe(x)
    torch.testing.assert_close(moe.last_aux["expert_fraction"], torch.full((4,), 0.25))
    torch.testing.assert_close(moe.last_aux["router_prob"], torch.full((4,), 0.25))
    assert moe.last_aux["balance_loss"].item() == pytest.approx(1.0, abs=1e-6)


def test_moe_loaded_from_dense_ffn_reproduces_dense_output():
    torch.manual_seed(2)
    linear1, linear2 = nn.Linear(16, 40), nn.Linear(40, 16)
    moe = MoEFFN(16, 40, num_experts=4, top_k=2, activation="gelu")
    moe.load_from_dense(linear1, linear2)
    x = torch.randn(2, 30, 16)
    dense = linear2(F.gelu(linear1(x)))
    for training in (False, True):  # training noise changes the routing, not the result
        moe.train(training)
        torch.testing.assert_close(moe(x), dense, atol=1e-6, rtol=1e-5)


def test_load_from_dense_rejects_wrong_shapes():
    moe = MoEFFN(16, 40)
    with pytest.raises(ValueError, match="dim_feedforward"):
        moe.load_from_dense(nn.Linear(16, 32), nn.Linear(32, 16))


class _DenseLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(16)
        self.linear1, self.linear2 = nn.Linear(16, 40), nn.Linear(40, 16)

    def forward(self, x):
        return self.linear2(F.relu(self.linear1(self.norm(x))))


class _MoELayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(16)
        self.moe = MoEFFN(16, 40, num_experts=3, top_k=2)

    def forward(self, x):
        return self.moe(self.norm(x))


def test_expand_dense_ffn_state_round_trip_loads_and_matches_dense_model():
    torch.manual_seed(3)
    dense = nn.Sequential(_DenseLayer(), _DenseLayer())
    moe_model = nn.Sequential(_MoELayer(), _MoELayer())
    ckpt = dense.state_dict()
    new_state, messages = expand_dense_ffn_state(ckpt, moe_model.state_dict())

    assert len(messages) == 2 and all("expanded" in m for m in messages)
    assert not any(".linear1." in k or ".linear2." in k for k in new_state)
    assert set(ckpt) == set(expand_dense_ffn_state(ckpt, dense.state_dict())[0])  # nothing to do: untouched
    for layer in ("0", "1"):
        for name, dense_key in (("w1", "linear1.weight"), ("b1", "linear1.bias"),
                                ("w2", "linear2.weight"), ("b2", "linear2.bias")):
            stacked = new_state[f"{layer}.moe.{name}"]
            assert stacked.shape[0] == 3
            for e in range(3):
                assert torch.equal(stacked[e], ckpt[f"{layer}.{dense_key}"])
    result = moe_model.load_state_dict(new_state, strict=False)
    assert sorted(result.missing_keys) == ["0.moe.gate.bias", "0.moe.gate.weight", "1.moe.gate.bias",
                                           "1.moe.gate.weight"]
    assert result.unexpected_keys == []
    x = torch.randn(5, 16)
    torch.testing.assert_close(moe_model.eval()(x), dense(x), atol=1e-6, rtol=1e-5)


def test_expand_dense_ffn_state_reports_shape_mismatch_and_keeps_keys():
    model_state = nn.Sequential(_MoELayer()).state_dict()
    ckpt = {"0.linear1.weight": torch.zeros(32, 16), "0.linear1.bias": torch.zeros(32),
            "0.linear2.weight": torch.zeros(16, 32), "0.linear2.bias": torch.zeros(16)}
    new_state, messages = expand_dense_ffn_state(ckpt, model_state)
    assert set(new_state) == set(ckpt)
    assert len(messages) == 1 and "cannot expand" in messages[0]


def test_top_k_larger_than_num_experts_is_rejected_naming_both_keys():
    with pytest.raises(ValueError, match=r"top_k=5.*num_experts=4"):
        MoEFFN(8, 16, num_experts=4, top_k=5)


def test_gradients_reach_gate_and_every_used_expert():
    torch.manual_seed(4)
    moe = MoEFFN(8, 16, num_experts=4, top_k=2).train()
    x = torch.randn(64, 8, requires_grad=True)
    y = moe(x)
    (y.square().mean() + 0.01 * moe.last_aux["balance_loss"]).backward()
    used = moe.last_aux["expert_fraction"] > 0
    assert used.all()
    assert moe.gate.weight.grad is not None and moe.gate.weight.grad.abs().sum() > 0
    for name in ("w1", "b1", "w2", "b2"):
        grad = getattr(moe, name).grad
        assert (grad.flatten(1).abs().sum(1) > 0).all(), name
    assert x.grad.abs().sum() > 0


def test_balance_loss_alone_sends_gradient_to_gate():
    torch.manual_seed(5)
    moe = MoEFFN(8, 16, num_experts=4, top_k=1).eval()
    moe(torch.randn(20, 8))
    moe.last_aux["balance_loss"].backward()
    assert moe.gate.weight.grad.abs().sum() > 0
    assert moe.w1.grad is None


def test_training_noise_changes_routing_only_in_train_mode():
    torch.manual_seed(6)
    moe = MoEFFN(8, 16, num_experts=8, top_k=2, noise_std=5.0)
    x = torch.randn(200, 8)
    moe.eval()
    a, b = moe(x), moe(x)
    assert torch.equal(a, b)
    moe.train()
    torch.manual_seed(7)
    c = moe(x)
    torch.manual_seed(8)
    d = moe(x)
    assert not torch.allclose(c, d)


def noisy_reference(moe: MoEFFN, x: torch.Tensor, noise: torch.Tensor):
    """dense_reference with the router noise given: (output, router probs [T, E]) in training mode."""
    flat = x.reshape(-1, moe.d_model)
    logits = flat @ moe.gate.weight.T + moe.gate.bias + noise * moe.noise_std
    top_logit, top_idx = logits.topk(moe.top_k, dim=-1)
    weights = torch.zeros_like(logits).scatter(1, top_idx, top_logit.softmax(-1))
    act = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}[moe.activation_name]
    out = sum(weights[:, e:e + 1] * (act(flat @ moe.w1[e].T + moe.b1[e]) @ moe.w2[e].T + moe.b2[e])
              for e in range(moe.num_experts))
    return out.view_as(x), logits.softmax(-1), top_idx


def test_training_mode_routing_with_seeded_noise_equals_the_reference_and_its_statistics():
    torch.manual_seed(3)
    moe = MoEFFN(16, 24, num_experts=4, top_k=2, noise_std=0.5).train()
    x = torch.randn(3, 11, 16)
    torch.manual_seed(99)
    noise = torch.randn(33, 4)  # what randn_like draws inside route() after the same seed
    torch.manual_seed(99)
    y = moe(x)
    ref, probs, top_idx = noisy_reference(moe, x, noise)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    fraction = torch.stack([(top_idx == e).float().sum() for e in range(4)]) / (33 * 2)
    torch.testing.assert_close(moe.last_aux["expert_fraction"], fraction)
    torch.testing.assert_close(moe.last_aux["router_prob"], probs.mean(0))
    # the noise matters: without it (eval) the output differs
    with torch.no_grad():
        assert not torch.allclose(moe.eval()(x), y.detach(), atol=1e-4)


def test_zero_tokens_give_an_empty_output_and_a_zero_balance_loss_with_a_gradient_path():
    moe = MoEFFN(8, 16, num_experts=3, top_k=2).train()
    y = moe(torch.zeros(2, 0, 8))
    assert y.shape == (2, 0, 8)
    assert moe.last_aux["balance_loss"].item() == 0.0 and torch.equal(moe.last_aux["expert_fraction"], torch.zeros(3))
    moe.last_aux["balance_loss"].backward()  # reaches the router (zero gradient), as DDP needs
    assert moe.gate.weight.grad is not None and torch.count_nonzero(moe.gate.weight.grad) == 0


def test_routing_under_bfloat16_autocast_keeps_float32_router_logits_and_is_close_to_float32():
    torch.manual_seed(4)
    moe = MoEFFN(16, 32, num_experts=4, top_k=2, noise_std=0.0).eval()
    x = torch.randn(64, 16)
    with torch.no_grad():
        ref = moe(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            probs, top_idx, top_weight = moe.route(x)
            y = moe(x)
    assert probs.dtype == torch.float32 and top_weight.dtype == torch.float32
    torch.testing.assert_close(y.float(), ref, atol=0.05, rtol=0.05)  # bfloat16 experts: 3 significant digits
    assert (top_idx.sort(-1).values == moe.gate(x).topk(2, -1).indices.sort(-1).values).float().mean() > 0.9


def _export_moe(moe: MoEFFN, path: str, tokens: int = 6) -> None:
    """The MoE alone as an ONNX graph with a dynamic token axis, traced as graph export traces it."""
    import warnings
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(moe, (torch.randn(tokens, moe.d_model),), path, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "T"}, "y": {0: "T"}}, opset_version=17, dynamo=False)


def test_the_exported_gather_dispatch_equals_the_dense_reference_for_any_token_count_and_routing(tmp_path):
    """The export form (tokens sorted by expert, each expert on a slice whose bounds the graph computes):
    eager and in onnxruntime, for token counts and routings other than the traced ones, including experts
    that get no token and all tokens on one expert pair."""
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    moe = MoEFFN(16, 24, num_experts=4, top_k=2, noise_std=0.0, activation="gelu").eval()
    path = str(tmp_path / "moe.onnx")
    _export_moe(moe, path)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    cases = [torch.randn(n, 16) for n in (1, 6, 7, 50)]
    skewed = torch.randn(9, 16)
    with torch.no_grad():
        for x in cases:
            _, top_idx, top_weight = moe.route(x)
            torch.testing.assert_close(moe._gathered(x, top_idx, top_weight), dense_reference(moe, x),
                                       atol=1e-5, rtol=1e-5)
            (y,) = session.run(None, {"x": x.numpy()})
            torch.testing.assert_close(torch.from_numpy(y), dense_reference(moe, x), atol=1e-5, rtol=1e-5)
        moe.gate.bias.copy_(torch.tensor([0.0, 0.0, 50.0, 50.0]))  # experts 0 and 1 get no token
        _export_moe(moe, path)
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        assert set(moe.route(skewed)[1].flatten().tolist()) == {2, 3}
        (y,) = session.run(None, {"x": skewed.numpy()})
        torch.testing.assert_close(torch.from_numpy(y), dense_reference(moe, skewed), atol=1e-5, rtol=1e-5)
