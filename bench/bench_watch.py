#!/usr/bin/env python3
"""Benchmark of --watch against the fake SageTV and Plex servers of tests/fakes/.

    python bench/bench_watch.py                    20 stops on each side
    python bench/bench_watch.py --stops 50 --poll 5

A world of ``--items`` episodes is served with realistic latency (``--sage-latency-ms`` 20
and ``--plex-latency-ms`` 5 per request); the tool runs ``--watch`` in a thread of this
process. Then, one at a time, a Plex player stops an item at a new position, and a SageTV
client plays and stops another: for each the time from the stop to the other side showing
it. Printed: p50/p95 per direction against the targets (p95 <= 5 s Plex -> SageTV,
<= poll + 5 s SageTV -> Plex) and the requests each synced item cost on each server.
"""

from __future__ import annotations

import argparse
import io
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ["PLEXAPI_CONFIG_PATH"] = os.devnull + ".plexapi-config-not-here.ini"
for _name in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY",
              "ALL_PROXY"):
    os.environ.pop(_name, None)

import sageplex_sync  # noqa: E402
from tests.fakes.world import MIN, Item, World, none  # noqa: E402
from tests.user import User  # noqa: E402


def wait_for(predicate: object, timeout_s: float) -> float | None:
    """Seconds until ``predicate()`` holds, or None."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if predicate():  # type: ignore[operator]
            return time.monotonic() - start
        time.sleep(0.01)
    return None


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stops", type=int, default=20)
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--poll", type=float, default=sageplex_sync.POLL_S)
    parser.add_argument("--sage-latency-ms", type=float, default=20)
    parser.add_argument("--plex-latency-ms", type=float, default=5)
    args = parser.parse_args()

    world = World()
    items: list[Item] = [world.episode("Bench Show", 1 + i // 50, 1 + i % 50, f"Episode {i}",
                                       duration_ms=45 * MIN, sage=none(), plex=none())
                         for i in range(max(args.items, 2 * args.stops))]
    folder = Path(tempfile.mkdtemp(prefix="bench-watch-"))
    os.environ["SAGEPLEX_LOG"] = str(folder / "sageplex_sync.log")
    with world.running() as servers:
        servers.sage.read_delay_s = servers.sage.write_delay_s = args.sage_latency_ms / 1000
        servers.plex.read_delay_s = servers.plex.write_delay_s = args.plex_latency_ms / 1000
        config = servers.write_config(folder / "sageplex_cfg.json")
        user = User(world, servers.plex)
        stop = threading.Event()
        out, err = io.StringIO(), io.StringIO()
        thread = threading.Thread(target=sageplex_sync.main, daemon=True, args=(
            ["--watch", "--poll", str(args.poll), "-c", str(config)],),
            kwargs={"out": out, "err": err, "stdin": sys.stdin, "stop": stop})
        began = time.monotonic()
        thread.start()
        if wait_for(lambda: "watching both servers" in err.getvalue(), 600) is None:
            print(err.getvalue())
            return 1
        print(f"{len(items)} items, first full sync and start {time.monotonic() - began:.1f} s")
        time.sleep(0.5)

        to_sage: list[float] = []
        to_plex: list[float] = []
        servers.sage.clear_log()
        servers.plex.clear_log()
        for n in range(args.stops):
            item = items[n]
            position = (10 + n % 20) * MIN
            user.plex_play(item, position - MIN)
            user.plex_stop(item, position)
            took = wait_for(lambda i=item, p=position: abs(world.sage_position_ms(i) - p)
                            < 2000, 30)
            to_sage.append(took if took is not None else float("inf"))
        plex_side = (len(servers.sage.requests()), len(servers.plex.requests()))
        servers.sage.clear_log()
        servers.plex.clear_log()
        phase = random.Random(17)
        for n in range(args.stops):
            item = items[args.stops + n]
            position = (10 + n % 20) * MIN
            # A stop lands anywhere between two polls (one right after the last item's
            # sync would always wait a whole poll).
            time.sleep(phase.uniform(0, args.poll))
            user.sage_play(item, position - MIN)
            user.sage_stop(item, position)
            took = wait_for(lambda i=item, p=position: abs(
                world.plex_item(i).view_offset_ms - p) < 2000, args.poll + 30)
            to_plex.append(took if took is not None else float("inf"))
        sage_side = (len(servers.sage.requests()), len(servers.plex.requests()))
        stop.set()
        thread.join(30)

    for name, times, target, (sage_n, plex_n) in (
            ("Plex -> SageTV", to_sage, 5.0, plex_side),
            ("SageTV -> Plex", to_plex, args.poll + 5, sage_side)):
        p50, p95 = statistics.median(times), percentile(times, 0.95)
        verdict = "ok" if p95 <= target else "OVER TARGET"
        print(f"{name}: {len(times)} stops, p50 {p50:.2f} s, p95 {p95:.2f} s "
              f"(target p95 <= {target:g} s: {verdict}); requests per synced item: "
              f"SageTV {sage_n / len(times):.1f}, Plex {plex_n / len(times):.1f} "
              f"(polls included)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
