"""``benchmarks/profile_step.py``'s pieces that need no GPU."""
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'benchmarks'))
from profile_step import StaticLaunchBypasses, take_turn  # noqa: E402


def test_static_launch_bypasses_are_collected_while_attached_only():
    """Inductor's bypass lines are counted by reason while the handler is attached; other lines are not, the
    logger's level and propagation are restored after, and nothing is collected then."""
    logger = logging.getLogger(StaticLaunchBypasses.LOGGER)
    before = logger.level, logger.propagate, list(logger.handlers)
    bypasses = StaticLaunchBypasses()
    with bypasses:
        for reason in ('User defined triton kernel', 'User defined triton kernel', 'store_cubin is enabled'):
            logger.info('Bypassing StaticallyLaunchedCudaKernel due to %s', reason)
        logger.info('Benchmarking 3 configs')
    logger.info('Bypassing StaticallyLaunchedCudaKernel due to %s', 'after the step')
    assert bypasses.reasons == {'Bypassing StaticallyLaunchedCudaKernel due to User defined triton kernel': 2,
                                'Bypassing StaticallyLaunchedCudaKernel due to store_cubin is enabled': 1}
    assert (logger.level, logger.propagate, list(logger.handlers)) == before


def test_a_turn_starts_once_every_process_announced_itself(tmp_path):
    """Two processes taking turns: a process that failed (announced, then gone) still counts, so the other
    takes its turn instead of waiting."""
    (tmp_path / 'ready.12345').touch()  # the failed process's announcement
    lock = take_turn(str(tmp_path), 2)
    assert (tmp_path / 'lock').exists() and not lock.closed
    lock.close()


def test_host_times_start_every_step_with_the_gpu_idle():
    """Each timed step comes after a synchronisation and the last is waited for: the calls alternate sync, step,
    and end with a sync; one time per step."""
    from profile_step import host_times
    calls = []
    times = host_times(lambda: calls.append('step'), lambda: calls.append('sync'), repeats=3)
    assert calls == ['sync', 'step'] * 3 + ['sync']
    assert len(times) == 3 and all(t >= 0 for t in times)


def test_host_functions_lists_the_steps_own_functions_by_own_time():
    """The profiled steps' functions come back as cProfile's table, the step's own function among them, called
    once per step."""
    from profile_step import host_functions

    def a_step_function():
        return sum(range(1000))

    text = host_functions(a_step_function, lambda: None, rows=5, steps=3)
    assert 'a_step_function' in text and 'Ordered by: internal time' in text
    row = next(line for line in text.splitlines() if 'a_step_function' in line)
    assert row.split()[0] == '3'
