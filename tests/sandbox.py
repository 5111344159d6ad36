"""Sandbox demo: sageplex_sync against a fake SageTV and a fake Plex, no servers needed.

    python -m tests.sandbox                      report every section (the tool's `all`)
    python -m tests.sandbox all -s               sync them
    python -m tests.sandbox --run "all -s" --run all    several runs on the same library
    python -m tests.sandbox --serve              keep the fakes up and try commands by hand

Both fakes start on free ports of 127.0.0.1 with a sample library of 32 recordings in
every interesting state (30 Plex items, the report's videos; 30 SageTV media files, what
--check counts; the first lines say which are on one side only), a temporary
sageplex_cfg.json points at them, and the tool runs in this process exactly as it would
against real servers. ``--run "--check"`` works as ``--run=--check`` does.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `tests` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.fakes.world import DAY, HOUR, MIN, World, at, none, watched  # noqa: E402


def demo_world(now_ms: int | None = None) -> World:
    """32 recordings, each in a state worth seeing (the comment says which)."""
    w = World(now_ms=now_ms)
    show = "Castle"
    # in sync already
    w.episode(show, 7, 1, "Driven", sage=none(), plex=none())
    w.episode(show, 7, 2, "Resurrection", sage=watched(ago=5 * DAY), plex=watched(ago=5 * DAY))
    w.episode(show, 7, 3, "Reckoning", sage=at(12 * MIN, ago=DAY), plex=at(12 * MIN + 800))
    w.episode(show, 7, 4, "Clear & Present Danger", sage=at(40_000), plex=none())  # < 1 min
    w.episode(show, 7, 5, "Time of Our Lives", sage=at(26 * MIN), plex=watched())  # near end
    w.episode(show, 7, 6, "Habeas Corpse", sage=at(9 * MIN, ago=3 * HOUR),
              plex=at(9 * MIN, ago=2 * HOUR, view_count=2))  # a Plex rewatch, same place
    # watched on one side only (rows 1 and 2)
    w.episode(show, 7, 7, "Once Upon a Time", sage=watched(ago=2 * DAY), plex=none())
    w.episode(show, 7, 8, "Kill Switch", sage=none(), plex=watched(ago=DAY))
    w.episode(show, 7, 9, "Private Eye Caramba!", sage=watched(ago=None), plex=at(30_000))
    w.episode(show, 7, 10, "The Wrong Stuff", sage=none(), plex=at(29 * MIN))  # near end
    # a resume position on one side only (rows 3 and 4)
    w.episode(show, 7, 11, "Dead from New York", sage=at(14 * MIN, ago=HOUR), plex=none())
    w.episode(show, 7, 12, "Bad Santa", sage=none(), plex=at(17 * MIN, ago=HOUR))
    # watched on one side, in progress on the other (rows 5 and 6, newer side wins)
    doctor = "Doctor Who"
    w.episode(doctor, 9, 1, "The Magician's Apprentice", sage=watched(ago=3 * DAY),
              plex=at(6 * MIN, ago=HOUR, view_count=1), duration_ms=45 * MIN,
              folder="Doctor Who\\Season 09")
    w.episode(doctor, 9, 2, "The Witch's Familiar", sage=watched(ago=HOUR),
              plex=at(20 * MIN, ago=3 * DAY, view_count=1), duration_ms=45 * MIN,
              folder="Doctor Who\\Season 09")
    w.episode(doctor, 9, 3, "Under the Lake", sage=at(11 * MIN, ago=4 * DAY),
              plex=watched(ago=HOUR), duration_ms=45 * MIN, folder="Doctor Who\\Season 09")
    w.episode(doctor, 9, 4, "Before the Flood", sage=at(22 * MIN, ago=HOUR),
              plex=watched(ago=2 * DAY), duration_ms=45 * MIN, folder="Doctor Who\\Season 09")
    # in progress on both sides at different places (row 7)
    w.episode(doctor, 9, 5, "The Girl Who Died", sage=at(30 * MIN, ago=2 * DAY),
              plex=at(8 * MIN, ago=HOUR), duration_ms=45 * MIN, folder="Doctor Who\\Season 09")
    w.episode(doctor, 9, 6, "The Woman Who Lived", sage=at(18 * MIN, ago=HOUR),
              plex=at(4 * MIN, ago=DAY), duration_ms=45 * MIN, folder="Doctor Who\\Season 09")
    # recordings with padding, a late start, two segments, a unicode title
    news = "Nature"
    w.episode(news, 34, 1, "Padded Start", sage=at(15 * MIN, ago=HOUR), plex=none(),
              duration_ms=60 * MIN, pad_start_ms=2 * MIN, pad_end_ms=3 * MIN)
    w.episode(news, 34, 2, "Late Start", sage=none(), plex=at(20 * MIN, ago=HOUR),
              duration_ms=60 * MIN, late_start_ms=90_000)
    w.episode(news, 34, 3, "Two Segments", sage=none(), plex=at(40 * MIN, ago=HOUR),
              duration_ms=60 * MIN, segments=2)
    w.episode("Café Society", 1, 1, "Ünïcødé — 日本の夜", sage=watched(ago=DAY), plex=none())
    # movies
    w.movie("Heat", year=1995, sage=watched(ago=7 * DAY), plex=watched(ago=7 * DAY))
    w.movie("Ronin", year=1998, sage=at(50 * MIN, ago=HOUR), plex=none())
    w.movie("Collateral", year=2004, sage=none(), plex=watched(ago=DAY))
    w.movie("Thief", year=1981, sage=at(100 * MIN, ago=DAY), plex=at(112 * MIN, ago=2 * DAY))
    w.movie("Home Video", year=2024, is_tv=False, sage=none(), plex=at(15 * MIN, ago=HOUR),
            duration_ms=40 * MIN)
    # not in SageTV (left alone), and one file name SageTV has twice (ambiguous)
    w.movie("Blu-ray Rip", year=2010, in_sage=False, plex=watched())
    w.episode(show, 8, 1, "XY", in_sage=False, plex=at(10 * MIN))
    twin = w.episode("Twins", 1, 1, "First", file_name="Twins-S01E01.mpg", plex=watched())
    w.episode("Twins", 1, 2, "Second", file_name="Twins-S01E01.mpg", in_plex=False,
              sage=watched(ago=DAY))
    # a recording no Plex library holds (counted in the total as not in Plex)
    w.episode(show, 7, 13, "Sleeper", in_plex=False, sage=none())
    assert twin.rating_key is not None
    return w


def numbers(world: World) -> str:
    """What the sandbox's numbers are, so that the report's and --check's agree with it."""
    items = world.items
    sage = sum(1 for i in items if i.media_file_id is not None)
    plex = sum(1 for i in items if i.rating_key is not None)
    both = sum(1 for i in items if i.media_file_id is not None and i.rating_key is not None)
    return (f"sandbox: {len(items)} recordings: {sage} in SageTV (media files: what --check "
            f"counts), {plex} in Plex (the report's videos); {both} on both, {plex - both} "
            f"only in Plex (not in SageTV), {sage - both} only in SageTV (one shares a Plex "
            "item's file name: ambiguous; the other is counted as not in Plex)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.sandbox", allow_abbrev=False,
        description="Run sageplex_sync against fake SageTV and Plex servers.",
        epilog="Anything else on the command line is passed to sageplex_sync "
               "(default: all).")
    parser.add_argument("--serve", action="store_true",
                        help="keep the fake servers up and print the config path")
    parser.add_argument("--run", action="append", metavar="ARGS", default=[],
                        help="one sageplex_sync command line (repeat for several runs)")
    options, rest = parser.parse_known_args(_runs_joined(sys.argv[1:] if argv is None
                                                         else argv))
    runs = [shlex.split(r) for r in options.run] + ([rest] if rest else [])
    if not runs and not options.serve:
        runs = [["all"]]

    # SIGTERM ends the sandbox like Ctrl-C, so that its temporary folder goes too
    previous = signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        with tempfile.TemporaryDirectory(prefix="sageplex-sandbox-") as name:
            return _sandbox(Path(name), runs, options.serve)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _runs_joined(argv: list[str]) -> list[str]:
    """``--run "--check"`` as ``--run=--check``: argparse takes a value that starts with a
    dash only when it is joined to its option."""
    joined: list[str] = []
    words = iter(argv)
    for word in words:
        if word == "--run":
            word = "--run=" + next(words, "")
        joined.append(word)
    return joined


def _stop_on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _sandbox(folder: Path, runs: list[list[str]], serve: bool) -> int:
    """Serve the demo world, do the runs (and serve on, with --serve); the caller removes
    ``folder`` (the config, the sync state and the log) afterwards."""
    os.environ["SAGEPLEX_LOG"] = str(folder / "sageplex_sync.log")
    os.environ.setdefault("PLEXAPI_CONFIG_PATH", str(folder / "no-plexapi-config.ini"))
    import sageplex_sync

    world = demo_world()
    with world.running() as servers:
        config = servers.write_config(folder / "sageplex_cfg.json")
        os.environ["SAGEPLEX_CFG"] = str(config)
        sections = world.plex.sections
        seen = ", ".join(f"{location} ({section.title})" for section in sections.values()
                         for location in section.locations)
        print(f"sandbox: fake SageTV at {servers.sage.base_url}, fake Plex at "
              f"{servers.plex.base_url}\n{numbers(world)}\n"
              f"sandbox: the fake Plex sees the folders {seen}\n"
              f"sandbox: config {config}\n", file=sys.stderr)
        code = 0
        for args in runs:
            print(f"$ sageplex_sync.py {shlex.join(args)}", file=sys.stderr)
            code = sageplex_sync.main(args)
            print(file=sys.stderr)
        tool = Path(sageplex_sync.__file__).resolve()
        if not serve:
            print("sandbox: done; its servers stop and its temporary folder is removed. Try next:\n"
                  '  python -m tests.sandbox --run "all -s" --run all   sync, then report '
                  "again\n"
                  "  python -m tests.sandbox --serve                     keep the fakes up "
                  "and get a config path to point the tool at", file=sys.stderr)
            return code
        folders = " ".join(location for section in sections.values()
                           for location in section.locations)
        print(f"sandbox: serving until Ctrl-C. Point the tool at the sandbox, in another "
              f"shell:\n"
              f"  export SAGEPLEX_CFG={config}\n"
              f"  python {tool} -l\n  python {tool} all\n  python {tool} all -s\n"
              f"  python {tool} --check\n"
              f"  python {tool} --addtv \"Sandbox TV\" ...   (the fake Plex sees: {folders})",
              file=sys.stderr)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            print("\nsandbox: stopped (its temporary folder is removed)", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
