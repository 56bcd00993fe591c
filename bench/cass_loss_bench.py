"""Benchmark of the CASS target + loss (forward and backward), vectorised vs the per-box loop oracle.

Times one training-step call: soft masks of every box, the loss of one normalisation mode, and the
backward pass to the logits. The vectorised path is src/zoo/rtdetr/cass.py; the reference is
src/zoo/rtdetr/cass_oracle.py (a Python loop over images and boxes, each box a [P] tensor, as a seed-style
implementation would be). Default setting: batch 8, 10/50/200 boxes per image, feature grid 40 x 23
(w x h: input 1280 x 736 at stride 32), patch sizes 1 and 4, CPU and CUDA when available (the oracle is
timed on CPU only; it builds its tensors there).

    python -m bench.cass_loss_bench            # full table (run from the repo root), about 1-2 minutes on a 2-core CPU
    python -m bench.cass_loss_bench --quick    # fewer repeats, no 200-box row for the oracle
"""
import argparse
import time


import torch  # noqa: E402

from src.zoo.rtdetr.cass import NORMALIZATIONS, CASSConfig, cass_loss, patch_grid  # noqa: E402
from src.zoo.rtdetr.cass_oracle import oracle_cass_loss  # noqa: E402


def make_batch(batch, boxes_per_image, img_shape, device, seed):
    """Boxes with log-uniform sides 8..400 px and centres anywhere in the image: list of [n, 4]."""
    gen = torch.Generator().manual_seed(seed)
    H, W = img_shape
    out = []
    for _ in range(batch):
        centre = torch.rand(boxes_per_image, 2, generator=gen) * torch.tensor([W, H])
        size = torch.exp(torch.empty(boxes_per_image, 2).uniform_(2.08, 5.99, generator=gen))
        out.append(torch.cat([centre - size / 2, centre + size / 2], 1).clamp(min=0).to(device))
    return out


def time_call(fn, repeats, device):
    """Fastest of `repeats` timed calls after one warm-up call (robust to other jobs on a shared machine)."""
    def sync():
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return min(times)


def step(loss_fn, logits, gt, feat, img, patch_size, cfg):
    """Forward (masks + loss) and backward to the logits."""
    logits.grad = None
    loss_fn(logits, gt, feat, img, patch_size, cfg).backward()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--boxes', type=int, nargs='+', default=[10, 50, 200], help='boxes per image')
    parser.add_argument('--patch-sizes', type=int, nargs='+', default=[1, 4])
    parser.add_argument('--feat', type=int, nargs=2, default=[23, 40], metavar=('H', 'W'), help='feature map h w')
    parser.add_argument('--stride', type=int, default=32)
    parser.add_argument('--modes', nargs='+', default=list(NORMALIZATIONS), choices=NORMALIZATIONS)
    parser.add_argument('--loss-type', default='focal', choices=('mse', 'focal', 'vfl'))
    parser.add_argument('--devices', nargs='+', default=None, help='default: cpu, plus cuda when available')
    parser.add_argument('--repeats', type=int, default=20, help='timed calls of the vectorised path')
    parser.add_argument('--oracle-repeats', type=int, default=3, help='timed calls of the loop oracle')
    parser.add_argument('--oracle-max-boxes', type=int, default=200, help='skip the oracle above this many boxes/img')
    parser.add_argument('--threads', type=int, default=1,
                        help='torch intra-op CPU threads; 0 = torch default. Default 1: on a small shared CPU extra '
                             'threads mostly add spin-wait jitter, worst for the loop oracle (conservative speed-ups)')
    parser.add_argument('--quick', action='store_true', help='5 repeats, 1 oracle call, oracle only up to 50 boxes/img')
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.oracle_repeats, args.oracle_max_boxes = 5, 1, 50
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = args.devices or (['cpu', 'cuda'] if torch.cuda.is_available() else ['cpu'])
    feat = tuple(args.feat)
    img = (feat[0] * args.stride, feat[1] * args.stride)
    print(f'# CASS loss bench: batch {args.batch}, feature {feat[1]}x{feat[0]} (w x h), input {img[1]}x{img[0]}, '
          f'loss {args.loss_type}, forward+backward, best of {args.repeats} (oracle {args.oracle_repeats}) '
          f'calls, torch {torch.__version__}, {torch.get_num_threads()} CPU threads')
    header = f"{'device':6} {'k':>2} {'P':>4} {'boxes/img':>9} {'mode':16} {'vectorised ms':>13} " \
             f"{'loop ms':>9} {'speed-up':>9} {'cost/patch':>10}"
    print(header)
    print('-' * len(header))
    for device_name in devices:
        device = torch.device(device_name)
        for patch_size in args.patch_sizes:
            ph, pw = patch_grid(feat, patch_size)
            for n_boxes in args.boxes:
                gt = make_batch(args.batch, n_boxes, img, device, seed=n_boxes)
                gt_cpu = [b.cpu() for b in gt]
                logits = torch.randn(args.batch, ph * pw, device=device, requires_grad=True)
                logits_cpu = logits.detach().cpu().requires_grad_()
                patch_time = None
                for mode in args.modes:
                    cfg = CASSConfig(normalization=mode, loss_type=args.loss_type)
                    fast = time_call(lambda: step(cass_loss, logits, gt, feat, img, patch_size, cfg),
                                     args.repeats, device)
                    patch_time = fast if mode == 'patch' else patch_time
                    loop = None
                    if device.type == 'cpu' and n_boxes <= args.oracle_max_boxes:
                        loop = time_call(lambda: step(oracle_cass_loss, logits_cpu, gt_cpu, feat, img, patch_size, cfg),
                                         args.oracle_repeats, torch.device('cpu'))
                    ratio = f'{fast / patch_time:10.2f}' if patch_time else f"{'':>10}"
                    loop_ms = f'{loop * 1e3:9.1f}' if loop else f"{'n/a':>9}"
                    speed = f'{loop / fast:8.0f}x' if loop else f"{'n/a':>9}"
                    print(f'{device_name:6} {patch_size:>2} {ph * pw:>4} {n_boxes:>9} {mode:16} {fast * 1e3:13.2f} '
                          f'{loop_ms} {speed} {ratio}', flush=True)


if __name__ == '__main__':
    main()
