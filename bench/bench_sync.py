#!/usr/bin/env python3
"""Benchmark of sageplex_sync against the fake SageTV and Plex servers of tests/fakes/.

    python bench/bench_sync.py                         1,000, 10,000 and 50,000 items
    python bench/bench_sync.py --sizes 2000 --repeat 1
    python bench/bench_sync.py --quick                 1,000 and 10,000, fewer repeats

For each size it builds a world in both fakes (40 shows of many seasons and episodes plus
~12 % movies, 1 in 500 a split two-file recording; 5 % out of sync, spread over every row of
the decision table), serves it from this process on 127.0.0.1 and runs, each in its own
subprocess so that peak memory (``os.wait4`` rusage) and start-up are the tool's own:

* the FLOOR: one raw ``requests`` GET per listing (SageTV's GetMediaFiles with the tool's
  size and filter, each Plex section's episode/movie listing in one page) and a plain parse
  (``json.loads`` / ``ElementTree.fromstring``), nothing else;
* the tool's full check (``all``), its sync (``all -s``) and a check after the sync (which
  must find everything in sync and write nothing);
* the ORIGINAL tool's strategy on a sample: one ``plex:GetMediaFileForName`` request per
  Plex item (the original's JS service, enabled in the fake: a linear scan of every media
  file per call), extrapolated to all items.

Floor and tool are measured the same way (wall time around a subprocess, start-up
included) and alternately, ``--repeat`` times, keeping the fastest; ratios compare figures
of one run only. The fakes pre-render their listings (a warm-up fetch before timing),
keep connections alive and report the seconds spent inside them ("server"). Speed targets
are checked here, by ratios printed, never by timed assertions in the test suite.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "sageplex_sync.py"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SHOWS = 40
EPISODES_PER_SEASON = 22
MOVIE_SHARE = 0.12
OUT_OF_SYNC_EVERY = 20  # 5 %
SPLIT_EVERY = 500  # a recording restarted mid-way: two files, stacked as one Plex item
TARGET_FLOOR_RATIO = 1.5
TARGET_SCALING = 5.5
TARGET_SPEEDUP = 50
TARGET_RSS_MB = 300


# -----------------------------------------------------------------------------------------
# Workers: run as subprocesses of the benchmark (`--worker NAME SPEC.json`)
# -----------------------------------------------------------------------------------------

def worker_floor(spec: dict) -> dict:
    """The floor: one raw request per listing and a plain parse, nothing else."""
    started = time.perf_counter()
    import xml.etree.ElementTree as ElementTree

    import requests

    imported = time.perf_counter()
    sage = requests.Session()
    sage.trust_env = False
    sage.auth = (spec["sage_user"], spec["sage_password"])
    reply = sage.get(spec["sage_url"], params=spec["sage_params"], timeout=60)
    records = json.loads(reply.content)["Result"]
    plex = requests.Session()
    plex.trust_env = False
    videos = 0
    for url in spec["plex_urls"]:
        reply = plex.get(url, timeout=60, headers={
            "X-Plex-Token": spec["plex_token"], "X-Plex-Container-Start": "0",
            "X-Plex-Container-Size": str(spec["plex_page_size"])})
        root = ElementTree.fromstring(reply.content)
        videos += len(root.findall("Video"))
    done = time.perf_counter()
    return {"records": len(records), "videos": videos, "import_s": imported - started,
            "work_s": done - imported}


def worker_original(spec: dict) -> dict:
    """The original tool's per-item look-up, one request per sampled Plex item."""
    import requests

    session = requests.Session()
    session.trust_env = False
    session.auth = (spec["sage_user"], spec["sage_password"])
    found = 0
    started = time.perf_counter()
    for name in spec["names"]:
        reply = session.get(spec["sage_url"], timeout=600, params={
            "c": "plex:GetMediaFileForName", "1": name, "encoder": "json"})
        found += isinstance(json.loads(reply.content).get("MediaFile"), dict)
    elapsed = time.perf_counter() - started
    return {"samples": len(spec["names"]), "found": found, "seconds": elapsed}


def worker_startup(spec: dict) -> dict:
    """Nothing: what python and the tool's imports cost (timed from outside)."""
    import plexapi.server  # noqa: F401  (imported by the tool on connecting)

    import sageplex_sync  # noqa: F401

    return {}


WORKERS = {"floor": worker_floor, "original": worker_original, "startup": worker_startup}


# -----------------------------------------------------------------------------------------
# The world
# -----------------------------------------------------------------------------------------

@dataclass
class WorldInfo:
    size: int
    episodes: int = 0
    movies: int = 0
    seasons: int = 0
    splits: int = 0
    out_of_sync: int = 0
    rows: dict[str, int] = field(default_factory=dict)
    build_s: float = 0.0


def _states(index: int):  # -> (sage Watch, plex Watch, row label or "")
    """5 % out of sync over the decision table's rows (both directions of rows 5-7), the
    rest in sync in the usual proportions (mostly unwatched or watched, some in progress)."""
    from tests.fakes.world import DAY, HOUR, MIN, at, none, watched

    if index % OUT_OF_SYNC_EVERY == 7:
        variant = (index // OUT_OF_SYNC_EVERY) % 10
        return [
            (watched(ago=2 * DAY), none(), "1 Sage watched"),
            (none(), watched(ago=DAY), "2 Plex watched"),
            (at(12 * MIN, ago=HOUR), none(), "3 Sage position"),
            (none(), at(14 * MIN, ago=HOUR), "4 Plex position"),
            (watched(ago=3 * DAY), at(6 * MIN, ago=HOUR, view_count=1), "5 Plex newer"),
            (watched(ago=HOUR), at(10 * MIN, ago=3 * DAY, view_count=1), "5 Sage newer"),
            (at(11 * MIN, ago=4 * DAY), watched(ago=HOUR), "6 Plex newer"),
            (at(13 * MIN, ago=HOUR), watched(ago=2 * DAY), "6 Sage newer"),
            (at(20 * MIN, ago=2 * DAY), at(8 * MIN, ago=HOUR), "7 Plex newer"),
            (at(18 * MIN, ago=HOUR), at(4 * MIN, ago=DAY), "7 Sage newer"),
        ][variant]
    kind = index % 10
    if kind in (0, 1, 2, 3, 9):
        return none(), none(), ""
    if kind in (4, 5, 6):
        return watched(ago=5 * DAY), watched(ago=5 * DAY), ""
    if kind == 7:
        return at(12 * MIN, ago=DAY), at(12 * MIN + 800, ago=HOUR), ""
    return watched(ago=None), watched(ago=2 * DAY, times=2), ""


def build_world(size: int):  # -> (World, WorldInfo)
    from tests.fakes.world import HOUR, MIN, World

    started = time.perf_counter()
    world = World(sage_options={"plex_js_service": True})
    # every recording gets its own 3-hour slot: start far enough back that none is in
    # the future (World starts 60 days back, fine for tests, not for 50,000 items)
    world._next_slot_ms = world.clock.ms() - (size + 10) * 3 * HOUR
    info = WorldInfo(size)
    info.movies = round(size * MOVIE_SHARE)
    info.episodes = size - info.movies
    per_show = -(-info.episodes // SHOWS)
    for index in range(size):
        sage, plex, row = _states(index)
        options = {"segments": 2} if index % SPLIT_EVERY == 3 else {}
        info.splits += bool(options)
        if row:
            info.out_of_sync += 1
            info.rows[row] = info.rows.get(row, 0) + 1
        if index < info.episodes:
            show, number = divmod(index, per_show)
            season, episode = divmod(number, EPISODES_PER_SEASON)
            info.seasons += episode == 0
            world.episode(f"Show {show:02d}", season + 1, episode + 1, f"Episode {number + 1}",
                          sage=sage, plex=plex, duration_ms=30 * MIN, **options)
        else:
            number = index - info.episodes
            world.movie(f"Movie {number:05d}", year=1950 + number % 75, sage=sage, plex=plex,
                        duration_ms=110 * MIN, **options)
    info.build_s = time.perf_counter() - started
    return world, info


# -----------------------------------------------------------------------------------------
# Running things in subprocesses
# -----------------------------------------------------------------------------------------

@dataclass
class ChildRun:
    wall_s: float
    code: int
    rss_mb: float
    cpu_s: float
    out: str
    err: str
    server_s: dict[str, float] = field(default_factory=dict)  # per fake: seconds in the app
    serve_s: dict[str, float] = field(default_factory=dict)  # ... and handling requests
    requests: dict[str, dict[str, int]] = field(default_factory=dict)  # fake -> function -> n


def spawn(job: dict) -> dict:
    """Run one subprocess, stdout and stderr to files (nothing to drain); its wall time,
    exit code, peak RSS (KB) and CPU seconds from os.wait4."""
    with open(job["out"], "wb") as out, open(job["err"], "wb") as err:
        started = time.perf_counter()
        proc = subprocess.Popen(job["argv"], stdout=out, stderr=err, env=job["env"],
                                cwd=job["cwd"])
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    return {"wall_s": wall, "code": proc.returncode, "maxrss_kb": usage.ru_maxrss,
            "cpu_s": usage.ru_utime + usage.ru_stime}


def spawner_loop() -> int:
    """`--spawner`: run the jobs read from stdin (one JSON a line), answer on stdout."""
    for line in sys.stdin:
        sys.stdout.write(json.dumps(spawn(json.loads(line))) + "\n")
        sys.stdout.flush()
    return 0


class Spawner:
    """Starts the measured subprocesses from a small helper process, itself started before
    any world is built. Linux counts in a child's ru_maxrss the memory it had before exec,
    i.e. a copy of its parent: a child of this process, which holds a 50,000-item world,
    would seem to peak at this process's size."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()),
                                      "--spawner"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)

    def run(self, job: dict) -> dict:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait()


SPAWNER: Spawner | None = None


def run_child(argv: list[str], env: dict[str, str], workdir: Path) -> ChildRun:
    out_path, err_path = workdir / "child.out", workdir / "child.err"
    job = {"argv": argv, "env": env, "cwd": str(ROOT), "out": str(out_path),
           "err": str(err_path)}
    result = SPAWNER.run(job) if SPAWNER is not None else spawn(job)
    return ChildRun(result["wall_s"], result["code"], result["maxrss_kb"] / 1024,
                    result["cpu_s"], out_path.read_text(encoding="utf-8", errors="replace"),
                    err_path.read_text(encoding="utf-8", errors="replace"))


def run_worker(name: str, spec: dict, env: dict[str, str], workdir: Path) -> tuple[ChildRun, dict]:
    spec_path = workdir / f"{name}.json"
    spec_path.write_text(json.dumps(spec), encoding="utf-8")
    run = run_child([sys.executable, str(Path(__file__).resolve()), "--worker", name,
                     str(spec_path)], env, workdir)
    if run.code != 0:
        raise RuntimeError(f"worker {name} failed ({run.code}):\n{run.err}")
    return run, json.loads(run.out)


class Bench:
    """One world served, and the runs measured against it."""

    def __init__(self, world, servers, workdir: Path) -> None:
        import sageplex_sync

        self.world = world
        self.servers = servers
        self.workdir = workdir
        self.config = servers.write_config(workdir / "sageplex_cfg.json")
        self.env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        self.env.update(SAGEPLEX_CFG=str(self.config), SAGEPLEX_LOG=str(workdir / "tool.log"),
                        PLEXAPI_CONFIG_PATH=str(workdir / "no-plexapi-config.ini"),
                        PYTHONDONTWRITEBYTECODE="1")
        from tests.fakes.world import PLEX_TOKEN, SAGE_PASSWORD, SAGE_USER

        sections = [(world.tv_section, 4), (world.movie_section, 1)]
        self.floor_spec = {
            "sage_url": f"{servers.sage.base_url}/sagex/api", "sage_user": SAGE_USER,
            "sage_password": SAGE_PASSWORD,
            "sage_params": {"c": "GetMediaFiles", "1": "TV", "encoder": "json",
                            "size": sageplex_sync.SAGEX_PAGE_SIZE,
                            "filter": "|".join(sageplex_sync.SAGE_FIELDS)},
            "plex_urls": [f"{servers.plex.base_url}/library/sections/{key}/all?type={kind}"
                          for key, kind in sections],
            "plex_token": PLEX_TOKEN, "plex_page_size": sageplex_sync.PLEX_PAGE_SIZE}

    def _fakes(self):
        return {"SageTV": self.servers.sage, "Plex": self.servers.plex}

    def _reset(self) -> None:
        for fake in self._fakes().values():
            fake.clear_log()
            fake.reset_stats()

    def _collect(self, run: ChildRun) -> ChildRun:
        for name, fake in self._fakes().items():
            stats = fake.stats()
            run.server_s[name] = stats.app_s
            run.serve_s[name] = stats.serve_s
            counts: dict[str, int] = {}
            for request in fake.requests():
                key = request.function or request.path
                counts[key] = counts.get(key, 0) + 1
            run.requests[name] = counts
        return run

    def tool(self, *args: str, workers: int | None = None) -> ChildRun:
        """Run the tool (``workers``: with that many write workers instead of its own)."""
        self._reset()
        argv = [sys.executable, str(TOOL), *args]
        if workers is not None:
            argv = [sys.executable, "-c", "import sys, sageplex_sync as s; "
                    f"s.WRITE_WORKERS = {workers}; sys.exit(s.main(sys.argv[1:]))", *args]
        run = run_child(argv, self.env, self.workdir)
        if run.code not in (0,):
            raise RuntimeError(f"sageplex_sync {' '.join(args)} exited {run.code}:\n"
                               f"{run.err[-2000:]}")
        return self._collect(run)

    def floor(self) -> tuple[ChildRun, dict]:
        self._reset()
        run, result = run_worker("floor", self.floor_spec, self.env, self.workdir)
        return self._collect(run), result

    def original(self, names: list[str]) -> tuple[ChildRun, dict]:
        spec = {key: self.floor_spec[key] for key in ("sage_url", "sage_user", "sage_password")}
        spec["names"] = names
        self._reset()
        run, result = run_worker("original", spec, self.env, self.workdir)
        return self._collect(run), result

    def startup(self) -> float:
        return run_worker("startup", {}, self.env, self.workdir)[0].wall_s


# -----------------------------------------------------------------------------------------
# Measuring one size
# -----------------------------------------------------------------------------------------

@dataclass
class SizeResult:
    info: WorldInfo
    floor: ChildRun
    floor_result: dict
    check: ChildRun
    checks: list[float]
    floors: list[float]
    sync: ChildRun
    after: ChildRun
    original_per_item_s: float
    original_samples: int
    original_found: int
    startup_s: float
    cleared_then_set: int

    @property
    def original_s(self) -> float:
        return self.original_per_item_s * self.info.size


def total_line(out: str) -> str:
    return next((ln for ln in reversed(out.splitlines()) if ln.startswith("Total:")), "?")


def count_of(words: str, line: str) -> int:
    found = re.search(r"(\d+) " + re.escape(words), line)
    return int(found.group(1)) if found else 0


def writes(run: ChildRun) -> dict[str, int]:
    """Write requests each fake received during a run."""
    from tests.fakes.fake_plex import WRITE_FUNCTIONS as PLEX_WRITES
    from tests.fakes.fake_sagex import FakeSage

    return {name: sum(n for f, n in run.requests[name].items() if f in functions)
            for name, functions in (("SageTV", FakeSage.WRITE_FUNCTIONS), ("Plex", PLEX_WRITES))}


def write_order(fake) -> tuple[int, int]:
    """(items whose ClearWatched and SetWatchedTimes both reached SageTV, those of them
    where the SetWatchedTimes came first): the two calls of one item must keep their order."""
    first: dict[tuple[str, str | None], int] = {}
    for index, request in enumerate(fake.requests()):
        if request.function in ("ClearWatched", "SetWatchedTimes"):
            first.setdefault((request.function, request.param("1")), index)
    both = wrong = 0
    for (function, airing), index in first.items():
        if function == "ClearWatched" and ("SetWatchedTimes", airing) in first:
            both += 1
            wrong += first[("SetWatchedTimes", airing)] < index
    return both, wrong


def describe_requests(counts: dict[str, int]) -> str:
    return ", ".join(f"{name} {n}" for name, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def measure(size: int, repeat: int, samples: int, say) -> SizeResult:
    world, info = build_world(size)
    gc.collect()
    gc.freeze()  # the fakes' library is permanent: keep the collector off it while serving
    say(f"\n== {size:,} items: {info.episodes:,} episodes ({SHOWS} shows, {info.seasons} "
        f"seasons), {info.movies:,} movies, {info.splits} split recordings; "
        f"{info.out_of_sync:,} out of sync — world built in {info.build_s:.1f} s")
    with tempfile.TemporaryDirectory(prefix="sageplex-bench-") as tmp, world.running() as servers:
        bench = Bench(world, servers, Path(tmp))
        bench.floor()  # warm-up: the fakes render and cache every listing fragment
        startup = min(bench.startup() for _ in range(max(2, repeat)))
        floors: list[tuple[ChildRun, dict]] = []
        checks: list[ChildRun] = []
        for _ in range(repeat):  # alternate, so that noise hits both alike
            floors.append(bench.floor())
            checks.append(bench.tool("all"))
        floor, floor_result = min(floors, key=lambda fr: fr[0].wall_s)
        check = min(checks, key=lambda run: run.wall_s)
        if floor_result["records"] != size or floor_result["videos"] != size:
            raise RuntimeError(f"floor saw {floor_result}, expected {size} of each")
        line = total_line(check.out)
        if count_of("videos", line) != size or \
                count_of("in-sync", line) != size - info.out_of_sync:
            raise RuntimeError(f"check reported {line!r}, expected {size} videos, "
                               f"{size - info.out_of_sync} in sync")
        # the original strategy, on items spread evenly over the library
        step = max(1, size // samples)
        names = [world.items[i].file_names[0] for i in range(step // 2, size, step)][:samples]
        _, original = bench.original(names)
        if original["found"] != len(names):
            raise RuntimeError(f"original look-ups found {original['found']} of {len(names)}")
        sync = bench.tool("all", "-s")
        line = total_line(sync.out)
        if count_of("updated", line) != info.out_of_sync:
            raise RuntimeError(f"sync reported {line!r}, expected {info.out_of_sync} updated")
        cleared_then_set, out_of_order = write_order(servers.sage)
        if out_of_order:
            raise RuntimeError(f"{out_of_order} items got SetWatchedTimes before ClearWatched")
        after = bench.tool("all")
        line = total_line(after.out)
        if count_of("in-sync", line) != size or sum(writes(after).values()):
            raise RuntimeError(f"check after the sync reported {line!r}, writes "
                               f"{writes(after)}")
    gc.unfreeze()
    result = SizeResult(info, floor, floor_result, check, [c.wall_s for c in checks],
                        [f[0].wall_s for f in floors], sync, after,
                        original["seconds"] / original["samples"], original["samples"],
                        original["found"], startup, cleared_then_set)
    report_size(result, say)
    del world
    gc.collect()
    return result


def report_size(r: SizeResult, say) -> None:
    floor_net = r.floor_result["work_s"]
    floor_start = r.floor.wall_s - floor_net

    def server(run: ChildRun) -> str:
        total = sum(run.server_s.values())
        return (f"server {total:.2f} s = {100 * total / run.wall_s:.0f} % "
                f"(SageTV {run.server_s['SageTV']:.2f}, Plex {run.server_s['Plex']:.2f}; "
                f"{sum(run.serve_s.values()):.2f} s with HTTP handling)")

    def spread(values: list[float]) -> str:
        return (f"best of {len(values)}, median {statistics.median(values):.2f} s"
                if len(values) > 1 else "1 run")

    say(f"  floor  raw GET+parse, 3 listings   {r.floor.wall_s:6.2f} s wall ({spread(r.floors)}; "
        f"start-up {floor_start:.2f} s + work {floor_net:.2f} s); {server(r.floor)}")
    say(f"  check  `all`                       {r.check.wall_s:6.2f} s wall ({spread(r.checks)}; "
        f"start-up {r.startup_s:.2f} s) = {r.check.wall_s / r.floor.wall_s:.2f}x floor "
        f"[{(r.check.wall_s - r.startup_s) / floor_net:.2f}x without start-ups]; "
        f"CPU {r.check.cpu_s:.2f} s; peak RSS {r.check.rss_mb:.0f} MB; {server(r.check)}")
    sync_writes = writes(r.sync)
    say(f"  sync   `all -s`                    {r.sync.wall_s:6.2f} s wall; "
        f"{r.info.out_of_sync:,} items updated with {sync_writes['SageTV']:,} SageTV + "
        f"{sync_writes['Plex']:,} Plex writes; CPU {r.sync.cpu_s:.2f} s; peak RSS "
        f"{r.sync.rss_mb:.0f} MB; {server(r.sync)}")
    say(f"  again  `all` after the sync         {r.after.wall_s:6.2f} s wall; "
        f"{total_line(r.after.out)} (0 writes); in the sync, ClearWatched came before "
        f"SetWatchedTimes for all {r.cleared_then_set:,} items that had both")
    say(f"  original per-item look-ups         {r.original_s:6.1f} s (EXTRAPOLATED from "
        f"{r.original_samples} samples, {1000 * r.original_per_item_s:.1f} ms each, times "
        f"{r.info.size:,}; excludes its own Plex listing) = "
        f"{r.original_s / r.check.wall_s:,.0f}x the check")
    for label, run in (("check", r.check), ("sync", r.sync)):
        say(f"  requests ({label}): SageTV {sum(run.requests['SageTV'].values()):,} "
            f"[{describe_requests(run.requests['SageTV'])}]; Plex "
            f"{sum(run.requests['Plex'].values()):,} [{describe_requests(run.requests['Plex'])}]")


def measure_pool(size: int, latency_ms: float, say) -> dict[int, ChildRun]:
    """The first sync of a world with the fakes answering every write after ``latency_ms``
    (a real server commits it to its database), with one write worker and with the tool's
    own pool: a fresh world for each, as a sync changes it."""
    import sageplex_sync

    runs: dict[int, ChildRun] = {}
    for workers in (1, sageplex_sync.WRITE_WORKERS):
        world, info = build_world(size)
        with tempfile.TemporaryDirectory(prefix="sageplex-bench-") as tmp, \
                world.running() as servers:
            for fake in (servers.sage, servers.plex):
                fake.write_delay_s = latency_ms / 1000
            bench = Bench(world, servers, Path(tmp))
            run = runs[workers] = bench.tool("all", "-s", workers=workers)
            if count_of("updated", total_line(run.out)) != info.out_of_sync:
                raise RuntimeError(f"sync reported {total_line(run.out)!r}")
        del world
        gc.collect()
    one, pool = runs[1], runs[sageplex_sync.WRITE_WORKERS]
    sync_writes = writes(pool)
    say(f"\n== write pool: first sync of {size:,} items ({sum(sync_writes.values()):,} writes), "
        f"the fakes taking {latency_ms:g} ms to answer each write")
    say(f"  1 write worker: {one.wall_s:.2f} s; the tool's {sageplex_sync.WRITE_WORKERS} workers: "
        f"{pool.wall_s:.2f} s ({one.wall_s / pool.wall_s:.1f}x faster)")
    return runs


# -----------------------------------------------------------------------------------------
# Summary
# -----------------------------------------------------------------------------------------

def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{os.cpu_count()} CPUs ({cpu}), Python {platform.python_version()}, "
            f"{platform.system()} {platform.release()}")


def summary(results: list[SizeResult], say) -> None:
    say("\n   items |  check | floor | tool/floor |   sync | original (extrap.) | speed-up |"
        " RSS check/sync | SageTV req | Plex req")
    say("  -------+--------+-------+------------+--------+--------------------+----------+"
        "----------------+------------+---------")
    for r in results:
        say(f"  {r.info.size:>6,} | {r.check.wall_s:5.2f}s | {r.floor.wall_s:4.2f}s | "
            f"{r.check.wall_s / r.floor.wall_s:9.2f}x | {r.sync.wall_s:5.2f}s | "
            f"{r.original_s:16.1f}s | {r.original_s / r.check.wall_s:7,.0f}x | "
            f"{r.check.rss_mb:5.0f} / {r.sync.rss_mb:4.0f} MB | "
            f"{sum(r.check.requests['SageTV'].values()):>10,} | "
            f"{sum(r.check.requests['Plex'].values()):>7,}")
    by_size = {r.info.size: r for r in results}
    say("\nTargets (ratios within this run):")

    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    sage_counts = {sum(r.check.requests["SageTV"].values()) for r in results}
    plex_counts = {sum(r.check.requests["Plex"].values()) for r in results}
    say(f"  reads: SageTV requests per check {sorted(sage_counts)}, Plex {sorted(plex_counts)} "
        f"(2 sections) for every size: "
        f"{verdict(len(sage_counts) == 1 and len(plex_counts) == 1)}")
    big = by_size.get(50_000) or results[-1]
    ratio = big.check.wall_s / big.floor.wall_s
    say(f"  check at {big.info.size:,} items <= {TARGET_FLOOR_RATIO}x floor: {ratio:.2f}x "
        f"{verdict(ratio <= TARGET_FLOOR_RATIO)}")
    if 10_000 in by_size and 50_000 in by_size:
        scale = by_size[50_000].check.wall_s / by_size[10_000].check.wall_s
        say(f"  scaling 10,000 -> 50,000 items <= {TARGET_SCALING}x: {scale:.2f}x "
            f"{verdict(scale <= TARGET_SCALING)}")
    mid = by_size.get(10_000)
    if mid is not None:
        speedup = mid.original_s / mid.check.wall_s
        say(f"  >= {TARGET_SPEEDUP}x faster than the original at 10,000 items: {speedup:,.0f}x "
            f"{verdict(speedup >= TARGET_SPEEDUP)} (original extrapolated from "
            f"{mid.original_samples} samples)")
    rss = max(big.check.rss_mb, big.sync.rss_mb)
    say(f"  peak RSS at {big.info.size:,} items < {TARGET_RSS_MB} MB: {rss:.0f} MB "
        f"{verdict(rss < TARGET_RSS_MB)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,10000,50000",
                        help="comma-separated item counts (default 1000,10000,50000)")
    parser.add_argument("--quick", action="store_true",
                        help="1,000 and 10,000 items, one repetition, 50 samples")
    parser.add_argument("--repeat", type=int, default=3,
                        help="floor/check repetitions, the fastest is kept (default 3)")
    parser.add_argument("--samples", type=int, default=200,
                        help="Plex items timed with the original's look-up (default 200)")
    parser.add_argument("--pool-size", type=int, default=10_000,
                        help="items of the write-pool experiment (default 10000; 0: skip it)")
    parser.add_argument("--write-latency-ms", type=float, default=5.0,
                        help="what each write costs the fakes in that experiment (default 5)")
    parser.add_argument("--worker", nargs=2, metavar=("NAME", "SPEC"), help=argparse.SUPPRESS)
    parser.add_argument("--spawner", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.spawner:
        return spawner_loop()
    if args.worker:
        name, spec_path = args.worker
        result = WORKERS[name](json.loads(Path(spec_path).read_text(encoding="utf-8")))
        sys.stdout.write(json.dumps(result))
        return 0
    if args.quick:
        args.sizes, args.repeat, args.samples = "1000,10000", 1, 50
    sizes = [int(s.replace("_", "")) for s in args.sizes.split(",") if s.strip()]

    def say(text: str) -> None:
        print(text, flush=True)

    global SPAWNER
    SPAWNER = Spawner()  # before any world: see Spawner
    try:
        say(f"sageplex_sync benchmark, {datetime.date.today().isoformat()}, {machine()}")
        say(f"sizes {', '.join(f'{s:,}' for s in sizes)}; floor and check: best of "
            f"{args.repeat}; all wall times are around a subprocess (python start-up "
            "included), peak RSS and CPU from its rusage")
        say("server = seconds inside the fakes' code; 'with HTTP handling' adds parsing the "
            "requests and writing the replies, which waits while the client is busy reading")
        results = [measure(size, args.repeat, args.samples, say) for size in sizes]
        if args.pool_size:
            measure_pool(args.pool_size, args.write_latency_ms, say)
        summary(results, say)
    finally:
        SPAWNER.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
