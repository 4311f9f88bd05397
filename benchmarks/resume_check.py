"""Does resuming lose anything? An interrupted-and-resumed training against the uninterrupted one (issue #20).

    python benchmarks/resume_check.py CONFIG --interrupt-at N [--work-dir DIR] [--noise-floor]
        [--cfg-options KEY=VALUE ...]

Three trainings of CONFIG, each in a process of its own (as a real restart is) and with a work dir of its own:

* ``full``: the whole schedule (``train_cfg.max_epochs`` or ``max_iters``);
* ``interrupted``: the same, stopped by an exception right after the checkpoint of epoch N (epoch-based loops)
  or iteration N (iteration-based loops) was written, as a crash or a preemption at that moment would;
* ``resumed``: a new process that resumes from that checkpoint (``resume=True``, ``load_from=``, what
  ``mim train --resume`` does) and trains to the end.

It prints the largest absolute difference between ``resumed`` and ``full`` of the final checkpoints' model
state (parameters and buffers), EMA parameters (with an EMAHook), optimizer state, param schedulers and stored
random states, and of every training scalar logged after iteration/epoch N (loss terms, lr, grad norm; not
timings). ``interrupted`` against ``full`` at N shows the runs agree up to the interruption. With
``--noise-floor`` a second uninterrupted run measures how far two runs from the same seed drift anyway (e.g.
non-deterministic GPU kernels). Exit status: 0 when ``resumed`` equals ``full`` bitwise, 1 otherwise.

The checkpoint interval is set to N and the logging interval to 1; ``randomness`` defaults to ``seed=0,
deterministic=True`` (on a GPU, ops without a deterministic implementation then raise: pass
``randomness.deterministic=False`` and ``--noise-floor``). CPU, the classification demo, tiny (``DATA`` from
``python -m mmgroupmamba.cls.demo_data``, ``TEACHER`` any weights of the demo teacher)::

    python benchmarks/resume_check.py configs/mmpretrain/demo/groupmamba_mini_distill_demo.py --interrupt-at 2 \\
        --cfg-options train_cfg.max_epochs=4 train_dataloader.dataset.data_root=DATA \\
        val_dataloader.dataset.data_root=DATA model.teacher.checkpoint=TEACHER

GPU, with the backbone's CUDA graphs: the same with ``model.backbone.cuda_graph=True`` (and ``--noise-floor``).
"""
import argparse
import copy
import hashlib
import json
import math
import os
import os.path as osp
import subprocess
import sys

import torch
from mmengine.config import Config, DictAction
from mmengine.hooks import Hook

STAGES = ('full', 'interrupted', 'resumed')
# Logged per iteration but not computed by training: host timings and counters.
NOT_TRAINING_SCALARS = ('time', 'data_time', 'eta', 'memory', 'epoch', 'iter', 'step')


class Interrupted(Exception):
    """Stops the ``interrupted`` run once the checkpoint of the interruption point is on disk."""


class InterruptAfter(Hook):
    """Raises :class:`Interrupted` after epoch (``by_epoch``) or iteration ``at``, once its checkpoint is written."""

    priority = 'LOWEST'  # after CheckpointHook (VERY_LOW) has saved the checkpoint of this epoch/iteration

    def __init__(self, at, by_epoch):
        self.at, self.by_epoch = at, by_epoch

    def after_train_epoch(self, runner):
        if self.by_epoch and runner.epoch + 1 == self.at:
            raise Interrupted(f'interrupted after epoch {self.at}')

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        if not self.by_epoch and runner.iter + 1 == self.at:
            raise Interrupted(f'interrupted after iteration {self.at}')


def is_epoch_based(cfg):
    return 'max_epochs' in cfg.train_cfg


def stage_config(cfg, stage, work_dir, interrupt_at, resume_from=None):
    """``cfg`` for one stage: its work dir and experiment name, a checkpoint at ``interrupt_at``, and for
    ``resumed`` the checkpoint to resume from."""
    if stage not in STAGES and not stage.startswith('full'):
        raise ValueError(f'unknown stage {stage!r}')
    cfg = copy.deepcopy(cfg)
    cfg.work_dir = str(work_dir)
    # mmengine's logger and visualizer are instances looked up by name: one of their own for each run in a
    # process (mmdet's and mmseg's configs name their visualizer 'visualizer').
    name = f'resume_check_{stage}_{hashlib.sha1(osp.abspath(work_dir).encode()).hexdigest()[:8]}'
    cfg.experiment_name = name
    if cfg.get('visualizer'):
        cfg.visualizer.name = name
    by_epoch = is_epoch_based(cfg)
    last = cfg.train_cfg.max_epochs if by_epoch else cfg.train_cfg.max_iters
    if not 0 < interrupt_at < last:
        raise ValueError(f'--interrupt-at {interrupt_at} must lie inside the schedule of {last} '
                         f'{"epochs" if by_epoch else "iterations"}')
    # Every checkpoint kept: the full run's at the interruption point is compared too.
    cfg.default_hooks.checkpoint.update(interval=interrupt_at, by_epoch=by_epoch, max_keep_ckpts=-1)
    cfg.default_hooks.logger.interval = 1  # every iteration's losses logged, to compare them all
    if stage == 'resumed':
        if resume_from is None:
            raise ValueError('the resumed stage needs the checkpoint to resume from')
        cfg.resume, cfg.load_from = True, str(resume_from)
    else:
        cfg.resume = False
    return cfg


def run_stage(cfg, stage, interrupt_at):
    """Train ``cfg`` (from :func:`stage_config`) in this process; ``interrupted`` stops after ``interrupt_at``.

    Returns the run's log dir, last checkpoint and seed.
    """
    from mmengine.runner import Runner
    runner = Runner.from_cfg(cfg)
    if stage == 'interrupted':
        runner.register_hook(InterruptAfter(interrupt_at, is_epoch_based(cfg)))
    try:
        runner.train()
    except Interrupted:
        pass
    else:
        if stage == 'interrupted':
            raise RuntimeError(f'the interrupted run reached the end without passing {interrupt_at}')
    with open(osp.join(cfg.work_dir, 'last_checkpoint')) as f:
        checkpoint = f.read().strip()
    return dict(log_dir=runner.log_dir, checkpoint=checkpoint, seed=runner.seed)


def load_checkpoint(path):
    import mmgroupmamba  # noqa: F401  (the allow-list of mmengine's non-tensor types)
    return torch.load(path, map_location='cpu', weights_only=True)


def checkpoint_groups(checkpoint):
    """What training carries in a checkpoint, by kind.

    mmengine's EMAHook saves the averaged weights as ``state_dict`` and the trained ones (``module.*``, with the
    EMA's step count) as ``ema_state_dict``.
    """
    groups = {}
    if 'ema_state_dict' in checkpoint:
        ema = checkpoint['ema_state_dict']
        groups['model state'] = {k[len('module.'):]: v for k, v in ema.items() if k.startswith('module.')}
        groups['EMA parameters'] = dict(checkpoint['state_dict'], steps=ema.get('steps'))
    else:
        groups['model state'] = checkpoint['state_dict']
    for name, key in (('optimizer state', 'optimizer'), ('param schedulers', 'param_schedulers'),
                      ('random states', 'random_states')):
        if key in checkpoint:
            groups[name] = checkpoint[key]
    return groups


class Difference:
    """Largest |a - b| over the leaves of two nested structures, and whether they are bitwise equal."""

    def __init__(self):
        self.max_abs, self.leaves, self.identical, self.first = 0.0, 0, True, None

    def add(self, a, b, path):
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b), key=str):
                if key not in a or key not in b:
                    self._differs(math.inf, f'{path}.{key} (only in {"full" if key in a else "resumed"})')
                else:
                    self.add(a[key], b[key], f'{path}.{key}')
        elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
            if len(a) != len(b):
                self._differs(math.inf, f'{path} (length {len(a)} vs {len(b)})')
            for i, (x, y) in enumerate(zip(a, b)):
                self.add(x, y, f'{path}[{i}]')
        elif isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            self.leaves += 1
            if a.shape != b.shape or a.dtype != b.dtype:
                self._differs(math.inf, f'{path} ({a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)})')
            elif not _bitwise_equal(a, b):
                x, y = a.double(), b.double()
                both_nan = x.isnan() & y.isnan()
                self._differs(float((x - y).abs().masked_fill(both_nan, 0).max()) if a.numel() else 0.0, path)
        else:
            self.leaves += 1
            if type(a) is not type(b) or a != b:
                numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, b))
                self._differs(abs(a - b) if numeric else math.inf, f'{path} ({a!r} vs {b!r})')

    def _differs(self, amount, path):
        self.identical = False
        self.first = self.first or path
        self.max_abs = max(self.max_abs, amount)


def _bitwise_equal(a, b):
    if a.is_floating_point() or a.is_complex():
        bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64, 16: torch.int64}[a.element_size()]
        a, b = a.contiguous().view(bits), b.contiguous().view(bits)
    return torch.equal(a, b)


def logged_training_scalars(log_dir):
    """The training records of mmengine's ``scalars.json`` (what LoggerHook logged), by iteration."""
    records = {}
    with open(osp.join(log_dir, 'vis_data', 'scalars.json')) as f:
        for line in f:
            record = json.loads(line)
            if 'loss' in record:  # validation records carry metrics, not a loss
                records[record['iter']] = {k: v for k, v in record.items() if k not in NOT_TRAINING_SCALARS}
    return records


def compare(reference, other, after_iter=0):
    """Differences between two runs' results (from :func:`run_stage`): final checkpoints by kind, then every
    logged training scalar after ``after_iter``. Returns ``{name: Difference}``."""
    differences = {}
    ref_groups = checkpoint_groups(load_checkpoint(reference['checkpoint']))
    other_groups = checkpoint_groups(load_checkpoint(other['checkpoint']))
    for name in list(ref_groups) + [n for n in other_groups if n not in ref_groups]:
        difference = differences[name] = Difference()
        difference.add(ref_groups.get(name), other_groups.get(name), name)
    ref_logged = {i: r for i, r in logged_training_scalars(reference['log_dir']).items() if i > after_iter}
    other_logged = {i: r for i, r in logged_training_scalars(other['log_dir']).items() if i > after_iter}
    if not ref_logged:
        differences['logged iterations'] = none = Difference()
        none._differs(math.inf, f'none logged after iteration {after_iter}')
    elif sorted(ref_logged) != sorted(other_logged):
        differences['logged iterations'] = missing = Difference()
        missing._differs(math.inf, f'{sorted(ref_logged)} vs {sorted(other_logged)}')
    for key in sorted({k for record in ref_logged.values() for k in record}):
        difference = differences[f'logged {key}'] = Difference()
        for i in sorted(set(ref_logged) & set(other_logged)):
            difference.add(ref_logged[i].get(key), other_logged[i].get(key), f'iter {i}')
    return differences


def report(differences, title):
    rows = [(name, str(d.leaves), 'bitwise equal' if d.identical else f'{d.max_abs:.3g}', d.first or '')
            for name, d in differences.items()]
    widths = [max(len(row[i]) for row in rows + [(title, 'values', 'max |difference|', 'first difference')])
              for i in range(4)]
    lines = [' | '.join(cell.ljust(w) for cell, w in zip((title, 'values', 'max |difference|', 'first difference'),
                                                        widths))]
    lines.append('-+-'.join('-' * w for w in widths))
    lines += [' | '.join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    return '\n'.join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('config')
    parser.add_argument('--interrupt-at', type=int, required=True,
                        help='epoch (epoch-based loops) or iteration (iteration-based) after which to stop')
    parser.add_argument('--work-dir', default='work_dirs/resume_check')
    parser.add_argument('--noise-floor', action='store_true', help='a second uninterrupted run, to compare too')
    parser.add_argument('--cfg-options', nargs='+', default=[], metavar='KEY=VALUE',
                        help='config overrides, as for mim train (applied after the randomness defaults)')
    parser.add_argument('--stage', help=argparse.SUPPRESS)  # internal: run one stage in this process
    parser.add_argument('--resume-from', help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def load_config(args):
    cfg = Config.fromfile(args.config)
    cfg.randomness = dict(seed=0, deterministic=True)
    options = {}
    for option in args.cfg_options:
        key, sep, value = option.partition('=')
        if not sep:
            raise ValueError(f'--cfg-options takes KEY=VALUE, got {option!r}')
        options[key] = DictAction._parse_iterable(value)  # what mmengine's DictAction does with each value
    cfg.merge_from_dict(options)
    return cfg


def main(argv=None):
    args = parse_args(argv)
    cfg = load_config(args)
    if args.stage:  # one stage, in this process: write its result for the parent
        stage_cfg = stage_config(cfg, args.stage, osp.join(args.work_dir, args.stage), args.interrupt_at,
                                 args.resume_from)
        result = run_stage(stage_cfg, args.stage, args.interrupt_at)
        with open(osp.join(args.work_dir, f'{args.stage}.json'), 'w') as f:
            json.dump(result, f)
        return 0

    os.makedirs(args.work_dir, exist_ok=True)
    env = dict(os.environ)
    env.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')  # cuBLAS is deterministic only with it
    base = [sys.executable, osp.abspath(__file__), args.config, '--interrupt-at', str(args.interrupt_at),
            '--work-dir', args.work_dir]
    if args.cfg_options:
        base += ['--cfg-options'] + args.cfg_options
    results = {}
    for stage in STAGES[:2] + (('full_again', ) if args.noise_floor else ()) + STAGES[2:]:
        extra = ['--resume-from', results['interrupted']['checkpoint']] if stage == 'resumed' else []
        log = osp.join(args.work_dir, f'{stage}.log')
        print(f'== {stage} (log: {log})', flush=True)
        with open(log, 'w') as out:
            returncode = subprocess.run(base + ['--stage', stage] + extra, stdout=out, stderr=subprocess.STDOUT,
                                        env=env).returncode
        if returncode:
            with open(log) as f:
                print(f.read()[-6000:])
            raise SystemExit(f'the {stage} run failed (exit status {returncode}); its log: {log}')
        with open(osp.join(args.work_dir, f'{stage}.json')) as f:
            results[stage] = json.load(f)

    with open(osp.join(args.work_dir, 'resumed.log')) as f:
        hook_lines = [line.rstrip() for line in f if 'RandomStateHook:' in line]
    print('\nthe resumed run\'s RandomStateHook: ' + ('\n  ' + '\n  '.join(hook_lines) if hook_lines else
                                                   'nothing logged (is the hook in custom_hooks?)'))
    by_epoch = is_epoch_based(cfg)
    unit = 'epoch' if by_epoch else 'iteration'
    full_at_n = dict(results['full'], checkpoint=osp.join(osp.dirname(results['full']['checkpoint']),
                                                          f'{"epoch" if by_epoch else "iter"}_{args.interrupt_at}.pth'))
    interrupted_iter = load_checkpoint(results['interrupted']['checkpoint'])['meta']['iter']
    before = compare(full_at_n, results['interrupted'])
    print(f'\ninterrupted vs full, at {unit} {args.interrupt_at} (checkpoints and all logged iterations up to it)')
    print(report({k: v for k, v in before.items() if not k.startswith('logged')} |
                 _logged_up_to(before, full_at_n, results['interrupted'], interrupted_iter), 'quantity'))
    if args.noise_floor:
        print('\nfull again vs full, at the end (two uninterrupted runs from the same seed)')
        print(report(compare(results['full'], results['full_again']), 'quantity'))
    after = compare(results['full'], results['resumed'], after_iter=interrupted_iter)
    print(f'\nresumed vs full, at the end (checkpoints, and every iteration logged after {unit} '
          f'{args.interrupt_at} = iteration {interrupted_iter})')
    print(report(after, 'quantity'))
    exact = all(d.identical for d in after.values())
    print('\nresumed run ' + ('equals the uninterrupted one bitwise' if exact else
                              'DIFFERS from the uninterrupted one'))
    return 0 if exact else 1


def _logged_up_to(differences, reference, other, last_iter):
    """The logged scalars of both runs up to ``last_iter`` (the full run logs beyond it)."""
    ref = {i: r for i, r in logged_training_scalars(reference['log_dir']).items() if i <= last_iter}
    oth = logged_training_scalars(other['log_dir'])
    out = {}
    if not ref:
        out['logged iterations'] = none = Difference()
        none._differs(math.inf, f'none logged up to iteration {last_iter}')
    for key in sorted({k for record in ref.values() for k in record}):
        difference = out[f'logged {key}'] = Difference()
        for i in sorted(ref):
            difference.add(ref[i].get(key), oth.get(i, {}).get(key), f'iter {i}')
    return out


if __name__ == '__main__':
    sys.exit(main())
