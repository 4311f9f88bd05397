"""``benchmarks/backbone_speed.py`` builds, for each GroupMamba size, the Swin Transformer of that size, and takes
each row's ratios to it (the timing itself runs on a GPU only)."""
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'benchmarks'))
import backbone_speed  # noqa: E402
from backbone_speed import allocator_setting, baseline, build_backbones, swin_config  # noqa: E402


def test_each_row_is_compared_with_the_swin_of_its_size_in_its_mode():
    assert baseline('GroupMamba-T') == 'Swin-T'
    assert baseline('GroupMamba-S +graphs') == 'Swin-S +graphs'
    assert baseline('GroupMamba-B +compile') == 'Swin-B +compile'
    assert baseline('Swin-B +compile') == 'Swin-B +compile'


def test_a_row_without_its_baseline_is_found_before_timing():
    graphed_alone = ['GroupMamba-T +graphs']
    assert backbone_speed.missing_baselines(graphed_alone) == ['Swin-T +graphs']
    assert backbone_speed.missing_baselines(graphed_alone, against='Swin-T +compile') == ['Swin-T +compile']
    assert backbone_speed.missing_baselines(graphed_alone + ['Swin-T +compile'], against='Swin-T +compile') == []
    assert backbone_speed.missing_baselines(['Swin-S', 'GroupMamba-S', 'GroupMamba-T']) == ['Swin-T']


def test_swin_b_takes_the_published_b_settings_and_s_is_mmdets():
    cfg, channels = swin_config('B', 0.3)
    assert (cfg.embed_dims, list(cfg.depths), list(cfg.num_heads), cfg.window_size) == (128, [2, 2, 18, 2],
                                                                                        [4, 8, 16, 32], 7)
    assert channels == 1024 and cfg.drop_path_rate == 0.3 and 'init_cfg' not in cfg
    cfg, channels = swin_config('S', 0.2)
    assert (cfg.embed_dims, list(cfg.depths), list(cfg.num_heads), channels) == (96, [2, 2, 18, 2], [3, 6, 12, 24],
                                                                                 768)


def test_backbones_of_each_size_with_their_last_channels():
    backbones = build_backbones(['T', 'B'], [''], 0.1)
    assert list(backbones) == ['Swin-T', 'GroupMamba-T', 'Swin-B', 'GroupMamba-B']
    images = torch.randn(1, 3, 64, 64)
    for name, (backbone, channels) in backbones.items():
        backbone.eval()  # not chained: mmdet's SwinTransformer.train() returns None
        with torch.no_grad():
            assert backbone(images)[-1].shape[1] == channels, name
    params = {name: sum(p.numel() for p in backbone.parameters()) / 1e6 for name, (backbone, _) in backbones.items()}
    # Swin-B is about 87M parameters without a head (Swin's paper: 88M with its classifier).
    assert 86 < params['Swin-B'] < 88, params


def test_groupmamba_options_reach_groupmamba_only():
    """--groupmamba-options: padded and unpadded GroupMamba timed against the same Swin in one call."""
    backbones = build_backbones(['T'], [''], 0.1, groupmamba_options={'channel_multiple': 1})
    assert backbones['GroupMamba-T'][0].stored_dims == [64, 128, 348, 448]
    assert build_backbones(['T'], [''], 0.1)['GroupMamba-T'][0].stored_dims == [64, 128, 352, 448]


def test_compiled_rows_ask_for_static_launches_before_any_row_compiles(monkeypatch):
    """Swin's compiled row runs first and would start Inductor's compile workers without the variable that lets
    them launch GroupMamba's kernels statically: building the rows sets it, unless a row's options turn that off."""
    from types import SimpleNamespace

    from torch._inductor.async_compile import AsyncCompile

    from mmgroupmamba.models.compiled import STATIC_USER_KERNELS, STATIC_USER_KERNELS_ENV

    monkeypatch.setattr(AsyncCompile, 'process_pool', SimpleNamespace(cache_info=lambda: SimpleNamespace(currsize=0)))
    monkeypatch.delenv(STATIC_USER_KERNELS_ENV, raising=False)
    build_backbones(['T'], [' +compile'], 0.1, compile_options={'options': {STATIC_USER_KERNELS: False}})
    assert STATIC_USER_KERNELS_ENV not in os.environ
    assert list(build_backbones(['T'], [' +compile'], 0.1)) == ['Swin-T +compile', 'GroupMamba-T +compile']
    assert os.environ[STATIC_USER_KERNELS_ENV] == '1'


def test_every_detection_row_is_timed_before_any_is_profiled(monkeypatch):
    # A profiler run can leave CUPTI attached and slow every later launch: no timing may follow a count.
    calls = []
    monkeypatch.setattr(backbone_speed, 'detection_step', lambda backbone, steps: calls.append(('time', backbone))
                        or 10.0 * len(calls))
    monkeypatch.setattr(backbone_speed, 'detection_launches', lambda backbone: calls.append(('count', backbone))
                        or len(calls))
    rows = backbone_speed.detection_rows({'Swin-T': ('swin', 768), 'GroupMamba-T': ('gm', 768)}, 5,
                                         report=lambda *args, **kwargs: None)
    assert calls == [('time', 'swin'), ('time', 'gm'), ('count', 'swin'), ('count', 'gm')]
    assert rows == {'Swin-T': (10.0, 3), 'GroupMamba-T': (20.0, 4)}


def test_garbage_collections_are_counted_and_timed():
    import gc
    with backbone_speed.garbage_collections() as collected:
        gc.collect()
        gc.collect(0)
    assert collected['runs'][2] == 1 and collected['runs'][0] == 1 and collected['seconds'] > 0
    gc.collect()
    assert collected['runs'] == [1, 0, 1]  # the callback is gone after the block


def test_the_tables_name_the_allocator_setting(monkeypatch):
    monkeypatch.delenv('PYTORCH_CUDA_ALLOC_CONF', raising=False)
    assert allocator_setting() == 'PYTORCH_CUDA_ALLOC_CONF=(unset)'
    monkeypatch.setenv('PYTORCH_CUDA_ALLOC_CONF', 'expandable_segments:True')
    assert allocator_setting() == 'PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True'
