"""bench/latency_bench.py: the json schema of its rows, and FLOPs that agree with hand counts."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from bench import latency_bench as lb
from src.zoo.rtdetr.hybrid_encoder import TransformerEncoderLayer


def test_flops_of_a_linear_layer_are_2_m_k_n():
    lin = nn.Linear(64, 48)
    total, per_module = lb.count_flops(lambda: lin(torch.randn(5, 7, 64)))
    assert total == 2 * (5 * 7) * 64 * 48


def test_flops_of_an_attention_layer_match_the_formula_with_and_without_padding_mask():
    n, d, f, b = 50, 64, 128, 2
    layer = TransformerEncoderLayer(d, 4, f, 0.0, "gelu").eval()
    x, pos = torch.randn(b, n, d), torch.randn(1, n, d)
    # q/k/v projections 3 d^2, scores n d, weighted sum n d, output projection d^2, FFN 2 d f; per token, x 2 FLOPs
    hand = b * 2 * (n * 3 * d * d + n * n * d + n * n * d + n * d * d + 2 * n * d * f)
    for mask in (None, torch.zeros(b, n, dtype=torch.bool).index_fill_(1, torch.tensor([47, 48, 49]), True)):
        total, _ = lb.count_flops(lambda: layer(x, pos_embed=pos, src_key_padding_mask=mask))
        assert total == hand


def test_variant_overrides_name_the_model_changes():
    assert lb.variant_overrides("plain_p5", (640, 640)) == {
        "input_size": [640, 640], "dset": {"enabled": False}, "HybridEncoder": {"use_encoder_idx": [2]}}
    assert lb.variant_overrides("dset_k0.3_dense", (736, 1280)) == {
        "input_size": [736, 1280], "dset": {"keep_ratio": 0.3, "num_experts": 0, "encoder_moe_num_experts": 0}}
    with pytest.raises(ValueError, match="unknown variant 'dset_kx'"):
        lb.variant_overrides("dset_kx", (32, 32))


def test_quick_bench_writes_rows_with_the_documented_schema(tmp_path):
    out = tmp_path / "latency.json"
    assert lb.main(["--quick", "--inputs", "96x160", "--repeats", "1", "--warmup", "0", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert {"date", "command", "machine", "quick"} <= set(result["meta"])
    rows = {r["model"]: r for r in result["rows"]}
    assert sorted(rows) == sorted(lb.QUICK_VARIANTS)
    for r in rows.values():
        assert set(r) == set(lb.ROW_KEYS)
        assert r["device"] == "cpu" and r["input"] == "96x160" and r["batch"] == 1 and r["median_ms"] > 0
        stages = r["stages_ms"]
        assert {"backbone", "encoder_proj", "aifi_p5", "ccfm", "decoder", "postprocessor"} <= set(stages)
        # the stages add up to (about) one forward; both measured, so only a loose sanity bound
        assert 0.3 * r["median_ms"] < sum(v for k, v in stages.items() if not k.startswith("pruner")) < 3 * r["median_ms"]
        # per-stage FLOPs add up to the total (nothing counted twice, nothing lost)
        sf = r["stage_gflops"]
        assert abs(sum(v for k, v in sf.items() if not k.startswith("pruner")) - r["gflops"]) < 1e-2
    assert "aifi_p4" not in rows["plain_p5"]["stages_ms"] and "aifi_p4" in rows["plain_p4p5"]["stages_ms"]
    # keep 0.3 (min_patches=1 in quick mode): 2 of the 2 x 3 patches of P4, 1 of the 1 x 2 of P5; all at 1.0
    assert rows["dset_k0.3_moe"]["kept_fraction"] == {"p4": round(2 / 6, 4), "p5": 0.5}
    assert rows["dset_k1.0_moe"]["kept_fraction"] == {"p4": 1.0, "p5": 1.0}
    assert rows["dset_k0.3_moe"]["stage_gflops"]["aifi_p4"] < rows["dset_k1.0_moe"]["stage_gflops"]["aifi_p4"]
    assert "| plain_p5 | cpu | 96x160 | 1 |" in out.with_suffix(".md").read_text()


def _result(date, rows):
    meta = {"date": date, "command": f"python -m bench.latency_bench # {date}", "quick": False,
            "machine": {"processor": "x86_64", "cpu_count": 2, "torch_threads": 2, "torch": "2.x"}}
    full = [{**{k: None for k in lb.ROW_KEYS}, "model": m, "device": "cpu", "dtype": "float32", "input": hw,
             "batch": b, "median_ms": ms, "p25_ms": ms, "p75_ms": ms, "stages_ms": None, "gflops": 1.0,
             "kept_fraction": None, "run": 0} for m, hw, b, ms in rows]
    return {"meta": meta, "runs": [meta], "rows": full}


def test_append_replaces_rows_measured_again_and_keeps_the_others_with_their_run():
    old = _result("2026-12-01", [("plain_p5", "736x1280", 1, 100.0), ("dset_k0.3_moe", "736x1280", 1, 110.0)])
    del old["runs"]  # a file written before `runs` existed
    for r in old["rows"]:
        del r["run"]
    new = _result("2026-12-02", [("plain_p5", "736x1280", 1, 90.0), ("plain_p5", "640x640", 8, 400.0)])
    merged = lb.merge_results(old, new)
    got = {(r["model"], r["input"], r["batch"]): (r["median_ms"], r["run"]) for r in merged["rows"]}
    assert got == {("dset_k0.3_moe", "736x1280", 1): (110.0, 0), ("plain_p5", "736x1280", 1): (90.0, 1),
                   ("plain_p5", "640x640", 8): (400.0, 1)}
    assert [m["date"] for m in merged["runs"]] == ["2026-12-01", "2026-12-02"] and merged["meta"] == new["meta"]
    table = lb.markdown_table(merged)
    assert "| dset_k0.3_moe | cpu | 736x1280 | 1 | 110.0 (110.0-110.0) |" in table and " run |" in table
    assert "- run 0: `python -m bench.latency_bench # 2026-12-01`" in table
    # a run none of whose rows is left is dropped, and the indices close up
    again = lb.merge_results(merged, _result("2026-12-03", [("dset_k0.3_moe", "736x1280", 1, 105.0)]))
    assert [m["date"] for m in again["runs"]] == ["2026-12-02", "2026-12-03"]
    assert sorted((r["model"], r["run"]) for r in again["rows"]) == \
        [("dset_k0.3_moe", 1), ("plain_p5", 0), ("plain_p5", 0)]


def test_cuda_graph_rows_need_the_cuda_rows_and_a_graph_needs_a_cuda_device(capsys):
    from src.zoo.rtdetr.cuda_graph import GraphedDetector

    with pytest.raises(SystemExit):
        lb.parse_args(["--devices", "cpu", "--cuda-graph"])
    assert "add cuda to --devices" in capsys.readouterr().err
    assert lb.parse_args(["--devices", "cuda", "--cuda-graph"]).cuda_graph
    with pytest.raises(RuntimeError, match="CUDA graphs need a CUDA device, got device='cpu'"):
        GraphedDetector(nn.Identity().eval(), 1, (32, 32), device="cpu")


def test_bench_variants_have_no_two_equal_weight_tensors_so_a_runtime_cannot_share_layer_work():
    """With plain random init the decoder layers are deep copies (equal weights), and onnxruntime then ran
    their value projections of the same memory once: the bench's onnxruntime rows of this repo were faster
    than a trained model's. Every parameter tensor of a bench variant must differ from every other of its shape."""
    deploy = lb.build("dset_k0.3_moe", (128, 128), "cpu", fuse=False)
    tensors = [(k, v) for k, v in deploy.model.state_dict().items()
               if v.is_floating_point() and v.numel() > 1 and "running_" not in k]
    by_shape = {}
    for key, value in tensors:
        for other_key, other in by_shape.get((value.shape, value.dtype), []):
            assert not torch.equal(value, other), f"{key} equals {other_key}"
        by_shape.setdefault((value.shape, value.dtype), []).append((key, value))
    value_projs = [k for k, _ in tensors if k.endswith("cross_attn.value_proj.weight")]
    assert len(value_projs) == 3  # the decoder's layers: the case that mattered
