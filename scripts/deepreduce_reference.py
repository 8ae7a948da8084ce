#!/usr/bin/env python3
"""PyTorch reference of the DeepReDuce method on the shipped ResNet-18 (a yardstick for the
README, not part of the product).

For each configuration it switches ReLUs off in models/resnet18w16.pt's network the way
models/reference_reduced.py does (stage 0 = the stem ReLU, stages 1-4 = layer1..layer4):

    cull(1,2)              every ReLU of those stages becomes nn.Identity
    thin(bottom)           relu2 (after the residual add) of every block of the kept stages
    thin(top)              relu1 (after the first conv) of every block of the kept stages
    thin(bottom,3,4)       thinning limited to those stages

then counts the ReLUs left (forward hooks on a 1x1x28x28 input), and trains the reduced
network with knowledge distillation from the unmodified one, as DeepReDuce does:
loss = alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) (batch mean) + (1 - alpha) * CE,
T = 4, alpha = 0.9; SGD Nesterov (momentum 0.9, weight decay 5e-4), one-cycle LR (as
models/train.py: cosine, 25% warm-up, start max/10, end max/1000), batch 128, models/train.py's
augmentation (random crop 28 after padding 2, horizontal flip) and data (Fashion-MNIST,
normalised). BatchNorm is kept and runs in train mode while training; the teacher is in eval
mode. Every configuration starts from the same seed (same data order and augmentation draws).
No recalibration: "before KD" is the reduced network with the original weights as they are.

Prints a markdown table (configuration, ReLUs, test accuracy before and after KD, training wall
time) and writes it as JSON to --out.

    python3 scripts/deepreduce_reference.py                        # the default configurations
    python3 scripts/deepreduce_reference.py 'cull(1,2),thin(bottom)' 'cull(1,2,3)' --epochs 1
    python3 scripts/deepreduce_reference.py --count-only           # ReLU counts only, no training
    python3 scripts/deepreduce_reference.py ... --resume           # keep every configuration --out holds, run the rest
    python3 scripts/deepreduce_reference.py --width 64 --out docs/deepreduce_reference_w64.json

The JSON is rewritten after every configuration, so a run stopped from outside loses only the
configuration in progress; each configuration starts from the same seed, so a resumed run
measures what an uninterrupted one would (wall times aside).
"""
import argparse
import json
import os
import re
import signal
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "models"))
import train  # noqa: E402  (the model definitions, data loaders and augmentation of the shipped weights)

SHAPE = (1, 28, 28)
# ReLUs of the ResNet-18 at base width 16 on 28x28 inputs; a width w network has (w/16)^2 times
# as many channels per layer, so w/16 times as many ReLUs.
RELUS_AT_WIDTH_16 = 108544
BUDGETS = (0.25, 0.15, 0.10, 0.05)
# One at or under each budget of 108,544 ReLUs (25%: 27,136; 15%: 16,281; 10%: 10,854; 5%: 5,427).
DEFAULT_CONFIGS = [
    "cull(1,2),thin(bottom)",    # 22,912 (21.1%)
    "cull(0,1,2)",               # 20,736 (19.1%)
    "cull(0,1,2),thin(bottom)",  # 10,368 (9.6%)
    "cull(0,1,2,3)",             #  8,192 (7.5%)
    "cull(0,1,2,3),thin(bottom)",  # 4,096 (3.8%)
]


# ---------------------------------------------------------------- configurations
def parse_config(text):
    """'cull(0,1,2),thin(bottom)' -> (set of culled stages, thin kind or None, thinned stages or None)."""
    cull, thin, thin_stages = set(), None, None
    pos = 0
    for m in re.finditer(r"\s*(\w+)\(([^)]*)\)\s*(,|$)", text):
        if m.start() != pos:
            break
        pos = m.end()
        name, args = m.group(1), [a.strip() for a in m.group(2).split(",") if a.strip()]
        if name == "cull":
            stages = {int(a) for a in args}
            if not stages or not stages <= {0, 1, 2, 3, 4}:
                raise ValueError(f"{text}: cull takes stages 0-4")
            cull |= stages
        elif name == "thin":
            if not args or args[0] not in ("bottom", "top") or thin is not None:
                raise ValueError(f"{text}: thin takes bottom or top (once), then optional stages")
            thin = args[0]
            if args[1:]:
                thin_stages = {int(a) for a in args[1:]}
                if not thin_stages <= {1, 2, 3, 4}:
                    raise ValueError(f"{text}: thin stages are 1-4")
        else:
            raise ValueError(f"{text}: unknown pass {name!r} (cull, thin)")
    if pos != len(text) or pos == 0:
        raise ValueError(f"cannot parse configuration {text!r}")
    return cull, thin, thin_stages


def weights(width):
    return os.path.join(ROOT, "models", f"resnet18w{width}.pt")


def load_original(width):
    model = train.build(f"resnet18w{width}")
    model.load_state_dict(torch.load(weights(width), map_location="cpu"))
    return model


def reduce(model, config):
    """Switch ReLUs off in place, as models/reference_reduced.py does."""
    cull, thin, thin_stages = parse_config(config)
    layers = [model.layer1, model.layer2, model.layer3, model.layer4]
    if 0 in cull:
        model.relu = nn.Identity()
    for stage, layer in enumerate(layers, start=1):
        for block in layer:
            if stage in cull:
                block.relu1 = nn.Identity()
                block.relu2 = nn.Identity()
            elif thin is not None and (thin_stages is None or stage in thin_stages):
                if thin == "bottom":
                    block.relu2 = nn.Identity()
                else:
                    block.relu1 = nn.Identity()
    return model


def relu_census(model):
    total, per_module = train.count_relus(model, SHAPE)
    stages = train.resnet_stage_counts(per_module)
    return total, {("stem" if k == "stem" else "stage" + k[-1]): v for k, v in stages.items()}


# ---------------------------------------------------------------- training
def kd_loss(s, t, y, temperature, alpha):
    kl = F.kl_div(F.log_softmax(s / temperature, dim=1), F.softmax(t / temperature, dim=1),
                  reduction="batchmean")
    return alpha * temperature * temperature * kl + (1.0 - alpha) * F.cross_entropy(s, y)


def distill(student, teacher, xtr, ytr, args, label):
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    bs = args.batch
    steps_per_epoch = (len(xtr) + bs - 1) // bs
    opt = torch.optim.SGD(student.parameters(), lr=args.lr, momentum=0.9, nesterov=True,
                          weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=args.lr, epochs=args.epochs, steps_per_epoch=steps_per_epoch,
        pct_start=0.25, anneal_strategy="cos", div_factor=10.0, final_div_factor=100.0)
    xtr_t, ytr_t = torch.from_numpy(xtr), torch.from_numpy(ytr)
    # channels_last: ~25% faster oneDNN convolutions on this CPU (as models/train.py)
    student.to(memory_format=torch.channels_last)
    teacher.to(memory_format=torch.channels_last)
    teacher.eval()
    history = []
    t0 = time.time()
    for ep in range(args.epochs):
        student.train()  # BatchNorm in train mode
        perm = torch.randperm(len(xtr), generator=gen)
        tot_loss, tot_ok, seen, te = 0.0, 0, 0, time.time()
        for s in range(steps_per_epoch):
            idx = perm[s * bs:(s + 1) * bs]
            xb = train.augment(xtr_t[idx], gen).contiguous(memory_format=torch.channels_last)
            yb = ytr_t[idx]
            with torch.no_grad():
                tb = teacher(xb)
            out = student(xb)
            loss = kd_loss(out, tb, yb, args.temperature, args.alpha)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot_loss += loss.item() * len(idx)
            tot_ok += (out.argmax(1) == yb).sum().item()
            seen += len(idx)
            if s % 100 == 0:
                print(f"  [{label}] ep {ep + 1} step {s}/{steps_per_epoch} loss {tot_loss / seen:.4f} "
                      f"acc {tot_ok / seen:.4f} lr {sched.get_last_lr()[0]:.5f} {time.time() - te:.0f}s",
                      flush=True)
        secs = time.time() - te
        history.append({"epoch": ep + 1, "train_loss": round(tot_loss / seen, 5),
                        "train_accuracy": round(tot_ok / seen, 5), "seconds": round(secs, 1)})
        print(f"  [{label}] epoch {ep + 1}/{args.epochs} loss {tot_loss / seen:.4f} "
              f"train_acc {tot_ok / seen:.4f} {secs:.0f}s", flush=True)
    wall = time.time() - t0
    student.to(memory_format=torch.contiguous_format)
    teacher.to(memory_format=torch.contiguous_format)
    return wall, history


# ---------------------------------------------------------------- report
def table(report):
    lines = ["| configuration | ReLUs | % of original | test accuracy before KD | after KD | training wall time |",
             "|---|---:|---:|---:|---:|---:|"]
    o = report["original"]
    lines.append(f"| original | {o['relus']:,} | 100.0% | {100 * o['accuracy']:.2f}% | - | - |")
    for r in report["configs"]:
        after = f"{100 * r['accuracy_after_kd']:.2f}%" if r.get("accuracy_after_kd") is not None else "-"
        wall = f"{r['train_seconds']:.0f} s" if r.get("train_seconds") is not None else "-"
        lines.append(f"| `{r['config']}` | {r['relus']:,} | {100 * r['relu_fraction']:.1f}% | "
                     f"{100 * r['accuracy_before_kd']:.2f}% | {after} | {wall} |")
    return "\n".join(lines)


def reference_points(report):
    """The configurations as `relucompile pareto --reference` reads them."""
    return [{"label": r["config"], "relus": r["relus"], "accuracy": r["accuracy_after_kd"]}
            for r in report["configs"]]


def write_json(path, report):
    report["name"] = "DeepReDuce in PyTorch, %d epochs of KD" % report["recipe"]["epochs"]
    report["points"] = reference_points(report)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("configs", nargs="*", help="e.g. 'cull(1,2),thin(bottom)' (default: %s)" % " ".join(DEFAULT_CONFIGS))
    ap.add_argument("--width", type=int, default=16,
                    help="base width of the shipped ResNet-18 to reduce (models/resnet18w<N>.pt; default 16)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--lr", type=float, default=0.02, help="one-cycle peak learning rate")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--weight-decay", type=float, default=5e-4)
    ap.add_argument("--temperature", type=float, default=4.0)
    ap.add_argument("--alpha", type=float, default=0.9)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data-dir", default=train.DATA_DIR)
    ap.add_argument("--train-limit", type=int, help="first N training images only (smoke tests)")
    ap.add_argument("--test-limit", type=int, help="first N test images only (smoke tests)")
    ap.add_argument("--count-only", action="store_true", help="print the ReLU counts and stop")
    ap.add_argument("--resume", action="store_true",
                    help="keep the configurations --out already holds (same recipe, seed and data) and run the rest")
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "deepreduce_reference.json"))
    args = ap.parse_args()
    configs = args.configs or DEFAULT_CONFIGS
    for c in configs:
        parse_config(c)  # fail before any work

    def on_signal(signum, _frame):  # say so in the log when a long run is stopped from outside
        print(f"stopped by signal {signal.Signals(signum).name} after {time.time() - t_start:.0f}s", flush=True)
        sys.exit(128 + signum)

    t_start = time.time()
    signal.signal(signal.SIGTERM, on_signal)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)

    if not os.path.exists(weights(args.width)):
        sys.exit(f"{weights(args.width)} is missing: train it with models/train.py --model resnet18 --width {args.width}")
    original = load_original(args.width)
    orig_relus, orig_stages = relu_census(original)
    assert orig_relus == RELUS_AT_WIDTH_16 * args.width // 16, orig_relus
    print(f"torch {torch.__version__}, {args.threads} threads; original: {orig_relus:,} ReLUs {orig_stages}")
    reduced = []
    for c in configs:
        relus, stages = relu_census(reduce(load_original(args.width), c))
        reduced.append((c, relus, stages))
        print(f"  {c:32s} {relus:7,d} ReLUs ({100 * relus / orig_relus:5.1f}%)  {stages}", flush=True)
    for b in BUDGETS:  # the configuration with the most ReLUs at or under each budget
        under = [(r, c) for c, r, _ in reduced if r <= b * orig_relus]
        best = f"{max(under)[1]} ({max(under)[0]:,})" if under else "none"
        print(f"  budget {100 * b:.0f}% ({int(b * orig_relus):,} ReLUs): {best}")
    if args.count_only:
        return

    xtr, ytr = train.load_split("train", args.data_dir)
    xte, yte = train.load_split("test", args.data_dir)
    if args.train_limit:
        xtr, ytr = xtr[:args.train_limit], ytr[:args.train_limit]
    if args.test_limit:
        xte, yte = xte[:args.test_limit], yte[:args.test_limit]
    print(f"data: train {xtr.shape}, test {xte.shape}", flush=True)

    orig_acc = float(train.evaluate_torch(original, xte, yte))
    print(f"original: test accuracy {100 * orig_acc:.2f}%", flush=True)
    report = {
        "model": f"models/resnet18w{args.width}.pt",
        "command": "python3 scripts/deepreduce_reference.py " + " ".join(
            "'" + a + "'" if "(" in a else a for a in sys.argv[1:]),
        "torch_version": torch.__version__, "threads": args.threads, "seed": args.seed,
        "recipe": {"epochs": args.epochs, "batch": args.batch, "optimizer": "SGD nesterov momentum 0.9",
                   "weight_decay": args.weight_decay, "schedule": "OneCycleLR cos pct_start 0.25 div 10 final_div 100",
                   "max_lr": args.lr, "temperature": args.temperature, "alpha": args.alpha,
                   "augmentation": "random crop 28 pad 2 + horizontal flip (models/train.py)",
                   "batchnorm": "kept, train mode while training", "recalibration": "none"},
        "train_images": int(len(xtr)), "test_images": int(len(xte)),
        "original": {"relus": orig_relus, "relus_per_stage": orig_stages, "accuracy": orig_acc},
        "configs": [],
    }
    prior_seconds = 0.0
    if args.resume and os.path.exists(args.out):
        with open(args.out) as f:
            old = json.load(f)
        same = all(old.get(k) == report[k] for k in ("recipe", "seed", "train_images", "test_images", "original"))
        if not same:
            sys.exit(f"--resume: {args.out} was made with another recipe, seed or data; not resuming")
        # Every configuration measured before is kept, named or not (a run is hours), each
        # with the command that measured it.
        report["configs"] = [{**r, "command": r.get("command", old.get("command"))} for r in old["configs"]]
        prior_seconds = old.get("total_seconds", 0.0)
        report["resumed"] = old.get("resumed", 0) + 1
        print(f"resuming from {args.out}: {', '.join(r['config'] for r in report['configs']) or 'nothing'} "
              f"already measured ({prior_seconds:.0f}s)", flush=True)
    done = {r["config"] for r in report["configs"]}
    teacher = original.eval()
    for c, relus, stages in reduced:
        if c in done:
            continue
        student = reduce(load_original(args.width), c)
        before = float(train.evaluate_torch(student, xte, yte))
        print(f"{c}: {relus:,} ReLUs, test accuracy before KD {100 * before:.2f}%", flush=True)
        wall, history = distill(student, teacher, xtr, ytr, args, c)
        after = float(train.evaluate_torch(student, xte, yte))
        print(f"{c}: test accuracy after KD {100 * after:.2f}% (training {wall:.0f}s)", flush=True)
        report["configs"].append({
            "config": c, "command": report["command"], "relus": relus,
            "relu_fraction": round(relus / orig_relus, 5),
            "relus_per_stage": stages, "accuracy_before_kd": before, "accuracy_after_kd": after,
            "train_seconds": round(wall, 1), "epochs": history})
        report["total_seconds"] = round(prior_seconds + time.time() - t_start, 1)
        write_json(args.out, report)  # after every configuration: a partial run keeps what it measured
    order = {c: i for i, c in enumerate(configs)}
    # Configurations this command did not name first, as they were; then its own, in its order.
    report["configs"].sort(key=lambda r: order.get(r["config"], -1))
    report["total_seconds"] = round(prior_seconds + time.time() - t_start, 1)
    write_json(args.out, report)
    print()
    print(table(report))
    print(f"\ntotal wall time {report['total_seconds']:.0f}s; wrote {os.path.relpath(args.out)}")


if __name__ == "__main__":
    main()
