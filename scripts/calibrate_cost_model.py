#!/usr/bin/env python3
"""Calibrate relucompile's private-inference cost model on CrypTen.

Builds a set of graphs from the shipped models with relucompile (originals, the lossless
pipeline, culling, thinning, channel thinning), measures each in CrypTen 0.4.1 (two parties on
loopback, batch 1; scripts/crypten_run.py), reads each graph's census with
`relucompile inspect --json`, and fits non-negative coefficients by least squares:

    bytes   = a * ReLUs + b * max-pool comparisons + c * linear operands + m * Mul elements + d
    rounds  = e * ReLU layers + f * pool layers + g * linear layers + n * Mul layers + h
    latency = i * bytes + j * rounds + k * MACs + o * operators + l

The coefficients go to src/analysis/cost/crypten.json (compiled into relucompile as the
`crypten` cost model), with the fit's per-graph residuals.

    SKLEARN_ALLOW_DEPRECATED_SKLEARN_PACKAGE_INSTALL=True pip install crypten==0.4.1
    cargo build --release && python3 scripts/calibrate_cost_model.py
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
from scipy.optimize import nnls

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import crypten_run  # noqa: E402

# (name, model, relucompile flags); flags None = the model file as shipped.
GRAPHS = [
    ("resnet", "resnet18w16", None),
    ("resnet cull 0", "resnet18w16", ["--cull", "0"]),
    ("resnet cull 1,2", "resnet18w16", ["--cull", "1,2"]),
    ("resnet thin bottom", "resnet18w16", ["--thin", "bottom"]),
    ("resnet cull 1,2 thin bottom", "resnet18w16", ["--cull", "1,2", "--thin", "bottom"]),
    ("resnet cull 0-4", "resnet18w16", ["--cull", "0,1,2,3,4"]),
    ("resnet cull 0-3", "resnet18w16", ["--cull", "0,1,2,3"]),
    ("resnet cull 1-4", "resnet18w16", ["--cull", "1,2,3,4"]),
    ("vgg", "vgg", None),
    ("vgg lossless", "vgg", []),
    ("vgg cull 0", "vgg", ["--cull", "0"]),
    ("vgg cull 2", "vgg", ["--cull", "2"]),
    ("vgg thin alternate", "vgg", ["--thin", "alternate"]),
    ("vgg cull 0-3", "vgg", ["--cull", "0,1,2,3"]),
    ("vgg cull 0,1", "vgg", ["--cull", "0,1"]),
    ("resnet channel 0.6", "resnet18w16", ["--channel-threshold", "0.6"]),
    ("resnet cull 0,1,2 channel 0.9", "resnet18w16", ["--cull", "0,1,2", "--channel-threshold", "0.9"]),
    ("vgg channel 0.6", "vgg", ["--channel-threshold", "0.6"]),
    ("vgg cull 0,3 thin channel 0.9", "vgg", ["--cull", "0,3", "--thin", "alternate", "--channel-threshold", "0.9"]),
]


def features(binary, path):
    out = subprocess.run([binary, "inspect", path, "--json"], check=True, capture_output=True, text=True)
    c = json.loads(out.stdout)
    return {
        "relus": c["total_relus"],
        "comparisons": sum(p["comparisons"] for p in c["pools"]),
        "operands": sum(l["operands"] for l in c["linear"]),
        "relu_layers": len(c["nodes"]),
        "pool_layers": len(c["pools"]),
        "linear_layers": len(c["linear"]),
        "macs": c["total_macs"],
        "muls": sum(m["comparisons"] for m in c["muls"]),
        "mul_layers": len(c["muls"]),
        "operators": c["operators"],
    }


def fit(rows, columns, target, relative=False):
    """Non-negative least squares; `relative` minimises relative rather than absolute error,
    so that the cheapest graphs (where a fixed term dominates) are fitted as well as the
    largest ones: the benchmark's tolerance is relative."""
    a = np.array([[r[c] for c in columns] + [1.0] for r in rows], dtype=np.float64)
    y = np.array([r[target] for r in rows], dtype=np.float64)
    w = 1.0 / y if relative else np.ones_like(y)
    scale = np.maximum(np.abs(a).max(axis=0), 1e-12)  # conditioning
    coef, _ = nnls(a * w[:, None] / scale, y * w)
    coef = coef / scale
    return coef, a @ coef


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "release", "relucompile"))
    ap.add_argument("--images", type=int, default=16, help="images per launch")
    ap.add_argument("--launches", type=int, default=3, help="separate CrypTen launches per graph; latency is the best launch's median")
    ap.add_argument("--out", default=os.path.join(ROOT, "src", "analysis", "cost", "crypten.json"))
    args = ap.parse_args()
    tmp = tempfile.mkdtemp()
    rows = []
    for name, model, flags in GRAPHS:
        src = os.path.join(ROOT, "models", f"{model}.onnx")
        path = src
        if flags is not None:
            path = os.path.join(tmp, name.replace(" ", "_").replace(",", "") + ".onnx")
            subprocess.run([args.bin, src, "-o", path, "--json", "--no-progress", "--limit", "10", *flags],
                           check=True, capture_output=True)
        f = features(args.bin, path)
        m = crypten_run.run_one(path, args.images, os.path.join(tmp, "r.json"), args.launches)
        rows.append({"graph": name, **f, "bytes": m["bytes"], "rounds": m["rounds"], "latency": m["latency_s"]})
        print(f"{name}: {f['relus']} ReLUs, {m['bytes'] / 1e6:.2f} MB, {m['rounds']:.0f} rounds, {m['latency_s']:.3f} s",
              flush=True)
    b, b_hat = fit(rows, ["relus", "comparisons", "operands", "muls"], "bytes")
    r, r_hat = fit(rows, ["relu_layers", "pool_layers", "linear_layers", "mul_layers"], "rounds")
    t, t_hat = fit(rows, ["bytes", "rounds", "macs", "operators"], "latency", relative=True)
    model = {
        "engine": "CrypTen 0.4.1, 2 parties on loopback, batch 1 (scripts/calibrate_cost_model.py)",
        "bytes_per_relu": b[0], "bytes_per_comparison": b[1], "bytes_per_linear_operand": b[2],
        "bytes_per_mul": b[3], "bytes_fixed": b[4],
        "rounds_per_relu_layer": r[0], "rounds_per_pool_layer": r[1], "rounds_per_linear_layer": r[2],
        "rounds_per_mul_layer": r[3], "rounds_fixed": r[4],
        "seconds_per_byte": t[0], "seconds_per_round": t[1], "seconds_per_mac": t[2],
        "seconds_per_operator": t[3], "seconds_fixed": t[4],
        "calibration": [
            {"graph": row["graph"], "relus": row["relus"], "measured_bytes": row["bytes"],
             "fitted_bytes": float(bh), "measured_rounds": row["rounds"], "fitted_rounds": float(rh),
             "measured_seconds": row["latency"], "fitted_seconds": float(th)}
            for row, bh, rh, th in zip(rows, b_hat, r_hat, t_hat)
        ],
    }
    with open(args.out, "w") as fh:
        json.dump(model, fh, indent=2)
        fh.write("\n")
    print(f"wrote {args.out}")
    for c in model["calibration"]:
        print(f"  {c['graph']:<28} bytes {c['fitted_bytes'] / c['measured_bytes'] - 1:+.1%}  "
              f"latency {c['fitted_seconds'] / c['measured_seconds'] - 1:+.1%}")


if __name__ == "__main__":
    main()
