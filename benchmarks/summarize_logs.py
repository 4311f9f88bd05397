"""Summarise mmengine training runs: loss at start and end, NaN check, seconds per iteration, peak memory.

    python benchmarks/summarize_logs.py WORK_DIR [WORK_DIR ...]

Reads each run's ``*/vis_data/scalars.json`` (written by mmengine's LocalVisBackend) and prints a Markdown
table. Exits non-zero if any loss is not finite or a run did not log.
"""
import glob
import json
import math
import os.path as osp
import statistics
import sys


def summarize(work_dir):
    files = sorted(glob.glob(osp.join(work_dir, '*', 'vis_data', 'scalars.json')))
    if not files:
        raise FileNotFoundError(f'{work_dir}: no */vis_data/scalars.json')
    records = [json.loads(line) for line in open(files[-1]) if line.strip()]
    train = [r for r in records if 'loss' in r]
    metrics = {k: v for r in records if 'loss' not in r for k, v in r.items() if k not in ('step', 'epoch', 'iter')}
    losses = [r['loss'] for r in train]
    window = max(1, len(losses) // 5)
    times = [r['time'] for r in train[len(train) // 5:]]  # past warm-up and cudnn autotuning
    return dict(
        iters=train[-1].get('iter', train[-1].get('step')),
        loss_start=statistics.mean(losses[:window]),
        loss_end=statistics.mean(losses[-window:]),
        finite=all(math.isfinite(v) for r in train for k, v in r.items() if k.startswith('loss')),
        sec_per_iter=statistics.median(times),
        memory_mb=max(r.get('memory', 0) for r in train),
        metrics=metrics)


def main():
    ok = True
    print('| run | iters | loss (first 20%) | loss (last 20%) | finite | s/iter (median) | peak MB | metrics |')
    print('| --- | --- | --- | --- | --- | --- | --- | --- |')
    for work_dir in sys.argv[1:]:
        try:
            s = summarize(work_dir)
        except (FileNotFoundError, KeyError, ValueError) as error:
            print(f'| {osp.basename(work_dir)} | failed: {error} |')
            ok = False
            continue
        ok &= s['finite'] and s['loss_end'] < s['loss_start']
        metrics = ', '.join(f'{k}={v:.3f}' if isinstance(v, float) else f'{k}={v}' for k, v in s['metrics'].items())
        print(f'| {osp.basename(work_dir)} | {s["iters"]} | {s["loss_start"]:.3f} | {s["loss_end"]:.3f} | '
              f'{s["finite"]} | {s["sec_per_iter"]:.3f} | {s["memory_mb"]} | {metrics} |')
    sys.exit(0 if ok else 1)


if __name__ == '__main__':
    main()
