"""Run a CPU demo of the README for several seeds and print each seed's metrics, their mean and their range.

    python benchmarks/demo_seeds.py seg            # seeds 0 1 2, as the README's numbers were measured
    python benchmarks/demo_seeds.py det --seeds 0 1 2
    python benchmarks/demo_seeds.py cls

Each seed runs the README's commands (`mim train`, OMP_NUM_THREADS=1) with only `randomness.seed` and the work
directory overridden, into work_dirs/demo_seeds/<task>/seed<N>/. The demo configs fix seed 0, so seed 0 is
exactly the README's plain command. The metrics are the final validation's, read from the run's
vis_data/scalars.json. `--reuse` takes a seed's metrics from an earlier finished run in its work directory
instead of training again (each reused seed is named in the output); without it every seed is trained.
"""
import argparse
import glob
import json
import os
import os.path as osp
import shutil
import statistics
import subprocess
import sys
import time

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
SEG_CONFIG = 'configs/mmseg/upernet_groupmamba-mini_1xb4-600_ade20k-demo-128x128.py'
DET_CONFIG = 'configs/mmdet/mask_rcnn_groupmamba_demo_shapes.py'
CLS_TEACHER_CONFIG = 'configs/mmpretrain/demo/resnet_mini_demo_teacher.py'
CLS_STUDENT_CONFIG = 'configs/mmpretrain/demo/groupmamba_mini_distill_demo.py'
# The metrics each task reports (keys of mmengine's scalars.json) and how they are printed.
METRICS = {
    'seg': ['mIoU', 'mAcc', 'aAcc'],
    'det': ['coco/bbox_mAP', 'coco/bbox_mAP_50', 'coco/bbox_mAP_75', 'coco/segm_mAP', 'coco/segm_mAP_50',
            'coco/segm_mAP_75'],
    'cls': ['accuracy/top1'],
}


def run(cmd):
    """Run a README command from the repository root with the README's environment; fail loudly."""
    env = dict(os.environ, OMP_NUM_THREADS='1')
    print('$ ' + ' '.join(cmd), flush=True)
    completed = subprocess.run(cmd, cwd=REPO, env=env)
    if completed.returncode != 0:
        sys.exit(f'demo_seeds: `{" ".join(cmd)}` exited with {completed.returncode}')


def mim(*args):
    # The Python running this script runs mim, so the environment's plugin and OpenMMLab stack are used.
    return [sys.executable, '-m', 'mim', *args]


def final_metrics(work_dir, keys):
    """The last validation's values of `keys` in the newest run under `work_dir` (mmengine's scalars.json)."""
    runs = sorted(glob.glob(osp.join(REPO, work_dir, '*', 'vis_data', 'scalars.json')))
    if not runs:
        return None
    last = None
    with open(runs[-1]) as f:
        for line in f:
            record = json.loads(line)
            if all(key in record for key in keys):
                last = record
    return None if last is None else {key: last[key] for key in keys}


def train_seg(seed, work_dir):
    if not osp.isdir(osp.join(REPO, 'data/ade_demo')):
        run([sys.executable, '-m', 'mmgroupmamba.seg.demo_data', '--out', 'data/ade_demo', '--num-train', '200',
             '--num-val', '40'])
    run(mim('train', 'mmseg', SEG_CONFIG, '--gpus', '0', '--work-dir', work_dir,
            '--cfg-options', f'randomness.seed={seed}'))


def train_det(seed, work_dir):
    # The shapes data set is written by the config's dataset on first use (data/shapes_coco/).
    run(mim('train', 'mmdet', DET_CONFIG, '--work-dir', work_dir, '--cfg-options', f'randomness.seed={seed}'))


def train_cls(seed, work_dir):
    if not osp.isdir(osp.join(REPO, 'data/groupmamba_cls_demo')):
        run([sys.executable, '-m', 'mmgroupmamba.cls.demo_data', 'data/groupmamba_cls_demo'])
    teacher_dir = osp.join(work_dir, 'teacher')
    run(mim('train', 'mmpretrain', CLS_TEACHER_CONFIG, '--work-dir', teacher_dir,
            '--cfg-options', f'randomness.seed={seed}'))
    run(mim('train', 'mmpretrain', CLS_STUDENT_CONFIG, '--work-dir', work_dir,
            '--cfg-options', f'randomness.seed={seed}', f'model.teacher.checkpoint={teacher_dir}/epoch_8.pth'))


TRAIN = {'seg': train_seg, 'det': train_det, 'cls': train_cls}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('task', choices=sorted(TRAIN))
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--work-root', default='work_dirs/demo_seeds')
    parser.add_argument('--reuse', action='store_true',
                        help="take a seed's metrics from its finished run under --work-root instead of training")
    args = parser.parse_args()
    keys = METRICS[args.task]

    results = {}
    for seed in args.seeds:
        work_dir = osp.join(args.work_root, args.task, f'seed{seed}')
        metrics = final_metrics(work_dir, keys) if args.reuse else None
        if metrics is not None:
            print(f'seed {seed}: reused the finished run in {work_dir}', flush=True)
        else:
            # A fresh directory: an older run's scalars must not be read as this one's.
            shutil.rmtree(osp.join(REPO, work_dir), ignore_errors=True)
            start = time.time()
            TRAIN[args.task](seed, work_dir)
            print(f'seed {seed}: trained in {time.time() - start:.0f} s', flush=True)
            metrics = final_metrics(work_dir, keys)
            if metrics is None:
                sys.exit(f'demo_seeds: no validation with {keys} in {work_dir}/*/vis_data/scalars.json')
        results[seed] = metrics

    width = max(len(key) for key in [*keys, 'metric'])
    print(f'\n{args.task} demo, final validation, seeds {" ".join(map(str, args.seeds))}')
    print(f'{"metric":<{width}}  ' + '  '.join(f'seed {s:<3}' for s in args.seeds) + '  mean      range')
    for key in keys:
        values = [results[s][key] for s in args.seeds]
        print(f'{key:<{width}}  ' + '  '.join(f'{v:<8.4g}' for v in values)
              + f'  {statistics.mean(values):<8.4g}  {min(values):.4g} - {max(values):.4g}')


if __name__ == '__main__':
    main()
