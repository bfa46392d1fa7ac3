"""`python -m raysae.toy --root runs/toy [--preset test]`: build or reuse a toy pair.

Prints the pair's report: baselines, held-out CE, task accuracies and topic probes.
"""

from __future__ import annotations

import argparse
import json
import time

from raysae.toy.pair import PRESETS, ensure_toy_pair, preset


def main(argv: list[str] | None = None) -> None:
    """Build (or reuse) the toy pair of a preset and print where it is and its report."""
    parser = argparse.ArgumentParser(prog="python -m raysae.toy", description=__doc__)
    parser.add_argument("--root", default="runs/toy", help="cache root (default: runs/toy)")
    parser.add_argument("--preset", default="default", choices=sorted(PRESETS))
    args = parser.parse_args(argv)
    start = time.perf_counter()
    paths = ensure_toy_pair(preset(args.preset), root=args.root)
    report = paths.read_report()
    print(json.dumps({k: v for k, v in report.items() if k != "config"}, indent=2))
    print(f"unigram entropy {report['unigram_entropy_nats']:.3f} nats")
    for name, m in report["models"].items():
        tasks = " ".join(f"{t}={a:.2f}" for t, a in m["task_accuracy"].items())
        probe = m["topic_probe"]
        print(f"{name}: CE {m['heldout_ce_nats']:.3f} | {tasks} | topic probe L{probe['layer']} "
              f"{probe['accuracy']:.2f} (chance {probe['chance']:.2f})")
    verb = "built" if paths.built else "reused"
    print(f"{verb} {paths.dir} in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
