"""Usage: ``python scripts/folder_cache_cost.py FOLDER [--repeats 3]``: what a data folder's first and cached loads cost.

For each repeat, in a cache folder of its own (a temporary ``$CNNLAB_CACHE``): the first load (listing, headers,
decoding every picture, writing the cache), then the cached load (listing, the cache key, reading the cache), then
the cache key alone (``folder.cache_key`` on the listed folder: for a key of file contents, every file read and
hashed). Prints each time and the medians, with the CPU's name, the date and the load average, so a figure can be
quoted with the machine that gave it. Make a folder of 70,000 PNGs with ``python scripts/fashion_to_png.py DIR``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import tempfile
import time
from pathlib import Path

from cnnlab.config import load_config
from cnnlab.cpus import cpu_name
from cnnlab.data import folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="a data folder (DIR/train/<class>/...)")
    parser.add_argument("--repeats", type=int, default=3, help="how many times to measure each (default 3)")
    args = parser.parse_args()
    cfg = load_config(None, ["data.name=folder", f"data.root={args.folder}"]).data
    print(f"{datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}; {cpu_name()}; {os.cpu_count()} CPUs; "
          f"load average {os.getloadavg()[0]:.2f} before")
    times: dict[str, list[float]] = {"first load": [], "cached load": [], "cache key alone": []}
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory(prefix="cnnlab-cache-") as cache:
            os.environ["CNNLAB_CACHE"] = cache
            for what in ("first load", "cached load"):
                started = time.perf_counter()
                folder.read(cfg)
                times[what].append(time.perf_counter() - started)
            layout = folder.scan(cfg.root)
            started = time.perf_counter()
            folder.cache_key(layout, None, None)
            times["cache key alone"].append(time.perf_counter() - started)
    for what, seconds in times.items():
        print(f"{what}: median {statistics.median(seconds):.2f} s ({', '.join(f'{s:.2f}' for s in seconds)})")
    print(f"load average {os.getloadavg()[0]:.2f} after")


if __name__ == "__main__":
    main()
