"""``python -m gravprobe.orbits repair PATH [--workers N]``: finish or repair a dataset from its manifest."""
from __future__ import annotations

import argparse
import logging

from gravprobe.orbits.store import repair_dataset


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m gravprobe.orbits")
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("repair", help="regenerate missing/truncated/corrupted shards of a dataset")
    r.add_argument("path")
    r.add_argument("--workers", type=int, default=0, help="processes (0 = all cores)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    print(repair_dataset(args.path, workers=args.workers))


if __name__ == "__main__":
    main()
