"""``benchmarks/kernel_registers.py``: the norm and channel-affinity kernels' default tilings, compiled for sm_90 on
the CPU (Triton's bundled ptxas), spill no registers; the norms' earlier tiles spilled up to 1.9 KB a thread in
the backward, the affinity's whole-tile backward 1.7 KB. The script runs in its own process: conftest.py turns
on Triton's interpreter, whose kernels do not compile."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / 'benchmarks'
sys.path.insert(0, str(BENCHMARKS))
from kernel_registers import PTXAS, global_accesses, parse_ptxas  # noqa: E402


def test_parse_ptxas_reads_registers_and_spills():
    # ptxas -v for sm_90 on the earlier stage-3 gated-norm backward tile (Triton 3.8).
    report = ("ptxas info    : Compiling entry function '_gated_norm_bwd_kernel' for 'sm_90a'\n"
              "ptxas info    : Function properties for _gated_norm_bwd_kernel\n"
              "    1696 bytes stack frame, 1704 bytes spill stores, 4928 bytes spill loads\n"
              "ptxas info    : Used 255 registers, used 1 barriers, 1696 bytes cumulative stack size\n")
    assert parse_ptxas(report) == (255, 1704, 4928)
    assert parse_ptxas(report.replace('1704 bytes spill stores, 4928', '0 bytes spill stores, 0')
                       .replace('255 registers', '87 registers')) == (87, 0, 0)


def test_global_accesses_count_loads_and_stores_by_width():
    ptx = ('ld.global.v4.b32 {%r1, %r2, %r3, %r4}, [%rd1];\n ld.global.b16 %rs1, [%rd2];\n'
           '@%p1 ld.global.b16 %rs2, [%rd3];\n ld.global.L1::evict_last.v2.b32 {%r5, %r6}, [%rd4];\n'
           'st.global.b32 [%rd5], %r7;\n ld.shared.b32 %r8, [%r9];\n')
    assert global_accesses(ptx) == ('16Bx1 8Bx1 2Bx2', '4Bx1')
    assert global_accesses('ld.shared.b32 %r8, [%r9];') == ('-', '-')


def register_rows(family, *options):
    """The table rows of ``kernel_registers.py --kernels family [options]``, run without the interpreter."""
    env = {k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET'}
    result = subprocess.run([sys.executable, str(BENCHMARKS / 'kernel_registers.py'), '--kernels', family, *options],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return [line.split('|')[1:-1] for line in result.stdout.splitlines() if line.startswith('| ')][2:]


def assert_no_spills(rows):
    for kernel, channels, tiling, warps, registers, stores, loads, shared, *_accesses in rows:
        assert 0 < int(registers) <= 255
        assert (int(stores), int(loads)) == (0, 0), f'{kernel} at {channels} channels ({tiling}): spills'


@pytest.mark.skipif(not Path(PTXAS).exists(), reason='this Triton ships no ptxas')
def test_default_norm_tilings_do_not_spill():
    rows = register_rows('norm')
    assert len(rows) == 4 * 8  # 4 stage widths x 4 norms (the residual form too) x forward and backward
    assert_no_spills(rows)


@pytest.mark.skipif(not Path(PTXAS).exists(), reason='this Triton ships no ptxas')
def test_affinity_kernels_do_not_spill():
    rows = register_rows('affinity')
    # 4 stage widths x (the forward, the backward at bs 2, 128 and 256)
    assert len(rows) == 4 * 4
    assert {row[0].strip() for row in rows} == {'affinity fwd', 'affinity bwd (bs 2)', 'affinity bwd (bs 128)',
                                                'affinity bwd (bs 256)'}
    assert_no_spills(rows)


@pytest.mark.skipif(not Path(PTXAS).exists(), reason='this Triton ships no ptxas')
def test_widths_off_16_compile_to_element_accesses():
    """As on the GPU, widths that are multiples of 16 give the kernels 16-byte row accesses; GroupMamba-B's stage
    3 stored as 424 channels (``channel_multiple=8``) loads its rows 2 bytes at a time, stored as 432 (the default,
    16) it does not."""
    def stage3_conv(*options):
        rows = register_rows('dwconv', '--model', 'B', *options)
        (row,) = [r for r in rows if r[0].strip() == 'dwconv fwd (layer)' and int(r[1]) in (424, 432)]
        return row[8].split()

    assert any(access.startswith('2Bx') for access in stage3_conv('--channel-multiple', '8'))
    vectors = stage3_conv()
    assert any(access.startswith('16Bx') for access in vectors)
    assert not any(access.startswith('2Bx') for access in vectors)
