"""Registers and spills of the Triton kernels' default tilings, compiled for sm_90 on the CPU (no GPU needed).

    python benchmarks/kernel_registers.py [--arch 90] [--kernels norm dwconv scan affinity] [--model T]
                                          [--channel-multiple 8]

Each kernel is compiled by Triton for the target (``triton.compile`` with a ``GPUTarget``) at the tilings its
launcher picks for the shapes of GroupMamba ``--model`` (its stages stored as ``--channel-multiple`` makes them:
the model's option of that name), and its PTX assembled by the ptxas that ships with Triton (``ptxas -v``):
registers per thread, spill stores and loads (bytes a thread), and Triton's shared memory.

As Triton's launcher does on the GPU, pointers are compiled as 16-byte aligned and the integer arguments that
are multiples of 16 (strides and widths, taken from each row's shapes) as such: that divisibility decides
whether a row of a map is loaded and stored in 16-byte vectors or element by element. The last two columns
count the kernel's global loads and stores by width (bytes x instructions in the PTX, a thread's share of one
tile: static counts, not executed ones). Many 2-byte accesses in an fp16 kernel mean a width that is not a
multiple of 16 (e.g. GroupMamba-B's stage 3 stored as 424 channels, `--model B --channel-multiple 8`: README,
forty-sixth session; the default stores it as 432). Sizes that only count rows (``N``, ``HW``, ``L``) are left
unspecialised.
A kernel at 255 registers with spills runs few warps per multiprocessor and reloads from local memory: the
first thing to rule out before timing a memory-bound kernel. Pointer dtypes are those of an fp16 AMP step.
The GPU runs its own Triton version, whose counts may differ somewhat. Run it without ``TRITON_INTERPRET``
(the interpreter's kernels do not compile).
"""
import argparse
import os
import re
import subprocess
import tempfile
from collections import Counter

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from mmgroupmamba.kernels import triton_affinity, triton_dwconv, triton_gated_norm, triton_scan
from mmgroupmamba.kernels.layout import CHANNEL_MULTIPLE, group_widths, stored_channels
from mmgroupmamba.kernels.ops_util import ONES_COLUMNS, cdiv
from mmgroupmamba.models.groupmamba import ARCH_SETTINGS

MODELS = {'T': 'tiny', 'S': 'small', 'B': 'base'}
GROUPS = 4
PTXAS = os.path.join(os.path.dirname(triton.__file__), 'backends', 'nvidia', 'bin', 'ptxas')


def ptxas_report(fn, signature, constexprs, arch, num_warps, num_stages=3, ints=None):
    """(registers, spill store bytes, spill load bytes, shared bytes, loads, stores) of ``fn`` compiled for
    ``sm_<arch>``; ``ints``: values of integer arguments, those that are multiples of 16 compiled as such (pointers
    always are), ``loads`` and ``stores`` as :func:`global_accesses` gives them."""
    signature = dict(signature, **{name: 'constexpr' for name in constexprs})
    names = list(signature)
    divisible = [i for i, name in enumerate(names)
                 if signature[name].startswith('*') or (ints or {}).get(name, 1) % 16 == 0]
    source = ASTSource(fn=fn, signature=signature,
                       constexprs={(names.index(name),): value for name, value in constexprs.items()},
                       attrs={(i,): [['tt.divisibility', 16]] for i in divisible})
    kernel = triton.compile(source, target=GPUTarget('cuda', arch, 32),
                            options=dict(num_warps=num_warps, num_stages=num_stages))
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, 'kernel.ptx')
        with open(ptx, 'w') as f:
            f.write(kernel.asm['ptx'])
        suffix = 'a' if arch == 90 else ''
        result = subprocess.run([PTXAS, '--gpu-name', f'sm_{arch}{suffix}', '-v', ptx, '-o', os.devnull],
                                capture_output=True, text=True, check=True)
    return (*parse_ptxas(result.stderr), kernel.metadata.shared, *global_accesses(kernel.asm['ptx']))


# Qualifiers such as L1::evict_last may come between the state space and the vector width.
_GLOBAL_ACCESS = re.compile(r'\b(ld|st)\.global(?:\.[A-Za-z][\w:]*?)*?(?:\.v(\d))?\.[bfus](\d+)\b')


def global_accesses(ptx):
    """``(loads, stores)`` of a PTX listing, each a string of ``<bytes>Bx<instructions>`` from the widest access
    down, e.g. ``16Bx8 4Bx10 2Bx48``."""
    counts = {'ld': Counter(), 'st': Counter()}
    for op, vector, bits in _GLOBAL_ACCESS.findall(ptx):
        counts[op][int(vector or 1) * int(bits) // 8] += 1
    return tuple(' '.join(f'{size}Bx{n}' for size, n in sorted(c.items(), reverse=True)) or '-'
                 for c in (counts['ld'], counts['st']))


def parse_ptxas(report):
    """(registers, spill store bytes, spill load bytes) from ``ptxas -v``'s report of one kernel."""
    registers = stores = loads = 0
    for line in report.splitlines():
        words = line.replace(',', '').split()
        if 'registers' in words:
            registers = int(words[words.index('registers') - 1])
        if 'spill' in words:
            stores = int(words[words.index('stores') - 3])
            loads = int(words[words.index('loads') - 3])
    return registers, stores, loads


NORM_FWD = dict(Y='*fp16', Z='*fp16', W='*fp32', Bias='*fp32', Out='*fp16', Mean='*fp32', Rstd='*fp32',
                Keep='*fp32', Total='*fp16', N='i32', HW='i32', stride_y='i32', stride_z='i32', stride_o='i32',
                stride_t='i32', eps='fp32')
NORM_BWD = dict(DOut='*fp16', Y='*fp16', Z='*fp16', W='*fp32', Bias='*fp32', Mean='*fp32', Rstd='*fp32', DY='*fp16',
                DZ='*fp16', DWBPart='*fp32', Out='*fp16', DTotal='*fp16', Keep='*fp32', N='i32', HW='i32',
                tiles_per_program='i32', stride_do='i32', stride_y='i32', stride_z='i32', stride_dy='i32',
                stride_dz='i32', stride_o='i32', stride_dt='i32', C='i32', part_stride='i32', out_width='i32')
MOD_FWD = dict(Y='*fp16', X='*fp16', S='*fp32', W='*fp32', Bias='*fp32', Out='*fp16', Mean='*fp32', Rstd='*fp32',
               HW='i32', C='i32', C_VALID='i32', eps='fp32')
MOD_BWD = dict(DOut='*fp16', Y='*fp16', X='*fp16', S='*fp32', W='*fp32', Bias='*fp32', Mean='*fp32', Rstd='*fp32',
               DY='*fp16', DX='*fp16', Parts='*fp32', Out='*fp16', HW='i32', C='i32', C_VALID='i32',
               tiles_per_program='i32', part_stride='i32')
DWCONV_FWD = dict(X='*fp16', Wt='*fp32', Bias='*fp32', Out='*fp16', H='i32', W='i32', C='i32', n_cb='i32',
                  n_wb='i32', n_rb='i32', rows_per_prog='i32', stride_xb='i32', stride_xh='i32', stride_xw='i32',
                  stride_ob='i32', stride_oh='i32', stride_ow='i32')
DWCONV_BWD = dict(X='*fp16', Wt='*fp32', Bias='*fp32', DOut='*fp16', DPre='*fp16', Out='*fp16', Part='*fp32',
                  H='i32', W='i32', C='i32', n_cb='i32', n_wb='i32', n_rb='i32', rows_per_prog='i32',
                  stride_xb='i32', stride_xh='i32', stride_xw='i32', stride_db='i32', stride_dh='i32',
                  stride_dw='i32')


def stage_widths(model='T', channel_multiple=CHANNEL_MULTIPLE):
    """``(channels, stored channels, MLP ratio)`` of each stage of GroupMamba ``model``."""
    arch = ARCH_SETTINGS[MODELS[model]]
    return [(channels, stored_channels(channels, channel_multiple), ratio)
            for channels, ratio in zip(arch['embed_dims'], arch['mlp_ratios'])]


def norm_rows(stages=None):
    """(kernel, channels, tiling, fn, signature, constexprs, warps, ints) of every norm kernel at its default
    tiling, on the maps as the model stores them (T's stage of 348 channels padded to 352: kernels/layout.py);
    ``ints`` the integer arguments' values that decide their divisibility (row strides and widths)."""
    norm = triton_gated_norm
    for channels, stored, _ in stages or stage_widths():
        # The residual form: a block's residual add with stochastic depth, and the sum's gradient added backward.
        for name, groups, gated, residual in (('layer norm', 1, False, False),
                                              ('gated group norm', GROUPS, True, False),
                                              ('residual layer norm', 1, False, True)):
            layout = norm._layout_meta(channels, stored, stored, groups)
            per_program, _ = norm._group_tiles(groups, layout['D'], None)
            for backward, fn, signature in ((False, norm._gated_norm_fwd_kernel, NORM_FWD),
                                            (True, norm._gated_norm_bwd_kernel, NORM_BWD)):
                block_n, block_d, warps = norm._tiles(layout['D'], groups_per_program=per_program)
                constexprs = dict(GROUPS=groups, GROUPS_PER_PROGRAM=per_program, **layout, BLOCK_N=block_n,
                                  BLOCK_D=block_d, GATED=gated, HAS_KEEP=residual)
                if backward:
                    constexprs.update(STORE_OUT=True, ADD_DTOTAL=residual, PAD=ONES_COLUMNS)
                    ints = dict(stride_do=stored, stride_y=stored, stride_z=stored, stride_dy=stored,
                                stride_dz=stored, stride_o=stored + ONES_COLUMNS, stride_dt=stored, C=channels,
                                out_width=stored)
                else:
                    constexprs['RESIDUAL'] = residual
                    ints = dict(stride_y=stored, stride_z=stored, stride_o=stored, stride_t=stored)
                yield (f'{name} {"bwd" if backward else "fwd"}', channels,
                       f'block_n={block_n} groups/program={per_program}', fn, signature, constexprs, warps, ints)
        for backward, fn, signature in ((False, norm._modulated_norm_fwd_kernel, MOD_FWD),
                                        (True, norm._modulated_norm_bwd_kernel, MOD_BWD)):
            block_n, block_c, warps = norm._tiles(stored)
            constexprs = dict(**norm._modulated_layout(stored, channels), BLOCK_N=block_n, BLOCK_C=block_c,
                              **({'STORE_OUT': True, 'PAD': ONES_COLUMNS} if backward else {}))
            yield (f'modulated norm {"bwd" if backward else "fwd"}', channels, f'block_n={block_n}', fn, signature,
                   constexprs, warps, dict(C=stored, C_VALID=channels))


def dwconv_rows(stages=None, sms=132):
    """The same for the depthwise conv at the FFN's hidden widths (bs 128, 224x224) and the layer's (its stored
    channels)."""
    conv = triton_dwconv
    for (channels, stored, ratio), side in zip(stages or stage_widths(), (56, 28, 14, 7)):
        for width, act in ((stored, 1), (channels * ratio, 2)):
            for backward in (False, True):
                block_w, block_c, rows, warps, prefetch, stages = conv._tiles_for(
                    (128, side, side, width), sms, backward, None, None, None, None, None, None)
                tiling = f'w={block_w} c={block_c} rows={rows} prefetch={prefetch} stages={stages}'
                if backward:
                    fn, signature = conv._dwconv_bwd_pre_kernel, DWCONV_BWD
                    constexprs = dict(ACT=act, NEED_OUT=act == 2, PREFETCH=prefetch, STAGES=stages,
                                      BLOCK_W=block_w, BLOCK_C=block_c, PAD=ONES_COLUMNS)
                else:
                    fn, signature = conv._dwconv_fwd_kernel, DWCONV_FWD
                    constexprs = dict(ACT=act, HAS_BIAS=True, FLIP=False, PREFETCH=prefetch, STAGES=stages,
                                      BLOCK_W=block_w, BLOCK_C=block_c)
                # Contiguous maps, but the layer's conv reads its input in place as the first half of the input
                # projection's output (GroupMambaLayer.forward): rows of twice its width.
                ints = dict(C=width)
                for m, row in (('x', width * (2 if act == 1 else 1)), ('o', width), ('d', width)):
                    ints.update({f'stride_{m}b': side * side * row, f'stride_{m}h': side * row, f'stride_{m}w': row})
                yield (f'dwconv {"bwd pre" if backward else "fwd"} ({"FFN" if act == 2 else "layer"})', width,
                       tiling, fn, signature, constexprs, warps, ints)


_SCAN_POINTERS = dict(u_ptr='*fp16', dt_ptr='*fp16', A_logs_ptr='*fp32', B_ptr='*fp16', C_ptr='*fp16',
                      D_ptr='*fp32', bias_ptr='*fp32')
SCAN_FWD = dict(_SCAN_POINTERS, y_ptr='*fp16', st_ptr='*fp32', P_ptr='*fp32', E_ptr='*fp32',
                **{n: 'i32' for n in ('L', 'H', 'W', 'CH', 'K', 'bc_stride', 'dt_stride', 'n_cblocks', 'chunk_len',
                                      'n_chunks', 'n_states', 'chunk0')})
SCAN_BWD = dict(_SCAN_POINTERS, dy_ptr='*fp16', st_ptr='*fp32', du_ptr='*fp16', ddt_ptr='*fp16',
                dBC_ptr='*fp32', dADb_ptr='*fp32', P_ptr='*fp32', E_ptr='*fp32',
                **{n: 'i32' for n in ('batch', 'L', 'H', 'W', 'CH', 'K', 'bc_stride', 'dt_stride', 'n_cblocks',
                                      'chunk_len', 'n_chunks', 'n_states', 'chunk0', 'bc_part_stride',
                                      'adb_part_stride')})


def scan_rows(stages=None, sms=132):
    """The same for the scan's forward and backward (their main pass) at bs 128, 224x224, and the main passes of
    the split scans of the detection step's four stages (bs 2, 800x1344), whose programs first compose the
    summaries of the chunks before theirs; on the stored channels."""
    stages = stages or stage_widths()
    cases = [(128, side * side, stored, False) for (_, stored, _), side in zip(stages, (56, 28, 14, 7))]
    cases += [(2, (200 >> i) * (336 >> i), stored, True) for i, (_, stored, _) in enumerate(stages)]
    for batch, length, channels, split in cases:
        config = triton_scan._config_for(batch, length, channels, sms, ((None, None),) * 5)
        for backward, passed in ((False, config.fwd), (True, config.bwd)):
            assert split == (passed.n_chunks(length) > 1), (batch, length, passed)
            # The unsplit backward also in its split form (carry composed from summaries, none here): at the
            # same tiles the two forms compile to different layouts and registers (kernels/README.md).
            forms = (split, True) if backward and not split else (split,)
            for form in forms:
                constexprs = dict(BLOCK_T=passed.block_t, BLOCK_C=passed.block_c, STATE_T=config.state_t,
                                  STAGES=passed.stages, SUMMARY=False,
                                  **({'HAS_GIN': form} if backward else {'HAS_HIN': form, 'SAVE_STATES': True}))
                name = (f'scan {"bwd" if backward else "fwd"}' + (f' (bs {batch}, split)' if split else '')
                        + (' in the split form' if form != split else ''))
                yield (name, channels, f'block_t={passed.block_t} block_c={passed.block_c} stages={passed.stages}',
                       triton_scan._scan_bwd_kernel if backward else triton_scan._scan_fwd_kernel,
                       SCAN_BWD if backward else SCAN_FWD, constexprs, passed.num_warps,
                       dict(CH=channels, K=channels // GROUPS))


AFFINITY_FWD = dict(Pooled='*fp16', W1='*fp32', B1='*fp32', W2='*fp32', B2='*fp32', Skip='*fp32', Scale='*fp32',
                    C='i32', R='i32', S='i32', V='i32', P='i32')
AFFINITY_BWD = dict(DScale='*fp32', Pooled='*fp16', W1='*fp32', B1='*fp32', W2='*fp32', B2='*fp32', Skip='*fp32',
                    DPosition='*fp16', Partials='*fp32', batch='i32', images_per_program='i32', positions='i32',
                    C='i32', R='i32', S='i32', V='i32', P='i32')


def affinity_rows(stages=None, sms=132):
    """The same for the channel affinity (``R = C // 16`` hidden units), its pooled map in the stored layout (348
    channels stored as 352 at T's stage 3; the scale and weights compact). The forward (one program per image)
    once per stage; the backward at bs 2 (detection) and 128 (classification), both one image a program on 132
    multiprocessors, which Triton's launcher passes as the constant 1, and at bs 256, two a program, as a
    runtime count."""
    for channels, stored, _ in stages or stage_widths():
        units = channels // 16
        block_s, block_r, forward_warps, backward_warps = triton_affinity._blocks(stored, units)
        valid, pitch = group_widths(channels, stored)
        ints = dict(C=channels, R=units, S=stored, V=valid, P=pitch)
        yield ('affinity fwd', channels, f'block_s={block_s} block_r={block_r}', triton_affinity._affinity_fwd_kernel,
               AFFINITY_FWD, dict(BLOCK_S=block_s, BLOCK_R=block_r), forward_warps, ints)
        for batch in (2, 128, 256):
            per_program = cdiv(batch, sms)
            constexprs = dict(BLOCK_R=block_r, CHUNK_C=triton_affinity.CHUNK_C)
            if per_program == 1:
                constexprs['images_per_program'] = 1
            yield (f'affinity bwd (bs {batch})', channels,
                   f'block_r={block_r} chunk_c={triton_affinity.CHUNK_C} images/program={per_program}',
                   triton_affinity._affinity_bwd_kernel, AFFINITY_BWD, constexprs, backward_warps, ints)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--arch', type=int, default=90)
    parser.add_argument('--kernels', nargs='+', choices=('norm', 'dwconv', 'scan', 'affinity'),
                        default=['norm', 'dwconv', 'scan', 'affinity'])
    parser.add_argument('--model', choices=list(MODELS), default='T')
    parser.add_argument('--channel-multiple', type=int, default=CHANNEL_MULTIPLE,
                        help="GroupMamba's channel_multiple: the stored widths (default the model's default)")
    args = parser.parse_args(argv)
    stages = stage_widths(args.model, args.channel_multiple)
    print(f'Triton {triton.__version__}, sm_{args.arch}, GroupMamba-{args.model}, stored widths '
          f'{[stored for _, stored, _ in stages]}')
    print('| kernel | channels | tiling | warps | registers | spill stores B | spill loads B | shared B | global loads '
          '| global stores |')
    print('| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- | --- |')
    rows = {'norm': norm_rows, 'dwconv': dwconv_rows, 'scan': scan_rows, 'affinity': affinity_rows}
    for family in args.kernels:
        for name, channels, tiling, fn, signature, constexprs, warps, ints in rows[family](stages):
            report = ptxas_report(fn, signature, constexprs, args.arch, warps, constexprs.get('STAGES', 3), ints)
            print(f'| {name} | {channels} | {tiling} | {warps} | ' + ' | '.join(map(str, report)) + ' |', flush=True)


if __name__ == '__main__':
    main()
