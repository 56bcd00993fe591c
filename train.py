"""Train or evaluate an RT-DETRv2 / DSET detector.

    python train.py -c configs/dset4_r18_ratio0.3.yaml
    python train.py -c CONFIG -r output/run/last.pth          # resume the full training state
    python train.py -c CONFIG -t rtdetrv2_r18vd_120e_coco_rerun_48.1.pth   # tune from weights
    python train.py -c CONFIG -r output/run/best.pth --test-only
    torchrun --nproc_per_node 2 train.py -c CONFIG           # DDP (nccl on CUDA, gloo on CPU or when ranks share a GPU)

Exit status: 0 done; 2 config, data or checkpoint error (the message names the key or file and the fix);
3 stopped on a non-finite loss (the last good checkpoint is kept); 130 interrupted (Ctrl-C; one line says
how to resume). A new run refuses an output directory that holds one (use -r, --output-dir or
--overwrite). See docs/reliability.md.
"""
from __future__ import annotations

import argparse
import os
import sys

from src.core import ConfigError, DataError, YAMLConfig
from src.misc.checkpoint import add_trust_option


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--config", required=True, help="YAML config")
    p.add_argument("-r", "--resume", help="training checkpoint (last.pth) to resume from")
    p.add_argument("-t", "--tuning", help="weights to tune from (official format or ours)")
    p.add_argument("--test-only", action="store_true", help="evaluate once and exit")
    p.add_argument("--use-amp", action="store_true", help="mixed precision (autocast in amp_dtype + GradScaler for float16; CUDA or CPU)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--seed", type=int, default=None, help="random seed (overrides the config)")
    p.add_argument("--output-dir", default=None, help="output directory (overrides the config)")
    p.add_argument("--overwrite", action="store_true",
                   help="start a new run in an output directory that already holds one (last.pth / log.jsonl): "
                        "its checkpoints are replaced and the log is appended to")
    add_trust_option(p)
    p.add_argument("-u", "--update", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override config keys, values parsed as YAML (e.g. -u epochs=3 dset.keep_ratio=0.5)")
    args = p.parse_args(argv)
    if args.resume and args.tuning:
        p.error("-r (resume) and -t (tune) are exclusive: resume continues a run, tune starts a new one")
    return args


EXIT_INPUT_ERROR = 2  # bad config, data or checkpoint: nothing was trained (as argparse's usage errors)
EXIT_NONFINITE = 3  # training stopped on a NaN/inf loss; the last good checkpoint is kept
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT, as a shell reports it)
RUN_FILES = ("last.pth", "log.jsonl")  # what a previous run leaves in its output directory


def check_output_dir(output_dir: str, args) -> None:
    """A new training run must not silently replace another run's checkpoints and append to its log."""
    if args.resume or args.test_only or args.overwrite:
        return
    found = [f for f in RUN_FILES if os.path.exists(os.path.join(output_dir, f))]
    if found:
        last = os.path.join(output_dir, "last.pth")
        raise ConfigError(f"output directory {output_dir!r} already holds a run ({', '.join(found)}); a new run would "
                          f"overwrite its checkpoints and append to its log. Continue it with -r {last}, start a "
                          f"new one with --output-dir NEW_DIR, or pass --overwrite to replace it")


def main(argv=None) -> int:
    import torch

    from src.misc.checkpoint import NotACheckpointError
    from src.solver.trainer import CheckpointError, NonFiniteLossError, Trainer

    args = parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg = trainer = None
    try:
        cfg = YAMLConfig(args.config, overrides=args.update)
        check_output_dir(args.output_dir or cfg.get("output_dir", "./output/run"), args)
        trainer = Trainer(cfg, device=device, output_dir=args.output_dir, seed=args.seed,
                          use_amp=True if args.use_amp else None, resume=args.resume, tuning=args.tuning,
                          trusted_checkpoint=args.trust_checkpoint, test_only=args.test_only)
        if args.test_only:
            trainer.evaluate_only()
        else:
            trainer.fit()
    except KeyboardInterrupt:
        print(interrupted_message(args, cfg, trainer), file=sys.stderr)
        return EXIT_INTERRUPTED
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    except DataError as e:  # annotation json, image files: the message names the file and the image id
        print(f"data error: {e}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    except CheckpointError as e:
        print(f"checkpoint error: {e}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    except NotACheckpointError as e:  # random bytes, a truncated copy: no flag can load it
        print(f"checkpoint error: {e}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    except NonFiniteLossError as e:
        print(f"training stopped: {e}", file=sys.stderr)
        return EXIT_NONFINITE
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


def interrupted_message(args, cfg, trainer) -> str:
    """One line for Ctrl-C: where the last complete checkpoint is and the command that resumes from it."""
    if trainer is None or args.test_only:
        return "interrupted (nothing was trained)"
    last = os.path.join(trainer.output_dir, "last.pth")
    if trainer.state.last_saved_epoch is None or not os.path.isfile(last):
        return "interrupted during the first epoch: no checkpoint was written yet (nothing to resume)"
    command = " ".join(["python", "train.py", "-c", args.config, "-r", last]
                       + (["-u", *args.update] if args.update else []))
    return (f"interrupted; {last} (end of epoch {trainer.state.last_saved_epoch}) is complete and untouched, "
            f"resume with: {command}")


if __name__ == "__main__":
    sys.exit(main())
