#!/usr/bin/env python3
"""Throughput of `relucompile eval` (tract) against onnxruntime on the same models and data.

    cargo build --release
    python3 scripts/bench_eval.py                       # both shipped models, 3 repetitions
    python3 scripts/bench_eval.py --models models/vgg.onnx --reps 5 --batch 1 16 128

For each model, in one run: `target/release/relucompile eval MODEL --json --no-progress` on the
full Fashion-MNIST test set (10k images), and onnxruntime (CPU, intra-op threads = all cores)
on the same images, normalised the same way (x = (pixel * scale - mean) / std in float32, with
scale/mean/std from the model's metadata `relucompile.*`, else 1/255, 0, 1: the rule the
evaluator applies) and fed in batches of the same size; one row per model and batch size
(default: 1, the evaluator's default, and 64). Only inference is timed on both sides
(relucompile's own `seconds`; for onnxruntime the loop over batches, after one untimed warm-up
batch). Prints the median images/s of each, their ratio, and both accuracies, which must agree:
the script exits 1 when they differ by more than --max-acc-diff.
"""
import argparse
import gzip
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_DIR = "/usr/share/datasets/fashion-mnist"
BIN = os.path.join(ROOT, "target", "release", "relucompile")


def read_idx(path):
    with open(path, "rb") as f:
        data = f.read()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    assert data[0] == 0 and data[1] == 0 and data[2] == 0x08, f"{path}: not a u8 IDX file"
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def idx_file(data_dir, name):
    for cand in (name, name + ".gz"):
        p = os.path.join(data_dir, cand)
        if os.path.exists(p):
            return p
    sys.exit(f"{data_dir}: no {name}[.gz]")


def normalisation(sess):
    meta = sess.get_modelmeta().custom_metadata_map
    floats = lambda key, default: [float(v) for v in meta[key].split(",")] if key in meta else default
    scale = floats("relucompile.scale", [1.0 / 255.0])[0]
    return scale, floats("relucompile.mean", [0.0]), floats("relucompile.std", [1.0])


def bench_tract(binary, model, batch, reps, data_dir):
    runs = []
    for _ in range(reps):
        out = subprocess.run(
            [binary, "eval", model, "--json", "--no-progress", "--batch", str(batch),
             "--data", data_dir],
            cwd=ROOT, capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"relucompile eval {model} failed ({out.returncode}):\n{out.stderr}")
        runs.append(json.loads(out.stdout))
    accs = {r["accuracy"] for r in runs}
    assert len(accs) == 1, f"tract accuracy changed between runs: {accs}"
    return runs


def bench_ort(model, batch, reps, pixels, labels):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = os.cpu_count()
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # errors only: no exporter warnings in the table
    sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    scale, mean, std = normalisation(sess)
    c = pixels.shape[1]
    mean = np.array(mean * (c if len(mean) == 1 else 1), np.float32).reshape(1, c, 1, 1)
    std = np.array(std * (c if len(std) == 1 else 1), np.float32).reshape(1, c, 1, 1)
    # The evaluator's formula, in float32, in the same order of operations.
    x = np.ascontiguousarray((pixels.astype(np.float32) * np.float32(scale) - mean) / std)
    name = sess.get_inputs()[0].name
    n = sess.get_inputs()[0].shape[0]
    if isinstance(n, int) and n != batch:
        sys.exit(f"{model}: onnxruntime needs batches of exactly {n} (a fixed batch dimension)")
    sess.run(None, {name: x[:batch]})  # warm-up, untimed
    speeds, acc = [], None
    for _ in range(reps):
        preds = []
        t0 = time.perf_counter()
        for i in range(0, len(x), batch):
            preds.append(sess.run(None, {name: x[i:i + batch]})[0].argmax(1))
        secs = time.perf_counter() - t0
        speeds.append(len(x) / secs)
        a = float((np.concatenate(preds) == labels).mean())
        assert acc is None or a == acc, f"onnxruntime accuracy changed between runs: {acc} {a}"
        acc = a
    return speeds, acc, (scale, mean.ravel().tolist(), std.ravel().tolist())


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+",
                    default=[os.path.join(ROOT, "models", m) for m in ("resnet18w16.onnx", "vgg.onnx")])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 64],
                    help="batch sizes to compare at (default: 1 64)")
    ap.add_argument("--data-dir", default=DATA_DIR)
    ap.add_argument("--bin", default=BIN, help="the relucompile binary (default: the release build)")
    ap.add_argument("--max-acc-diff", type=float, default=0.001,
                    help="largest accepted accuracy difference (fraction; default 0.001 = 10 images "
                         "of 10k, for arg-max near-ties that float rounding can flip)")
    args = ap.parse_args()
    if not os.path.exists(args.bin):
        sys.exit(f"{args.bin} is missing: run `cargo build --release` first")
    import onnxruntime as ort

    pixels = read_idx(idx_file(args.data_dir, "t10k-images-idx3-ubyte"))
    labels = read_idx(idx_file(args.data_dir, "t10k-labels-idx1-ubyte")).astype(np.int64)
    if pixels.ndim == 3:
        pixels = pixels[:, None, :, :]

    cores = os.cpu_count()
    print(f"{len(labels)} test images from {args.data_dir}, batches {args.batch}, {args.reps} "
          f"repetitions, {cores} cores; onnxruntime {ort.__version__} (intra-op threads {cores}), "
          f"relucompile {args.bin}")
    rows, ok = [], True
    for model in args.models:
        if not os.path.exists(model):
            print(f"{model}: missing, skipped")
            continue
        for batch in args.batch:
            tract = bench_tract(args.bin, model, batch, args.reps, args.data_dir)
            ort_speeds, ort_acc, norm = bench_ort(model, batch, args.reps, pixels, labels)
            t_med = statistics.median(r["images_per_second"] for r in tract)
            o_med = statistics.median(ort_speeds)
            t_acc = tract[0]["accuracy"]
            agree = abs(t_acc - ort_acc) <= args.max_acc_diff
            ok &= agree
            rows.append([os.path.relpath(model, ROOT), str(batch), f"{t_med:,.0f}",
                         f"{o_med:,.0f}", f"{t_med / o_med:.2f}", f"{100 * t_acc:.2f}%",
                         f"{100 * ort_acc:.2f}%", "yes" if agree else "NO"])
            print(f"{rows[-1][0]} batch {batch}: tract "
                  f"{[round(r['images_per_second']) for r in tract]} images/s "
                  f"({tract[0]['threads']} threads), onnxruntime {[round(s) for s in ort_speeds]} "
                  f"images/s; normalisation scale {norm[0]:.6g} mean {norm[1]} std {norm[2]}",
                  flush=True)
    if not rows:
        sys.exit("no model to benchmark")
    head = ["model", "batch", "tract img/s", "onnxruntime img/s", "tract/ort", "tract acc", "ort acc",
            "acc agree"]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    print()
    print(line(head))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print(line(r))
    print("\nimg/s: median of the repetitions; tract/ort > 1 means tract is faster")
    if not ok:
        print(f"accuracies differ by more than {args.max_acc_diff}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
