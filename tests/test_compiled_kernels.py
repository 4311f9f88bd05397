"""``benchmarks/compiled_kernels.py`` lists the kernels Inductor launches for the compiled backbone on a machine
without a GPU. Run in its own process (it answers torch's device queries as an H200 would, and conftest.py
turns on Triton's interpreter, whose kernels Inductor cannot compile): for the mini arch, the compiled step
launches each of our Triton kernels as often as the layers call them, no more (no forward kernel recomputed in
the backward, none copied around), and Inductor fuses the glue into its own kernels."""
import os
import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / 'benchmarks' / 'compiled_kernels.py'


def listing(*options):
    """The listing's stdout for the mini arch's det step at 64x64, ``options`` added."""
    env = {k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET'}
    result = subprocess.run([sys.executable, str(SCRIPT), '--arch', 'mini', '--size', '64', '64', *options],
                            capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def tables_of(stdout):
    """The launches table and the statements table, each ``{row: (forward, backward, both)}``."""
    tables, rows = [], None
    for line in stdout.splitlines():
        cells = [cell.strip('* ') for cell in line.strip().strip('|').split('|')]
        if line.startswith('| ') and cells[1] == 'forward':
            rows = {}
            tables.append(rows)
        elif line.startswith('| ') and cells[1].isdigit():
            rows[cells[0]] = tuple(int(c) for c in cells[1:])
    assert len(tables) == 2, stdout[-3000:]
    return tables


def test_compiled_step_kernels_listed_without_a_gpu():
    default_listing = listing()  # in the backbones' compile context
    rows, statements = tables_of(default_listing)
    blocks = 5  # mini: depths 1, 1, 2, 1
    # Per block, forward / backward: three gated-norm launches (the layer's norm, out_norm, the FFN's norm)
    # and their backward; the modulated norm, the channel affinity and the two depthwise convs once each way;
    # the backward reuses the conv's forward kernel for each dx.
    assert rows['ours _gated_norm_fwd_kernel'][:2] == (3 * blocks + 4 + 4, 0)  # + the stem's and 4 stage norms
    assert rows['ours _gated_norm_bwd_kernel'][:2] == (0, 3 * blocks + 4 + 4)
    for kernel in ('_modulated_norm', '_affinity'):
        assert rows[f'ours {kernel}_fwd_kernel'][:2] == (blocks, 0)
        assert rows[f'ours {kernel}_bwd_kernel'][:2] == (0, blocks)
    assert rows['ours _dwconv_fwd_kernel'][:2] == (2 * blocks, 2 * blocks)
    assert rows['ours _dwconv_bwd_pre_kernel'][:2] == (0, 2 * blocks)
    assert rows['inductor poi'][2] > 0
    total = rows['total']
    assert total[2] == total[0] + total[1] == sum(row[2] for name, row in rows.items() if name != 'total')
    # The compile-time line: under the backbones' compile context PyTorch analyses each distinct kernel and
    # argument set once, fewer than the launches of our kernels in the listing.
    ours = sum(row[2] for name, row in rows.items() if name.startswith('ours '))
    calls, distinct = write_analyses(default_listing)
    assert 0 < calls == distinct < ours
    # The wrappers' host work besides the launches: every launch is a statement, passing its arguments.
    assert statements['launches'] == total
    assert statements['launch arguments'][2] > statements['launches'][2]
    assert statements['statements'][2] >= total[2] + statements['buffer allocations'][2]
    # Inductor's peak-memory estimate of each graph, before and after its combo kernels, one pair per graph.
    peaks = re.search(r"^Inductor's peak-memory estimate .*: (.*)$", default_listing, re.M)
    assert peaks and re.fullmatch(r'\d+ -> \d+, \d+ -> \d+', peaks.group(1)), default_listing[-2000:]
    # The pointwise kernels whose elements issue the most loads, each graph's (wrapper_code.widest_elements).
    for phase in ('forward', 'backward'):
        section = default_listing.split(f'\n{phase}: pointwise kernels by the loads each element issues')[1]
        assert re.match(r'[^\n]*\n +\d+ loads x +\d+ elements  triton_poi_', section), section[:500]


def write_analyses(stdout):
    timing = re.search(r'write analysis of user-defined Triton launches (\d+) s in (\d+) calls, for (\d+) distinct',
                       stdout)
    assert timing, stdout[-2000:]
    return int(timing.group(2)), int(timing.group(3))


def test_kept_write_analyses_leave_the_compiled_wrappers_unchanged(tmp_path):
    """The backbones' compile context keeps PyTorch's analysis of our launches by kernel and arguments
    (``models/compiled.py``): the wrappers Inductor writes are the same as without it, line for line, for fewer
    analyses (without it, at least one per launch site)."""
    wrappers, analyses = [], []
    for options in ([], ['--no-memo']):
        out = tmp_path / ('plain' if options else 'kept')
        analyses.append(write_analyses(listing('--top', '1', '--save-code', str(out), *options)))
        # Inductor's cache folder (a fresh temporary one per run) is named in comments only.
        wrappers.append([re.sub(r'\S*/compiled_kernels_\w+/', '', (out / f'{phase}.py').read_text())
                         for phase in ('forward', 'backward')])
    assert wrappers[0] == wrappers[1]
    (kept, distinct), (plain, same_distinct) = analyses
    assert kept == distinct == same_distinct and plain > 3 * kept


def test_regional_listing_counts_each_stage_block_graph_per_block():
    stdout = listing('--regional', '--top', '1')
    assert '4 block graphs for 5 blocks' in stdout, stdout[-2000:]
    rows, _ = tables_of(stdout)
    # Blocks only (the stem's and the stage norms run eagerly): three gated norms and two convs per block, each
    # of the four block graphs counted once per block of its stage.
    assert rows['ours _gated_norm_fwd_kernel'][:2] == (3 * 5, 0)
    assert rows['ours _dwconv_bwd_pre_kernel'][:2] == (0, 2 * 5)
    timing = re.search(r'write analysis of user-defined Triton launches (\d+) s in (\d+) calls', stdout)
    assert timing and int(timing.group(2)) > 0


def test_one_dynamic_compile_of_the_gpu_path_serves_new_sizes():
    """``compile=True`` (symbolic sizes) on the path a GPU runs, where the fused ops' Triton launches and the
    Python choosing their tilings are traced into the graph: three input sizes, one forward graph (a guard on a
    size there would compile again for every new detection batch size). 224x192 gives stage 4 42 tokens, two scan
    checkpoints, where the other sizes' 20-24 tokens give one (a dimension of 1 there was a guard)."""
    script = SCRIPT.parent / 'dynamic_sizes_trace.py'
    env = {k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET'}
    result = subprocess.run([sys.executable, str(script), '--arch', 'mini', '--sizes', '2x128x192', '2x224x192',
                             '2x160x128'], capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    traced = [int(n) for n in re.findall(r'forward graphs traced so far (\d+)', result.stdout)]
    assert traced == [1, 1, 1], result.stdout[-2000:]
