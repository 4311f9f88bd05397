"""``benchmarks/check_gpu.py`` runs every check even after one fails, and refuses options it would not use (its
checks themselves need a GPU)."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'benchmarks'))
from check_gpu import main, run_checks  # noqa: E402


def test_a_failing_check_does_not_hide_the_next_and_a_bug_stops_the_run():
    ran = []

    def fails():
        ran.append('fails')
        raise AssertionError('compiled AMP 1.18e-02 (bound 1.00e-02)')

    def passes():
        ran.append('passes')

    failures = run_checks([('compile', fails), ('graphs', passes)])
    assert ran == ['fails', 'passes']
    assert failures == [('compile', 'compiled AMP 1.18e-02 (bound 1.00e-02)')]

    def broken():
        raise KeyError('a bug, not a verdict')

    with pytest.raises(KeyError):
        run_checks([('broken', broken), ('graphs', passes)])


@pytest.mark.parametrize('argv, message', [
    (['--compile-options', '{"options": {"cpp_wrapper": true}}'], 'is for the --compile check'),
    (['--compile', 'static', '--compile-options', '{"dynamic": true}'], 'give dynamic by --compile'),
    (['--only', 'golden', 'compile'], '--only compile: opcheck, compile and compile-amp need --compile'),
    (['--compile', '--only', 'steps'], '--only steps:'),
])
def test_compile_options_are_refused_where_they_would_be_ignored(monkeypatch, capsys, argv, message):
    monkeypatch.setattr(sys, 'argv', ['check_gpu.py', *argv])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_only_runs_the_checks_named(monkeypatch):
    import check_gpu
    ran = []
    monkeypatch.setattr(check_gpu.torch.cuda, 'get_device_name', lambda: 'a card')
    # main() turns TF32 off for its comparisons: restored after the test.
    monkeypatch.setattr(check_gpu.torch.backends.cudnn, 'allow_tf32', check_gpu.torch.backends.cudnn.allow_tf32)
    monkeypatch.setattr(check_gpu.torch.backends.cuda.matmul, 'allow_tf32',
                        check_gpu.torch.backends.cuda.matmul.allow_tf32)
    monkeypatch.setattr(check_gpu, 'run_checks', lambda checks: ran.extend(name for name, _ in checks) or [])
    monkeypatch.setattr(sys, 'argv', ['check_gpu.py', '--compile', 'static', '--only', 'compile', 'graphs'])
    main()
    assert ran == ['compiled against eager, fp32', 'CUDA graphs']
    ran.clear()
    monkeypatch.setattr(sys, 'argv', ['check_gpu.py', '--compile', '--only', 'compile-amp'])
    main()
    assert ran == ['compiled against eager, AMP fp16']
