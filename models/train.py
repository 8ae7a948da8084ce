#!/usr/bin/env python3
"""Train and export the Fashion-MNIST models shipped with relucompile.

    python3 models/train.py --model resnet18w16 --epochs 10 --seed 0 --threads 2
    python3 models/train.py --model vgg         --epochs 7  --seed 0 --threads 2
    python3 models/train.py --model resnet18 --width 64 --epochs 30 --threads 2 --resume

`--model resnet18 --width N` names everything resnet18w<N> (`resnet18w16` is an alias
of `resnet18 --width 16`). After every epoch the whole training state is written
atomically to --checkpoint (default <out-dir>/<name>.ckpt.pt); `--resume` goes on from
it, and a resumed run ends with the same weights, bit for bit, as an uninterrupted one
with the same flags and thread count.

Pixel convention (applied OUTSIDE the model, by the caller):
    x = (pixel / 255 - 0.2860) / 0.3530, float32 [N,1,28,28], ONNX input name `input`.
Output: `logits`, float32 [N,10]. The batch dimension is dynamic and named `N`.

Writes models/<name>.onnx (TorchScript exporter, opset 13, BN folded into Conv),
models/<name>.pt (state dict), and updates models/metrics.json with the test
accuracy measured by onnxruntime on the ONNX file over the full 10k test set.
"""
import argparse
import datetime
import gzip
import json
import os
import random
import re
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
DATA_DIR = "/usr/share/datasets/fashion-mnist"
MEAN, STD = 0.2860, 0.3530


# ---------------------------------------------------------------- data
def read_idx(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[0:4], "big")
    ndim = magic & 0xFF
    assert (magic >> 8) == 0x08, f"{path}: expected unsigned-byte IDX, magic {magic:#x}"
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    return arr.reshape(dims)


def load_split(split, data_dir=DATA_DIR):
    prefix = "train" if split == "train" else "t10k"
    x = read_idx(os.path.join(data_dir, f"{prefix}-images-idx3-ubyte.gz"))
    y = read_idx(os.path.join(data_dir, f"{prefix}-labels-idx1-ubyte.gz"))
    x = ((x.astype(np.float32) / 255.0 - MEAN) / STD)[:, None, :, :]
    return np.ascontiguousarray(x, dtype=np.float32), y.astype(np.int64)


def augment(xb, gen):
    """Random crop 28 with padding 2 (pad value = normalised black) + horizontal flip."""
    n = xb.shape[0]
    pad_val = (0.0 - MEAN) / STD
    padded = F.pad(xb, (2, 2, 2, 2), value=pad_val)
    dx = torch.randint(0, 5, (n,), generator=gen)
    dy = torch.randint(0, 5, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(28))[:, :, None]          # [n,28,1]
    cols = (dx[:, None] + torch.arange(28))[:, None, :]          # [n,1,28]
    out = padded[torch.arange(n)[:, None, None], 0, rows, cols].unsqueeze(1).contiguous()
    flip = torch.rand(n, generator=gen) < 0.5
    out[flip] = out[flip].flip(3)
    return out


# ---------------------------------------------------------------- models
class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU()
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR-style ResNet-18 (no max-pool), configurable base width and input channels."""

    def __init__(self, width=16, in_ch=1, num_classes=10):
        super().__init__()
        w = [width, 2 * width, 4 * width, 8 * width]
        self.conv1 = nn.Conv2d(in_ch, w[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w[0])
        self.relu = nn.ReLU()
        layers, cin = [], w[0]
        for i, (c, s) in enumerate(zip(w, [1, 2, 2, 2])):
            blocks = [BasicBlock(cin, c, s), BasicBlock(c, c, 1)]
            cin = c
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w[3], num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


class VGG(nn.Module):
    """Small VGG: every MaxPool is preceded by a ReLU (work for a relu-after-maxpool pass)."""

    def __init__(self, num_classes=10):
        super().__init__()

        def cbr(cin, cout):
            return [nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

        self.features = nn.Sequential(
            *cbr(1, 32), *cbr(32, 32), nn.MaxPool2d(2),      # 28 -> 14
            *cbr(32, 64), *cbr(64, 64), nn.MaxPool2d(2),     # 14 -> 7
            *cbr(64, 128), nn.MaxPool2d(2),                  # 7 -> 3
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(128 * 3 * 3, 256), nn.ReLU(), nn.Dropout(0.3),
            nn.Linear(256, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


def build(name):
    """`resnet18w<N>` (CIFAR-style ResNet-18, base width N) or `vgg`."""
    m = re.fullmatch(r"resnet18w([1-9][0-9]*)", name)
    if m:
        return ResNet18(width=int(m.group(1)), in_ch=1)
    if name == "vgg":
        return VGG()
    raise ValueError(name)


def count_relus(model, shape):
    """ReLU elements per sample, by forward hooks on every nn.ReLU; returns (total, per-module)."""
    counts = {}
    hooks = []
    for n, m in model.named_modules():
        if isinstance(m, (nn.ReLU, nn.ReLU6)):
            hooks.append(m.register_forward_hook(
                lambda mod, inp, out, n=n: counts.__setitem__(n, counts.get(n, 0) + out[0].numel())))
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, *shape))
    model.train(was_training)
    for h in hooks:
        h.remove()
    return sum(counts.values()), counts


def resnet_expected_stages(width):
    """ReLUs per sample of each stage of a width-`width` ResNet-18 on 28x28 (linear in the width):
    stem 28*28*w, layer1 4*28*28*w, layer2 4*14*14*2w, layer3 4*7*7*4w, layer4 4*4*4*8w."""
    return {"stem": 784 * width, "layer1": 3136 * width, "layer2": 1568 * width,
            "layer3": 784 * width, "layer4": 512 * width}


def resnet_stage_counts(counts):
    stages = {"stem": 0, "layer1": 0, "layer2": 0, "layer3": 0, "layer4": 0}
    for n, c in counts.items():
        key = n.split(".")[0] if n.startswith("layer") else "stem"
        stages[key] += c
    return stages


# ---------------------------------------------------------------- checkpoints
# The flags a checkpoint must agree with: anything that changes the sequence of weights.
CKPT_FLAGS = ("model", "width", "lr", "seed", "epochs", "batch", "train_limit")


def run_config(args):
    return {"model": args.name, "width": args.width, "lr": args.lr, "seed": args.seed,
            "epochs": args.epochs, "batch": args.batch, "train_limit": args.train_limit}


def rng_states(gen):
    """Every RNG the training touches: `gen` (shuffling + augmentation), torch's global
    generator (Dropout), and numpy's and Python's (seeded, saved for completeness).
    Plain lists/tuples/tensors only, so that torch.load(weights_only=True) reads them."""
    np_state = np.random.get_state()
    return {"gen": gen.get_state(), "torch": torch.get_rng_state(),
            "numpy": [np_state[0], [int(v) for v in np_state[1]], int(np_state[2]),
                      int(np_state[3]), float(np_state[4])],
            "python": random.getstate()}


def set_rng_states(states, gen):
    gen.set_state(states["gen"])
    torch.set_rng_state(states["torch"])
    name, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    random.setstate(states["python"])


def save_checkpoint(path, state):
    """torch.save to <path>.tmp, fsync, then os.replace: a kill at any moment leaves
    either the previous checkpoint or the new one, never a torn file."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- any unreadable file gets the same clear refusal
        raise SystemExit(f"error: cannot read checkpoint {path}: {e}")


def check_checkpoint(ckpt, path, args):
    """Refuse a checkpoint written by a run with other flags (it would not continue this run)."""
    saved = ckpt.get("config", {})
    now = run_config(args)
    diff = [k for k in CKPT_FLAGS if saved.get(k) != now[k]]
    if diff:
        raise SystemExit(
            f"error: checkpoint {path} was written with other flags: "
            + ", ".join(f"{k}={saved.get(k)!r} (this run: {now[k]!r})" for k in diff)
            + ". Resume with the checkpoint's flags, or pass another --checkpoint "
              "(or delete this one) to start afresh.")
    if ckpt.get("threads") != args.threads:
        print(f"note: checkpoint written with --threads {ckpt.get('threads')}, resuming with "
              f"--threads {args.threads}: the weights may differ in the last bits from an "
              f"uninterrupted run", flush=True)


def fmt_secs(secs):
    secs = int(round(secs))
    return f"{secs // 3600}h{secs % 3600 // 60:02d}m{secs % 60:02d}s"


# ---------------------------------------------------------------- train / eval
def evaluate_torch(model, x, y, bs=1000):
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), bs):
            correct += (model(torch.from_numpy(x[i:i + bs])).argmax(1).numpy() == y[i:i + bs]).sum()
    return correct / len(x)


def train(model, args, xtr, ytr, xte, yte, ckpt_path=None, ckpt=None):
    """Train from scratch, or from `ckpt` (a loaded checkpoint) when given; after every epoch
    the whole state goes to `ckpt_path` (when given). Returns the training seconds, those
    of the runs before a resume included."""
    gen = torch.Generator().manual_seed(args.seed)
    bs = args.batch
    steps_per_epoch = (len(xtr) + bs - 1) // bs
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True,
                          weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=args.lr, epochs=args.epochs, steps_per_epoch=steps_per_epoch,
        pct_start=0.25, anneal_strategy="cos", div_factor=10.0, final_div_factor=100.0)
    xtr_t, ytr_t = torch.from_numpy(xtr), torch.from_numpy(ytr)
    # channels_last: ~25% faster oneDNN convolutions on this CPU (measured, 1 thread)
    model.to(memory_format=torch.channels_last)
    start, prior_secs, history = 0, 0.0, []
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])  # copies into the channels_last parameters
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        set_rng_states(ckpt["rng"], gen)
        start, prior_secs, history = ckpt["epoch"], ckpt["train_seconds"], list(ckpt["history"])
        print(f"resumed from {ckpt_path} after epoch {start}/{args.epochs} "
              f"({fmt_secs(prior_secs)} of training so far); earlier epochs:", flush=True)
        for h in history:
            print("  [checkpoint] " + h["line"], flush=True)
    t0 = time.time()
    for ep in range(start, args.epochs):
        model.train()
        perm = torch.randperm(len(xtr), generator=gen)
        tot_loss, tot_ok, seen, te = 0.0, 0, 0, time.time()
        for s in range(steps_per_epoch):
            idx = perm[s * bs:(s + 1) * bs]
            xb = augment(xtr_t[idx], gen).contiguous(memory_format=torch.channels_last)
            yb = ytr_t[idx]
            out = model(xb)
            loss = F.cross_entropy(out, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot_loss += loss.item() * len(idx)
            tot_ok += (out.argmax(1) == yb).sum().item()
            seen += len(idx)
            if s % 100 == 0:
                print(f"  ep {ep + 1} step {s}/{steps_per_epoch} loss {tot_loss / seen:.4f} "
                      f"acc {tot_ok / seen:.4f} lr {sched.get_last_lr()[0]:.4f} "
                      f"{time.time() - te:.0f}s", flush=True)
        train_secs = time.time() - te
        last = ep + 1 == args.epochs  # full test set at the end, first 2000 before (saves CPU)
        n_eval = len(xte) if last else min(2000, len(xte))
        acc = evaluate_torch(model, xte[:n_eval], yte[:n_eval])
        line = (f"epoch {ep + 1}/{args.epochs} train_loss {tot_loss / seen:.4f} "
                f"train_acc {tot_ok / seen:.4f} test_acc[{n_eval}] {acc:.4f} epoch_time {time.time() - te:.0f}s "
                f"total {prior_secs + time.time() - t0:.0f}s")
        print(line, flush=True)
        history.append({"epoch": ep + 1, "line": line, "train_loss": tot_loss / seen,
                        "train_acc": tot_ok / seen, "test_acc": float(acc), "test_images": n_eval,
                        "epoch_seconds": time.time() - te, "images_per_second": seen / train_secs})
        if ckpt_path:
            save_checkpoint(ckpt_path, {
                "format": 1, "config": run_config(args), "threads": args.threads,
                "torch_version": str(torch.__version__), "epoch": ep + 1,
                "train_seconds": prior_secs + time.time() - t0, "history": history,
                "model": model.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "rng": rng_states(gen)})
        done_here = ep + 1 - start
        elapsed_here = time.time() - t0
        left = args.epochs - (ep + 1)
        eta = elapsed_here / done_here * left  # mean epoch time of this process (eval included)
        finish = datetime.datetime.now() + datetime.timedelta(seconds=eta)
        print(f"progress: epoch {ep + 1}/{args.epochs} done, {seen / train_secs:.1f} images/s, "
              f"elapsed {fmt_secs(prior_secs + elapsed_here)}, ETA {fmt_secs(eta)} for "
              f"{left} more epoch(s) (~{finish:%Y-%m-%d %H:%M}), "
              + (f"checkpoint {ckpt_path}" if ckpt_path else "no checkpoint"), flush=True)
    secs = prior_secs + time.time() - t0
    model.to(memory_format=torch.contiguous_format)
    return secs


# ---------------------------------------------------------------- export / verify
def export_onnx(model, path):
    model.eval()
    dummy = torch.zeros(2, 1, 28, 28)
    torch.onnx.export(
        model, (dummy,), path, dynamo=False, opset_version=13, do_constant_folding=True,
        input_names=["input"], output_names=["logits"],
        dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})
    # The pixel convention travels with the model: relucompile's evaluator reads these
    # entries when no --scale/--mean/--std is given.
    import onnx
    m = onnx.load(path)
    del m.metadata_props[:]
    for key, value in (("relucompile.scale", repr(1 / 255)), ("relucompile.mean", str(MEAN)),
                       ("relucompile.std", str(STD))):
        entry = m.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(m, path)


def verify_onnx(model, path, xte, yte):
    import onnx
    import onnxruntime as ort
    m = onnx.load(path)
    onnx.checker.check_model(m, full_check=True)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    model.eval()
    xs = xte[:256]
    with torch.no_grad():
        ref = model(torch.from_numpy(xs)).numpy()
    got = sess.run(["logits"], {"input": xs})[0]
    diff = float(np.abs(ref - got).max())
    scale = max(1.0, float(np.abs(ref).max()))
    print(f"max |onnx - torch| on 256 test images: {diff:.2e} (max |logit| {scale:.3g})")
    # Relative to the logits' size: a briefly trained wide model's logits reach 1e3, and float32
    # sums in another order then differ by 1e-3 (measured: 4.9e-3 at width 64, 2,048 images).
    assert diff < 1e-4 * scale, f"ONNX output differs from PyTorch by {diff} (max |logit| {scale:.3g})"
    correct = 0
    for i in range(0, len(xte), 500):
        correct += int((sess.run(["logits"], {"input": xte[i:i + 500]})[0].argmax(1) == yte[i:i + 500]).sum())
    ops = {}
    for n in m.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    print("ONNX ops:", dict(sorted(ops.items())))
    return correct / len(xte), diff


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, choices=["resnet18", "resnet18w16", "vgg"],
                    help="resnet18 (base width --width, files named resnet18w<width>), "
                         "resnet18w16 (alias of resnet18 --width 16), or vgg")
    ap.add_argument("--width", type=int, default=None,
                    help="base width of the ResNet-18 (default 16); not for vgg")
    ap.add_argument("--epochs", type=int, default=None, help="default: 10 (resnet18), 7 (vgg)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lr", type=float, default=None, help="peak lr; default 0.1 (resnet), 0.05 (vgg)")
    ap.add_argument("--batch", type=int, default=128, help="batch size (default 128)")
    ap.add_argument("--out-dir", default=HERE)
    ap.add_argument("--data-dir", default=DATA_DIR)
    ap.add_argument("--checkpoint", default=None,
                    help="checkpoint written atomically after every epoch; default "
                         "<out-dir>/<name>.ckpt.pt")
    ap.add_argument("--resume", action="store_true",
                    help="go on from --checkpoint (refused if written with other flags); "
                         "starts from scratch when there is no checkpoint yet")
    ap.add_argument("--train-limit", type=int, default=None, metavar="N",
                    help="train on the first N training images only (smoke tests; needs --out-dir)")
    ap.add_argument("--test-limit", type=int, default=None, metavar="N",
                    help="evaluate on the first N test images only (smoke tests; needs --out-dir)")
    ap.add_argument("--export-only", action="store_true",
                    help="skip training: load <out-dir>/<name>.pt, re-export and re-measure "
                         "(keeps train_seconds from metrics.json)")
    args = ap.parse_args()
    if args.model == "vgg":
        if args.width is not None:
            ap.error("--width is the ResNet-18's base width; --model vgg has none")
        args.name = "vgg"
    else:
        if args.model == "resnet18w16" and args.width not in (None, 16):
            ap.error(f"--model resnet18w16 means width 16, but --width {args.width} was given; "
                     f"use --model resnet18 --width {args.width}")
        if args.width is None:
            args.width = 16
        if args.width < 1:
            ap.error(f"--width must be at least 1, not {args.width}")
        args.name = f"resnet18w{args.width}"
    is_resnet = args.name != "vgg"
    for flag in ("epochs", "batch", "train_limit", "test_limit"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            ap.error(f"--{flag.replace('_', '-')} must be at least 1, not {v}")
    if (args.train_limit or args.test_limit) and \
            os.path.abspath(args.out_dir) == os.path.abspath(HERE):
        ap.error("--train-limit/--test-limit are for smoke tests: pass an --out-dir other than "
                 f"{HERE}, so that the shipped models and metrics.json stay untouched")
    if args.epochs is None:
        args.epochs = 10 if is_resnet else 7
    if args.lr is None:
        args.lr = 0.1 if is_resnet else 0.05
    ckpt_path = args.checkpoint or os.path.join(args.out_dir, f"{args.name}.ckpt.pt")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    random.seed(args.seed)

    # Checkpoint decisions first: a refusal must not wait for the data to load.
    ckpt = None
    if not args.export_only and os.path.exists(ckpt_path):
        found = load_checkpoint(ckpt_path)
        if args.resume:
            check_checkpoint(found, ckpt_path, args)
            ckpt = found
        elif found.get("epoch", 0) < found.get("config", {}).get("epochs", 0):
            raise SystemExit(
                f"error: {ckpt_path} holds an unfinished run (epoch {found.get('epoch')}/"
                f"{found['config']['epochs']}, {found['config']}): pass --resume to go on from it, "
                "or delete it (or pass another --checkpoint) to start afresh")
        else:
            print(f"note: {ckpt_path} holds a finished run; it will be overwritten", flush=True)
        del found
    elif args.resume and not args.export_only:
        print(f"no checkpoint at {ckpt_path} yet: starting from scratch", flush=True)

    model = build(args.name)
    nparams = sum(p.numel() for p in model.parameters())
    relus, per_mod = count_relus(model, (1, 28, 28))
    print(f"model {args.name}: {nparams} params, {relus} ReLUs/sample, torch {torch.__version__}")
    if is_resnet:
        stages = resnet_stage_counts(per_mod)
        print("ReLUs per stage:", stages)
        expected = resnet_expected_stages(args.width)
        assert relus == sum(expected.values()), relus  # 108544 at width 16
        assert stages == expected, stages
    else:
        assert nparams < 1_000_000, nparams

    xtr, ytr = load_split("train", args.data_dir)
    xte, yte = load_split("test", args.data_dir)
    if args.train_limit:
        xtr, ytr = xtr[:args.train_limit], ytr[:args.train_limit]
    if args.test_limit:
        xte, yte = xte[:args.test_limit], yte[:args.test_limit]
    print(f"data: train {xtr.shape}, test {xte.shape}")
    total_steps = args.epochs * ((len(xtr) + args.batch - 1) // args.batch)
    if not args.export_only and total_steps <= 4:  # OneCycleLR's 25 % warm-up must span > 1 step
        raise SystemExit(f"error: {total_steps} optimizer steps in all (epochs x ceil(images/batch)); "
                         "OneCycle needs at least 5: raise --epochs or --train-limit")

    os.makedirs(args.out_dir, exist_ok=True)
    pt_path = os.path.join(args.out_dir, f"{args.name}.pt")
    onnx_path = os.path.join(args.out_dir, f"{args.name}.onnx")
    metrics_path = os.path.join(args.out_dir, "metrics.json")
    metrics = {}
    if os.path.exists(metrics_path):
        with open(metrics_path) as f:
            metrics = json.load(f)
    if args.export_only:
        model.load_state_dict(torch.load(pt_path, map_location="cpu"))
        old = metrics.get(args.name, {})
        secs = old.get("train_seconds", float("nan"))
        args.epochs = old.get("epochs", args.epochs)
        args.lr = old.get("peak_lr", args.lr)
    else:
        secs = train(model, args, xtr, ytr, xte, yte, ckpt_path, ckpt)
        del ckpt
        print(f"training wall time: {secs:.0f}s")
        model.eval()
        torch.save(model.state_dict(), pt_path)
    model.eval()
    export_onnx(model, onnx_path)
    acc, diff = verify_onnx(model, onnx_path, xte, yte)
    print(f"ONNX test accuracy (onnxruntime, {len(xte) // 1000}k): {acc:.4f}"
          if len(xte) % 1000 == 0 else
          f"ONNX test accuracy (onnxruntime, {len(xte)} images): {acc:.4f}")

    if os.path.exists(metrics_path):  # re-read: the other model may have finished meanwhile
        with open(metrics_path) as f:
            metrics = json.load(f)
    metrics[args.name] = {
        "test_accuracy": round(acc, 4), "relus": relus, "params": nparams,
        "train_seconds": round(secs, 1), "epochs": args.epochs, "seed": args.seed,
        "threads": args.threads, "peak_lr": args.lr, "onnx_max_abs_diff": diff,
        "torch_version": torch.__version__,
    }
    if args.batch != 128:
        metrics[args.name]["batch"] = args.batch
    if args.train_limit:
        metrics[args.name]["train_limit"] = args.train_limit
    if args.test_limit:
        metrics[args.name]["test_limit"] = args.test_limit
    with open(metrics_path, "w") as f:
        json.dump(metrics, f, indent=2, sort_keys=True)
        f.write("\n")
    print("wrote", *([] if args.export_only else [pt_path]), onnx_path, metrics_path)


if __name__ == "__main__":
    main()
