#!/usr/bin/env python3
"""Throughput of `relucompile eval` against onnxruntime on the same models and data.

    cargo build --release
    python3 scripts/bench_eval.py                       # both shipped models, 3 repetitions
    python3 scripts/bench_eval.py --models models/vgg.onnx --reps 5 --ort-batch 1 16 64 128
    python3 scripts/bench_eval.py --in-graph-normalisation   # also the graphs with Sub/Div in them
    python3 scripts/bench_eval.py --width 16 32 64 --reps 1  # the ResNet-18 across base widths

For each model, in one run: `target/release/relucompile eval MODEL --json --no-progress` on the
full Fashion-MNIST test set (10k images) with each engine at its own default batch (the native
engine: 32 images per run, one run per thread; tract: one image per run), and onnxruntime (CPU,
intra-op threads = all cores) on the same images, normalised the same way (x = (pixel * scale -
mean) / std in float32, with scale/mean/std from the model's metadata `relucompile.*`, else
1/255, 0, 1: the rule the evaluator applies) at each --ort-batch (default 1 and 64). Only
inference is timed on both sides (relucompile's own `seconds`; for onnxruntime the loop over
batches, after one untimed warm-up batch). Prints the median images/s of each, the ratio of
relucompile's default engine to onnxruntime at its best batch, and the accuracies, which must
agree: the script exits 1 when they differ by more than --max-acc-diff. Each side runs in its own
process (onnxruntime in this script re-invoked with --ort-side), one repetition of each in turn,
and the table gives each one's peak resident memory (GNU time's maximum RSS; relucompile's is
its default engine's run).
--width N... benchmarks the ResNet-18 of each base width (models/resnet18w<N>.onnx when shipped,
else one briefly trained under target/bench-models/, see bench_common.py).
"""
import argparse
import gzip
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common  # noqa: E402

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


def with_normalisation_in_graph(model, out_dir):
    """`model` as a wrapper module exports it: its `relucompile.*` metadata removed and the
    normalisation put in the graph as Sub and Div by constants before the first node (it then
    takes pixels scaled to [0, 1], which both runtimes feed it)."""
    import onnx
    from onnx import helper, numpy_helper
    m = onnx.load(model)
    meta = {p.key: p.value for p in m.metadata_props}
    floats = lambda key, default: [float(v) for v in meta[key].split(",")] if key in meta else default
    mean, std = floats("relucompile.mean", [0.0]), floats("relucompile.std", [1.0])
    c = 1 if len(mean) == 1 else len(mean)
    del m.metadata_props[:]
    g = m.graph
    x = g.input[0].name
    for node in g.node:
        node.input[:] = ["normalised" if i == x else i for i in node.input]
    g.initializer.append(numpy_helper.from_array(np.array(mean, np.float32).reshape(1, c, 1, 1), "pixel_mean"))
    g.initializer.append(numpy_helper.from_array(np.array(std, np.float32).reshape(1, c, 1, 1), "pixel_std"))
    g.node.insert(0, helper.make_node("Div", ["centred", "pixel_std"], ["normalised"], name="div"))
    g.node.insert(0, helper.make_node("Sub", [x, "pixel_mean"], ["centred"], name="sub"))
    onnx.checker.check_model(m, full_check=True)
    out = os.path.join(out_dir, os.path.basename(model).replace(".onnx", ".in-graph.onnx"))
    onnx.save(m, out)
    return out


def bench_relucompile(binary, model, engine, reps, data_dir):
    runs = []
    for _ in range(reps):
        out, peak = bench_common.run_measured(
            [binary, "eval", model, "--json", "--no-progress", "--engine", engine,
             "--data", data_dir], cwd=ROOT)
        if out.returncode != 0:
            sys.exit(f"relucompile eval {model} failed ({out.returncode}):\n{out.stderr}")
        runs.append(dict(json.loads(out.stdout), peak_rss_bytes=peak))
    accs = {r["accuracy"] for r in runs}
    assert len(accs) == 1, f"{engine} accuracy changed between runs: {accs}"
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


def bench_ort_process(model, batch, reps, data_dir):
    """bench_ort in a fresh process (this script with --ort-side): its speeds, accuracy,
    normalisation and peak memory."""
    import tempfile
    with tempfile.NamedTemporaryFile("r", suffix=".json") as out:
        proc, peak = bench_common.run_measured(
            [sys.executable, os.path.abspath(__file__), "--ort-side", out.name, "--models", model,
             "--ort-batch", str(batch), "--reps", str(reps), "--data-dir", data_dir])
        if proc.returncode != 0:
            sys.exit(f"the onnxruntime side failed ({proc.returncode}):\n{proc.stderr}")
        speeds, acc, norm = json.load(out)
    return speeds, acc, norm, peak


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+",
                    default=[os.path.join(ROOT, "models", m) for m in ("resnet18w16.onnx", "vgg.onnx")])
    ap.add_argument("--width", type=int, nargs="+",
                    help="ResNet-18 base widths to benchmark (replaces --models)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--ort-batch", type=int, nargs="+", default=[1, 64],
                    help="onnxruntime batch sizes (default: 1 64); its best counts")
    ap.add_argument("--data-dir", default=DATA_DIR)
    ap.add_argument("--in-graph-normalisation", action="store_true",
                    help="also bench each model with its normalisation moved from the metadata "
                         "into the graph (Sub, Div), as wrapper modules export it")
    ap.add_argument("--bin", default=BIN, help="the relucompile binary (default: the release build)")
    ap.add_argument("--max-acc-diff", type=float, default=0.001,
                    help="largest accepted accuracy difference (fraction; default 0.001 = 10 images "
                         "of 10k, for arg-max near-ties that float rounding can flip)")
    ap.add_argument("--ort-side", metavar="OUT", help=argparse.SUPPRESS)
    args = ap.parse_args()
    import onnxruntime as ort

    pixels = read_idx(idx_file(args.data_dir, "t10k-images-idx3-ubyte"))
    labels = read_idx(idx_file(args.data_dir, "t10k-labels-idx1-ubyte")).astype(np.int64)
    if pixels.ndim == 3:
        pixels = pixels[:, None, :, :]
    if args.ort_side:
        with open(args.ort_side, "w") as f:
            json.dump(bench_ort(args.models[0], args.ort_batch[0], args.reps, pixels, labels), f)
        return
    if not os.path.exists(args.bin):
        sys.exit(f"{args.bin} is missing: run `cargo build --release` first")
    if args.width:
        args.models = [bench_common.resnet18_at_width(w) for w in args.width]

    cores = os.cpu_count()
    print(f"{len(labels)} test images from {args.data_dir}, {args.reps} repetitions, {cores} "
          f"cores; onnxruntime {ort.__version__} (intra-op threads {cores}, batches "
          f"{args.ort_batch}), relucompile {args.bin}")
    rows, ok = [], True
    models = list(args.models)
    if args.in_graph_normalisation:
        import tempfile
        tmp = tempfile.mkdtemp(prefix="bench_eval_")
        models += [with_normalisation_in_graph(m, tmp) for m in args.models]
    for model in models:
        if not os.path.exists(model):
            print(f"{model}: missing, skipped")
            continue
        name = os.path.relpath(model, ROOT) if model.startswith(ROOT) else os.path.basename(model)
        # The sides alternate, one repetition each in turn, so that a slow spell of this shared
        # machine falls on both rather than on one side's whole block.
        runs_of = {engine: [] for engine in ("native", "tract")}
        ort_runs = {batch: ([], []) for batch in args.ort_batch}
        ort_acc_norm = {}
        for _ in range(args.reps):
            for engine, runs in runs_of.items():
                runs += bench_relucompile(args.bin, model, engine, 1, args.data_dir)
            for batch, (ort_speeds, ort_peaks) in ort_runs.items():
                speed, acc, norm, peak = bench_ort_process(model, batch, 1, args.data_dir)
                ort_speeds += speed
                ort_peaks.append(peak)
                earlier = ort_acc_norm.setdefault(batch, (acc, norm))[0]
                assert acc == earlier, f"onnxruntime accuracy changed: {earlier} then {acc}"
        speeds, accs = {}, {}
        for engine, runs in runs_of.items():
            assert len({r["accuracy"] for r in runs}) == 1, f"{engine} accuracy changed between runs"
            speeds[engine] = statistics.median(r["images_per_second"] for r in runs)
            accs[engine] = runs[0]["accuracy"]
            print(f"{name} relucompile {engine} (batch {runs[0]['batch']}, {runs[0]['threads']} "
                  f"threads): {[round(r['images_per_second']) for r in runs]} images/s", flush=True)
        best = None
        for batch, (ort_speeds, ort_peaks) in ort_runs.items():
            med = statistics.median(ort_speeds)
            ort_acc, norm = ort_acc_norm[batch]
            print(f"{name} onnxruntime batch {batch}: {[round(s) for s in ort_speeds]} images/s; "
                  f"normalisation scale {norm[0]:.6g} mean {norm[1]} std {norm[2]}", flush=True)
            if best is None or med > best[0]:
                best = (med, batch, ort_acc, statistics.median(ort_peaks))
        o_med, o_batch, o_acc, o_peak = best
        native_peak = statistics.median(r["peak_rss_bytes"] for r in runs_of["native"]) / 1e6
        agree = all(abs(a - o_acc) <= args.max_acc_diff for a in accs.values())
        ok &= agree
        rows.append([name, f"{speeds['native']:,.0f}", f"{speeds['tract']:,.0f}",
                     f"{o_med:,.0f} (batch {o_batch})", f"{speeds['native'] / o_med:.2f}",
                     f"{speeds['tract'] / o_med:.2f}", f"{native_peak:,.0f}", f"{o_peak / 1e6:,.0f}",
                     f"{100 * accs['native']:.2f}%",
                     f"{100 * o_acc:.2f}%", "yes" if agree else "NO"])
    if not rows:
        sys.exit("no model to benchmark")
    head = ["model", "native img/s", "tract img/s", "onnxruntime best img/s", "native/ort",
            "tract/ort", "native peak MB", "ort peak MB", "native acc", "ort acc", "acc agree"]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    print()
    print(line(head))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print(line(r))
    print("\nimg/s: median of the repetitions; x/ort > 1 means x is faster than onnxruntime at its "
          "best batch")
    if not ok:
        print(f"accuracies differ by more than {args.max_acc_diff}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
