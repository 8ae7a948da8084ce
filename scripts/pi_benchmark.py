#!/usr/bin/env python3
"""One table of private-inference cost for the shipped models and their frontier points:
ReLUs, accuracy, the cost model's estimate (`relucompile inspect --json`, model `crypten`)
and CrypTen's measurement (scripts/crypten_run.py: two parties on loopback, batch 1) of
latency, rounds and bytes. Exits 1 when an estimate is more than --tolerance off.

    cargo build --release
    relucompile pareto models/resnet18w16.onnx -o frontier-resnet
    relucompile pareto models/vgg.onnx -o frontier-vgg
    python3 scripts/pi_benchmark.py frontier-resnet frontier-vgg
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import crypten_run  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("frontiers", nargs="+", help="directories written by `relucompile pareto`")
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "release", "relucompile"))
    ap.add_argument("--images", type=int, default=16, help="images per launch")
    ap.add_argument("--launches", type=int, default=3, help="separate CrypTen launches per graph; latency is the best launch's median")
    ap.add_argument("--tolerance", type=float, default=0.15)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp()
    rows = []
    for d in args.frontiers:
        f = json.load(open(os.path.join(d, "frontier.json")))
        graphs = [(f["model"], os.path.join(ROOT, f["model"]) if not os.path.isabs(f["model"]) else f["model"],
                   f["original"]["relus"], f["original"]["accuracy"])]
        graphs += [(f"{os.path.basename(f['model'])} {p['config']}", os.path.join(d, p["file"]), p["relus"],
                    p["accuracy"]) for p in f["points"]]
        for name, path, relus, acc in graphs:
            est = json.loads(subprocess.run([args.bin, "inspect", path, "--json"], check=True,
                                            capture_output=True, text=True).stdout)["cost"]
            m = crypten_run.run_one(path, args.images, os.path.join(tmp, "r.json"), args.launches)
            rows.append({"graph": name, "relus": relus, "accuracy": acc, "est_s": est["seconds"],
                         "est_bytes": est["bytes"], "est_rounds": est["rounds"], "s": m["latency_s"],
                         "bytes": m["bytes"], "rounds": m["rounds"]})
            print(f"measured {name}", file=sys.stderr, flush=True)
    print("| graph | ReLUs | accuracy | latency est. / measured | rounds est. / measured | MB est. / measured |")
    print("|---|---:|---:|---:|---:|---:|")
    worst = 0.0
    for r in rows:
        e_s, e_b = r["est_s"] / r["s"] - 1, r["est_bytes"] / r["bytes"] - 1
        worst = max(worst, abs(e_s), abs(e_b))
        print(f"| {r['graph']} | {r['relus']:,} | {100 * r['accuracy']:.2f}% | {r['est_s']:.3f} / {r['s']:.3f} s "
              f"({e_s:+.0%}) | {r['est_rounds']:.0f} / {r['rounds']:.0f} | {r['est_bytes'] / 1e6:.1f} / "
              f"{r['bytes'] / 1e6:.1f} ({e_b:+.0%}) |")
    print(f"\nlargest estimate error: {worst:.1%} (tolerance {args.tolerance:.0%})")
    sys.exit(0 if worst <= args.tolerance else 1)


if __name__ == "__main__":
    main()
