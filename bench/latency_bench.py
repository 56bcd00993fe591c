"""Latency and FLOPs of the plain RT-DETRv2-R18 and DSET variants, end to end and per stage.

    python -m bench.latency_bench                  # full grid -> docs/results/latency.{json,md} (quiet machine!)
    python -m bench.latency_bench --quick          # 4 variants, 192x320, batch 1, CPU: under a minute
    python -m bench.latency_bench --devices cpu --inputs 736x1280 --batches 1 --repeats 20

Variants (all from configs/dset4_r18_ratio0.3.yaml, DAIR-V2X head of 8 classes, random weights plus seeded
noise so that no two layers are equal (see `build`): latency does not depend on the weights except through
DSET's data-dependent top-k and MoE routing, and through work a runtime can share between equal layers):
  plain_p5              the official RT-DETRv2-R18 (AIFI on P5), DSET off
  plain_p4p5            AIFI on P4 and P5, DSET off
  dset_k{1.0,0.7,0.5,0.3}_moe    DSET (pruner on P4+P5, MoE in encoder and decoder) at that keep ratio
  dset_k{...}_dense              the same without MoE (dense FFNs)
  official              with --official PATH: the official implementation (github:lyuwenyu/RT-DETR,
                        rtdetrv2_pytorch) with plain_p5's weights; refused unless its detections equal
                        plain_p5's (bench/official_model.py); it runs as the official code deploys it
                        (contiguous), this repo's CPU rows in channels_last as tools/infer.py runs them
                        (deploy.inference_memory_format); --official-channels-last runs it so too (like for like)

Stages (per-stage runs synchronise at every stage boundary; the end-to-end figure is measured in separate
runs without that): backbone, encoder_proj (input projections), aifi_p4 / aifi_p5 (pruner + attention
layer + scatter of that level; pruner_p4 / pruner_p5 is the pruner's share of it), ccfm (the FPN/PAN
fusion), decoder (query selection over all tokens + decoder layers), postprocessor.

Method: every setting (device, dtype, input, batch) builds all variants, warms each up, then times them
interleaved (A B C A B C ...) so that a shared machine's noise hits every variant alike; reported are the
median, p25 and p75 of the repeats. FLOPs from torch.utils.flop_counter (multiply-add = 2 FLOPs, the CPU
flash-attention kernel counted with the sdpa formula), at batch 1 times the batch. CUDA float16 rows run
under torch.autocast. cuda-graph rows (--cuda-graph): every model, the official one too, captured as one CUDA
graph per setting and replayed (no per-kernel launch cost; end to end only). onnxruntime rows (CPU, --onnx) time the graphs of tools/export_onnx.py, end to end only
(MoE in gather dispatch there, as tools/export_onnx.py exports by default: each expert on its own tokens).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from bench.official_model import check_same_outputs, load_official
from src.core.run_config import config_path, merge_overrides
from src.misc.provenance import git_commit
from src.zoo.rtdetr.deploy import DeployModel, fuse_for_inference, inference_memory_format, load_detector

REPO = Path(__file__).resolve().parents[1]
BASE_CONFIG = "dset4_r18_ratio0.3.yaml"   # under configs/
KEEP_RATIOS = (1.0, 0.7, 0.5, 0.3)
ALL_VARIANTS = ["plain_p5", "plain_p4p5"] + [f"dset_k{r}_{m}" for m in ("moe", "dense") for r in KEEP_RATIOS]
QUICK_VARIANTS = ["plain_p5", "plain_p4p5", "dset_k1.0_moe", "dset_k0.3_moe"]
STAGES = ("backbone", "encoder_proj", "aifi_p4", "pruner_p4", "aifi_p5", "pruner_p5", "ccfm", "decoder",
          "postprocessor")
ROW_KEYS = ("model", "device", "dtype", "input", "batch", "median_ms", "p25_ms", "p75_ms", "repeats", "vs_official",
            "stages_ms",
            "gflops", "stage_gflops", "kept_fraction", "run")
ROW_ID = ("model", "device", "dtype", "input", "batch")  # one measurement; --append replaces rows with the same id


# ---------------------------------------------------------------- models
def variant_overrides(name: str, hw: Sequence[int]) -> dict:
    """Overrides of BASE_CONFIG (a nested dict, src/core/run_config.py) for a variant at input (h, w)."""
    common = {"input_size": [hw[0], hw[1]]}
    if name in ("plain_p5", "plain_p4p5"):
        levels = [2] if name == "plain_p5" else [1, 2]
        return {**common, "dset": {"enabled": False}, "HybridEncoder": {"use_encoder_idx": levels}}
    m = re.fullmatch(r"dset_k([0-9.]+)_(moe|dense)", name)
    if not m:
        raise ValueError(f"unknown variant {name!r}; known: {', '.join(ALL_VARIANTS)}")
    dset = {"keep_ratio": float(m.group(1))}
    if m.group(2) == "dense":
        dset.update(num_experts=0, encoder_moe_num_experts=0)
    return {**common, "dset": dset}


def build(name: str, hw, device: str, extra: Sequence[str] = (), fuse: bool = True,
          memory_format: Optional[torch.memory_format] = None) -> DeployModel:
    """A variant with random weights (seed 0) made tie-free (``tie_free_weights``); ``extra``: -u overrides on
    top of the variant's. ``fuse``: as deployed (``fuse_for_inference``: RepVGG blocks and conv-norm layers
    folded, as the tools run it), in ``memory_format``, by default the one the tools run it in on ``device``
    (``inference_memory_format``: channels_last on a CPU; an exported graph is the same either way).

    Tie-free matters beyond top-k ties: the decoder's layers are deep copies of one initialised layer, so with
    plain random init they hold identical weights, and onnxruntime then computes their shared work once
    (identical initialisers, then common subexpressions: each layer's value projection of the same memory).
    A trained model has distinct layers; so do these."""
    torch.manual_seed(0)
    _, model, post = load_detector(str(config_path(BASE_CONFIG)), merge_overrides(variant_overrides(name, hw), extra),
                                   random_weights=True, device=device)
    model.load_state_dict(tie_free_weights(model))
    fmt = memory_format or inference_memory_format(device)
    return DeployModel(fuse_for_inference(model) if fuse else model, post, fmt).eval()


def tie_free_weights(model: torch.nn.Module, std: float = 0.05) -> dict:
    """``model``'s state dict with seeded Gaussian noise on every float parameter (not BatchNorm statistics)."""
    gen = torch.Generator().manual_seed(1)
    return {k: v + std * torch.randn(v.shape, generator=gen).to(v) if v.is_floating_point() and "running_" not in k
            else v for k, v in model.state_dict().items()}


def build_official(path: str, hw, device: str, extra: Sequence[str] = (), channels_last: bool = False):
    """The official row at input ``hw``: checked against plain_p5 with the same (tie-free) weights on CPU.
    As the official code deploys it (contiguous), or with ``channels_last`` on a CPU as this repo's CPU rows
    run (like for like)."""
    fmt = inference_memory_format(device) if channels_last else torch.contiguous_format
    # the check compares the top-K positionally: both sides in one layout, the same summation order (another
    # layout rounds differently, and queries with near-equal scores would swap places)
    ours = build("plain_p5", hw, "cpu", extra, fuse=False, memory_format=fmt)  # the official state-dict keys
    weights = ours.model.state_dict()                                          # plain_p5's row has these too
    official = load_official(path, hw, ours.postprocessor.num_classes, weights, "cpu", fmt)
    images = torch.rand(1, 3, *hw, generator=torch.Generator().manual_seed(2))
    diff = check_same_outputs(official, ours, images, torch.tensor([[hw[1], hw[0]]], dtype=torch.int64))
    print(f"official {hw[0]}x{hw[1]}: same detections as plain_p5 with the same weights (max diff {diff:.1e})",
          flush=True)
    return official.to(device)


def level_name(level: int) -> str:
    return f"p{level + 3}"  # backbone levels 0, 1, 2 are P3, P4, P5 (strides 8, 16, 32)


# ---------------------------------------------------------------- FLOPs
def _cpu_flash_sdpa(q, k, v, *args, out_shape=None, **kwargs):
    return sdpa_flop_count(q, k, v)


def flop_counter() -> FlopCounterMode:
    """FlopCounterMode that also counts the CPU flash-attention kernel (torch leaves it at 0)."""
    return FlopCounterMode(display=False, custom_mapping={
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_sdpa})


def count_flops(fn: Callable[[], object]) -> tuple:
    """(total FLOPs, {module name: FLOPs}) of one call of fn, under no_grad."""
    with torch.no_grad(), flop_counter() as fc:
        fn()
    return fc.get_total_flops(), {k: sum(v.values()) for k, v in fc.get_flop_counts().items()}


def stage_flops(per_module: Dict[str, int], deploy: DeployModel) -> Dict[str, float]:
    """Per-stage GFLOPs from the counter's module table (names 'DeployModel.model.<...>')."""
    root = "DeployModel.model"

    def total(pattern: str) -> int:
        return sum(v for k, v in per_module.items() if re.fullmatch(pattern, k))

    enc = deploy.model.encoder
    out = {"backbone": total(rf"{root}\.backbone"),
           "encoder_proj": total(rf"{root}\.encoder\.input_proj\.\d+"),
           "ccfm": total(rf"{root}\.encoder\.(lateral_convs|fpn_blocks|downsample_convs|pan_blocks)\.\d+"),
           "decoder": total(rf"{root}\.decoder"),
           "postprocessor": total(r"DeployModel\.postprocessor")}
    for i, level in enumerate(enc.use_encoder_idx):
        pruner = total(rf"{root}\.encoder\.pruners\.{i}")
        out[f"aifi_{level_name(level)}"] = total(rf"{root}\.encoder\.encoder\.{i}") + pruner
        if enc.pruners is not None:
            out[f"pruner_{level_name(level)}"] = pruner
    return {k: v / 1e9 for k, v in out.items()}


# ---------------------------------------------------------------- timing
def synchronizer(device: str) -> Callable[[], None]:
    if device.startswith("cuda"):
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


@contextlib.contextmanager
def stage_timer(deploy: DeployModel, sync: Callable[[], None]):
    """Time every stage of one forward: yields a dict stage -> seconds (filled after the forward)."""
    times: Dict[str, float] = {}
    model, enc = deploy.model, deploy.model.encoder
    patched = []

    def wrap(obj, attr: str, name_of: Callable):
        original = getattr(obj, attr)

        def timed(*args, **kwargs):
            sync()
            start = time.perf_counter()
            out = original(*args, **kwargs)
            sync()
            name = name_of(*args)
            times[name] = times.get(name, 0.0) + time.perf_counter() - start
            return out

        setattr(obj, attr, timed)
        patched.append((obj, attr))

    wrap(model.backbone, "forward", lambda *a: "backbone")
    wrap(enc, "forward", lambda *a: "encoder")
    wrap(enc, "encode_level", lambda enc_i, *a: f"aifi_{level_name(enc.use_encoder_idx[enc_i])}")
    wrap(enc, "fuse", lambda *a: "ccfm")
    wrap(model.decoder, "forward", lambda *a: "decoder")
    wrap(deploy.postprocessor, "forward_batched", lambda *a: "postprocessor")
    for i, pruner in enumerate(enc.pruners or []):
        wrap(pruner, "forward", lambda *a, i=i: f"pruner_{level_name(enc.use_encoder_idx[i])}")
    try:
        yield times
    finally:
        for obj, attr in patched:
            delattr(obj, attr)  # back to the class attribute
        if "encoder" in times:
            aifi = sum(v for k, v in times.items() if k.startswith("aifi_"))
            times["encoder_proj"] = times.pop("encoder") - aifi - times.get("ccfm", 0.0)


def quantiles(values_ms: List[float]) -> Dict[str, float]:
    q = statistics.quantiles(values_ms, n=4, method="inclusive") if len(values_ms) > 1 else values_ms * 3
    return {"median_ms": statistics.median(values_ms), "p25_ms": q[0], "p75_ms": q[2]}


def paired_ratio(reference_ms: List[float], model_ms: List[float]) -> Dict[str, float]:
    """Median, p25 and p75 of the round-by-round ratios reference / model of two interleaved series (> 1: the
    model is faster). A round's two calls ran back to back, so a slow stretch of a shared machine divides out,
    which a ratio of the two medians does not do."""
    if len(reference_ms) != len(model_ms) or not model_ms:
        raise ValueError(f"paired_ratio: the two series must pair round by round, got {len(reference_ms)} and "
                         f"{len(model_ms)} timings")
    ratios = [a / b for a, b in zip(reference_ms, model_ms)]
    q = quantiles(ratios)
    return {"median": q["median_ms"], "p25": q["p25_ms"], "p75": q["p75_ms"]}


def interleaved_ms(calls: Dict[str, Callable[[], object]], repeats: int,
                   sync: Callable[[], None] = lambda: None) -> Dict[str, List[float]]:
    """name -> the ms of each of ``repeats`` calls of ``calls[name]``, timed interleaved (A B C A B C ...) so that a
    shared machine's noise hits every call alike; ``sync`` before and after each (the device's queue)."""
    times: Dict[str, List[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            sync()
            start = time.perf_counter()
            call()
            sync()
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


def time_torch(variants: Dict[str, DeployModel], images, sizes, device: str, dtype: str, repeats: int,
               warmup: int) -> Dict[str, dict]:
    """Interleaved end-to-end and per-stage timings of every variant: name -> {e2e: [ms], stages: {s: [ms]}}."""
    sync = synchronizer(device)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.float16)) if dtype == "float16" else contextlib.nullcontext

    def run(deploy):
        with torch.no_grad(), autocast():
            deploy(images, sizes)

    for deploy in variants.values():
        for _ in range(warmup):
            run(deploy)
    e2e = interleaved_ms({name: (lambda d=deploy: run(d)) for name, deploy in variants.items()}, repeats, sync)
    res = {name: {"e2e": e2e[name], "stages": {}} for name in variants}
    staged = {name: deploy for name, deploy in variants.items() if isinstance(deploy, DeployModel)}
    for _ in range(repeats):
        for name, deploy in staged.items():  # the official row: end to end only
            with stage_timer(deploy, sync) as times:
                run(deploy)
            for k, v in times.items():
                res[name]["stages"].setdefault(k, []).append(v * 1e3)
    return res


def time_graphed(variants: Dict[str, torch.nn.Module], images, sizes, dtype: str, repeats: int,
                 warmup: int) -> Dict[str, dict]:
    """Interleaved end-to-end timings of every variant replayed as a CUDA graph (src/zoo/rtdetr/cuda_graph.py,
    captured after ``warmup`` eager forwards): name -> {e2e: [ms], stages: {}}, without a variant whose capture
    failed (it says so). The graphs are freed after."""
    from src.zoo.rtdetr.cuda_graph import GraphedDetector

    device = images.device
    graphs = {}
    for name, deploy in variants.items():
        try:
            graphs[name] = GraphedDetector(deploy, images.shape[0], images.shape[-2:], str(device),
                                           autocast=None if dtype == "float32" else dtype, warmup=max(1, warmup))
        except RuntimeError as e:  # a model that cannot be captured: no row for it, the others still run
            print(f"cuda-graph: {name} could not be captured, no row: {e}", flush=True)
            with contextlib.suppress(RuntimeError):
                torch.cuda.synchronize(device)
    sync = synchronizer(str(device))
    for graphed in graphs.values():
        graphed(images, sizes, copy=False)
    e2e = interleaved_ms({name: (lambda g=graphed: g(images, sizes, copy=False)) for name, graphed in graphs.items()},
                         repeats, sync)
    del graphs
    torch.cuda.empty_cache()
    return {name: {"e2e": times, "stages": {}} for name, times in e2e.items()}


def time_onnx(variants: Dict[str, DeployModel], images, sizes, hw, repeats: int, warmup: int,
              workdir: str) -> Dict[str, dict]:
    """Export every variant (deploy.export, as tools/export_onnx.py does) and time onnxruntime CPU sessions interleaved. The graphs
    have a dynamic batch, so a variant is exported once per input size and reused for the other batches
    (`build` gives the same weights every time)."""
    import onnxruntime as ort

    from src.zoo.rtdetr.deploy import export

    sessions = {}
    for name, deploy in variants.items():
        path = os.path.join(workdir, f"{name}_{hw[0]}x{hw[1]}.onnx")
        if not os.path.exists(path):
            export(deploy, path, hw)  # MoE layers trace their gather dispatch (MoEFFN.resolved_dispatch)
        sessions[name] = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    feed = {"images": images.cpu().numpy(), "orig_target_sizes": sizes.cpu().numpy()}
    for sess in sessions.values():
        for _ in range(warmup):
            sess.run(None, feed)
    e2e = interleaved_ms({name: (lambda x=sess: x.run(None, feed)) for name, sess in sessions.items()}, repeats)
    return {name: {"e2e": times, "stages": {}} for name, times in e2e.items()}


def kept_fraction(deploy: DeployModel) -> Dict[str, float]:
    """Fraction of patches each pruner kept in the last forward (1.0 when not pruning)."""
    enc = deploy.model.encoder
    out = {}
    for level, info in zip(enc.use_encoder_idx, enc.last_prune_info):
        total = info["patch_grid"][0] * info["patch_grid"][1]
        out[level_name(level)] = round(info["num_kept_patches"] / total, 4)
    return out


# ---------------------------------------------------------------- driver
def settings(args) -> List[tuple]:
    """(device label, torch device, dtype) rows to run."""
    rows = []
    for dev in args.devices:
        if dev == "cpu":
            rows.append(("cpu", "cpu", "float32"))
        elif dev == "cuda":
            if not torch.cuda.is_available():
                print("CUDA not available: skipping the cuda rows", file=sys.stderr)
                continue
            rows += [("cuda", "cuda", "float32"), ("cuda", "cuda", "float16")]
            if args.cuda_graph:
                rows += [("cuda-graph", "cuda", "float32"), ("cuda-graph", "cuda", "float16")]
        else:
            raise ValueError(f"--devices: {dev!r} is not cpu or cuda")
    return rows


def parse_hw(text: str) -> tuple:
    m = re.fullmatch(r"(\d+)x(\d+)", text)
    if not m:
        raise argparse.ArgumentTypeError(f"input size {text!r} must be HxW, e.g. 736x1280")
    return int(m.group(1)), int(m.group(2))


def machine() -> dict:
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        import onnxruntime
        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return info


def run_bench(args) -> dict:
    rows, officials = [], {}
    sizes_list = args.inputs
    with tempfile.TemporaryDirectory() as workdir:
        for hw in sizes_list:
            flops_cache = {}
            for batch in args.batches:
                images = torch.rand(batch, 3, *hw, generator=torch.Generator().manual_seed(0))
                sizes = torch.tensor([[hw[1], hw[0]]] * batch, dtype=torch.int64)
                plan = [(label, dev, dtype) for label, dev, dtype in settings(args)]
                if args.onnx:
                    plan.append(("onnxruntime-cpu", "cpu", "float32"))
                for label, dev, dtype in plan:
                    variants = {n: build(n, hw, dev, args.extra) for n in args.variants}
                    if args.official:
                        if (hw, dev) not in officials:  # built and checked once per input size and device
                            officials[(hw, dev)] = build_official(args.official, hw, dev, args.extra,
                                                                  args.official_channels_last)
                        variants["official"] = officials[(hw, dev)]
                    x, s = images.to(dev), sizes.to(dev)
                    if label == "onnxruntime-cpu":
                        timed = time_onnx(variants, x, s, hw, args.repeats, args.warmup, workdir)
                    elif label == "cuda-graph":
                        timed = time_graphed(variants, x, s, dtype, args.repeats, args.warmup)
                    else:
                        timed = time_torch(variants, x, s, dev, dtype, args.repeats, args.warmup)
                    for name, deploy in variants.items():
                        if name not in timed:  # a failed CUDA-graph capture (printed)
                            continue
                        if name not in flops_cache:  # FLOPs and kept fraction: CPU float32, batch 1
                            cpu_model = deploy.cpu() if name == "official" or dev == "cpu" else \
                                build(name, hw, "cpu", args.extra)
                            total, per_module = count_flops(lambda: cpu_model(images[:1], sizes[:1]))
                            ours = isinstance(cpu_model, DeployModel)
                            flops_cache[name] = (total / 1e9, stage_flops(per_module, cpu_model) if ours else {},
                                                 kept_fraction(cpu_model) if ours else {})
                            deploy.to(dev)
                        gflops, sflops, kept = flops_cache[name]
                        t = timed[name]
                        rows.append({"model": name, "device": label, "dtype": dtype, "input": f"{hw[0]}x{hw[1]}",
                                     "batch": batch, **{k: round(v, 3) for k, v in quantiles(t["e2e"]).items()},
                                     "repeats": len(t["e2e"]),
                                     "vs_official": {k: round(v, 4) for k, v in paired_ratio(
                                         timed["official"]["e2e"], t["e2e"]).items()}
                                     if "official" in timed and name != "official" else None,
                                     "stages_ms": {k: round(statistics.median(v), 3) for k, v in t["stages"].items()}
                                     or None,
                                     "gflops": round(gflops * batch, 3),
                                     "stage_gflops": {k: round(v * batch, 3) for k, v in sflops.items()},
                                     "kept_fraction": kept, "run": 0})
                        print(_row_line(rows[-1]), flush=True)
                    del variants
    argv = [portable_arg(a) for a in sys.argv[1:]]
    meta = {"date": datetime.date.today().isoformat(), "command": "python -m bench.latency_bench "
            + " ".join(argv), "commit": git_commit(REPO), "quick": args.quick, "machine": machine(),
            "layouts": ("every CPU row channels_last (like for like)" if args.official_channels_last else
                        "this repo's CPU rows channels_last (deploy.inference_memory_format), the official row "
                        "as the official code deploys (contiguous)" if args.official else
                        "CPU rows channels_last (deploy.inference_memory_format)"),
            "note": "random weights; FLOPs at batch 1 x batch; per-stage runs synchronise at stage "
                    "boundaries; onnxruntime rows: MoE in gather dispatch"}
    return {"meta": meta, "runs": [meta], "rows": rows}


def portable_arg(arg: str) -> str:
    """``arg`` without a machine's path: an absolute path (the whole argument, or the value of ``--opt=value`` /
    ``KEY=value``) inside the repository becomes relative to it, any other one PATH/<its name>, so a recorded
    command names no machine's folders."""
    head, eq, value = arg.partition("=") if "=" in arg else ("", "", arg)
    if not value.startswith("/"):
        return arg
    path = Path(value).resolve()
    if path == REPO or REPO in path.parents:
        short = str(path.relative_to(REPO)) or "."
    else:
        short = "PATH/" + path.name
    return head + eq + short


def merge_results(old: dict, new: dict) -> dict:
    """`new` appended to `old` (--append): rows of `new` replace those of `old` with the same ROW_ID, the
    others stay; `runs` lists every bench run that measured a remaining row and each row's `run` indexes it.
    `meta` is the newest run's. Files written before `runs` existed count as one run."""
    old_runs = old.get("runs") or [old["meta"]]
    new_ids = {tuple(r[k] for k in ROW_ID) for r in new["rows"]}
    kept = [{**r, "run": r.get("run", 0)} for r in old["rows"] if tuple(r[k] for k in ROW_ID) not in new_ids]
    used = sorted({r["run"] for r in kept})
    renumber = {old_index: i for i, old_index in enumerate(used)}
    runs = [old_runs[i] for i in used] + list(new["runs"])
    rows = ([{**r, "run": renumber[r["run"]]} for r in kept]
            + [{**r, "run": r["run"] + len(used)} for r in new["rows"]])
    return {"meta": new["meta"], "runs": runs, "rows": rows}


def _row_line(r: dict) -> str:
    return (f"{r['model']:>15} {r['device']:>15} {r['dtype']:>7} {r['input']:>9} b{r['batch']}: "
            f"{r['median_ms']:9.1f} ms (p25 {r['p25_ms']:.1f}, p75 {r['p75_ms']:.1f}), {r['gflops']:.1f} GFLOPs")


def speed_vs_official(rows: List[dict]) -> List[str]:
    """Lines 'speed against the official implementation' (official median / model median: > 1 is faster)
    for every setting that has an 'official' row; none without one. Where a row has its paired ratios
    (``vs_official``, rows of one run), they follow: median and p25-p75 of the round-by-round ratios. After
    ``--append`` the medians of one line may come from different runs; a row's paired ratio is always its own
    run's."""
    setting = lambda r: (r["device"], r["dtype"], r["input"], r["batch"])  # noqa: E731
    official = {setting(r): r["median_ms"] for r in rows if r["model"] == "official"}

    def ratio(r: dict, ms: float) -> str:
        paired = r.get("vs_official")
        return f"{r['model']} {ms / r['median_ms']:.3f}x" + (
            f" (paired {paired['median']:.3f}x, p25-p75 {paired['p25']:.3f}-{paired['p75']:.3f})" if paired else "")

    lines = []
    for key, ms in official.items():
        ratios = ", ".join(ratio(r, ms) for r in rows if setting(r) == key and r["model"] != "official")
        lines.append(f"- speed against the official implementation, {key[0]} {key[1]} {key[2]} batch {key[3]} "
                     f"(official median / model median, > 1 is faster): {ratios}")
    return ([""] + lines) if lines else []


def markdown_table(result: dict) -> str:
    """Markdown table of the rows (stage columns: median ms of the per-stage runs)."""
    cols = ["backbone", "encoder_proj", "aifi_p4", "aifi_p5", "ccfm", "decoder", "postprocessor"]
    runs = result.get("runs") or [result["meta"]]
    many = len(runs) > 1  # rows of several bench runs (--append): a run column, one footer line per run
    head = ("| model | device | input | batch | median ms (p25-p75) | " + " | ".join(cols)
            + " | GFLOPs | kept P4/P5 |" + (" run |" if many else "")
            + "\n|---|---|---|---:|---:|" + "---:|" * len(cols) + "---:|---|" + ("---:|" if many else ""))
    lines = [head]
    for r in result["rows"]:
        st = r["stages_ms"] or {}
        kept = "/".join(f"{r['kept_fraction'].get(p, '-')}" for p in ("p4", "p5")) if r["kept_fraction"] else "-"
        dev = r["device"] + ("" if r["dtype"] == "float32" else f" {r['dtype']}")
        lines.append(f"| {r['model']} | {dev} | {r['input']} | {r['batch']} | {r['median_ms']:.1f} "
                     f"({r['p25_ms']:.1f}-{r['p75_ms']:.1f}) | "
                     + " | ".join(f"{st[c]:.1f}" if c in st else "-" for c in cols)
                     + f" | {r['gflops']:.1f} | {kept} |" + (f" {r.get('run', 0)} |" if many else ""))
    lines += speed_vs_official(result["rows"])
    lines.append("")
    for i, m in enumerate(runs):
        where = (f"`{m['command']}`, {m['date']}, {m['machine'].get('processor')} "
                 f"({m['machine'].get('cpu_count')} CPUs, {m['machine'].get('torch_threads')} torch threads)"
                 + (f", {m['machine']['gpu']}" if "gpu" in m["machine"] else "") + f", torch {m['machine']['torch']}")
        where += f", commit {m['commit'][:12]}" if m.get("commit") else ""
        where += f" ({m['layouts']})" if m.get("layouts") else ""
        lines.append(f"- run {i}: {where}" if len(runs) > 1 else where)
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="4 variants, 192x320, batch 1, CPU, 3 repeats")
    p.add_argument("--variants", nargs="+", default=None, help=f"subset of {' '.join(ALL_VARIANTS)}")
    p.add_argument("--inputs", nargs="+", type=parse_hw, default=None, help="HxW sizes (default 640x640 736x1280)")
    p.add_argument("--batches", nargs="+", type=int, default=None, help="default 1 8")
    p.add_argument("--devices", nargs="+", default=None, help="cpu and/or cuda (cuda: float32 and float16 rows)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="with cuda: also rows 'cuda-graph' (float32 and float16), every model (the official one too) "
                        "replayed as one CUDA graph (src/zoo/rtdetr/cuda_graph.py), end to end only")
    p.add_argument("--onnx", action=argparse.BooleanOptionalAction, default=None,
                   help="also time onnxruntime CPU on the exported graphs (default: on, off with --quick)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per variant (default 10, quick 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs per variant first (default 2, quick 1)")
    p.add_argument("--out", default=None, help="json path (default docs/results/latency.json; quick: "
                                                "output/latency_quick.json); the markdown table goes next to it")
    p.add_argument("--append", action="store_true",
                   help="merge into the json at --out: rows measured again are replaced, the others kept")
    p.add_argument("-u", "--extra", nargs="+", default=[], help="extra config overrides for every variant")
    p.add_argument("--official", default=None, metavar="PATH",
                   help="add the official implementation as a row 'official': PATH is an extracted rtdetrv2_pytorch "
                        "folder of github:lyuwenyu/RT-DETR (end to end only; checked to give plain_p5's detections)")
    p.add_argument("--official-channels-last", action="store_true",
                   help="run the official row's convolutions in channels_last on a CPU, as this repo's CPU rows run "
                        "(like for like; by default it runs as the official code deploys it, contiguous)")
    args = p.parse_args(argv)
    if args.official_channels_last and not args.official:
        p.error("--official-channels-last needs --official PATH")
    q = args.quick
    args.variants = args.variants or (QUICK_VARIANTS if q else ALL_VARIANTS)
    args.inputs = args.inputs or ([(192, 320)] if q else [(640, 640), (736, 1280)])
    args.batches = args.batches or ([1] if q else [1, 8])
    args.devices = args.devices or (["cpu"] if q else ["cpu", "cuda"])
    if args.cuda_graph and "cuda" not in args.devices:
        p.error(f"--cuda-graph adds rows to the cuda ones: add cuda to --devices (got {' '.join(args.devices)})")
    args.onnx = (not q) if args.onnx is None else args.onnx
    args.repeats = args.repeats or (3 if q else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if q else 2)
    args.out = args.out or ("output/latency_quick.json" if q else "docs/results/latency.json")
    if q and not args.extra:
        args.extra = ["dset.min_patches=1"]  # at 192x320 the config's min_patches=10 would keep all of P5
    for v in args.variants:
        variant_overrides(v, (32, 32))  # unknown names fail before any work
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    result = run_bench(args)
    out = Path(args.out)
    if args.append and out.is_file():
        result = merge_results(json.loads(out.read_text()), result)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(markdown_table(result))
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
