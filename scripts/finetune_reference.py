#!/usr/bin/env python3
"""PyTorch reference for `relucompile finetune`, run side by side with it (a checker and a
benchmark, not part of the product).

Both fine-tune the same reduced ONNX graph (onnx2torch turns it into a torch module with the
same weights) against the same teacher with the same recipe: AdamW (betas 0.9/0.999, eps 1e-8,
decoupled weight decay), a per-step cosine learning rate, loss
alpha * T^2 * KL(teacher/T || student/T) (batch mean) + (1 - alpha) * cross-entropy, and the
same data order and augmentation: this script replays relucompile's SplitMix64 draws (shuffle,
crop offsets, flips), so the two differ only in floating-point arithmetic. It prints one table:
test accuracy before and after for each, and training images per second for each.

    cargo build --release
    target/release/relucompile models/resnet18w16.onnx -o reduced.onnx --cull 1,2 --thin bottom
    python3 scripts/finetune_reference.py reduced.onnx --teacher models/resnet18w16.onnx \
        --epochs 2 --train-limit 4096 --limit 2000
"""
import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import onnx
import onnx2torch
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "models"))
import train as model_train  # noqa: E402  (Fashion-MNIST, normalised)

MASK = (1 << 64) - 1


class Rng:
    """relucompile's SplitMix64 (src/train/mod.rs), draw for draw."""

    def __init__(self, state):
        self.state = state & MASK

    def next(self):
        self.state = (self.state + 0x9E3779B97F4A7C15) & MASK
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
        return z ^ (z >> 31)

    def below(self, n):
        return self.next() % n


def augment(img, p, hflip, rng):
    dy = int(rng.below(2 * p + 1)) - p
    dx = int(rng.below(2 * p + 1)) - p
    flip = hflip and (rng.next() & 1) == 1
    c, h, w = img.shape
    padded = np.pad(img, ((0, 0), (p, p), (p, p)))
    out = padded[:, dy + p:dy + p + h, dx + p:dx + p + w]
    return out[:, :, ::-1] if flip else out


def epoch_order(seed, epoch, n):
    """relucompile's shuffle of `n` training images for `epoch` (0-based): the order, and the
    generator, whose next draws are that epoch's augmentation."""
    rng = Rng(seed ^ ((epoch * 0x2545F4914F6CDD1D) & MASK))
    order = list(range(n))
    for i in range(n - 1, 0, -1):
        j = rng.below(i + 1)
        order[i], order[j] = order[j], order[i]
    return order, rng


def make_batch(xtr, ytr, idx, crop_padding, hflip, rng):
    """The augmented batch of training images `idx`, drawing from `rng` as relucompile does."""
    xb = torch.from_numpy(np.stack([augment(xtr[i], crop_padding, hflip, rng) for i in idx]))
    return xb, torch.from_numpy(ytr[idx].astype(np.int64))


def distillation_loss(s, t, y, temperature, alpha):
    """alpha * T^2 * KL(teacher/T || student/T) (batch mean) + (1 - alpha) * CE; and the KL."""
    kd = F.kl_div(F.log_softmax(s / temperature, 1), F.log_softmax(t / temperature, 1),
                  log_target=True, reduction="batchmean")
    return alpha * temperature ** 2 * kd + (1 - alpha) * F.cross_entropy(s, y), kd


def accuracy(model, x, y):
    with torch.no_grad():
        pred = torch.cat([model(torch.from_numpy(x[i:i + 500])).argmax(1) for i in range(0, len(x), 500)])
    return float((pred.numpy() == y).mean())


def finetune_torch(args, xtr, ytr):
    student = onnx2torch.convert(onnx.load(args.model))
    teacher = onnx2torch.convert(onnx.load(args.teacher)).eval()
    params = [p for p in student.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=args.weight_decay)
    n = len(xtr)
    steps_per_epoch = math.ceil(n / args.batch)
    total = steps_per_epoch * args.epochs
    history = []
    for epoch in range(args.epochs):
        order, rng = epoch_order(args.train_seed, epoch, n)
        started = time.perf_counter()
        loss_sum = kd_sum = 0.0
        for b in range(steps_per_epoch):
            idx = order[b * args.batch:(b + 1) * args.batch]
            xb, yb = make_batch(xtr, ytr, idx, args.crop_padding, not args.no_flip, rng)
            with torch.no_grad():
                t = teacher(xb)
            s = student(xb)
            loss, kd = distillation_loss(s, t, yb, args.temperature, args.alpha)
            for g in opt.param_groups:
                g["lr"] = 0.5 * args.lr * (1 + math.cos(math.pi * (epoch * steps_per_epoch + b) / total))
            opt.zero_grad()
            loss.backward()
            opt.step()
            loss_sum += loss.item() * len(idx)
            kd_sum += kd.item() * len(idx)
        seconds = time.perf_counter() - started
        history.append({"epoch": epoch + 1, "loss": loss_sum / n, "kd_loss": kd_sum / n,
                        "images_per_second": n / seconds, "seconds": seconds})
    return student, history


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="the reduced graph")
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "release", "relucompile"))
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=5e-4)
    ap.add_argument("--temperature", type=float, default=4.0)
    ap.add_argument("--alpha", type=float, default=0.9)
    ap.add_argument("--train-seed", type=int, default=0)
    ap.add_argument("--train-limit", type=int)
    ap.add_argument("--crop-padding", type=int, default=2)
    ap.add_argument("--no-flip", action="store_true")  # relucompile: flips are opt-in (--flip)
    ap.add_argument("--limit", type=int, help="test images for the accuracy")
    ap.add_argument("--json", help="write both reports here")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)

    # Normalised as the shipped models' metadata says (models/train.py wrote both).
    xtr, ytr = model_train.load_split("train")
    xte, yte = model_train.load_split("test")
    if args.train_limit:
        xtr, ytr = xtr[:args.train_limit], ytr[:args.train_limit]
    if args.limit:
        xte, yte = xte[:args.limit], yte[:args.limit]

    # relucompile first, alone on the machine.
    out = os.path.join(tempfile.mkdtemp(), "tuned.onnx")
    flags = ["--epochs", str(args.epochs), "--batch", str(args.batch), "--lr", str(args.lr),
             "--weight-decay", str(args.weight_decay), "--temperature", str(args.temperature),
             "--alpha", str(args.alpha), "--train-seed", str(args.train_seed),
             "--crop-padding", str(args.crop_padding),
             # This script's recipe: AdamW and cosine on the graph as emitted (relucompile's
             # defaults are now SGD + one-cycle with BatchNorm re-inserted and recalibration;
             # scripts/bench_finetune.py compares those).
             "--optimizer", "adamw", "--schedule", "cosine", "--no-batchnorm", "--no-recalibrate"]
    flags += [] if args.no_flip else ["--flip"]
    flags += ["--train-limit", str(args.train_limit)] if args.train_limit else []
    flags += ["--limit", str(args.limit)] if args.limit else []
    rust = json.loads(subprocess.run([args.bin, "finetune", args.model, "--teacher", args.teacher, "-o", out,
                                      "--json", *flags], check=True, capture_output=True, text=True).stdout)

    before = accuracy(onnx2torch.convert(onnx.load(args.model)), xte, yte)
    student, history = finetune_torch(args, xtr, ytr)
    after = accuracy(student, xte, yte)
    rust_ips = np.median([e["images_per_second"] for e in rust["epochs"]])
    torch_ips = np.median([e["images_per_second"] for e in history])
    print(f"KD fine-tuning, {args.epochs} epoch(s) on {len(xtr)} training images, batch {args.batch}; "
          f"test accuracy on {len(xte)} images (teacher {100 * rust['teacher_accuracy']:.2f}%)\n")
    print("| | before | after | final KD loss | train img/s |")
    print("|---|---:|---:|---:|---:|")
    print(f"| relucompile (Rust, candle) | {100 * rust['accuracy_before']:.2f}% | {100 * rust['accuracy_after']:.2f}% "
          f"| {rust['epochs'][-1]['kd_loss']:.4f} | {rust_ips:.0f} |")
    print(f"| PyTorch {torch.__version__} | {100 * before:.2f}% | {100 * after:.2f}% "
          f"| {history[-1]['kd_loss']:.4f} | {torch_ips:.0f} |")
    diff = 100 * (rust["accuracy_after"] - after)
    print(f"\naccuracy difference (relucompile - PyTorch): {diff:+.2f} points; "
          f"training speed ratio relucompile/PyTorch: {rust_ips / torch_ips:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"relucompile": rust, "pytorch": {"before": before, "after": after, "epochs": history}}, f,
                      indent=1)
    sys.exit(0 if abs(diff) <= 1.0 else 1)


if __name__ == "__main__":
    main()
