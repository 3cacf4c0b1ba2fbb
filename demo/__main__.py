"""`make demo`: the marketplace of seed 000, secured by Verity, on this machine.

It starts a control plane (embedded SQLite store), the users, items and invoices services each
with a Verity sidecar, the secure default mesh (STRICT mTLS, default deny) and seed 000's
policy, then walks through what that means with real calls. `--once` runs the tour and exits
non-zero if any observed result differs from the expected one; without it the mesh keeps
running until Ctrl-C.
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import threading
from pathlib import Path
from types import FrameType

from demo.tour import Tour


def main() -> None:
    parser = argparse.ArgumentParser(description="The Verity marketplace demo.")
    parser.add_argument(
        "--once",
        action="store_true",
        help="run the tour, then stop; exit 1 if anything was unexpected",
    )
    args = parser.parse_args()
    stop = threading.Event()

    def interrupted(signum: int, frame: FrameType | None) -> None:
        stop.set()
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    with tempfile.TemporaryDirectory(prefix="verity-demo-") as tmp:
        tour = Tour(Path(tmp))
        interrupted_early = False
        try:
            ok = tour.run()
            if not args.once:
                tour.keep_running(stop)
        except KeyboardInterrupt:
            print("\ninterrupted: stopping the mesh")
            interrupted_early = True
            ok = False if args.once else tour.ok
        finally:
            tour.close()
    if interrupted_early:
        print("demo stopped; every process it started is gone")
    else:
        print("demo finished cleanly" if ok else "demo finished: some results were unexpected")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
