"""bench/launch_ab.py: the two launch paths alternate, the first of each pair switching side every
round, each run with the direct path switched as its path says, and switched back on after."""

import launch_ab

from fusetune.ops._direct_launch import DirectLaunch


def test_interleaved_alternates_the_paths_with_the_switch_set_for_each():
    seen = []

    def run() -> float:
        seen.append(DirectLaunch.enabled)
        return float(len(seen))

    values = launch_ab.interleaved(run, rounds=3)
    assert seen == [True, False, False, True, True, False]
    assert values == {"direct": [1.0, 4.0, 5.0], "triton": [2.0, 3.0, 6.0]}
    assert DirectLaunch.enabled


def test_rotation_starts_each_round_one_further_along():
    import common

    assert [common.rotation("abc", index) for index in range(4)] == [
        ["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]
