"""Host syncs per training step: how often one step makes the host wait for the device.

    python -m bench.sync_count -c configs/dset4_r18_synth_cpu.yaml --steps 3
    python -m bench.sync_count -c configs/dset4_r18_synth_cpu.yaml --device cuda   # + CUDA's own sync checker

Runs ``--steps`` real training steps through the trainer (``train.py``'s Trainer, its data and model) and
counts, inside ``train_step`` only (logging steps, hooks and evaluation are outside it):

- on a CPU: calls that read a tensor value on the host: ``.item()`` / ``bool(t)`` / ``float(t)``
  (aten ``_local_scalar_dense``), ``nonzero`` (output size depends on the data), ``.tolist()`` and ``.cpu()``,
  indexing with a boolean mask (``bool_mask_index``: a ``nonzero`` on CUDA, inside the kernel on a CPU), and
  the autograd nodes of the loss whose CUDA backward reads the host (``prod_backward``: found in the graph
  ``backward`` is called on, since under this counter's dispatch mode torch takes a path without the read), by
  the calling file and line (not ``.numpy()``: it refuses a device tensor, so it never waits for one);
- on CUDA instead: every synchronisation ``torch.cuda.set_sync_debug_mode("warn")`` reports (blocking copies
  included), by the repository line it comes from (``--explain-backward`` names the forward call of a sync
  inside the backward pass).

Not counted: reads of the optimizer's step counts (host tensors on every device). On CPU the count is still an
upper bound of the GPU one: a read of a tensor that is already on the host would be counted though it would
not wait for a GPU, and blocking host-to-device copies are not seen (only CUDA's checker sees them). The MoE
layers' ``dispatch: auto`` is ``sorted`` on a CPU (one ``.tolist()`` per layer) and ``dense`` on CUDA (none):
``-u dset.moe_dispatch=dense`` counts on a CPU what a CUDA step does. The last line is
``host syncs per step: N`` (the median over the steps after the first). Figures: docs/performance.md.
"""
from __future__ import annotations

import argparse
import collections
import statistics
import sys
import tempfile
import traceback
import warnings
from pathlib import Path
from typing import Counter, List, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SYNC_OPS = {"_local_scalar_dense", "nonzero"}
INDEX_OPS = {"index", "index_put", "index_put_", "_index_put_impl_"}
TENSOR_METHODS = ("tolist", "cpu")  # not .numpy(): it refuses a device tensor, so it never waits for one
# autograd nodes whose CUDA backward reads a value on the host (prod's counts the zeros of its input: H200,
# 2026-12-04, 7 per DSET step in the GIoU loss) but which take a path without that read under a dispatch mode such
# as this counter's, so on a CPU they are found in the graph of the tensor ``backward`` is called on
HOST_READING_BACKWARD_NODES = {"ProdBackward0": "prod_backward", "ProdBackward1": "prod_backward"}


def host_reading_backward_nodes(root: torch.Tensor) -> Counter:
    """Kinds (``HOST_READING_BACKWARD_NODES``) of the nodes of ``root``'s autograd graph whose backward reads the
    device on CUDA -> how many of each."""
    found, seen, stack = collections.Counter(), set(), [root.grad_fn]
    while stack:  # the graph's nodes, each once
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        kind = HOST_READING_BACKWARD_NODES.get(type(node).__name__)
        if kind:
            found[kind] += 1
        stack.extend(child for child, _ in node.next_functions)
    return found


def boolean_mask_index(name: str, args) -> bool:
    """An indexing op with a boolean mask: on CUDA it turns the mask into indices with ``nonzero`` (a host wait),
    which on a CPU happens inside the kernel, out of this counter's sight. ``x[mask] = scalar`` is a
    ``masked_fill_`` on CUDA (no wait) and is not counted."""
    if name not in INDEX_OPS or len(args) < 2:
        return False
    if not any(torch.is_tensor(i) and i.dtype in (torch.bool, torch.uint8) for i in args[1] or ()):
        return False
    return name == "index" or not (len(args) > 2 and torch.is_tensor(args[2]) and args[2].dim() == 0)


def _caller() -> str:
    """file:line of the innermost frame of the repository's own code (not torch's)."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        path = Path(frame.filename)
        if REPO in path.parents and not {"bench", ".venv", "site-packages"} & set(path.parts):
            return f"{path.relative_to(REPO)}:{frame.lineno}"
    return "?"


class SyncCounter(TorchDispatchMode):
    """Counts host-reading operations while active: ``counts[(kind, where)]``."""

    def __init__(self, host_tensors=()):
        super().__init__()
        self.counts: Counter = collections.Counter()
        self._saved = {}
        self._host = {t.data_ptr() for t in host_tensors}  # on the host on every device (optimizer step counts)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in SYNC_OPS:
            host = name == "_local_scalar_dense" and args and torch.is_tensor(args[0]) and \
                args[0].data_ptr() in self._host
            if not host:
                self.counts[(name, _caller())] += 1
        elif boolean_mask_index(name, args):
            self.counts[("bool_mask_index", _caller())] += 1
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        for method in TENSOR_METHODS:
            original = getattr(torch.Tensor, method)
            self._saved[method] = original

            def counted(t, *a, _original=original, _name=method, **k):
                self.counts[(_name, _caller())] += 1
                return _original(t, *a, **k)
            setattr(torch.Tensor, method, counted)
        backward = self._saved["backward"] = torch.Tensor.backward

        def counted_backward(t, *a, **k):
            for kind, n in host_reading_backward_nodes(t).items():
                self.counts[(kind, _caller())] += n
            return backward(t, *a, **k)
        torch.Tensor.backward = counted_backward
        return super().__enter__()

    def __exit__(self, *exc):
        for method, original in self._saved.items():
            setattr(torch.Tensor, method, original)
        return super().__exit__(*exc)


class CudaSyncLog:
    """Every synchronisation CUDA's checker (``torch.cuda.set_sync_debug_mode("warn")``) reports while active, each
    occurrence (the ``always`` filter: Python would show a warning once per place), as ``counts[("cuda_sync",
    where)]``: ``where`` is the repository line the sync comes from (the innermost frame of the repository's code
    at the moment of the warning), plus the innermost torch frame when the sync is inside torch (a backward pass,
    a GradScaler)."""

    def __init__(self):
        self.counts: Counter = collections.Counter()
        self._catch = warnings.catch_warnings()

    def _show(self, message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message).lower():
            return self._previous(message, category, filename, lineno, file, line)
        where = _caller()
        inner = Path(filename)
        if REPO not in inner.parents:  # e.g. torch/autograd/graph.py: the backward pass, called from `where`
            where += f" (in {inner.parent.name}/{inner.name}:{lineno})"
        self.counts[("cuda_sync", where)] += 1

    def __enter__(self):
        self._catch.__enter__()
        warnings.simplefilter("always")
        self._previous, warnings.showwarning = warnings.showwarning, self._show
        torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc):
        torch.cuda.set_sync_debug_mode(0)
        return self._catch.__exit__(*exc)


class BackwardSync(Exception):
    """A synchronisation inside a backward pass (``explain_backward_sync``)."""


def explain_backward_sync(step, *args, **kwargs) -> Optional[str]:
    """Run one training ``step`` with autograd's anomaly mode (it records each node's forward call) and CUDA's
    checker set to raise inside the backward pass: the first synchronising backward node raises, and anomaly mode
    prints (a warning, on stderr) the forward line that made it. Returns the error, or None when the backward
    pass did not synchronise."""
    original = torch.autograd.backward

    def backward(*a, **k):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return original(*a, **k)
        except RuntimeError as e:
            raise BackwardSync(str(e)) from e
        finally:
            torch.cuda.set_sync_debug_mode(0)

    torch.autograd.backward = backward
    try:
        with torch.autograd.set_detect_anomaly(True, check_nan=False):
            step(*args, **kwargs)
    except BackwardSync as e:
        return str(e)
    finally:
        torch.autograd.backward = original
    return None


def run_train_steps(config: str, overrides: List[str], num_steps: int, device: str, wrap) -> None:
    """Run ``num_steps`` training steps of the config's trainer (no evaluation, no logging steps), each through
    ``wrap(real_step, trainer, *args, **kwargs)`` instead of ``train_step(*args, **kwargs)``; ``BackwardSync``
    raised by ``wrap`` ends the run quietly. Shared by this bench and ``bench/op_count.py --train-config``."""
    import src.solver.trainer as trainer_module
    from src.core import YAMLConfig

    cfg = YAMLConfig(config, overrides=overrides + [f"max_iters_per_epoch={num_steps}", "epochs=1",
                                                    "print_freq=100000"])
    cfg.yaml_cfg.pop("val_dataloader", None)  # no evaluation: steps only
    trainer = trainer_module.Trainer(cfg, device=device, output_dir=tempfile.mkdtemp(prefix="train_steps_"))
    real = trainer_module.train_step
    trainer_module.train_step = lambda *args, **kwargs: wrap(real, trainer, *args, **kwargs)
    try:
        trainer.fit()
    except BackwardSync:
        pass
    finally:
        trainer_module.train_step = real


def count_steps(config: str, overrides: List[str], num_steps: int, device: str, explain: bool = False) -> List[Counter]:
    """The counts of each of ``num_steps`` training steps of the config's trainer: on a CPU the host reads
    (``SyncCounter``), on CUDA the synchronisations CUDA's own checker reports (``CudaSyncLog``: every host read
    that waits for the GPU and every blocking copy, which ``SyncCounter`` cannot see; both at once would count a
    read twice)."""
    per_step: List[Counter] = []

    def counted_step(real, trainer, *args, **kwargs):
        if device.startswith("cuda"):
            torch.cuda.synchronize()  # nothing of the step before is waited for inside it
            if explain and len(per_step) == num_steps - 1:  # the last step: which forward call syncs in backward
                print(f"backward sync: {explain_backward_sync(real, *args, **kwargs)}", flush=True)
                raise BackwardSync("explained")
            with CudaSyncLog() as log:
                out = real(*args, **kwargs)
            per_step.append(collections.Counter(log.counts))
            return out
        # AdamW keeps its step counts as host tensors on every device (not fused / capturable): reading them is
        # no device sync, so they are not counted
        steps = [v for st in trainer.state.optimizer.state.values() for k, v in st.items() if k == "step"]
        with SyncCounter(steps) as counter:
            out = real(*args, **kwargs)
        per_step.append(collections.Counter(counter.counts))
        return out

    run_train_steps(config, overrides, num_steps, device, counted_step)
    return per_step


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-c", "--config", required=True)
    p.add_argument("-u", "--update", nargs="*", default=[], help="config overrides a.b=value")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--explain-backward", action="store_true",
                   help="CUDA: run the last step with anomaly mode and print the forward call of a backward sync")
    args = p.parse_args(argv)
    if args.explain_backward and (not args.device.startswith("cuda") or args.steps < 2):
        p.error("--explain-backward needs --device cuda (CUDA's checker) and --steps >= 2 (the last step explains, "
                "the others are counted)")
    per_step = count_steps(args.config, args.update, args.steps, args.device, args.explain_backward)
    where = collections.Counter()
    for counts in per_step[1:] or per_step:
        where.update(counts)
    n = max(1, len(per_step[1:] or per_step))
    print("| kind | where | per step |\n|---|---|---:|")
    for (kind, loc), c in sorted(where.items(), key=lambda x: (-x[1], x[0])):
        print(f"| {kind} | {loc} | {c / n:g} |")
    totals = [sum(c.values()) for c in per_step]
    print(f"steps: {len(per_step)}, per step: {totals}")
    print(f"host syncs per step: {statistics.median(totals[1:] or totals):g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
