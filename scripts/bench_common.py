"""Shared by the peer benchmarks: the ResNet-18 of a given base width, and a child process's
peak memory."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Models made for benchmarks only (briefly trained): under target/, which git ignores.
BENCH_MODELS = os.path.join(ROOT, "target", "bench-models")
# A width without a shipped model gets one epoch on this many images at this peak learning rate:
# enough to leave the random initialisation's scales (the recalibration and BatchNorm statistics
# see real activations), far from a trained model; throughput does not depend on the weights'
# values. (2,048 images at the default 0.1 diverged at width 64: logits 1.3e4, 10% accurate;
# 4,096 at 0.05: 66% on 500 test images at width 32, logits about 10.)
BRIEF_TRAIN_IMAGES = 4096
BRIEF_TRAIN_LR = 0.05
GNU_TIME = "/usr/bin/time"


def resnet18_at_width(width):
    """models/resnet18w<width>.onnx when shipped, else a briefly trained one made (once) by
    models/train.py under target/bench-models/."""
    shipped = os.path.join(ROOT, "models", f"resnet18w{width}.onnx")
    if os.path.exists(shipped):
        return shipped
    made = os.path.join(BENCH_MODELS, f"resnet18w{width}.onnx")
    if not os.path.exists(made):
        print(f"making {made}: models/train.py, 1 epoch on {BRIEF_TRAIN_IMAGES} images at lr {BRIEF_TRAIN_LR}", file=sys.stderr,
              flush=True)
        subprocess.run([sys.executable, os.path.join(ROOT, "models", "train.py"), "--model", "resnet18",
                        "--width", str(width), "--epochs", "1", "--train-limit", str(BRIEF_TRAIN_IMAGES),
                        "--lr", str(BRIEF_TRAIN_LR),
                        "--test-limit", "500", "--out-dir", BENCH_MODELS,
                        "--threads", str(os.cpu_count() or 1)],
                       check=True, stdout=subprocess.DEVNULL)
    return made


def run_measured(cmd, **kwargs):
    """Run `cmd` under GNU time; its CompletedProcess and its peak resident memory in bytes (the
    kernel's ru_maxrss of that process alone, children it waited for included)."""
    import tempfile
    if not os.path.exists(GNU_TIME):
        sys.exit(f"{GNU_TIME} is missing (apt-get install time): it measures each side's peak memory")
    with tempfile.NamedTemporaryFile("r", suffix=".rss") as rss:
        proc = subprocess.run([GNU_TIME, "-q", "-f", "%M", "-o", rss.name, *cmd], capture_output=True,
                              text=True, **kwargs)
        text = rss.read().strip().splitlines()
    peak = int(text[-1]) * 1024 if text and text[-1].isdigit() else None
    return proc, peak
