"""Read a trainer output directory: the per-epoch log, the last evaluation, and a summary row.

A run directory written by `src.solver.trainer.Trainer` holds
- ``log.jsonl``: one JSON object per epoch, ``{epoch, step, train: {loss_cass, loss_total, ...},
  eval: {AP, ..., dset_bias: {...}}}`` (``eval`` only on evaluated epochs; NaN written as null);
- ``tb/``: the TensorBoard scalars (``read_scalars``);
- ``eval/<epoch>.json``: the full evaluation of that epoch (``eval/test.json`` for ``--test-only``), with
  ``AP``, ``AP_small`` ... and, for DSET models, ``dset_bias`` (keep-recall, centroid shift).

Everything here is a pure function of the files; `tools/compare_runs.py` formats and plots the results.
Errors name the run directory and the missing or broken file.
"""
from __future__ import annotations

import json
import math
import os
from typing import Dict, List, Optional, Sequence

LOG_FILE = "log.jsonl"
EVAL_DIR = "eval"
AP_KEYS = ("AP", "AP_small", "AP_medium", "AP_large")
KEEP_RECALL_KEYS = ("keep_recall_small", "keep_recall_medium", "keep_recall_large", "keep_recall_far",
                    "keep_recall_near")
SUMMARY_COLUMNS = (("AP", "AP"), ("AP_small", "AP_S"), ("AP_medium", "AP_M"), ("AP_large", "AP_L"),
                   ("keep_recall_small", "KR small"), ("keep_recall_medium", "KR medium"),
                   ("keep_recall_large", "KR large"), ("keep_recall_far", "KR far"),
                   ("keep_recall_near", "KR near"), ("centroid_dy", "centroid dy"),
                   ("loss_cass", "final loss_cass"))


class RunDirError(FileNotFoundError):
    """A run directory, or a file the summary needs in it, is missing or unreadable."""


def _number(value) -> Optional[float]:
    """A finite float, or None for missing / null / NaN / non-numeric values."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def check_run_dir(run_dir: str) -> None:
    """Raise RunDirError unless ``run_dir`` is a directory with ``log.jsonl`` and at least one ``eval/*.json``."""
    if not os.path.isdir(run_dir):
        raise RunDirError(f"run directory {run_dir!r} does not exist (expected a trainer output_dir with "
                          f"{LOG_FILE} and {EVAL_DIR}/<epoch>.json)")
    log = os.path.join(run_dir, LOG_FILE)
    if not os.path.isfile(log):
        raise RunDirError(f"run directory {run_dir!r} has no {LOG_FILE} (missing file {log!r}); is it a trainer "
                          f"output_dir, and did an epoch finish?")
    eval_files(run_dir)


def read_log(run_dir: str) -> List[dict]:
    """The epoch records of ``run_dir/log.jsonl`` in file order (blank lines skipped)."""
    path = os.path.join(run_dir, LOG_FILE)
    if not os.path.isfile(path):
        raise RunDirError(f"run directory {run_dir!r}: missing file {path!r}")
    records = []
    with open(path, "r", encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise RunDirError(f"run directory {run_dir!r}: {path} line {number} is not valid JSON ({err})") from err
            if not isinstance(record, dict):
                raise RunDirError(f"run directory {run_dir!r}: {path} line {number} is not a JSON object")
            records.append(record)
    return records


def read_scalars(tb_dir: str) -> Dict[str, List[tuple]]:
    """TensorBoard scalars of every event file under ``tb_dir``: tag -> [(step, value), ...] in step order
    ({} when the folder holds none)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not os.path.isdir(tb_dir):
        return {}
    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def eval_files(run_dir: str) -> List[str]:
    """Paths of ``run_dir/eval/*.json`` ordered by epoch (numeric names ascending, then 'test.json').

    Raises RunDirError when the folder or its json files are missing.
    """
    folder = os.path.join(run_dir, EVAL_DIR)
    names = sorted(n for n in os.listdir(folder) if n.endswith(".json")) if os.path.isdir(folder) else []
    if not names:
        raise RunDirError(f"run directory {run_dir!r} has no evaluation (missing file {folder}/<epoch>.json); "
                          f"the trainer writes one per evaluated epoch")
    numeric = sorted((n for n in names if n[:-5].lstrip("-").isdigit()), key=lambda n: int(n[:-5]))
    others = [n for n in names if n not in numeric]
    return [os.path.join(folder, n) for n in numeric + others]


def read_last_eval(run_dir: str) -> dict:
    """The evaluation of the highest epoch (``eval/<max epoch>.json``; ``test.json`` only if no epoch file)."""
    paths = eval_files(run_dir)
    numeric = [p for p in paths if os.path.basename(p)[:-5].lstrip("-").isdigit()]
    path = (numeric or paths)[-1]
    try:
        with open(path, "r", encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise RunDirError(f"run directory {run_dir!r}: cannot read {path!r} ({err})") from err
    if not isinstance(data, dict):
        raise RunDirError(f"run directory {run_dir!r}: {path!r} is not a JSON object")
    data["_path"] = path
    return data


def last_train_value(records: Sequence[dict], key: str) -> Optional[float]:
    """``train[key]`` of the last record that has it, else None."""
    for record in reversed(records):
        value = _number((record.get("train") or {}).get(key))
        if value is not None:
            return value
    return None


def summarize_run(run_dir: str, name: Optional[str] = None) -> Dict[str, Optional[float]]:
    """One table row: {'name', 'eval_file', AP, AP_small/medium/large, keep_recall_{small,medium,large,far,near},
    centroid_dy, loss_cass}; values are floats or None when the run did not record them (e.g. no DSET)."""
    check_run_dir(run_dir)
    records = read_log(run_dir)
    last = read_last_eval(run_dir)
    bias = last.get("dset_bias") or {}
    row: Dict[str, Optional[float]] = {"name": name or os.path.basename(os.path.normpath(run_dir)),
                                       "eval_file": last["_path"]}
    for key in AP_KEYS:
        row[key] = _number(last.get(key))
    for key in KEEP_RECALL_KEYS + ("centroid_dy",):
        row[key] = _number(bias.get(key))
    row["loss_cass"] = last_train_value(records, "loss_cass")
    return row


def run_curves(records: Sequence[dict]) -> Dict[str, Dict[str, List[float]]]:
    """Per-epoch series from log.jsonl: {series: {'epoch': [...], 'value': [...]}} for 'AP', 'loss_cass',
    'keep_recall_large', 'keep_recall_near'; a series holds only epochs with a finite value (may be empty)."""
    getters = {
        "AP": lambda r: (r.get("eval") or {}).get("AP"),
        "loss_cass": lambda r: (r.get("train") or {}).get("loss_cass"),
        "keep_recall_large": lambda r: ((r.get("eval") or {}).get("dset_bias") or {}).get("keep_recall_large"),
        "keep_recall_near": lambda r: ((r.get("eval") or {}).get("dset_bias") or {}).get("keep_recall_near"),
    }
    curves = {}
    for series, get in getters.items():
        epochs, values = [], []
        for r in records:
            value, epoch = _number(get(r)), _number(r.get("epoch"))
            if value is not None and epoch is not None:
                epochs.append(int(epoch))
                values.append(value)
        curves[series] = {"epoch": epochs, "value": values}
    return curves


def format_value(value: Optional[float], key: str) -> str:
    """'-' for None; centroid shifts signed with 4 decimals, losses with 4, AP and recalls with 3."""
    if value is None:
        return "-"
    if key.startswith("centroid"):
        return f"{value:+.4f}"
    if key.startswith("loss"):
        return f"{value:.4f}"
    return f"{value:.3f}"


def format_summary_table(rows: Sequence[dict]) -> str:
    """Markdown table of `summarize_run` rows, one line per run, columns SUMMARY_COLUMNS."""
    lines = ["| run | " + " | ".join(title for _, title in SUMMARY_COLUMNS) + " |",
             "|---|" + "---:|" * len(SUMMARY_COLUMNS)]
    for row in rows:
        cells = [format_value(row.get(key), key) for key, _ in SUMMARY_COLUMNS]
        lines.append(f"| {row['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
