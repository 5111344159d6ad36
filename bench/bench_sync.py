#!/usr/bin/env python3
"""Benchmark of sageplex_sync against the fake SageTV and Plex servers of tests/fakes/.

    python bench/bench_sync.py                         1,000, 10,000, 50,000 and 100,000 items
    python bench/bench_sync.py --sizes 2000 --repeat 1
    python bench/bench_sync.py --quick                 1,000 and 10,000, fewer repeats
    python bench/bench_sync.py --slow-listing          also 100,000 items behind a 60 s listing

For each size it builds a world in both fakes (40 shows of many seasons and episodes plus
~12 % movies, 1 in 500 a split two-file recording; 5 % out of sync, spread over every row of
the decision table), serves it from this process on 127.0.0.1 and runs, each in its own
subprocess so that peak memory (the most it and any process it starts held at once, sampled
from /proc, and never less than ``os.wait4``'s peak) and start-up are the tool's own:

* the FLOOR: the tool's own listing requests (SageTV's GetMediaFiles for exactly
  ``sageplex_sync.SAGE_FIELDS``, each Plex section's listing in one page), their paths and
  queries built from the tool's constants, their headers copied from the tool's requests, and
  checked against what the fakes logged from a check (the bench stops if they differ); both
  servers read at once (a thread each) with ``http.client`` in 1 MB pieces, SageTV's reply
  through ``json.loads`` and each Plex listing through expat keeping each video's attributes
  and files. It is timed inside its process (no interpreter start-up, no imports): the
  tool's check, start-up included, is compared with that;
* the tool's full check (``all``), its first sync (``all -s``) and a check after the sync
  (which must find everything in sync and write nothing), each with a fresh ``--state``;
* the ORIGINAL tool's strategy on a sample: one ``plex:GetMediaFileForName`` request per
  Plex item (the original's JS service, enabled in the fake: a linear scan of every media
  file per call), extrapolated to all items: a per-item comparison, not a floor.

Before the sizes, start-up: ``--version`` and ``-l`` (as ``python sageplex_sync.py``, which
compiles the script on every run, and as the installed command runs it, byte code cached)
against ``python -c "import plexapi, requests"``, medians of ``--startup-repeat`` runs in turn.
After them, the write phase: a first sync of ``--write-size`` (10,000) items, all out of sync
(half a SageTV SetWatched, read back; half a Plex scrobble), every SageTV request taking
``--write-sage-ms`` (20) and every Plex request ``--write-plex-ms`` (5), default write
workers, against its latency bound: the check of the same world plus, for the slower server,
its requests beyond the check x latency / workers; and against a measured floor: the check
plus the same requests replayed with http.client by as many threads per server (the
fastest of ``--write-repeat`` rounds, each in a fresh world). The share of the machine's CPU
time the hypervisor took meanwhile ("steal", from /proc/stat) is printed with it: a bound
computed from latencies does not slow down when the host takes the CPUs away, a run does.
And, opt-in, a 100,000-item check and
first sync against a SageTV that takes ``--list-delay-s`` 60 s to build its listing
(``--slow-listing``; default config, so ``sagex.list_timeout`` 600 s).

The check and the floor run alternately, ``--repeat`` times, keeping the fastest of each;
ratios compare figures of one run only. Server latency (``--read-latency-ms``,
``--write-latency-ms``, ``--list-delay-s``) applies to floor and tool alike. The fakes
pre-render their listings (a warm-up check before timing), keep connections alive and report
the seconds spent inside them ("server"). Speed targets are checked here, by ratios printed,
never by timed assertions in the test suite.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import http.client
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple
from xml.parsers import expat

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "sageplex_sync.py"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SHOWS = 40
EPISODES_PER_SEASON = 22
MOVIE_SHARE = 0.12
OUT_OF_SYNC_PCT = 5.0  # of the main worlds, spread over the decision table's rows
SPLIT_EVERY = 500  # a recording restarted mid-way: two files, stacked as one Plex item
TARGET_FLOOR_RATIO = 1.5  # check (wall) / the floor (timed in its process), at these sizes:
TARGET_FLOOR_SIZES = (50_000, 100_000)
TARGET_RSS_MB = {100_000: 300}  # peak RSS (check and sync) below this
TARGET_WRITE_BOUND = 1.3  # first sync / (check + the slower server's requests x latency / workers)
TARGET_STARTUP = 1.2  # --version and -l / python -c "import plexapi, requests"
TARGET_SPEEDUP = 50  # vs the original's per-item look-ups at 10,000 items (informative)
FLOOR_READ_CHUNK = 1024 * 1024  # the floor reads replies in pieces of this size
LISTING_PATH = re.compile(r"/library/sections/\d+/all")  # a Plex section listing


def path_query(path: str, query: list[tuple[str, list[str]]]) -> str:
    """A request's path and query (parsed, as the fakes log it), in one canonical form."""
    return path + "?" + urllib.parse.urlencode([(k, v) for k, vs in sorted(query) for v in vs])


def url_key(url: str) -> str:
    """A path with its query string in the canonical form of ``path_query``."""
    split = urllib.parse.urlsplit(url)
    return path_query(split.path, list(urllib.parse.parse_qs(split.query,
                                                             keep_blank_values=True).items()))


# -----------------------------------------------------------------------------------------
# Workers: run as subprocesses of the benchmark (`--worker NAME SPEC.json`)
# -----------------------------------------------------------------------------------------

def worker_floor(spec: dict) -> dict:
    """The honest floor: the tool's own listing requests (same paths, queries and headers),
    both servers at once (one thread each), with the standard library's HTTP client reading
    1 MB pieces; SageTV's reply through ``json.loads``, each Plex listing through expat
    keeping each Video's attributes and its parts' files. Nothing is imported in here: the
    timer starts when the work does. The cyclic garbage collector is off, as the tool pauses
    it while it reads: it would otherwise scan the records built here over and over."""
    gc.disable()
    started = time.perf_counter()
    found = {"records": 0, "videos": 0}

    def body_pieces(conn: http.client.HTTPConnection, path: str, headers: dict):
        conn.request("GET", path, headers=headers)
        reply = conn.getresponse()
        if reply.status != 200:
            raise RuntimeError(f"floor: HTTP {reply.status} for {path}")
        while piece := reply.read(FLOOR_READ_CHUNK):
            yield piece

    def sage() -> None:
        conn = http.client.HTTPConnection(spec["sage_host"], spec["sage_port"],
                                          timeout=spec["timeout"])
        body = b"".join(body_pieces(conn, spec["sage_path"], spec["sage_headers"]))
        found["records"] = len(json.loads(body)["Result"])
        conn.close()

    def plex() -> None:
        conn = http.client.HTTPConnection(spec["plex_host"], spec["plex_port"],
                                          timeout=spec["timeout"])
        videos: list[tuple[dict, list[str]]] = []
        for path, headers in zip(spec["plex_paths"], spec["plex_headers"], strict=True):
            files: list[str] = []

            def start(tag: str, attrs: dict) -> None:
                nonlocal files
                if tag == "Part":
                    files.append(attrs.get("file", ""))
                elif tag == "Video":
                    files = []
                    videos.append((attrs, files))
            parser = expat.ParserCreate()
            parser.StartElementHandler = start
            for piece in body_pieces(conn, path, headers):
                parser.Parse(piece, False)
            parser.Parse(b"", True)
        found["videos"] = len(videos)
        conn.close()

    in_threads([sage, plex])
    return {**found, "work_s": time.perf_counter() - started}


def in_threads(calls: list) -> None:
    """Each call on a thread of its own, all at once; the first failure raised here."""
    errors: list[BaseException] = []

    def guarded(call) -> None:
        try:
            call()
        except BaseException as exc:  # reported below, from the calling thread
            errors.append(exc)
    threads = [threading.Thread(target=guarded, args=(call,)) for call in calls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def worker_write_floor(spec: dict) -> dict:
    """The write phase's floor: the requests a first sync sent beyond its check, as the
    fakes logged them (method, path and query, headers), replayed with the standard
    library's HTTP client by as many threads per server as the tool has write workers,
    both servers at once, each thread on one kept-alive connection; every reply read whole
    and parsed (``json.loads`` for SageTV's, expat for Plex's). Timed in its process."""
    started = time.perf_counter()

    def parse_xml(body: bytes) -> None:
        if body.strip():
            expat.ParserCreate().Parse(body, True)

    def replay(server: dict, taken: list[int], lock: threading.Lock) -> None:
        parse = json.loads if server["json"] else parse_xml
        conn = http.client.HTTPConnection("127.0.0.1", server["port"], timeout=3600)
        while True:
            with lock:
                index = taken[0]
                taken[0] += 1
            if index >= len(server["requests"]):
                break
            method, url, headers = server["requests"][index]
            conn.request(method, url, headers=headers)
            reply = conn.getresponse()
            body = reply.read()
            if reply.status >= 300:
                raise RuntimeError(f"write floor: HTTP {reply.status} for {url}")
            parse(body)
        conn.close()

    calls = []
    for server in spec["servers"]:
        taken, lock = [0], threading.Lock()  # the next request, shared by the server's threads
        calls += [functools.partial(replay, server, taken, lock)
                  for _ in range(server["workers"])]
    in_threads(calls)
    return {"requests": sum(len(server["requests"]) for server in spec["servers"]),
            "work_s": time.perf_counter() - started}


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


WORKERS = {"floor": worker_floor, "write-floor": worker_write_floor,
           "original": worker_original}


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


def _states(index: int, variant: int | None, rows: int = 10):
    """(sage Watch, plex Watch, row label): out of sync (``variant`` is not None: the
    decision table's rows, both directions of rows 5-7, taken in turn; the first ``rows`` of
    them only) or in sync in the usual proportions (mostly unwatched or
    watched, some in progress); the row label is "" for those in sync."""
    from tests.fakes.world import DAY, HOUR, MIN, at, none, watched

    if variant is not None:
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
        ][variant % rows]
    kind = index % 10
    if kind in (0, 1, 2, 3, 9):
        return none(), none(), ""
    if kind in (4, 5, 6):
        return watched(ago=5 * DAY), watched(ago=5 * DAY), ""
    if kind == 7:
        return at(12 * MIN, ago=DAY), at(12 * MIN + 800, ago=HOUR), ""
    return watched(ago=None), watched(ago=2 * DAY, times=2), ""


def out_of_sync_indexes(size: int, pct: float) -> dict[int, int]:
    """Item index -> its ordinal among the out-of-sync items: ``pct`` % of ``size``, evenly
    spaced (at 5 %: items 7, 27, 47, ...). Half of them need a SageTV write, half a Plex
    write (the rows alternate between the two directions)."""
    if pct <= 0:
        return {}
    every = 100.0 / pct
    offset = min(7, max(0, int(every) - 1))
    count = round(size * pct / 100)
    return {min(size - 1, int(k * every) + offset): k for k in range(count)}


def build_world(size: int, out_of_sync_pct: float = OUT_OF_SYNC_PCT, rows: int = 10
                ):  # -> (World, WorldInfo)
    from tests.fakes.world import HOUR, MIN, World

    started = time.perf_counter()
    world = World(sage_options={"plex_js_service": True})
    # every recording gets its own 3-hour slot: start far enough back that none is in
    # the future (World starts 60 days back, fine for tests, not for 100,000 items)
    world._next_slot_ms = world.clock.ms() - (size + 10) * 3 * HOUR
    info = WorldInfo(size)
    info.movies = round(size * MOVIE_SHARE)
    info.episodes = size - info.movies
    per_show = -(-info.episodes // SHOWS)
    out = out_of_sync_indexes(size, out_of_sync_pct)
    for index in range(size):
        sage, plex, row = _states(index, out.get(index), rows)
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
    rss_mb: float  # the most its processes held at once (itself alone when it starts none)
    cpu_s: float
    out: str
    err: str
    children_rss_mb: float = 0.0  # the largest peak of a process it started (0: none)
    peaks_sum_mb: float = 0.0  # each process's own peak, added up: a bound never reached
    server_s: dict[str, float] = field(default_factory=dict)  # per fake: seconds in the app
    listings: tuple[int, int] = (0, 0)  # SageTV GetMediaFiles calls, the most at once
    serve_s: dict[str, float] = field(default_factory=dict)  # ... and handling requests
    requests: dict[str, dict[str, int]] = field(default_factory=dict)  # fake -> function -> n
    steal: float | None = None  # the machine's CPU time stolen by the hypervisor meanwhile


class TreeMemory:
    """The memory of a subprocess and of every process it starts (the tool forks one to
    read SageTV's listing), sampled from /proc every few milliseconds while they live:
    the largest sum of their resident sizes at one moment (pages a fork shares with its
    parent count twice), plus the machine's in-memory files grown since the start (the
    batches Plex's listing process sends in memfd files, which no process's resident size
    counts while they are on their way), and each process's own peak (VmHWM). os.wait4's
    ru_maxrss is the largest of the subprocess and its children, never their sum."""

    INTERVAL_S = 0.005

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peaks_kb: dict[int, int] = {}  # each process's own high-water mark
        self.at_once_kb = 0  # the largest sum at one sample
        self._shmem_start_kb = self._shmem_kb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    @staticmethod
    def _children(pid: int) -> list[int]:
        try:
            text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
        except OSError:
            return []
        return [int(c) for c in text.split()]

    @staticmethod
    def _shmem_kb() -> int:
        """The machine's shared memory (tmpfs and memfd files among it), from /proc/meminfo."""
        try:
            found = re.search(r"^Shmem:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.M)
        except OSError:
            return 0
        return int(found[1]) if found else 0

    def _sample(self) -> None:
        while not self._stop.wait(self.INTERVAL_S):
            pending, total = [self.pid], max(0, self._shmem_kb() - self._shmem_start_kb)
            while pending:
                pid = pending.pop()
                pending += self._children(pid)
                try:
                    status = Path(f"/proc/{pid}/status").read_text()
                except OSError:
                    continue
                rss = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
                hwm = re.search(r"^VmHWM:\s+(\d+) kB", status, re.M)
                if rss and hwm:  # neither once it has exited
                    total += int(rss[1])
                    self.peaks_kb[pid] = max(self.peaks_kb.get(pid, 0), int(hwm[1]))
            self.at_once_kb = max(self.at_once_kb, total)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def spawn(job: dict) -> dict:
    """Run one subprocess, stdout and stderr to files (nothing to drain); its wall time,
    exit code, peak RSS (KB) and CPU seconds from os.wait4 (the CPU of the children it
    waited for included), and the memory of all its processes (TreeMemory)."""
    with open(job["out"], "wb") as out, open(job["err"], "wb") as err:
        started = time.perf_counter()
        proc = subprocess.Popen(job["argv"], stdout=out, stderr=err, env=job["env"],
                                cwd=job["cwd"])
        memory = TreeMemory(proc.pid)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
        memory.stop()
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    children = {pid: kb for pid, kb in memory.peaks_kb.items() if pid != proc.pid}
    return {"wall_s": wall, "code": proc.returncode, "maxrss_kb": usage.ru_maxrss,
            # never less than one process's own peak, which a sample may have missed
            "tree_rss_kb": max(usage.ru_maxrss, memory.at_once_kb),
            "children_rss_kb": max(children.values(), default=0),
            "peaks_sum_kb": usage.ru_maxrss + sum(children.values()),
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


def machine_ticks() -> list[int]:
    """The machine's CPU time so far per kind, in ticks (the first line of /proc/stat:
    user, nice, system, idle, iowait, irq, softirq, steal, ...); [] where there is none."""
    try:
        with open("/proc/stat", encoding="ascii") as stat:
            return [int(value) for value in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return []


def steal_share(before: list[int], after: list[int]) -> float | None:
    """The share of the machine's CPU time that the hypervisor gave to others meanwhile:
    a virtual CPU's "steal". A run that waited for its CPUs is slower for it, while a
    bound computed from latencies is not."""
    if len(before) < 8 or len(after) < 8:
        return None
    spent = [end - start for start, end in zip(before[:8], after[:8], strict=True)]
    return spent[7] / sum(spent) if sum(spent) else 0.0


def run_child(argv: list[str], env: dict[str, str], workdir: Path) -> ChildRun:
    out_path, err_path = workdir / "child.out", workdir / "child.err"
    job = {"argv": argv, "env": env, "cwd": str(ROOT), "out": str(out_path),
           "err": str(err_path)}
    ticks = machine_ticks()
    result = SPAWNER.run(job) if SPAWNER is not None else spawn(job)
    return ChildRun(result["wall_s"], result["code"], result["tree_rss_kb"] / 1024,
                    result["cpu_s"], out_path.read_text(encoding="utf-8", errors="replace"),
                    err_path.read_text(encoding="utf-8", errors="replace"),
                    result["children_rss_kb"] / 1024, result["peaks_sum_kb"] / 1024,
                    steal=steal_share(ticks, machine_ticks()))


def run_worker(name: str, spec: dict, env: dict[str, str], workdir: Path) -> tuple[ChildRun, dict]:
    spec_path = workdir / f"{name}.json"
    spec_path.write_text(json.dumps(spec), encoding="utf-8")
    run = run_child([sys.executable, str(Path(__file__).resolve()), "--worker", name,
                     str(spec_path)], env, workdir)
    if run.code != 0:
        raise RuntimeError(f"worker {name} failed ({run.code}):\n{run.err}")
    return run, json.loads(run.out)


@dataclass
class Latency:
    """What the fakes take to answer: every read, every write, and (SageTV) each listing."""

    read_ms: float = 0.0
    write_ms: float = 0.0
    list_s: float = 0.0
    sage_write_ms: float | None = None  # SageTV's writes alone, when not write_ms

    def apply(self, servers) -> None:
        for fake in (servers.sage, servers.plex):
            fake.read_delay_s = self.read_ms / 1000
            fake.write_delay_s = self.write_ms / 1000
        if self.sage_write_ms is not None:
            servers.sage.write_delay_s = self.sage_write_ms / 1000
        servers.world.sage.list_delay_s = self.list_s

    def __str__(self) -> str:
        sage_write = "" if self.sage_write_ms is None else \
            f" (SageTV writes {self.sage_write_ms:g} ms)"
        return (f"reads {self.read_ms:g} ms, writes {self.write_ms:g} ms{sage_write}, "
                f"SageTV listing {self.list_s:g} s")


class Bench:
    """One world served, and the runs measured against it. ``config``: overrides of the
    generated sageplex_cfg.json, as ``section__key=value``."""

    def __init__(self, world, servers, workdir: Path, **config: object) -> None:
        self.world = world
        self.servers = servers
        self.workdir = workdir
        self.config = servers.write_config(workdir / "sageplex_cfg.json", **config)
        self.env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        self.env.update(SAGEPLEX_CFG=str(self.config), SAGEPLEX_LOG=str(workdir / "tool.log"),
                        PLEXAPI_CONFIG_PATH=str(workdir / "no-plexapi-config.ini"),
                        PYTHONDONTWRITEBYTECODE="1")
        self.runs = 0
        self.floor_spec: dict = {}  # set by warm_up, from the tool's own requests

    def _floor_spec(self, tool_headers: dict[str, dict[str, str]]) -> dict:
        """The floor's requests: paths and queries built from the tool's own constants (as
        SageClient.call and PlexClient.section_videos build them); headers as the tool sent
        them (``tool_headers``: path and query -> headers, from the fakes' log)."""
        import sageplex_sync as tool

        params = {"c": "GetMediaFiles", "encoder": "json", "1": "TV", "start": 0,
                  "size": tool.SAGEX_PAGE_SIZE, "filter": "|".join(tool.SAGE_FIELDS)}
        sage_path = "/sagex/api?" + urllib.parse.urlencode(params)
        plex_paths = [f"/library/sections/{key}/all?type={tool.VIDEO_SECTION_TYPES[kind]}"
                      for key, kind in ((self.world.tv_section, "show"),
                                        (self.world.movie_section, "movie"))]
        sage, plex = self.servers.sage, self.servers.plex
        return {"sage_host": "127.0.0.1", "sage_port": sage.port, "sage_path": sage_path,
                "sage_headers": tool_headers[url_key(sage_path)],
                "plex_host": "127.0.0.1", "plex_port": plex.port, "plex_paths": plex_paths,
                "plex_headers": [tool_headers[url_key(path)] for path in plex_paths],
                "timeout": 3600}

    def listing_requests(self) -> list[tuple]:
        """The listing requests the fakes logged since the last reset, as (server, method,
        path, query, headers), sorted: what the floor must ask exactly as the tool does."""
        found = []
        for name, fake in self._fakes().items():
            for r in fake.requests():
                if r.function == "GetMediaFiles" or LISTING_PATH.fullmatch(r.path):
                    found.append((name, r.method, r.path, sorted(r.query.items()),
                                  sorted(r.headers.items())))
        return sorted(found)

    def _fakes(self):
        return {"SageTV": self.servers.sage, "Plex": self.servers.plex}

    def _reset(self) -> None:
        for fake in self._fakes().values():
            fake.clear_log()
            fake.reset_stats()
        sage = self.world.sage
        sage.listing_calls = sage.listings_in_flight_max = 0

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
        run.listings = (self.world.sage.listing_calls, self.world.sage.listings_in_flight_max)
        return run

    def tool(self, *args: str) -> ChildRun:
        """Run the tool with a fresh sync state (a first sync) and -y (no guard question)."""
        self._reset()
        self.runs += 1
        state = self.workdir / f"state-{self.runs}.sqlite"
        argv = [sys.executable, str(TOOL), *args, "--state", str(state), "-y"]
        run = run_child(argv, self.env, self.workdir)
        if run.code != 0:
            raise RuntimeError(f"sageplex_sync {' '.join(args)} exited {run.code}:\n"
                               f"{run.err[-2000:]}")
        return self._collect(run)

    def replay_spec(self, check: ChildRun, workers: tuple[int, int]) -> dict:
        """For the write floor: the requests the last run sent beyond those of ``check``
        (as many of each kind as the check sent are left out), per server, as sent."""
        servers = []
        for (name, fake), count, is_json in zip(self._fakes().items(), workers, (True, False),
                                                strict=True):
            left = dict(check.requests[name])
            sent = []
            for r in fake.requests():
                kind = r.function or r.path
                if left.get(kind, 0):
                    left[kind] -= 1
                    continue
                headers = {k: v for k, v in r.headers.items()
                           if k not in ("content-length", "connection")}
                sent.append([r.method, path_query(r.path, sorted(r.query.items())), headers])
            servers.append({"port": fake.port, "workers": count, "json": is_json,
                            "requests": sent})
        return {"servers": servers}

    def worker(self, name: str, spec: dict) -> tuple[ChildRun, dict]:
        """One of WORKERS in a process of its own, with the fakes' log and stats of it."""
        self._reset()
        run, result = run_worker(name, spec, self.env, self.workdir)
        return self._collect(run), result

    def floor(self) -> tuple[ChildRun, dict]:
        return self.worker("floor", self.floor_spec)

    def warm_up(self) -> ChildRun:
        """One check (without the listing delay: the fakes render and cache every listing),
        whose listing requests the floor then copies; then one floor, whose requests must be
        the tool's exactly (paths, queries, headers), or the bench stops."""
        delay, self.world.sage.list_delay_s = self.world.sage.list_delay_s, 0.0
        try:
            for _ in range(3):  # the first check fills the fakes' caches; under load one of
                check = self.tool("all")  # its listings may time out and be asked again
                wanted = self.listing_requests()
                if len(set(map(repr, wanted))) == len(wanted):
                    break
            self.floor_spec = self._floor_spec({
                path_query(path, query): dict(headers)
                for _, _, path, query, headers in wanted})
            self.floor()
            got = self.listing_requests()
        finally:
            self.world.sage.list_delay_s = delay
        if got != wanted:
            raise RuntimeError(f"the floor's listing requests differ from the tool's:\n"
                               f"  tool:  {wanted}\n  floor: {got}")
        return check

    def original(self, names: list[str]) -> tuple[ChildRun, dict]:
        from tests.fakes.world import SAGE_PASSWORD, SAGE_USER

        spec = {"sage_url": f"{self.servers.sage.base_url}/sagex/api", "sage_user": SAGE_USER,
                "sage_password": SAGE_PASSWORD, "names": names}
        return self.worker("original", spec)


# -----------------------------------------------------------------------------------------
# Measuring one size
# -----------------------------------------------------------------------------------------

@dataclass
class SizeResult:
    info: WorldInfo
    floor: ChildRun
    floor_result: dict  # the worker's own figures: work_s, the floor proper
    floors: list[float]  # work_s of every floor run
    check: ChildRun
    checks: list[float]
    sync: ChildRun
    after: ChildRun
    original_per_item_s: float
    original_samples: int
    original_found: int
    cleared_then_set: int

    @property
    def floor_s(self) -> float:
        return self.floor_result["work_s"]

    @property
    def ratio(self) -> float:
        return self.check.wall_s / self.floor_s

    @property
    def original_s(self) -> float:
        return self.original_per_item_s * self.info.size

    @property
    def rss_mb(self) -> float:
        return max(self.check.rss_mb, self.sync.rss_mb)


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


def reads(run: ChildRun) -> dict[str, int]:
    """Requests other than writes each fake received during a run."""
    done = writes(run)
    return {name: sum(run.requests[name].values()) - done[name] for name in done}


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


def check_report(run: ChildRun, info: WorldInfo, what: str) -> None:
    line = total_line(run.out)
    if count_of("videos", line) != info.size or \
            count_of("in-sync", line) != info.size - info.out_of_sync:
        raise RuntimeError(f"{what} reported {line!r}, expected {info.size} videos, "
                           f"{info.size - info.out_of_sync} in sync")


def sync_report(run: ChildRun, info: WorldInfo, what: str) -> None:
    line = total_line(run.out)
    if count_of("updated", line) != info.out_of_sync:
        raise RuntimeError(f"{what} reported {line!r}, expected {info.out_of_sync} updated")


def measure(size: int, repeat: int, samples: int, latency: Latency, say) -> SizeResult:
    world, info = build_world(size)
    gc.collect()
    gc.freeze()  # the fakes' library is permanent: keep the collector off it while serving
    say(f"\n== {size:,} items: {info.episodes:,} episodes ({SHOWS} shows, {info.seasons} "
        f"seasons), {info.movies:,} movies, {info.splits} split recordings; "
        f"{info.out_of_sync:,} out of sync — world built in {info.build_s:.1f} s")
    with tempfile.TemporaryDirectory(prefix="sageplex-bench-") as tmp, world.running() as servers:
        latency.apply(servers)
        bench = Bench(world, servers, Path(tmp))
        bench.warm_up()
        floors: list[tuple[ChildRun, dict]] = []
        checks: list[ChildRun] = []
        for turn in range(repeat):  # alternate (and swap), so that noise hits both alike
            for kind in ("floor", "check") if turn % 2 == 0 else ("check", "floor"):
                if kind == "floor":
                    floors.append(bench.floor())
                else:
                    checks.append(bench.tool("all"))
        floor, floor_result = min(floors, key=lambda fr: fr[1]["work_s"])
        check = min(checks, key=lambda run: run.wall_s)
        for _, result in floors:
            if result["records"] != size or result["videos"] != size:
                raise RuntimeError(f"floor saw {result}, expected {size} of each")
        for run in checks:
            check_report(run, info, "check")
        original = {"seconds": 0.0, "samples": 0, "found": 0}
        if samples:  # the original strategy, on items spread evenly over the library
            step = max(1, size // samples)
            names = [world.items[i].file_names[0] for i in range(step // 2, size, step)]
            _, original = bench.original(names[:samples])
            if original["found"] != original["samples"]:
                raise RuntimeError(f"original look-ups found {original['found']} of "
                                   f"{original['samples']}")
        sync = bench.tool("all", "-s")
        sync_report(sync, info, "sync")
        cleared_then_set, out_of_order = write_order(servers.sage)
        if out_of_order:
            raise RuntimeError(f"{out_of_order} items got SetWatchedTimes before ClearWatched")
        after = bench.tool("all")
        line = total_line(after.out)
        if count_of("in-sync", line) != size or sum(writes(after).values()):
            raise RuntimeError(f"check after the sync reported {line!r}, writes "
                               f"{writes(after)}")
    gc.unfreeze()
    result = SizeResult(info, floor, floor_result, [r["work_s"] for _, r in floors], check,
                        [c.wall_s for c in checks], sync, after,
                        original["seconds"] / max(1, original["samples"]), original["samples"],
                        original["found"], cleared_then_set)
    report_size(result, say)
    del world
    gc.collect()
    return result


def rss_split(run: ChildRun) -> str:
    """How a peak RSS over several processes adds up."""
    if not run.children_rss_mb:
        return ""
    return (f" at once over its processes (its listing process alone {run.children_rss_mb:.0f};"
            f" each process's own peak added up {run.peaks_sum_mb:.0f})")


def server_share(run: ChildRun) -> str:
    total = sum(run.server_s.values())
    return (f"server {total:.2f} s = {100 * total / run.wall_s:.0f} % "
            f"(SageTV {run.server_s['SageTV']:.2f}, Plex {run.server_s['Plex']:.2f}; "
            f"{sum(run.serve_s.values()):.2f} s with HTTP handling)")


def describe_run_requests(label: str, run: ChildRun) -> str:
    return (f"  requests ({label}): SageTV {sum(run.requests['SageTV'].values()):,} "
            f"[{describe_requests(run.requests['SageTV'])}]; Plex "
            f"{sum(run.requests['Plex'].values()):,} [{describe_requests(run.requests['Plex'])}]")


def report_size(r: SizeResult, say) -> None:
    def spread(values: list[float]) -> str:
        return (f"best of {len(values)}, median {statistics.median(values):.2f} s"
                if len(values) > 1 else "1 run")

    say(f"  floor (the tool's listing requests, both servers at once, http.client, json.loads "
        f"/ expat) {r.floor_s:6.2f} s timed in its process ({spread(r.floors)}); its subprocess "
        f"{r.floor.wall_s:.2f} s wall with interpreter start-up, CPU {r.floor.cpu_s:.2f} s; "
        f"peak RSS {r.floor.rss_mb:.0f} MB; {server_share(r.floor)}")
    say(f"  check `all`  {r.check.wall_s:6.2f} s wall ({spread(r.checks)}; start-up "
        f"included) = {r.ratio:.2f}x the floor ({r.check.wall_s / r.floor.wall_s:.2f}x the "
        f"floor's subprocess wall); CPU {r.check.cpu_s:.2f} s = "
        f"{r.check.cpu_s / r.floor.cpu_s:.2f}x the floor's subprocess CPU; peak RSS "
        f"{r.check.rss_mb:.0f} MB{rss_split(r.check)}; {server_share(r.check)}")
    sync_writes = writes(r.sync)
    say(f"  sync  `all -s` (first sync) {r.sync.wall_s:6.2f} s wall; "
        f"{r.info.out_of_sync:,} items updated with {sync_writes['SageTV']:,} SageTV + "
        f"{sync_writes['Plex']:,} Plex writes; CPU {r.sync.cpu_s:.2f} s; peak RSS "
        f"{r.sync.rss_mb:.0f} MB{rss_split(r.sync)}; {server_share(r.sync)}")
    say(f"  again `all` after the sync {r.after.wall_s:6.2f} s wall; "
        f"{total_line(r.after.out)} (0 writes); in the sync, ClearWatched came before "
        f"SetWatchedTimes for all {r.cleared_then_set:,} items that had both")
    if r.original_samples:
        say(f"  original per-item look-ups {r.original_s:6.1f} s (EXTRAPOLATED from "
            f"{r.original_samples} samples, {1000 * r.original_per_item_s:.1f} ms each, times "
            f"{r.info.size:,}; excludes its own Plex listing) = "
            f"{r.original_s / r.check.wall_s:,.0f}x the check (a per-item comparison, "
            "not a floor)")
    for label, run in (("check", r.check), ("sync", r.sync)):
        say(describe_run_requests(label, run))


# -----------------------------------------------------------------------------------------
# The write phase against its latency bound
# -----------------------------------------------------------------------------------------

@dataclass
class WritePhase:
    size: int
    info: WorldInfo
    sage_ms: float  # each SageTV request (read or write) waits this long
    plex_ms: float  # each Plex request waits this long
    workers: tuple[int, int]  # the tool's default write workers: SageTV, Plex
    check: ChildRun  # a check of the same world and latency: what reading and deciding take
    sync: ChildRun
    floor: ChildRun  # the sync's requests beyond the check, replayed (worker_write_floor)
    floor_s: float  # ... timed in its process

    def phase_requests(self) -> dict[str, int]:
        """Requests of the sync beyond those of the check: the writes and their read-backs."""
        return {name: sum(kinds.values())
                for name, kinds in requests_beyond(self.sync, self.check).items()}

    def server_bound_s(self) -> dict[str, float]:
        done = self.phase_requests()
        return {"SageTV": done["SageTV"] * self.sage_ms / 1000 / self.workers[0],
                "Plex": done["Plex"] * self.plex_ms / 1000 / self.workers[1]}

    @property
    def bound_s(self) -> float:
        """sum of requests x latency / workers, per server; the slower server; plus the check."""
        return self.check.wall_s + max(self.server_bound_s().values())

    @property
    def ratio(self) -> float:
        return self.sync.wall_s / self.bound_s

    @property
    def floor_ratio(self) -> float:
        """The first sync against the check plus its measured floor: what the same
        requests take with no client work, on this machine at this moment."""
        return self.sync.wall_s / (self.check.wall_s + self.floor_s)


def requests_beyond(run: ChildRun, check: ChildRun) -> dict[str, dict[str, int]]:
    """Per server and kind, the requests of ``run`` beyond those of ``check``."""
    beyond = {}
    for name, kinds in run.requests.items():
        counts = {kind: n - check.requests[name].get(kind, 0) for kind, n in kinds.items()}
        beyond[name] = {kind: n for kind, n in counts.items() if n}
    return beyond


class WriteRound(NamedTuple):
    info: WorldInfo
    check: ChildRun
    sync: ChildRun
    floor: ChildRun  # the sync's requests beyond the check, replayed
    floor_s: float  # ... timed in its process
    replayed: int  # requests replayed


def write_round(size: int, sage_ms: float, plex_ms: float, workers: tuple[int, int]
                ) -> WriteRound:
    """One world: its check, its first sync, then the sync's requests replayed (the floor)."""
    world, info = build_world(size, 100.0, rows=2)
    gc.collect()
    gc.freeze()
    with tempfile.TemporaryDirectory(prefix="sageplex-bench-") as tmp, world.running() as servers:
        bench = Bench(world, servers, Path(tmp))
        bench.warm_up()
        for fake, ms in ((servers.sage, sage_ms), (servers.plex, plex_ms)):
            fake.read_delay_s = fake.write_delay_s = ms / 1000
        check = bench.tool("all")
        check_report(check, info, "check before the write-phase sync")
        sync = bench.tool("all", "-s")
        sync_report(sync, info, "write-phase first sync")
        floor, replayed = bench.worker("write-floor", bench.replay_spec(check, workers))
        if floor.requests != requests_beyond(sync, check):
            raise RuntimeError(f"the write floor sent {floor.requests}, the sync beyond its "
                               f"check {requests_beyond(sync, check)}")
    gc.unfreeze()
    del world
    gc.collect()
    return WriteRound(info, check, sync, floor, replayed["work_s"], replayed["requests"])


def measure_write_phase(size: int, sage_ms: float, plex_ms: float, rounds: int, say
                        ) -> WritePhase:
    """A first sync of ``size`` items, every one out of sync, half needing a SageTV
    SetWatched (watched on Plex only), half a Plex scrobble (watched on SageTV only), against
    fakes that take ``sage_ms`` / ``plex_ms`` to answer each request; default config. In
    ``rounds`` fresh worlds, the fastest check, sync and floor kept."""
    import sageplex_sync

    workers = (sageplex_sync.DEFAULT_SAGE_WRITE_WORKERS, sageplex_sync.DEFAULT_PLEX_WRITE_WORKERS)
    runs = [write_round(size, sage_ms, plex_ms, workers) for _ in range(max(1, rounds))]
    check = min((run.check for run in runs), key=lambda r: r.wall_s)
    sync = min((run.sync for run in runs), key=lambda r: r.wall_s)
    fastest = min(runs, key=lambda run: run.floor_s)
    floor = fastest.floor
    result = WritePhase(size, runs[0].info, sage_ms, plex_ms, workers, check, sync, floor,
                        fastest.floor_s)
    syncs = ", ".join(f"{run.sync.wall_s:.2f}" for run in runs)
    floors = ", ".join(f"{run.floor_s:.2f}" for run in runs)
    say(f"\n== write phase (best of {len(runs)} rounds, each in a fresh world; first syncs "
        f"{syncs} s, floors {floors} s)")
    done, phase, bound = writes(sync), result.phase_requests(), result.server_bound_s()
    say(f"  first sync of {size:,} items, all out of sync ({done['SageTV']:,} "
        f"SageTV + {done['Plex']:,} Plex writes); every SageTV request takes {sage_ms:g} ms, "
        f"every Plex request {plex_ms:g} ms; default write workers {workers[0]} + {workers[1]}")
    say(f"  check of the same world: {check.wall_s:.2f} s wall")
    say(f"  requests beyond the check: SageTV {phase['SageTV']:,} x {sage_ms:g} ms / "
        f"{workers[0]} = {bound['SageTV']:.2f} s; Plex {phase['Plex']:,} x {plex_ms:g} ms / "
        f"{workers[1]} = {bound['Plex']:.2f} s")
    say(f"  bound = check + the slower server = {result.bound_s:.2f} s; first sync "
        f"{sync.wall_s:.2f} s wall = {result.ratio:.2f}x the bound (write phase alone "
        f"{sync.wall_s - check.wall_s:.2f} s vs {max(bound.values()):.2f} s); CPU "
        f"{sync.cpu_s:.2f} s ({1000 * (sync.cpu_s - check.cpu_s) / max(1, sum(phase.values())):.2f}"
        f" ms per request beyond the check); peak RSS {sync.rss_mb:.0f} MB")
    say(f"  floor: the same {fastest.replayed:,} requests replayed with http.client, "
        f"{workers[0]} + {workers[1]} threads, both servers at once: {result.floor_s:.2f} s "
        f"(timed in its process); first sync / (check + floor) = {result.floor_ratio:.2f}x")
    say(f"  CPU time the host's hypervisor took from this machine (steal): "
        f"{steal_words(sync.steal)} during the sync, {steal_words(floor.steal)} during the floor")
    say(describe_run_requests("sync", sync))
    return result


def steal_words(share: float | None) -> str:
    return "unknown" if share is None else f"{100 * share:.0f} %"


# -----------------------------------------------------------------------------------------
# Start-up
# -----------------------------------------------------------------------------------------

@dataclass
class Startup:
    medians: dict[str, float]  # label -> median wall seconds
    repeat: int

    BASE = "python -c 'import plexapi, requests'"


def measure_startup(repeat: int, say) -> Startup:
    """``--version`` and ``-l`` (against the fakes, 1,000 items) as ``python sageplex_sync.py``
    (compiled on every run) and as the installed command runs it (``from sageplex_sync import
    main``, byte code cached), against importing plexapi and requests; every command in turn,
    ``repeat`` times, after one warm-up run each (which writes the byte code caches)."""
    world, _ = build_world(1_000)
    run_tool = "import sys; from sageplex_sync import main; sys.exit(main())"
    with tempfile.TemporaryDirectory(prefix="sageplex-bench-") as tmp, world.running() as servers:
        bench = Bench(world, servers, Path(tmp))
        env = {k: v for k, v in bench.env.items() if k != "PYTHONDONTWRITEBYTECODE"}
        env["PYTHONPYCACHEPREFIX"] = str(Path(tmp) / "pycache")  # caches of every command
        commands = {
            Startup.BASE: ["-c", "import plexapi, requests"],
            "python sageplex_sync.py --version": [str(TOOL), "--version"],
            "python sageplex_sync.py -l": [str(TOOL), "-l"],
            "sageplex-sync --version (cached byte code)": ["-c", run_tool, "--version"],
            "sageplex-sync -l (cached byte code)": ["-c", run_tool, "-l"],
        }
        times: dict[str, list[float]] = {label: [] for label in commands}
        for turn in range(repeat + 1):
            for label, args in commands.items():
                run = run_child([sys.executable, *args], env, Path(tmp))
                if run.code != 0:
                    raise RuntimeError(f"{label} exited {run.code}:\n{run.err[-2000:]}")
                if turn:
                    times[label].append(run.wall_s)
    del world
    gc.collect()
    result = Startup({label: statistics.median(v) for label, v in times.items()}, repeat)
    base = result.medians[Startup.BASE]
    say(f"\n== start-up: median of {repeat} runs each, in turn")
    for label, seconds in result.medians.items():
        say(f"  {label:45s} {1000 * seconds:5.0f} ms = {seconds / base:.2f}x the imports")
    return result


# -----------------------------------------------------------------------------------------
# A SageTV that takes minutes to build its listing
# -----------------------------------------------------------------------------------------

@dataclass
class SlowListing:
    size: int
    delay_s: float
    plain: ChildRun  # the check without the delay: the reads to expect
    check: ChildRun
    sync: ChildRun
    sync_plain_reads: dict[str, int] | None  # a first sync of the same world at no delay

    @property
    def ok(self) -> bool:
        return (reads(self.check) == reads(self.plain)
                and self.check.listings == (1, 1) and self.sync.listings[1] == 1
                and (self.sync_plain_reads is None or reads(self.sync) == self.sync_plain_reads))


def measure_slow_listing(size: int, delay_s: float, latency: Latency,
                         reference: SizeResult | None, say) -> SlowListing:
    """Check and first sync, default config (``sagex.list_timeout`` 600 s), against a
    SageTV whose GetMediaFiles takes ``delay_s`` before it answers."""
    world, info = build_world(size)
    gc.collect()
    gc.freeze()
    say(f"\n== slow listing: {size:,} items, SageTV taking {delay_s:g} s to build each "
        f"GetMediaFiles reply; default config (sagex.list_timeout "
        f"{_default_list_timeout():g} s) — world built in {info.build_s:.1f} s")
    with tempfile.TemporaryDirectory(prefix="sageplex-bench-") as tmp, world.running() as servers:
        latency.apply(servers)
        bench = Bench(world, servers, Path(tmp))
        bench.warm_up()
        world.sage.list_delay_s = 0.0
        plain = bench.tool("all")
        check_report(plain, info, "check without the delay")
        world.sage.list_delay_s = delay_s
        check = bench.tool("all")
        check_report(check, info, "slow-listing check")
        sync = bench.tool("all", "-s")
        sync_report(sync, info, "slow-listing first sync")
    gc.unfreeze()
    sync_plain = reads(reference.sync) if reference is not None else None
    result = SlowListing(size, delay_s, plain, check, sync, sync_plain)
    for label, run, delay in (("check, no delay", plain, 0.0), ("check", check, delay_s),
                              ("first sync", sync, delay_s)):
        say(f"  {label:16s} {run.wall_s:7.2f} s wall ({run.wall_s - delay * run.listings[0]:.2f} "
            f"s beyond the listing delays); reads SageTV {reads(run)['SageTV']:,}, Plex "
            f"{reads(run)['Plex']:,}; GetMediaFiles calls {run.listings[0]}, at most "
            f"{run.listings[1]} at once; peak RSS {run.rss_mb:.0f} MB")
    if sync_plain is not None:
        say(f"  the same first sync at no delay read SageTV {sync_plain['SageTV']:,}, Plex "
            f"{sync_plain['Plex']:,}")
    say(describe_run_requests("first sync", sync))
    del world
    gc.collect()
    return result


def _default_list_timeout() -> float:
    import sageplex_sync

    return sageplex_sync.DEFAULT_LIST_TIMEOUT_S


def profile_check(size: int, latency: Latency, top: int, say) -> None:
    """One check under cProfile (``--profile SIZE``): where the tool's own time goes."""
    import io
    import pstats

    world, info = build_world(size)
    with tempfile.TemporaryDirectory(prefix="sageplex-bench-") as tmp, world.running() as servers:
        latency.apply(servers)
        bench = Bench(world, servers, Path(tmp))
        bench.warm_up()
        profile = Path(tmp) / "check.prof"
        argv = [sys.executable, "-m", "cProfile", "-o", str(profile), str(TOOL), "all",
                "--state", str(Path(tmp) / "state.sqlite"), "-y"]
        run = run_child(argv, bench.env, Path(tmp))
        if run.code != 0:
            raise RuntimeError(f"profiled check exited {run.code}:\n{run.err[-2000:]}")
        check_report(run, info, "profiled check")
        for order in ("tottime", "cumulative"):
            text = io.StringIO()
            pstats.Stats(str(profile), stream=text).sort_stats(order).print_stats(top)
            lines = text.getvalue().splitlines()
            start = next((i for i, ln in enumerate(lines) if "ncalls" in ln), 0)
            say(f"\n== profile of one check of {size:,} items ({run.wall_s:.2f} s wall under "
                f"cProfile), top {top} by {order}")
            for line in lines[start:]:
                if line.strip():
                    say("  " + line.replace(str(ROOT) + "/", ""))
    del world
    gc.collect()


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
    memory = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        memory = f", {kb / 1024 / 1024:.0f} GB"
    except (OSError, ValueError, IndexError):
        pass
    return (f"{os.cpu_count()} CPUs ({cpu}){memory}, Python {platform.python_version()}, "
            f"{platform.system()} {platform.release()}")


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def summary(results: list[SizeResult], write: WritePhase | None, startup: Startup | None,
            slow: SlowListing | None, slow_wanted: bool, say) -> None:
    say("\n    items |  check | floor (in process) | check/floor | floor wall | CPU check/floor "
        "| sync (writes)   | peak RSS check/sync/floor | requests SageTV/Plex")
    say("  --------+--------+--------------------+-------------+------------+-----------------"
        "+-----------------+---------------------------+---------------------")
    for r in results:
        say(f"  {r.info.size:>7,} | {r.check.wall_s:5.2f}s | {r.floor_s:17.2f}s | "
            f"{r.ratio:10.2f}x | {r.floor.wall_s:9.2f}s | "
            f"{r.check.cpu_s:5.2f}/{r.floor.cpu_s:5.2f}s {r.check.cpu_s / r.floor.cpu_s:4.2f}x | "
            f"{r.sync.wall_s:6.2f}s ({sum(writes(r.sync).values()):>5,}) | "
            f"{r.check.rss_mb:8.0f} / {r.sync.rss_mb:4.0f} / {r.floor.rss_mb:4.0f} MB | "
            f"{sum(r.check.requests['SageTV'].values()):>8,} / "
            f"{sum(r.check.requests['Plex'].values()):,}")
    by_size = {r.info.size: r for r in results}
    say("\nTargets (ratios within this run):")
    for size in TARGET_FLOOR_SIZES:
        r = by_size.get(size)
        if r is None:
            say(f"  check at {size:,} items <= {TARGET_FLOOR_RATIO}x the floor: not measured")
            continue
        say(f"  check at {size:,} items <= {TARGET_FLOOR_RATIO}x the floor: {r.ratio:.2f}x "
            f"({r.check.wall_s:.2f} s vs {r.floor_s:.2f} s) "
            f"{verdict(r.ratio <= TARGET_FLOOR_RATIO)}")
    for size, limit in sorted(TARGET_RSS_MB.items()):
        r = by_size.get(size)
        if r is None:
            say(f"  peak RSS at {size:,} items < {limit} MB: not measured")
            continue
        say(f"  peak RSS at {size:,} items < {limit} MB: {r.rss_mb:.0f} MB (check "
            f"{r.check.rss_mb:.0f}, sync {r.sync.rss_mb:.0f}) {verdict(r.rss_mb < limit)}")
    if write is None:
        say(f"  write phase <= {TARGET_WRITE_BOUND}x its latency bound: not measured")
    else:
        say(f"  first sync of {write.size:,} items <= {TARGET_WRITE_BOUND}x its latency bound: "
            f"{write.ratio:.2f}x ({write.sync.wall_s:.2f} s vs {write.bound_s:.2f} s) "
            f"{verdict(write.ratio <= TARGET_WRITE_BOUND)}")
        say(f"  (also) the same first sync against the check and its measured floor: "
            f"{write.floor_ratio:.2f}x ({write.sync.wall_s:.2f} s vs "
            f"{write.check.wall_s + write.floor_s:.2f} s); steal {steal_words(write.sync.steal)}"
            f" during the sync")
    if startup is None:
        say(f"  start-up <= {TARGET_STARTUP}x the imports: not measured")
    else:
        base = startup.medians[Startup.BASE]
        for label, seconds in startup.medians.items():
            if label != Startup.BASE:
                say(f"  {label} <= {TARGET_STARTUP}x {Startup.BASE}: {seconds / base:.2f}x "
                    f"({1000 * seconds:.0f} vs {1000 * base:.0f} ms) "
                    f"{verdict(seconds / base <= TARGET_STARTUP)}")
    if slow is not None:
        say(f"  slow listing ({slow.size:,} items, {slow.delay_s:g} s a listing): check "
            f"{slow.check.wall_s:.1f} s and first sync {slow.sync.wall_s:.1f} s succeeded, "
            f"reads as without the delay, one listing at a time: {verdict(slow.ok)}")
    else:
        say("  slow listing: not run" + ("" if slow_wanted else " (opt-in: --slow-listing)"))
    mid = by_size.get(10_000)
    if mid is not None and mid.original_samples:
        speedup = mid.original_s / mid.check.wall_s
        say(f"  (also) >= {TARGET_SPEEDUP}x faster than the original at 10,000 items: "
            f"{speedup:,.0f}x {verdict(speedup >= TARGET_SPEEDUP)} (original extrapolated "
            f"from {mid.original_samples} samples)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,10000,50000,100000",
                        help="comma-separated item counts (default 1000,10000,50000,100000)")
    parser.add_argument("--quick", action="store_true",
                        help="1,000 and 10,000 items, one repetition, 50 samples")
    parser.add_argument("--repeat", type=int, default=3,
                        help="floors/check repetitions, the fastest is kept (default 3)")
    parser.add_argument("--samples", type=int, default=200,
                        help="Plex items timed with the original's look-up (default 200; "
                             "0: skip)")
    parser.add_argument("--read-latency-ms", type=float, default=0.0,
                        help="what each read request costs the fakes (default 0)")
    parser.add_argument("--write-latency-ms", type=float, default=0.0,
                        help="what each write request costs the fakes (default 0)")
    parser.add_argument("--list-delay-s", type=float, default=0.0,
                        help="what SageTV takes to build each GetMediaFiles reply (default 0)")
    parser.add_argument("--write-size", type=int, default=10_000,
                        help="items of the write-phase first sync, all out of sync, half each "
                             "way (default 10000; 0: skip)")
    parser.add_argument("--write-repeat", type=int, default=2,
                        help="rounds of the write phase, each in a fresh world; the fastest "
                             "check, sync and floor are kept (default 2)")
    parser.add_argument("--write-sage-ms", type=float, default=20.0,
                        help="what each SageTV request costs in it (default 20)")
    parser.add_argument("--write-plex-ms", type=float, default=5.0,
                        help="what each Plex request costs in it (default 5)")
    parser.add_argument("--startup-repeat", type=int, default=15,
                        help="runs of each start-up command, the median is kept (default 15; "
                             "0: skip)")
    parser.add_argument("--skip-sizes", action="store_true",
                        help="no check/floor sizes (only the write phase and start-up)")
    parser.add_argument("--slow-listing", nargs="?", type=float, const=60.0, metavar="SECONDS",
                        help="also check and first-sync --slow-listing-size items against a "
                             "SageTV taking SECONDS (default 60) per listing; takes minutes")
    parser.add_argument("--slow-listing-size", type=int, default=100_000,
                        help="items of the slow-listing scenario (default 100000)")
    parser.add_argument("--profile", type=int, metavar="SIZE",
                        help="only profile one check of SIZE items with cProfile")
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
        args.sizes, args.repeat, args.samples, args.startup_repeat = "1000,10000", 1, 50, 5
        args.write_repeat = 1
    sizes = [int(s.replace("_", "")) for s in args.sizes.split(",") if s.strip()]
    latency = Latency(args.read_latency_ms, args.write_latency_ms, args.list_delay_s)

    def say(text: str) -> None:
        print(text, flush=True)

    global SPAWNER
    SPAWNER = Spawner()  # before any world: see Spawner
    started = time.perf_counter()
    try:
        say(f"sageplex_sync benchmark, {datetime.date.today().isoformat()}, {machine()}")
        if args.profile:
            say(f"server latency: {latency}")
            profile_check(args.profile, latency, 25, say)
            return 0
        say(f"sizes {', '.join(f'{s:,}' for s in sizes)}; floor and check: best of "
            f"{args.repeat}, alternately; the tool's wall times are around a subprocess (python "
            "start-up included), the floor is timed inside its process; CPU from rusage "
            "(children included); peak RSS: the most a run's processes held at once (/proc "
            "every 5 ms; never below rusage's)")
        say(f"server latency: {latency}")
        say("server = seconds inside the fakes' code; 'with HTTP handling' adds parsing the "
            "requests and writing the replies, which waits while the client is busy reading")
        startup = measure_startup(args.startup_repeat, say) if args.startup_repeat else None
        results = [] if args.skip_sizes else [
            measure(size, args.repeat, args.samples, latency, say) for size in sizes]
        write = None
        if args.write_size:
            write = measure_write_phase(args.write_size, args.write_sage_ms, args.write_plex_ms,
                                        args.write_repeat, say)
        slow = None
        if args.slow_listing:
            reference = next((r for r in results if r.info.size == args.slow_listing_size
                              and latency == Latency()), None)
            slow = measure_slow_listing(args.slow_listing_size, args.slow_listing, latency,
                                        reference, say)
        summary(results, write, startup, slow, bool(args.slow_listing), say)
        say(f"\n(benchmark took {time.perf_counter() - started:.0f} s)")
    finally:
        SPAWNER.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
