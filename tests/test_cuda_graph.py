"""CUDA-graph option of the backbone: what holds without a GPU (the graphs themselves are checked on the GPU
by ``benchmarks/check_gpu.py``)."""
import copy
import gc
import pickle
import weakref

import pytest
import torch

from log_capture import mmengine_messages
from mmgroupmamba import GroupMamba
from mmgroupmamba.models.cuda_graph import _garbage_collected_first


@pytest.mark.parametrize('out_type', ['featmap', 'cls_token'])
def test_cpu_input_runs_eagerly_with_a_warning(out_type):
    torch.manual_seed(0)
    eager = GroupMamba(arch='tiny', out_type=out_type).eval()
    graphed = GroupMamba(arch='tiny', out_type=out_type, cuda_graph=True).eval()
    graphed.load_state_dict(eager.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with mmengine_messages() as messages, torch.no_grad():
        outs = [graphed(x) for _ in range(2)]
    expected = eager(x)
    for out in outs:
        for a, b in zip(out, expected):
            torch.testing.assert_close(a, b)
    warnings = [m for m in messages if 'without CUDA graphs' in m]
    assert len(warnings) == 1 and 'cpu' in warnings[0]


def test_with_cp_and_cuda_graph_refused():
    with pytest.raises(ValueError, match='cuda_graph=True and with_cp=True'):
        GroupMamba(arch='tiny', cuda_graph=True, with_cp=True)


def test_train_only_graphs_leave_evaluation_eager():
    """cuda_graph='train': training passes go through the graphs (on the CPU: their eager fallback, with its log
    line), evaluation passes do not reach them at all."""
    model = GroupMamba(arch='tiny', cuda_graph='train')
    x = torch.randn(1, 3, 64, 64)
    with mmengine_messages() as messages, torch.no_grad():
        model.eval()(x)
    assert not [m for m in messages if 'without CUDA graphs' in m]
    with mmengine_messages() as messages, torch.no_grad():
        model.train()(x)
    assert [m for m in messages if 'without CUDA graphs' in m]


@pytest.mark.parametrize('value', ['eval', 1, None])
def test_unknown_cuda_graph_value_refused(value):
    with pytest.raises(ValueError, match=f"cuda_graph={value!r}; choose one of"):
        GroupMamba(arch='tiny', cuda_graph=value)


def test_copies_start_without_graphs():
    model = GroupMamba(arch='tiny', cuda_graph=True)
    model._cuda_graphs.warned.add('something')
    for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert copied._cuda_graphs is not model._cuda_graphs
        assert copied._cuda_graphs.recorded == {} and copied._cuda_graphs.warned == set()
        assert copied._cuda_graphs.members is None  # would otherwise list the original's parameters


def test_model_freed_without_garbage_collection():
    """The graphs' bookkeeping must not hold the module in a reference cycle: its graphs and their memory
    pool would live on until a collection, which could then run in the middle of another capture."""
    model = GroupMamba(arch='tiny', cuda_graph=True)
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    assert model._cuda_graphs.members is not None
    collected = weakref.ref(model)
    gc.disable()
    try:
        del model
        assert collected() is None
    finally:
        gc.enable()


def test_recording_collects_garbage_then_pauses_the_collector():
    class Node:
        pass

    cycle = Node()
    cycle.itself = cycle
    dead = weakref.ref(cycle)
    del cycle
    with _garbage_collected_first():
        assert dead() is None and not gc.isenabled()
    assert gc.isenabled()
