"""SIGKILL an agent at random moments of updates (issue 17, campaign 5).

Each point: publish a signed deployment, wait a random delay (uniform over how
long an undisturbed job takes, measured first), SIGKILL the agent, restart it.
After the restart the agent must serve the very version its state pins, every
version directory in the repository must verify, and the job must resume to
SUCCEEDED or be reported failed with a reason (then the old version serves).
Uses the rig of tests/test_fleet_crash.py (real mosquitto, in-test controller
with slowed chunk answers, real agent processes).

    python tests/bench/kill_points.py --points 20 [--seed N]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

from tests.test_fleet_crash import Rig  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--points", type=int, default=20)
    parser.add_argument("--seed", type=int, default=time.time_ns() % 2**32)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    rows: list[tuple[int, float, str, float, str]] = []
    failures: list[str] = []
    with tempfile.TemporaryDirectory(prefix="kill-points-") as tmp:
        rig = Rig(Path(tmp))
        try:
            doc = rig.new_deployment()
            rig.start_agent()
            started = time.monotonic()
            rig.controller.deploy(doc, rig.keys.deploy)
            if rig.finish(doc, "warm-up")["status"] != "SUCCEEDED":
                print("warm-up job did not succeed")
                return 1
            window = time.monotonic() - started + 0.2
            for point in range(args.points):
                doc = rig.new_deployment()
                rig.controller.deploy(doc, rig.keys.deploy)
                delay = rng.uniform(0.0, window)
                time.sleep(delay)
                phase = _last_phase(rig, doc["deployment_id"])
                rig.kill(f"random {delay:.2f}s")
                where = f"point {point} (seed {args.seed}, {delay:.2f}s)"
                try:
                    rig.start_agent()
                    served_after = rig.check_serving(where)
                    final = rig.finish(doc, where)
                except AssertionError as exc:
                    failures.append(f"{where}: {str(exc)[:400]}")
                    rows.append((point, delay, phase, float("nan"), "INVARIANT BROKEN"))
                    continue
                rows.append((point, delay, phase, served_after,
                             f"{final['phase']}/{final['status']}"))
        finally:
            rig.close()
    good = len(rows) - len(failures)
    print(f"kill_points: seed {args.seed}, random window {window:.2f} s")
    print(f"{'point':>5} {'delay s':>8} {'killed in':<14} {'served after':>12}  outcome")
    for point, delay, phase, served_after, outcome in rows:
        print(f"{point:>5} {delay:>8.2f} {phase:<14} {served_after:>12.0f}  {outcome}")
    outcomes: dict[str, int] = {}
    for *_, outcome in rows:
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    print("outcomes:", ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items())))
    for failure in failures:
        print("  FAIL", failure)
    print(f"{good}/{args.points} kill points: verified version serving, job resumed "
          "or reported failed")
    print(f"verdict: {'PASS' if good == args.points else 'FAIL'}")
    return 0 if good == args.points else 1


def _last_phase(rig: Rig, deployment_id: str) -> str:
    jobs = rig.controller.jobs_for(deployment_id)
    return str(jobs[-1]["phase"]) if jobs else "(none yet)"


if __name__ == "__main__":
    raise SystemExit(main())
