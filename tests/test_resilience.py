"""End to end: runs killed at random moments (a step, a checkpoint write, an evaluation, start-up) and
restarted, on 1 or 2 processes, log exactly the losses of an uninterrupted run; a process whose peer
died stops by itself in seconds with a one-line error (benchmarks/kill_soak.py, a short soak)."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import kill_soak  # noqa: E402


def test_short_kill_soak_loses_nothing_and_never_hangs(tmp_path):
    report = kill_soak.main(["--kills_single=2", "--kills_multi=3", "--multi_moments=steps,save,eval",
                             "--seed=1", f"--workdir={tmp_path}", "--hang_timeout_s=300", "--lost_timeout_s=60"])
    assert report["hangs"] == 0 and report["failed_restarts"] == 0, report
    assert report["kills"] + report["finished_before_kill"] == 5 and report["kills"] >= 4, report
    assert {"save", "eval"} <= set(report["moments"]), report  # a kill while writing and while evaluating
    # survivors of a dead peer stop by themselves, saying why, well within the heartbeat bound
    assert report["survivor_messages"] == len(report["survivor_exit_s"]) >= 2, report
    assert max(report["survivor_exit_s"]) < 45, report
    for part in ("single", "multi"):
        assert report[part]["all_equal"] and report[part]["losses_compared"] >= 10, report
