#!/usr/bin/env python3
"""Training throughput of `relucompile finetune` against PyTorch on the same reduced graph with
the same recipe (a benchmark, not part of the product).

    cargo build --release
    python3 scripts/bench_finetune.py                          # batch 64 and 128, 4096 images
    python3 scripts/bench_finetune.py --reps 3 --full-epoch    # + one 60k-image epoch each side
    python3 scripts/bench_finetune.py --width 16 32 64 --batch 64 --images 2048   # across widths

The student is the reduced graph (--student, or by default made here: `relucompile
models/resnet18w16.onnx -o reduced.onnx --cull 1,2 --thin bottom --limit 64`, recalibrated by
the compiler; see below), the teacher models/resnet18w16.onnx, the data the first --images
Fashion-MNIST training images. For each batch size, in one run:

- relucompile: `target/release/relucompile finetune STUDENT --teacher T --epochs 1 --batch B
  --train-limit N --limit 64 --json --no-progress`, its default recipe: recalibration, a
  train-mode BatchNorm after every Conv (the identity on 512 training images), SGD with
  Nesterov momentum 0.9, peak lr 0.02, L2 weight decay 5e-4, one-cycle schedule, loss
  alpha * T^2 * KL(teacher/T || student/T) + (1 - alpha) * CE with T = 4, alpha = 0.9. Timed by
  its own report (`epochs[0].seconds`, `images_per_second`): the training loop only, from the
  first batch's augmentation to the last optimiser step, teacher forward included; loading,
  recalibration, BatchNorm insertion and the before/after evaluation are not.
- PyTorch (CPU, intra-op threads = all cores): onnx2torch's module of the same graph with a
  torch.nn.BatchNorm2d after every Conv2d, initialised the same way (running mean and variance
  = the conv output's per-channel mean and biased variance on the first 512 training images,
  gamma = sqrt(var + eps), beta = mean: the identity at inference), trained in train mode
  with torch.optim.SGD(nesterov=True, momentum=0.9, weight_decay=5e-4), relucompile's
  one-cycle learning rate set before every step, the same loss, the same batch size, and
  relucompile's data order and augmentation replayed draw for draw
  (scripts/finetune_reference.py). The teacher (onnx2torch, eval mode, no_grad) runs inside
  the timed step as it does in relucompile. Only the epoch's loop is timed, after two untimed
  warm-up steps on a throw-away copy of the student (so the timed epoch is the whole recipe).

Not reproduced in PyTorch: relucompile's training-free recalibration before training (a one-off
outside the timed loop). The PyTorch student starts from the graph as given, which is why the
default student is compiled with recalibration (without --no-eval): an unrecalibrated culled
graph's logits are around 1e3 and SGD at lr 0.02 diverges on it in PyTorch (loss 1e6 within a
few steps), while relucompile's own recalibration gives it the same start either way (its
per-channel map does not depend on the graph's prior channel scales: the same loss to the last
digit). The two then start from nearly the same function, recalibrated on different calibration
images, so their losses are close but not equal; a --student that makes PyTorch diverge is
flagged. Prints one line per run and a table of the median images/s of each and their
ratio, and each side's peak resident memory (GNU time's maximum RSS of its own process: each side
runs in a fresh process, the PyTorch one this script re-invoked with --torch-side, so both
count their runtime, model and data as well as the training). --width N... runs the ResNet-18
of each base width (models/resnet18w<N>.onnx when shipped, else one briefly trained by
models/train.py under target/bench-models/, see bench_common.py) as the teacher, the
student made from it as above. --full-epoch adds one epoch over all 60,000 training images at batch 64 on each side
(minutes) and prints both training-loop wall times.
"""
import argparse
import atexit
import copy
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import onnx
import onnx2torch
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import finetune_reference as ref  # noqa: E402  (SplitMix64 data order, augmentation, KD loss)

import bench_common  # noqa: E402

ROOT = ref.ROOT
BIN = os.path.join(ROOT, "target", "release", "relucompile")
BN_EPS = 1e-5  # src/train/batchnorm.rs (PyTorch's defaults)
BN_MOMENTUM = 0.1
BN_INIT_IMAGES = 512  # src/train/mod.rs: BATCHNORM_INIT_IMAGES
SGD_MOMENTUM = 0.9  # src/train/optim.rs
ONE_CYCLE_WARMUP, ONE_CYCLE_DIV, ONE_CYCLE_FINAL_DIV = 0.3, 25.0, 1e4
# relucompile's recipe (its defaults); passed explicitly so that a change of defaults shows.
RECIPE = {"optimizer": "sgd", "schedule": "one-cycle", "lr": 0.02, "weight_decay": 5e-4,
          "temperature": 4.0, "alpha": 0.9, "seed": 0, "crop_padding": 2, "hflip": True,
          "batchnorm": True}


def learning_rate(peak, step, total):
    """relucompile's one-cycle schedule (src/train/optim.rs, `learning_rate`)."""
    t = step / max(total, 1)

    def cos(start, end, frac):
        return end + 0.5 * (start - end) * (1 + np.cos(np.pi * min(max(frac, 0.0), 1.0)))

    start = peak / ONE_CYCLE_DIV
    if t < ONE_CYCLE_WARMUP:
        return cos(start, peak, t / ONE_CYCLE_WARMUP)
    return cos(peak, start / ONE_CYCLE_FINAL_DIV, (t - ONE_CYCLE_WARMUP) / (1 - ONE_CYCLE_WARMUP))


def student_with_batchnorm(path, calib):
    """onnx2torch's module of `path` with a BatchNorm2d after every Conv2d, each the identity
    at inference on the conv output of `calib` (src/train/batchnorm.rs, `identity_for`)."""
    student = onnx2torch.convert(onnx.load(path))
    convs = [(name, m) for name, m in student.named_modules() if isinstance(m, torch.nn.Conv2d)]
    moments = {}

    def observe(name):
        def hook(_module, _inputs, out):
            y = out.double()
            moments[name] = (y.mean((0, 2, 3)), y.var((0, 2, 3), unbiased=False))
        return hook

    hooks = [m.register_forward_hook(observe(name)) for name, m in convs]
    with torch.no_grad():
        student.eval()(calib)
    for h in hooks:
        h.remove()
    for name, conv in convs:
        mean, var = moments[name]
        bn = torch.nn.BatchNorm2d(conv.out_channels, eps=BN_EPS, momentum=BN_MOMENTUM)
        with torch.no_grad():
            bn.running_mean.copy_(mean.float())
            bn.running_var.copy_(var.float())
            bn.weight.copy_((var + BN_EPS).sqrt().float())
            bn.bias.copy_(mean.float())
        parent, _, attr = name.rpartition(".")
        setattr(student.get_submodule(parent) if parent else student, attr, torch.nn.Sequential(conv, bn))
    return student.train()


def sgd(student):
    return torch.optim.SGD(student.parameters(), lr=RECIPE["lr"], momentum=SGD_MOMENTUM, nesterov=True,
                           weight_decay=RECIPE["weight_decay"])


def step(student, teacher, opt, xb, yb, lr):
    """One training step as relucompile's (src/train/mod.rs): teacher forward, student forward,
    loss, backward, update, and the loss and accuracy read back."""
    with torch.no_grad():
        t = teacher(xb)
    s = student(xb)
    loss, kd = ref.distillation_loss(s, t, yb, RECIPE["temperature"], RECIPE["alpha"])
    for g in opt.param_groups:
        g["lr"] = lr
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item(), kd.item(), int((s.argmax(1) == yb).sum())


def bench_torch(student_path, teacher, xtr, ytr, batch):
    """One epoch over `xtr` at `batch`; the training loop's seconds and the epoch's record."""
    n = len(xtr)
    student = student_with_batchnorm(student_path, torch.from_numpy(xtr[:min(n, BN_INIT_IMAGES)]))
    steps = -(-n // batch)
    crop, hflip, seed = RECIPE["crop_padding"], RECIPE["hflip"], RECIPE["seed"]
    order, rng = ref.epoch_order(seed, 0, n)
    # Warm-up: two steps on a copy, with a copy of the generator, so the timed epoch is intact.
    warm, warm_rng = copy.deepcopy(student), copy.deepcopy(rng)
    warm_opt = sgd(warm)
    for b in range(min(2, steps)):
        xb, yb = ref.make_batch(xtr, ytr, order[b * batch:(b + 1) * batch], crop, hflip, warm_rng)
        step(warm, teacher, warm_opt, xb, yb, learning_rate(RECIPE["lr"], b, steps))
    del warm, warm_opt
    opt = sgd(student)
    loss_sum = kd_sum = 0.0
    correct = 0
    started = time.perf_counter()
    for b in range(steps):
        idx = order[b * batch:(b + 1) * batch]
        xb, yb = ref.make_batch(xtr, ytr, idx, crop, hflip, rng)
        loss, kd, right = step(student, teacher, opt, xb, yb, learning_rate(RECIPE["lr"], b, steps))
        loss_sum += loss * len(idx)
        kd_sum += kd * len(idx)
        correct += right
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "images_per_second": n / seconds, "loss": loss_sum / n, "kd_loss": kd_sum / n,
            "train_accuracy": correct / n}


def bench_relucompile(binary, student, teacher, batch, images, limit, out_dir):
    """One epoch of `relucompile finetune`; its epoch record, plus the command's wall time."""
    flags = ["--epochs", "1", "--batch", str(batch), "--optimizer", RECIPE["optimizer"],
             "--schedule", RECIPE["schedule"], "--lr", str(RECIPE["lr"]),
             "--weight-decay", str(RECIPE["weight_decay"]), "--temperature", str(RECIPE["temperature"]),
             "--alpha", str(RECIPE["alpha"]), "--train-seed", str(RECIPE["seed"]),
             "--crop-padding", str(RECIPE["crop_padding"]), "--limit", str(limit)]
    flags += ["--flip"] if RECIPE["hflip"] else []
    flags += ["--train-limit", str(images)] if images else []
    cmd = [binary, "finetune", student, "--teacher", teacher, "-o", os.path.join(out_dir, "tuned.onnx"),
           "--json", "--no-progress", *flags]
    started = time.perf_counter()
    proc, peak = bench_common.run_measured(cmd)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)}: exit {proc.returncode}\n{proc.stderr}")
    report = json.loads(proc.stdout)
    opts = report["options"]
    for key, want in RECIPE.items():
        got = opts.get(key)
        if got != want and not (isinstance(want, float) and abs(got - want) <= 1e-12 * abs(want)):
            sys.exit(f"relucompile ran {key} = {got!r}, the PyTorch side implements {want!r}")
    if not opts.get("recalibrate", False):
        print("note: relucompile did not recalibrate", file=sys.stderr)
    record = dict(report["epochs"][0])
    record["command_seconds"] = wall
    record["train_images"] = report["train_images"]
    record["peak_rss_bytes"] = peak
    return record


def bench_torch_process(student, teacher, batch, images, out_dir):
    """bench_torch in a fresh process (this script with --torch-side), for its peak memory."""
    out = os.path.join(out_dir, "torch.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--torch-side", out, "--student", student, "--teacher",
           teacher, "--batch", str(batch), "--images", str(images)]
    proc, peak = bench_common.run_measured(cmd)
    if proc.returncode != 0:
        sys.exit(f"the PyTorch side failed ({proc.returncode}):\n{proc.stderr}")
    with open(out) as f:
        record = json.load(f)
    record["peak_rss_bytes"] = peak
    return record


def check_diverged(r, t):
    if not np.isfinite(t["loss"]) or t["loss"] > 10 * r["loss"]:
        print(f"  warning: PyTorch's loss ({t['loss']:.4g}) is far above relucompile's ({r['loss']:.4g}): it "
              "diverged, probably on an unrecalibrated --student (relucompile recalibrates it, PyTorch does not); "
              "its timing is of a diverging run", flush=True)


def mb(r):
    return r["peak_rss_bytes"] / 1e6 if r.get("peak_rss_bytes") else float("nan")


def line(side, batch, r):
    return (f"  {side:<11} batch {batch:>4}: {r['images_per_second']:7.1f} img/s  ({r['seconds']:.2f} s training loop"
            + (f", {r['command_seconds']:.2f} s whole command" if "command_seconds" in r else "")
            + f", peak {mb(r):,.0f} MB"
            + f"; loss {r['loss']:.4f}, KD {r['kd_loss']:.4f}, train acc {100 * r['train_accuracy']:.1f}%)")


def make_student(binary, teacher, out):
    # Recalibrated by the compiler (hence no --no-eval; the accuracy gate on 64 images only).
    subprocess.run([binary, teacher, "-o", out, "--cull", "1,2", "--thin", "bottom", "--limit", "64",
                    "--no-progress"], check=True, capture_output=True)
    return out


def torch_side(args):
    """The PyTorch side alone, in this (fresh) process: one epoch, its record to args.torch_side."""
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    xall, yall = ref.model_train.load_split("train")
    teacher = onnx2torch.convert(onnx.load(args.teacher)).eval()
    record = bench_torch(args.student, teacher, xall[:args.images], yall[:args.images], args.batch[0])
    with open(args.torch_side, "w") as f:
        json.dump(record, f)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student", help="the reduced graph [default: made here, --cull 1,2 --thin bottom]")
    ap.add_argument("--teacher", default=os.path.join(ROOT, "models", "resnet18w16.onnx"))
    ap.add_argument("--width", type=int, nargs="+",
                    help="ResNet-18 base widths to run (teacher models/resnet18w<N>.onnx, or a briefly "
                         "trained one; student made from it); replaces --teacher and --student")
    ap.add_argument("--bin", default=BIN)
    ap.add_argument("--batch", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--images", type=int, default=4096, help="training images per timed epoch")
    ap.add_argument("--reps", type=int, default=1, help="runs of each side per batch size (median reported)")
    ap.add_argument("--limit", type=int, default=64,
                    help="test images relucompile evaluates before/after (untimed; kept small)")
    ap.add_argument("--full-epoch", action="store_true",
                    help="also one epoch over all 60,000 training images at batch 64, each side (minutes)")
    ap.add_argument("--json", help="write every run's record here")
    ap.add_argument("--torch-side", metavar="OUT", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.torch_side:
        return torch_side(args)
    if not os.path.exists(args.bin):
        sys.exit(f"{args.bin}: not built (cargo build --release)")
    if args.width and args.student:
        sys.exit("--width makes each width's student: give --student without --width")
    work = tempfile.mkdtemp(prefix="bench_ft_")
    atexit.register(shutil.rmtree, work, True)
    # (label, teacher, student) per network.
    nets = []
    for width in args.width or []:
        teacher = bench_common.resnet18_at_width(width)
        nets.append((f"w{width}", teacher, make_student(args.bin, teacher, os.path.join(work, f"w{width}.onnx"))))
    if not nets:
        student = args.student or make_student(args.bin, args.teacher, os.path.join(work, "reduced.onnx"))
        nets.append(("", args.teacher, student))

    n_train = len(ref.model_train.load_split("train")[1])
    images = min(args.images, n_train)
    load = os.getloadavg()[0]
    if load > 0.5:
        # PyTorch's OpenMP threads spin at barriers: with another job on the cores it can run 10x
        # slower than alone (measured: 22 img/s with 2 threads against 290 with 1, load 5 on 2 cores).
        print(f"warning: load average {load:.1f} before starting: the machine is not idle, and PyTorch "
              "(OpenMP, all cores) suffers far more from that than relucompile; the numbers will not be "
              "representative", file=sys.stderr, flush=True)
    print(f"KD fine-tuning throughput, 1 epoch on {images} Fashion-MNIST training images; {os.cpu_count()} cores, "
          f"PyTorch {torch.__version__} ({os.cpu_count()} threads), each side in its own process")
    results, rows = [], []
    for label, teacher, student in nets:
        print(f"{label or 'network'}: teacher {teacher}, student {student}", flush=True)
        for batch in args.batch:
            rust, tor = [], []
            for rep in range(args.reps):
                # relucompile first, then PyTorch, each alone on the machine.
                r = bench_relucompile(args.bin, student, teacher, batch, images, args.limit, work)
                print(line("relucompile", batch, r), flush=True)
                t = bench_torch_process(student, teacher, batch, images, work)
                print(line("PyTorch", batch, t), flush=True)
                check_diverged(r, t)
                rust.append(r)
                tor.append(t)
                results.append({"network": label, "teacher": teacher, "batch": batch, "images": images,
                                "rep": rep, "relucompile": r, "pytorch": t})
            med = lambda runs, key: statistics.median(x[key] for x in runs)  # noqa: E731
            peak = lambda runs: statistics.median(mb(x) for x in runs)  # noqa: E731
            rows.append((label, batch, med(rust, "images_per_second"), med(tor, "images_per_second"),
                         peak(rust), peak(tor)))

    full = None
    if args.full_epoch:
        label, teacher, student = nets[0]
        print(f"\nfull epoch ({label or 'network'}): all {n_train} training images, batch 64", flush=True)
        r = bench_relucompile(args.bin, student, teacher, 64, None, args.limit, work)
        print(line("relucompile", 64, r), flush=True)
        t = bench_torch_process(student, teacher, 64, n_train, work)
        print(line("PyTorch", 64, t), flush=True)
        check_diverged(r, t)
        full = {"relucompile": r, "pytorch": t}

    print(f"\nmedian of {args.reps} run(s); relucompile's time is its own `epochs[0].seconds` (training loop only); "
          "peak memory: each process's maximum RSS\n")
    print("| network | batch | relucompile img/s | PyTorch img/s | speed ratio | relucompile peak MB "
          "| PyTorch peak MB | memory ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, batch, rust, tor, rmb, tmb in rows:
        print(f"| {label or '-'} | {batch} | {rust:.1f} | {tor:.1f} | {rust / tor:.2f} | {rmb:,.0f} | {tmb:,.0f} "
              f"| {rmb / tmb:.2f} |")
    if full:
        r, t = full["relucompile"], full["pytorch"]
        print(f"\nfull epoch ({r['train_images']} images, batch 64), training-loop wall time: relucompile "
              f"{r['seconds']:.1f} s ({r['command_seconds']:.1f} s whole command), PyTorch {t['seconds']:.1f} s; "
              f"ratio (relucompile/PyTorch) {t['seconds'] / r['seconds']:.2f} in speed")
    print("\nnot reproduced in PyTorch: relucompile's recalibration before training (untimed); PyTorch trains the "
          "student as given, so the losses differ a little, the per-step work does not.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"runs": results, "full_epoch": full, "recipe": RECIPE}, f, indent=1)


if __name__ == "__main__":
    main()
