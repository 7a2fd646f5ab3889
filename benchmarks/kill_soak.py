"""Kill soak: SIGKILL training runs at random moments, restart them, and check that nothing is lost.

    python benchmarks/kill_soak.py                                 # 20 single-process kills, 10 two-process
    python benchmarks/kill_soak.py --kills_single=2 --kills_multi=2 --moments=save,eval   # a short one

A single-process run (2 fake devices, mesh data=2) is killed `--kills_single` times, each followed by a
restart on the same workdir. Two cooperating processes (1 device each) are killed `--kills_multi` times:
a random one of them, after which the other must exit by itself within `--lost_timeout_s` (else it
counts as a hang and is killed), and the restart takes a random host count (1 process x 2 devices or
2 x 1). Moments are random: while starting or restoring, during steps, or (`--moments`) right as a
checkpoint is being written or an evaluation runs. Finally each workdir runs to the furthest step seen
plus a few, and every train and validation loss ever logged (before and after each kill) is compared
with one uninterrupted run. The report (one JSON line) gives kills, failed restarts, hangs, how long
survivors took to stop, processes left behind, and whether all the losses are equal.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from jaxllm.distributed import _child_env, free_port  # noqa: E402

OPTIONS = [
    "model.num_layers=2",
    "model.embed_dim=64",
    "model.num_heads=4",
    "model.num_kv_heads=2",
    "model.mlp_dim=128",
    "model.vocab_size=512",
    "model.max_seq_len=64",
    "data.vocab_size=512",
    "data.block_size=32",
    "data.batch_size=8",
    "data.shuffle_window=40",
    "train.log_every=1",
    "train.eval_every=8",
    "train.eval_batches=4",
    "train.progress=false",
    "checkpoint.every=4",
    "checkpoint.keep=2",
    "optim.warmup_steps=5",
    "optim.decay_steps=200",
    "generate.max_new_tokens=0",
    "mesh.data=2",
    "distributed.heartbeat_timeout=10",
    "distributed.shutdown_timeout=10",
]
ENDLESS = 100_000  # train.steps of a run that is going to be killed (the schedule does not depend on it)


class Soak:
    def __init__(self, root: str, seed: int, hang_timeout_s: float, lost_timeout_s: float, moments: list[str]):
        self.root, self.rng = root, random.Random(seed)
        self.hang_timeout_s, self.lost_timeout_s, self.moments = hang_timeout_s, lost_timeout_s, moments
        self.env = dict(
            os.environ,
            PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
            JAX_PLATFORMS="cpu",
            JAX_COMPILATION_CACHE_DIR=os.path.join(root, "jax-cache"),
            JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        )
        self.stats = {
            "kills": 0,
            "failed_restarts": 0,
            "hangs": 0,
            "survivor_exit_s": [],
            "survivor_messages": 0,
            "moments": {},
            "finished_before_kill": 0,
            "leftover_processes": 0,
        }
        self.forced: list[str] = []  # moments the next kills take, in order (then random ones)
        self.logged: list[dict] = []  # every record any run wrote, kept before the next run trims them
        self._log_index = 0

    def start(self, workdir: str, steps: int, processes: int) -> list[subprocess.Popen]:
        cmd = [
            sys.executable,
            "-m",
            "jaxllm.cli",
            "train",
            "--config=configs/tiny.py",
            f"--workdir={workdir}",
            f"--config.train.steps={steps}",
        ] + [f"--config.{o}" for o in OPTIONS]
        port, procs = free_port(), []
        for p in range(processes):
            if processes == 1:
                env = dict(self.env, XLA_FLAGS="--xla_force_host_platform_device_count=2")
            else:
                env = _child_env(self.env, p, processes, 2 // processes, port)
            log = open(os.path.join(self.root, f"run{self._log_index}.p{p}.log"), "w")
            procs.append(
                subprocess.Popen(
                    cmd,
                    cwd=ROOT,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            )
        self._log_index += 1
        return procs

    def _records(self, workdir: str) -> list[dict]:
        from jaxllm.train.metrics import read_metrics

        try:
            return read_metrics(workdir)
        except Exception:  # noqa: BLE001  (being written right now)
            return []

    def _keep_log(self, workdir: str) -> None:
        self.logged.extend(self._records(workdir))

    def _wait_moment(self, workdir: str, procs: list[subprocess.Popen]) -> str | None:
        """Waits for a random moment of the run; None if it ended (or hung) first."""
        moment = self.forced.pop(0) if self.forced else self.rng.choice(["start", "steps", "steps", *self.moments])
        before = len(self._records(workdir))
        t0, last_progress = time.monotonic(), time.monotonic()
        delay = self.rng.uniform(0.5, 15.0) if moment == "start" else self.rng.uniform(0.0, 4.0)
        progressed_at = None
        ckpt = os.path.join(workdir, "checkpoints")
        while True:
            if any(p.poll() is not None for p in procs):
                return None
            records = self._records(workdir)
            now = time.monotonic()
            if len(records) > before:
                last_progress, before = now, len(records)
                progressed_at = progressed_at or now
            if moment == "start" and now - t0 >= delay:
                return moment
            if moment == "steps" and progressed_at is not None and now - progressed_at >= delay:
                return moment
            if (
                moment == "save"
                and progressed_at is not None
                and glob.glob(os.path.join(ckpt, "*.orbax-checkpoint-tmp*"))
            ):
                return moment
            if (
                moment == "eval"
                and records
                and records[-1].get("split") == "train"
                and records[-1]["step"] % 8 == 0
                and progressed_at is not None
            ):
                return moment
            if now - last_progress > self.hang_timeout_s:
                self.stats["hangs"] += 1
                return None
            time.sleep(0.01)

    def _stop(self, procs, sig=signal.SIGKILL) -> None:
        for p in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    pass
            p.wait()

    def kill_cycle(self, workdir: str, processes: int) -> None:
        procs = self.start(workdir, ENDLESS, processes)
        moment = self._wait_moment(workdir, procs)
        if moment is None:
            codes = [p.poll() for p in procs]
            if any(c not in (None, 0) for c in codes):
                self.stats["failed_restarts"] += 1
            else:
                self.stats["finished_before_kill"] += 1
            self._stop(procs)
            self._keep_log(workdir)
            return
        victim = self.rng.randrange(processes)
        os.killpg(procs[victim].pid, signal.SIGKILL)
        self.stats["kills"] += 1
        self.stats["moments"][moment] = self.stats["moments"].get(moment, 0) + 1
        t_kill = time.monotonic()
        for i, p in enumerate(procs):
            if i == victim:
                p.wait()
                continue
            try:
                p.wait(timeout=self.lost_timeout_s)
                self.stats["survivor_exit_s"].append(round(time.monotonic() - t_kill, 2))
                with open(os.path.join(self.root, f"run{self._log_index - 1}.p{i}.log")) as f:
                    text = f.read()
                if "lost contact with another process" in text or "JAX distributed service detected fatal" in text:
                    self.stats["survivor_messages"] += 1
            except subprocess.TimeoutExpired:
                self.stats["hangs"] += 1
                self._stop([p])
        self._count_leftovers(procs)
        self._keep_log(workdir)

    def _count_leftovers(self, procs) -> None:
        """Processes of a run's groups still alive once its processes ended (workers, helpers): orphans."""
        time.sleep(0.5)
        for p in procs:
            try:
                os.killpg(p.pid, 0)
            except ProcessLookupError:
                continue
            self.stats["leftover_processes"] += 1
            os.killpg(p.pid, signal.SIGKILL)

    def finish(self, workdir: str, steps: int, processes: int, keep: bool = True) -> bool:
        procs = self.start(workdir, steps, processes)
        deadline = time.monotonic() + 900
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            time.sleep(0.1)
        ok = all(p.poll() == 0 for p in procs)
        if not ok:
            self.stats["failed_restarts"] += 1
            self._stop(procs)
        if keep:
            self._keep_log(workdir)
        return ok


def compare(logged: list[dict], reference: list[dict]) -> dict:
    ref = {(r["split"], r["step"]): r["loss"] for r in reference if "loss" in r}
    diffs, missing = [], 0
    for r in logged:
        key = (r["split"], r["step"])
        if "loss" not in r:
            continue
        if key not in ref:
            missing += 1
            continue
        diffs.append(abs(r["loss"] - ref[key]) / max(abs(ref[key]), 1e-12))
    return {
        "losses_compared": len(diffs),
        "not_in_reference": missing,
        "max_rel_diff": max(diffs) if diffs else None,
        "all_equal": bool(diffs) and max(diffs) <= 1e-6,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills_single", type=int, default=20)
    parser.add_argument("--kills_multi", type=int, default=10)
    parser.add_argument("--moments", default="save,eval", help="besides start/steps: save, eval (comma-separated)")
    parser.add_argument(
        "--multi_moments",
        default="",
        help="moments of the first two-process kills, in order, "
        "e.g. steps,save,eval (those restart on 2 processes; then random moments and counts)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hang_timeout_s", type=float, default=240.0, help="no progress this long = a hang")
    parser.add_argument("--lost_timeout_s", type=float, default=120.0, help="a survivor must stop within this")
    parser.add_argument("--workdir", default="", help="kept for inspection (default: a temporary folder)")
    args = parser.parse_args(argv)
    root = args.workdir or tempfile.mkdtemp(prefix="jaxllm-soak-")
    os.makedirs(root, exist_ok=True)
    soak = Soak(root, args.seed, args.hang_timeout_s, args.lost_timeout_s, [m for m in args.moments.split(",") if m])
    t0 = time.monotonic()
    report: dict = {}
    for name, kills, counts in (("single", args.kills_single, (1,)), ("multi", args.kills_multi, (2, 1))):
        if not kills:
            continue
        workdir, first = os.path.join(root, name), len(soak.logged)
        processes = counts[0]
        soak.forced = [m for m in args.multi_moments.split(",") if m] if name == "multi" else []
        for _ in range(kills):
            soak.kill_cycle(workdir, processes)
            processes = counts[0] if soak.forced else soak.rng.choice(counts)  # the restart's host count
        furthest = max([r["step"] for r in soak.logged[first:]] + [0])
        steps = (furthest // 4 + 2) * 4
        soak.finish(workdir, steps, soak.rng.choice(counts))
        ref_dir = os.path.join(root, f"{name}-reference")
        shutil.rmtree(ref_dir, ignore_errors=True)
        if not soak.finish(ref_dir, steps, 1, keep=False):
            raise RuntimeError(f"the uninterrupted reference run failed; see {root}/run*.log")
        reference = soak._records(ref_dir)
        report[name] = {**compare(soak.logged[first:], reference), "steps": steps}
    report.update(soak.stats, wall_s=round(time.monotonic() - t0, 1), root=root)
    print(json.dumps(report), flush=True)
    return report


if __name__ == "__main__":
    result = main()
    ok = (
        result["hangs"] == 0
        and result["failed_restarts"] == 0
        and all(result[k]["all_equal"] for k in ("single", "multi") if k in result)
    )
    sys.exit(0 if ok else 1)
