"""qcast.timing: interleaved timing within a budget; a candidate far behind the leader is timed no more."""
from __future__ import annotations

import time

import torch.nn as nn

from qcast import timing


class Sleeper(nn.Module):
    def __init__(self, seconds: float):
        super().__init__()
        self.seconds, self.calls = seconds, 0

    def forward(self, x):
        self.calls += 1
        time.sleep(self.seconds)
        return x


def test_a_model_far_behind_the_leader_is_timed_no_more_after_the_first_rounds():
    fast, slow = Sleeper(0.002), Sleeper(0.03)
    times, repeats = timing.time_interleaved({"fast": fast, "slow": slow}, (0,), {}, drop_above=2.0)
    assert times["slow"] > 2 * times["fast"] and times["slow"] >= 30.0
    assert slow.calls == 1 + timing.MIN_REPEATS  # warm-up, then the rounds that showed it behind
    assert fast.calls == 1 + repeats and repeats > timing.MIN_REPEATS


def test_without_drop_above_every_model_runs_every_round():
    fast, slow = Sleeper(0.002), Sleeper(0.03)
    _, repeats = timing.time_interleaved({"fast": fast, "slow": slow}, (0,), {})
    assert fast.calls == slow.calls == 1 + repeats
