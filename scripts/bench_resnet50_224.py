#!/usr/bin/env python3
"""relucompile on an ImageNet-shaped graph: a torchvision ResNet-50 at 224x224 (random weights,
seeded; nothing is downloaded), exported by PyTorch's TorchScript exporter, then its census, the
lossless compile, a `--cull 1 --no-eval` compile and the native engine's outputs on random
inputs against onnxruntime's, each with wall time and peak memory (`/usr/bin/time`). A
benchmark, not part of the product; needs torch, torchvision, onnxruntime.

    cargo build --release && python3 scripts/bench_resnet50_224.py [--dir /tmp/r50] [--images 8]
"""
import argparse
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BINARY = os.path.join(ROOT, "target", "release", "relucompile")


def timed(cmd):
    """Run `cmd`; return (wall seconds, peak RSS in MB, stdout)."""
    out = subprocess.run(["/usr/bin/time", "-f", "TIME %e %M"] + cmd, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stderr}")
    line = [l for l in out.stderr.splitlines() if l.startswith("TIME ")][-1].split()
    return float(line[1]), int(line[2]) / 1024, out.stdout


def export(path):
    import torch
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None, num_classes=1000).eval()
    x = torch.randn(1, 3, 224, 224)
    torch.onnx.export(model, x, path, opset_version=17, dynamo=False,
                      input_names=["input"], output_names=["logits"])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/resnet50_224")
    ap.add_argument("--images", type=int, default=8)
    args = ap.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    at = lambda name: os.path.join(args.dir, name)  # noqa: E731
    model = at("resnet50_224.onnx")
    if not os.path.exists(model):
        export(model)
    x = np.random.default_rng(0).standard_normal((args.images, 3, 224, 224)).astype(np.float32)
    np.save(at("x.npy"), x)
    rows = []
    steps = [
        ("census", ["inspect", model]),
        ("lossless compile", [model, "-o", at("lossless.onnx"), "--no-progress"]),
        ("--cull 1 --no-eval", [model, "-o", at("cull1.onnx"), "--cull", "1", "--no-eval", "--no-progress"]),
        (f"native engine, {args.images} images", ["run", model, "--input", at("x.npy"), "--output",
                                                 at("y_native.npy"), "--engine", "native"]),
    ]
    for name, cmd in steps:
        wall, mb, _ = timed([BINARY] + cmd)
        rows.append((name, wall, mb))
    import onnxruntime as ort

    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    want = np.concatenate([session.run(None, {"input": x[i:i + 1]})[0] for i in range(len(x))])
    got = np.load(at("y_native.npy"))
    print(f"{'step':<28} {'wall s':>8} {'peak MB':>8}")
    for name, wall, mb in rows:
        print(f"{name:<28} {wall:>8.2f} {mb:>8.0f}")
    print(f"native vs onnxruntime: max |diff| {np.abs(got - want).max():.3g} "
          f"(largest logit {np.abs(want).max():.1f}), arg-max agreement "
          f"{(got.argmax(1) == want.argmax(1)).mean():.2f}")


if __name__ == "__main__":
    main()
