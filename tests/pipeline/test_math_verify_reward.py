"""math-verify scorer: equivalence in worker processes, hard deadline, no leaked processes."""

import importlib
import multiprocessing
import os
import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import pytest

from pipeline.rewards import get_reward_scorer
from pipeline.rewards.math_verify_reward import MathVerifyScorer

# Import path of the sibling helper module, whether or not tests/ is a package.
HELPERS_MODULE = f"{__name__.rpartition('.')[0]}.reward_helpers".lstrip(".")
helpers = importlib.import_module(HELPERS_MODULE)
SCRIPTED = f"{HELPERS_MODULE}:scripted_reward"

TIMEOUT_S = 2.0
MARGIN_S = 2.0

pytestmark = pytest.mark.slow


def _zombie_children() -> set[int]:
    """Pids of this process's children that exited but were not reaped (by anyone so far)."""
    zombies = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if fields[0] == "Z" and int(fields[1]) == os.getpid():
            zombies.add(int(stat.parent.name))
    return zombies


@pytest.fixture
def zombies_before() -> set[int]:
    """Unreaped children of other tests, present before this one started: not its doing."""
    return _zombie_children()


def _live_children() -> set[int]:
    """Pids of this process's live multiprocessing children (reaps exited ones)."""
    return {child.pid for child in multiprocessing.active_children() if child.pid is not None}


def _is_gone(pid: int) -> bool:
    """True once ``pid`` has exited and been reaped."""
    return not Path(f"/proc/{pid}").exists()


@pytest.fixture(scope="module")
def math_verify() -> Iterator[MathVerifyScorer]:
    with MathVerifyScorer(num_workers=2) as scorer:
        yield scorer


@pytest.mark.parametrize(
    ("response", "truth", "acc"),
    [
        ("So the value is half.\nAnswer: \\frac{1}{2}", "0.5", True),
        ("Answer: 0.5", "\\frac{1}{2}", True),
        ("Answer: $x^2+2x$", "x(x+2)", True),
        ("Answer: x^2+2x", "x(x+2)", True),
        ("Answer: 1,000", "1000", True),
        ("Answer: 3\nNo wait.\nAnswer: 5", "5", True),
        ("The final answer is $\\boxed{\\dfrac{3}{4}}$.", "3/4", True),
        ("Answer: 41", "42", False),
        ("Answer: x^2+2", "x(x+2)", False),
        ("I do not know.", "42", False),
    ],
)
def test_equivalence(math_verify: MathVerifyScorer, response: str, truth: str, acc: bool) -> None:
    result = math_verify.score(response, truth)
    assert result.acc is acc
    assert result.score == (1.0 if acc else -1.0)
    assert not result.timed_out


def test_batch_in_order(math_verify: MathVerifyScorer) -> None:
    pairs = [(f"Answer: {n}", "3") for n in range(6)]
    assert [r.acc for r in math_verify.score_batch(pairs)] == [n == 3 for n in range(6)]


def test_timeout_returns_and_pool_recovers(zombies_before: set[int]) -> None:
    with MathVerifyScorer(num_workers=1, timeout_s=TIMEOUT_S, fn_path=SCRIPTED) as scorer:
        worker_pid = int(scorer.score(helpers.PID, "").extracted)
        start = time.monotonic()
        result = scorer.score(helpers.HANG, "x")
        elapsed = time.monotonic() - start
        assert result.timed_out and not result.acc and result.score == -1.0
        assert TIMEOUT_S <= elapsed < TIMEOUT_S + MARGIN_S
        assert _is_gone(worker_pid)
        assert scorer.score("ok", "ok").acc
    assert _zombie_children() <= zombies_before


def test_timeout_in_batch_spares_other_calls(zombies_before: set[int]) -> None:
    pairs = [("a", "a"), (helpers.HANG, "x"), ("b", "c"), ("d", "d"), ("e", "e")]
    with MathVerifyScorer(num_workers=2, timeout_s=TIMEOUT_S, fn_path=SCRIPTED) as scorer:
        results = scorer.score_batch(pairs)
    assert [r.timed_out for r in results] == [False, True, False, False, False]
    assert [r.acc for r in results] == [True, False, False, True, True]
    assert _zombie_children() <= zombies_before


def test_worker_errors_are_results_and_a_dead_worker_raises(zombies_before: set[int]) -> None:
    pairs = [(helpers.HANG, "x"), (helpers.RAISE, "x"), ("ok", "ok"), (helpers.NOT_A_RESULT, "")]
    with MathVerifyScorer(num_workers=2, timeout_s=TIMEOUT_S, fn_path=SCRIPTED) as scorer:
        hung, raised, ok, wrong_type = scorer.score_batch(pairs)
        assert hung.timed_out and hung.error is None
        assert raised.error is not None and not raised.timed_out
        assert re.fullmatch(
            r"ValueError: scripted failure \(at .*reward_helpers\.py:\d+\)", raised.error
        )
        assert (raised.score, raised.acc) == (-1.0, False)
        assert ok.acc and ok.error is None
        assert wrong_type.error == "the reward function returned float, not RewardResult"
        worker_pid = int(scorer.score(helpers.PID, "").extracted)
        with pytest.raises(BrokenProcessPool):
            scorer.score(helpers.CRASH, "x")
        assert _is_gone(worker_pid)
        assert scorer.score("ok", "ok").acc
    assert _zombie_children() <= zombies_before


def test_concurrent_batches_from_threads_each_get_their_own_deadline(
    zombies_before: set[int],
) -> None:
    """The queue scores groups from several worker threads at once: their calls share the
    pool's workers one batch at a time, so none waits out its deadline behind the others'
    (6 threads x 2 calls of 0.4 s on one worker: 4.8 s, more than twice the 2 s deadline),
    and one that does time out does not disturb the rest."""
    pairs = [(helpers.SLOW, "x")] * 2
    scorer = MathVerifyScorer(num_workers=1, timeout_s=TIMEOUT_S, fn_path=SCRIPTED)
    with scorer, ThreadPoolExecutor(max_workers=6) as threads:
        batches = list(threads.map(lambda _: scorer.score_batch(pairs), range(6)))
        assert [r.timed_out for batch in batches for r in batch] == [False] * 12
        assert all(r.acc for batch in batches for r in batch)
        hung = threads.submit(scorer.score_batch, [(helpers.HANG, "x")])
        others = [threads.submit(scorer.score_batch, pairs) for _ in range(3)]
        assert hung.result()[0].timed_out
        assert [r.acc for other in others for r in other.result()] == [True] * 6
    assert _zombie_children() <= zombies_before


def test_close_reaps_workers_and_is_idempotent(zombies_before: set[int]) -> None:
    scorer = get_reward_scorer(SCRIPTED, num_workers=2)
    pids = {int(r.extracted) for r in scorer.score_batch([(helpers.PID, "")] * 4)}
    scorer.close()
    scorer.close()
    assert all(_is_gone(pid) for pid in pids)
    assert _zombie_children() <= zombies_before
    with pytest.raises(RuntimeError, match="closed"):
        scorer.score("ok", "ok")


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="module:function"):
        MathVerifyScorer(fn_path="no_colon")
    with pytest.raises(ValueError, match="num_workers"):
        MathVerifyScorer(num_workers=0)
    with pytest.raises(ValueError, match="timeout_s"):
        MathVerifyScorer(timeout_s=0)


@pytest.mark.parametrize("fn_path", ["pipeline.rewards.no_such_module:f", "no_such_package.m:f"])
def test_a_missing_function_module_raises_at_construction(fn_path: str) -> None:
    with pytest.raises(ModuleNotFoundError, match="no_such"):
        get_reward_scorer(fn_path)


@pytest.mark.parametrize(
    ("fn_path", "error"),
    [
        ("pipeline.rewards.dapo_math:no_such_function", AttributeError),
        ("pipeline.rewards.math_verify_reward:MATH_VERIFY_FN_PATH", TypeError),
    ],
)
def test_bad_function_path_raises_on_first_call(fn_path: str, error: type[Exception]) -> None:
    with get_reward_scorer(fn_path) as scorer, pytest.raises(error):
        scorer.score("a", "a")
