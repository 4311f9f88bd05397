"""RandomStateHook: the random states of training go into every checkpoint and come back on resume (issue #20).

What mmengine 0.10.7's resume already restores: the epoch and iteration (so the samplers shuffle from
``seed + epoch`` as before, and ``IterBasedTrainLoop`` skips the batches already trained), the message hub,
the optimizer, the param schedulers and, with ``EMAHook``, the averaged weights. What it does not: it seeds the
global generators again instead of continuing them, so after a resume Mixup/CutMix (numpy, torch), stochastic
depth (torch, on the model's device), the detectors' RoI sampling (torch) and the data augmentation of the main
process (numpy, ``random``) draw other numbers than the uninterrupted run. And when the config leaves
``randomness.seed`` unset, the resumed run's sampler and dataloader workers are seeded with the new run's seed,
while mmengine puts only the global generators back on the checkpoint's.

:class:`RandomStateHook` stores, per rank, the states of torch's CPU generator, the CUDA generators of every
device, numpy's global generator and Python's ``random``, and the seeds the train sampler and the dataloader
workers derive theirs from. On resume it puts all of them back right before the first batch is drawn, so the
resumed run draws exactly the numbers the uninterrupted run would have. Validation during training runs on a
copy of the training's states (put back afterwards), so a run validated after a checkpoint continues from that
checkpoint's states.

Everything is stored as plain data (tensors, ints, floats, strings, lists, dicts): checkpoints stay loadable
with ``torch.load(weights_only=True)`` and nothing is added to its allow-list.
"""
import functools
import logging
import random

import numpy as np
import torch
from mmengine.dataset import InfiniteSampler
from mmengine.dist import all_gather_object, get_rank, get_world_size
from mmengine.hooks import CheckpointHook, Hook
from mmengine.logging import print_log
from mmengine.registry import HOOKS
from mmengine.runner import EpochBasedTrainLoop, IterBasedTrainLoop

CHECKPOINT_KEY = 'random_states'
FORMAT = 1


def capture_random_states():
    """This process's global generators as plain data.

    ``torch``: the CPU generator's state (uint8 tensor); ``cuda``: one state per CUDA device (when CUDA is
    available); ``numpy``: the global RandomState's MT19937 state (its 624 32-bit keys as an int64 tensor);
    ``python``: ``random``'s state (625 ints).
    """
    bit_generator, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    states = dict(
        torch=torch.get_rng_state(),
        # int64, not uint32: torch 2.14 cannot unpickle a uint32 tensor pickled without torch.save (as
        # all_gather_object does with the ranks' states).
        numpy=dict(bit_generator=str(bit_generator), keys=torch.from_numpy(np.array(keys, dtype=np.int64)),
                   pos=int(pos), has_gauss=int(has_gauss), cached_gaussian=float(cached_gaussian)),
        python=dict(version=int(version), internal=[int(v) for v in internal],
                    gauss_next=None if gauss_next is None else float(gauss_next)),
    )
    if torch.cuda.is_available():
        states['cuda'] = torch.cuda.get_rng_state_all()
    return states


def restore_random_states(states):
    """Set this process's global generators to ``states`` (from :func:`capture_random_states`).

    Returns what was restored, in words. CUDA states of more devices than this process sees, or of none while it
    has CUDA, are reported with a warning: those generators keep their seeded state.
    """
    for key in ('torch', 'numpy', 'python'):
        if key not in states:
            raise KeyError(f'RandomStateHook: the stored random states have no {key!r} entry (keys: {sorted(states)})')
    numpy_state = states['numpy']
    python_state = states['python']
    # .cpu(): a resumed GPU run's checkpoint is loaded onto the GPU (mmengine's map_location), and the
    # generators take their states as CPU tensors only.
    torch.set_rng_state(states['torch'].cpu())
    np.random.set_state((numpy_state['bit_generator'], numpy_state['keys'].cpu().numpy().astype(np.uint32),
                         numpy_state['pos'], numpy_state['has_gauss'], numpy_state['cached_gaussian']))
    random.setstate((python_state['version'], tuple(python_state['internal']), python_state['gauss_next']))
    restored = ['torch CPU', 'numpy', 'random']

    saved_cuda = states.get('cuda')
    devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if saved_cuda:
        for device, state in enumerate(saved_cuda[:devices]):
            torch.cuda.set_rng_state(state.cpu(), device)
        if devices:
            restored.append(f'CUDA ({min(devices, len(saved_cuda))} device{"s" if devices > 1 else ""})')
        if len(saved_cuda) != devices:
            print_log(f'RandomStateHook: the checkpoint holds the CUDA generators of {len(saved_cuda)} devices and '
                      f'this process sees {devices}; '
                      + ('the generators of the other devices keep their seeded state.' if devices else
                         'their draws (e.g. stochastic depth on the GPU) do not carry over to the CPU generator.'),
                      logger='current', level=logging.WARNING)
    elif devices:
        print_log('RandomStateHook: the checkpoint holds no CUDA generator states (it was saved without CUDA); '
                  'the CUDA generators keep their seeded state.', logger='current', level=logging.WARNING)
    return restored


def _seeded_sampler(dataloader):
    """The sampler that shuffles from a ``seed`` attribute (mmengine's DefaultSampler, InfiniteSampler), if any."""
    for sampler in (getattr(dataloader, 'sampler', None),
                    getattr(getattr(dataloader, 'batch_sampler', None), 'sampler', None)):
        if isinstance(getattr(sampler, 'seed', None), int):
            return sampler
    return None


def dataloader_seeds(dataloader):
    """The seeds a train dataloader's order and workers derive from: the sampler's (order: ``seed + epoch``)
    and the one mmengine's ``worker_init_fn`` seeds each worker with (``seed + worker id + rank * workers``)."""
    seeds = {}
    sampler = _seeded_sampler(dataloader)
    if sampler is not None:
        seeds['sampler'] = int(sampler.seed)
    init_fn = getattr(dataloader, 'worker_init_fn', None)
    if isinstance(init_fn, functools.partial) and isinstance(init_fn.keywords.get('seed'), int):
        seeds['worker_init_fn'] = int(init_fn.keywords['seed'])
    return seeds


def restore_dataloader_seeds(dataloader, seeds):
    """Give ``dataloader``'s sampler and worker_init_fn the stored seeds; returns the changes made, in words.

    Call it before the dataloader's next iterator is created: iterators take both when they start.
    """
    changes = []
    sampler = _seeded_sampler(dataloader)
    if 'sampler' in seeds:
        if sampler is None:
            print_log(f'RandomStateHook: the checkpoint holds the train sampler\'s seed {seeds["sampler"]}, but '
                      f'this run\'s sampler ({type(getattr(dataloader, "sampler", None)).__name__}) takes none; '
                      'its order may differ from the interrupted run\'s.', logger='current', level=logging.WARNING)
        elif sampler.seed != seeds['sampler']:
            changes.append(f'sampler seed {sampler.seed} -> {seeds["sampler"]}')
            sampler.seed = seeds['sampler']
            if isinstance(sampler, InfiniteSampler):
                # Its infinite index stream is a generator that seeds itself once, when it starts: start it anew.
                sampler.indices = sampler._indices_of_rank()
    if 'worker_init_fn' in seeds:
        init_fn = getattr(dataloader, 'worker_init_fn', None)
        if isinstance(init_fn, functools.partial) and 'seed' in init_fn.keywords:
            if init_fn.keywords['seed'] != seeds['worker_init_fn']:
                changes.append(f'worker_init_fn seed {init_fn.keywords["seed"]} -> {seeds["worker_init_fn"]}')
                dataloader.worker_init_fn = functools.partial(
                    init_fn.func, *init_fn.args, **dict(init_fn.keywords, seed=seeds['worker_init_fn']))
        else:
            print_log(f'RandomStateHook: the checkpoint holds the dataloader workers\' seed '
                      f'{seeds["worker_init_fn"]}, but this run\'s worker_init_fn ({init_fn!r}) takes none; the '
                      'workers\' augmentation may differ from the interrupted run\'s.', logger='current',
                      level=logging.WARNING)
    return changes


class _RestoreAfterSkipping:
    """IterBasedTrainLoop's data iterator while the loop skips the batches trained before the checkpoint.

    mmengine skips them by loading them again, and their data augmentation draws random numbers (in this
    process with ``num_workers=0``). So the states are restored after those ``skip`` batches, right before the
    first batch to train is drawn; then the loop gets its own iterator back.
    """

    def __init__(self, loop, iterator, skip, restore):
        self._loop, self._iterator, self._skip, self._restore = loop, iterator, skip, restore

    def __iter__(self):
        return self

    def __next__(self):
        if self._skip > 0:
            self._skip -= 1
            return next(self._iterator)
        self._loop.dataloader_iterator = self._iterator
        self._restore()
        return next(self._iterator)


@HOOKS.register_module()
class RandomStateHook(Hook):
    """Store every random state training uses in the checkpoints and restore it on resume.

    Add it to a config with ``custom_hooks = [..., dict(type='RandomStateHook')]`` (registered in mmengine's
    root registry by ``import mmgroupmamba``, so any scope finds it). Checkpoints get a top-level
    ``random_states`` entry: ``dict(format, world_size, ranks=[per rank: dict(generators, dataloader)])``.

    Resuming is then exact (bitwise on the CPU) except where random state lives outside this process or is
    not random state at all; the hook warns at resume about the first two (and about a checkpoint without
    random states, or from another number of ranks):

    * persistent dataloader workers (``persistent_workers=True``) in an epoch-based loop keep their generators
      in their own processes across epochs; after a resume they start again from their seeds. Iteration-based
      loops are exact: mmengine's skip of the trained batches replays the workers' draws;
    * a checkpoint written inside an epoch of an epoch-based loop: mmengine starts that epoch again from its
      first batch;
    * non-deterministic kernels (CUDA atomics, cuDNN without ``randomness.deterministic=True``) and the
      resumed process's own autotuning give other numerics, random states or not;
    * work a resumed process does again and that draws numbers without putting the generators back (the CUDA
      graph recording of ``cuda_graph=True`` does put them back after its warm-up passes: docs/resuming.md).

    In distributed runs every rank's states are stored: they are gathered on all ranks where a checkpoint can
    be written (after each epoch; after each iteration when a CheckpointHook saves by iteration; before
    validation) and resumed with the same number of ranks.
    """

    priority = 'HIGHEST'  # restores before any other hook of the first resumed epoch draws a number

    def __init__(self):
        self._resumed = None  # this rank's stored states, from after_load_checkpoint until restored
        self._outside_validation = None  # every rank's states while validation runs during training
        self._gathered = None  # distributed: (iteration, every rank's states) where a checkpoint can be written
        self._training = False

    # ------------------------------------------------------------------------------------------------ saving
    def _local_states(self, runner):
        return dict(generators=capture_random_states(), dataloader=dataloader_seeds(runner.train_loop.dataloader))

    def _all_ranks(self, runner):
        local = self._local_states(runner)
        return [local] if get_world_size() == 1 else all_gather_object(local)

    def before_train(self, runner):
        self._training = True

    def after_train(self, runner):
        self._training = False

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        if get_world_size() > 1 and any(isinstance(hook, CheckpointHook) and not hook.by_epoch
                                        for hook in runner.hooks):
            self._gathered = (runner.iter, self._all_ranks(runner))

    def after_train_epoch(self, runner):
        if get_world_size() > 1:
            self._gathered = (runner.iter, self._all_ranks(runner))

    def before_val(self, runner):
        if self._training:
            self._outside_validation = self._all_ranks(runner)

    def after_val(self, runner):
        if self._outside_validation is not None:
            restore_random_states(self._outside_validation[get_rank()]['generators'])
            self._outside_validation = None

    def before_save_checkpoint(self, runner, checkpoint):
        if self._outside_validation is not None:  # e.g. CheckpointHook's save_best: the training's states
            ranks = self._outside_validation
        elif get_world_size() == 1:
            ranks = [self._local_states(runner)]
        elif self._gathered is not None and self._gathered[0] == runner.iter:
            ranks = self._gathered[1]
        else:
            raise RuntimeError(
                f'RandomStateHook: a checkpoint is being saved at iteration {runner.iter}, where the '
                f'{get_world_size()} ranks\' random states were not gathered (that happens after each epoch, after '
                'each iteration when a CheckpointHook saves by iteration, and before validation). Save checkpoints '
                'at those points, or remove RandomStateHook to resume without exact random states.')
        checkpoint[CHECKPOINT_KEY] = dict(format=FORMAT, world_size=len(ranks), ranks=ranks)

    # ------------------------------------------------------------------------------------------------ resuming
    def after_load_checkpoint(self, runner, checkpoint):
        if not runner._resume:  # load_from without resume starts a new training: nothing to continue
            return
        stored = checkpoint.get(CHECKPOINT_KEY)
        if stored is None:
            print_log('RandomStateHook: the checkpoint holds no random states (it was saved without '
                      'RandomStateHook): the resumed run continues from freshly seeded generators and draws other '
                      'random numbers than the interrupted run would have.', logger='current', level=logging.WARNING)
            return
        if stored.get('format') != FORMAT or not isinstance(stored.get('ranks'), list):
            raise ValueError(f'RandomStateHook: unknown random-state format in the checkpoint '
                             f'(format {stored.get("format")!r}, this version reads {FORMAT})')
        if stored['world_size'] != get_world_size():
            print_log(f'RandomStateHook: the checkpoint holds the random states of {stored["world_size"]} ranks and '
                      f'this run has {get_world_size()}: they are not restored, and the resumed run draws other '
                      'random numbers than the interrupted run would have.', logger='current', level=logging.WARNING)
            return
        self._resumed = stored['ranks'][get_rank()]

    def before_train_epoch(self, runner):
        if self._resumed is None:
            return
        states, self._resumed = self._resumed, None
        loop = runner.train_loop
        changes = restore_dataloader_seeds(loop.dataloader, states['dataloader'])
        if changes:
            print_log('RandomStateHook: this run was seeded otherwise than the checkpoint (randomness.seed unset?); '
                      f'set back: {", ".join(changes)}', logger='current')
        self._warn_where_inexact(runner)

        def restore():
            restored = restore_random_states(states['generators'])
            print_log(f'RandomStateHook: restored the random states of iteration {runner.iter} '
                      f'({", ".join(restored)})', logger='current')

        if isinstance(loop, IterBasedTrainLoop):
            if changes:  # its iterator (and workers) started with the other seeds when the loop was built
                loop.dataloader_iterator = type(loop.dataloader_iterator)(loop.dataloader)
            loop.dataloader_iterator = _RestoreAfterSkipping(loop, loop.dataloader_iterator, runner.iter, restore)
        else:  # EpochBasedTrainLoop and others: the epoch's data iterator starts after this hook
            restore()

    def _warn_where_inexact(self, runner):
        loop = runner.train_loop
        if not isinstance(loop, EpochBasedTrainLoop):
            return
        dataloader = loop.dataloader
        if dataloader.num_workers > 0 and dataloader.persistent_workers:
            print_log('RandomStateHook: the train dataloader\'s workers are persistent: their random states live in '
                      'the worker processes across epochs and are not in the checkpoint, so the data augmentation '
                      'of the resumed epochs differs from the uninterrupted run\'s. For an exact resume, train with '
                      'train_dataloader.persistent_workers=False.', logger='current', level=logging.WARNING)
        if runner.iter != runner.epoch * len(dataloader):
            print_log(f'RandomStateHook: the checkpoint was saved inside epoch {runner.epoch + 1} (iteration '
                      f'{runner.iter}); mmengine\'s EpochBasedTrainLoop trains that epoch again from its first '
                      'batch, so the resumed run does not repeat the uninterrupted one. Save checkpoints at epoch '
                      'ends for an exact resume.', logger='current', level=logging.WARNING)
