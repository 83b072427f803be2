"""Worker-side reward functions injected into MathVerifyScorer by import path in tests.

Behaviour is selected by the response text so one scorer can exercise several cases.
"""

import os
import time

from pipeline.rewards.base import RewardResult

HANG = "<hang>"
"""Response that makes :func:`scripted_reward` sleep forever."""
CRASH = "<crash>"
"""Response that makes :func:`scripted_reward` kill its worker process."""
RAISE = "<raise>"
"""Response that makes :func:`scripted_reward` raise ValueError."""
NOT_A_RESULT = "<float>"
"""Response that makes :func:`scripted_reward` return a float instead of a RewardResult."""
PID = "<pid>"
"""Response that makes :func:`scripted_reward` report its worker's pid as ``extracted``."""
SLOW = "<slow>"
"""Response that makes :func:`scripted_reward` take `SLOW_S` seconds, then judge it correct."""
SLOW_S = 0.4


def scripted_reward(response: str, ground_truth: str) -> RewardResult:
    """Exact-match reward, except for the control responses above."""
    if response == HANG:
        while True:
            time.sleep(60)
    if response == CRASH:
        os._exit(1)
    if response == RAISE:
        raise ValueError("scripted failure")
    if response == NOT_A_RESULT:
        return 1.0  # type: ignore[return-value]
    if response == SLOW:
        time.sleep(SLOW_S)
        return RewardResult.from_correctness(True, response)
    if response == PID:
        return RewardResult.from_correctness(False, str(os.getpid()))
    return RewardResult.from_correctness(response == ground_truth, response)
