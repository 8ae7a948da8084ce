#!/usr/bin/env python3
"""Build the exporter corpus: real architectures exported by both PyTorch exporters at several
opsets, plus graphs written in other styles (a test-input generator, not part of the product).

Every network is a torchvision architecture in eval mode at a small input size. The graphs are
committed without their weights: each float tensor of 16 or more elements (initializer or
Constant value) has its data removed and is marked STRIPPED, so the corpus is a few MB however
large the networks are, and torch is needed only to rebuild it. `scripts/hydrate_corpus.py`
fills the weights back in with seeded random values (He-scaled; BatchNorm variances positive)
before the tests run, so the exporters' graphs are kept exactly and only the weight values are
synthetic (they were random here too: nothing is downloaded).

    python3 scripts/make_corpus.py --out fixtures/corpus     # 61 s on 2 cores (torch 2.15)

DIR/manifest.json lists every graph: {"name", "family", "exporter", "opset", "style", "file",
"input_shape", "expect": "ok" | "unsupported", "export_s"}.
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import warnings

warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402
from onnx import helper, numpy_helper  # noqa: E402

SIZE = 64  # input height and width: every family below accepts it

# (family, constructor). The classifier keeps 10 classes.
FAMILIES = [
    ("resnet18", lambda: torchvision.models.resnet18(num_classes=10)),
    ("resnet50", lambda: torchvision.models.resnet50(num_classes=10)),
    ("mobilenet_v2", lambda: torchvision.models.mobilenet_v2(num_classes=10)),
    ("squeezenet1_1", lambda: torchvision.models.squeezenet1_1(num_classes=10)),
    ("densenet121", lambda: torchvision.models.densenet121(num_classes=10)),
    ("googlenet", lambda: torchvision.models.googlenet(num_classes=10, aux_logits=False, init_weights=True)),
    ("shufflenet_v2_x1_0", lambda: torchvision.models.shufflenet_v2_x1_0(num_classes=10)),
    ("efficientnet_b0", lambda: torchvision.models.efficientnet_b0(num_classes=10)),
]

# (exporter, opset) for every family; a few more for the families most users export.
EXPORTS = [("torchscript", 11), ("torchscript", 17), ("dynamo", 18)]
EXTRA_EXPORTS = {"resnet18": [("torchscript", 9), ("dynamo", 21)], "mobilenet_v2": [("dynamo", 21)]}


STRIPPED = "relucompile-corpus: weights stripped"
MIN_STRIPPED = 16


def strip_weights(src, dst):
    """Copy the graph without its float weights (see the module doc)."""
    model = onnx.load(src)
    tensors = list(model.graph.initializer)
    tensors += [a.t for n in model.graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
    for t in tensors:
        if t.data_type == onnx.TensorProto.FLOAT and int(np.prod(t.dims)) >= MIN_STRIPPED:
            t.ClearField("raw_data")
            t.ClearField("float_data")
            t.ClearField("external_data")
            t.data_location = onnx.TensorProto.DEFAULT
            t.doc_string = STRIPPED
    onnx.save(model, dst)


def network(family, ctor):
    torch.manual_seed(sum(map(ord, family)))
    net = ctor()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.2 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    return net.eval()


def export(net, path, exporter, opset, **kw):
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        if exporter == "dynamo":
            torch.onnx.export(net, (x,), path, dynamo=True, opset_version=opset, external_data=False,
                              verbose=False, **kw)
        else:
            torch.onnx.export(net, (x,), path, dynamo=False, opset_version=opset, input_names=["input"],
                              output_names=["logits"], **kw)
    onnx.checker.check_model(path, full_check=True)


# ---- graphs in other styles, rewritten from a TorchScript export of resnet18 ----

def gemm_to_matmul_add(model):
    """Gemm (transB=1) -> MatMul with the transposed weight, then Add of the bias."""
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    nodes = []
    for n in g.node:
        if n.op_type != "Gemm":
            nodes.append(n)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        assert attrs.get("transB", 0) == 1 and attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0
        w = numpy_helper.to_array(inits[n.input[1]])
        wt = numpy_helper.from_array(np.ascontiguousarray(w.T), n.input[1] + "_t")
        g.initializer.append(wt)
        mid = n.output[0] + "_mm"
        nodes.append(helper.make_node("MatMul", [n.input[0], wt.name], [mid], name=n.name + "_matmul"))
        nodes.append(helper.make_node("Add", [mid, n.input[2]], list(n.output), name=n.name + "_add"))
    del g.node[:]
    g.node.extend(nodes)
    used = {i for n in g.node for i in n.input}
    keep = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
    return model


def add_to_sum(model):
    """Residual Add -> Sum (the form some converters emit)."""
    for n in model.graph.node:
        if n.op_type == "Add":
            n.op_type = "Sum"
    return model


def initializers_to_constants(model):
    """Weights as Constant nodes instead of initializers (TF/Keras converters' style)."""
    g = model.graph
    consts = [helper.make_node("Constant", [], [i.name], name=f"const_{k}", value=i)
              for k, i in enumerate(g.initializer)]
    nodes = consts + list(g.node)
    del g.initializer[:]
    del g.node[:]
    g.node.extend(nodes)
    return model


def unsupported_loop(path):
    """A scripted loop: TorchScript exports it as an ONNX Loop, which relucompile refuses."""

    class Repeat(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x):
            y = x
            for _ in range(int(x.shape[1])):
                y = torch.relu(self.conv(y)).sum(1, keepdim=True).expand(-1, 3, -1, -1)
            return y

    net = torch.jit.script(Repeat().eval())
    export(net, path, "torchscript", 17)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="fixtures/corpus")
    ap.add_argument("--only", help="comma-separated families (for a quick look)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    manifest_path = os.path.join(args.out, "manifest.json")
    full = tempfile.mkdtemp()  # the exports with weights
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    graphs = []
    started = time.time()

    def record(name, family, exporter, opset, style="", expect="ok", make=None):
        file = f"{name}.onnx"
        path = os.path.join(full, file)
        t0 = time.time()
        make(path)
        strip_weights(path, os.path.join(args.out, file))
        graphs.append({"name": name, "family": family, "exporter": exporter, "opset": opset, "style": style,
                       "file": file, "input_shape": [1, 3, SIZE, SIZE], "expect": expect,
                       "export_s": round(time.time() - t0, 2)})
        print(f"  {name}: {graphs[-1]['export_s']:.1f} s", flush=True)

    only = set(args.only.split(",")) if args.only else None
    for family, ctor in FAMILIES:
        if only and family not in only:
            continue
        net = network(family, ctor)
        for exporter, opset in EXPORTS + EXTRA_EXPORTS.get(family, []):
            short = "ts" if exporter == "torchscript" else "dynamo"
            record(f"{family}-{short}-op{opset}", family, exporter, opset,
                   make=lambda p, e=exporter, o=opset: export(net, p, e, o))

    if not only or "resnet18" in only:
        net = network("resnet18", FAMILIES[0][1])
        # BatchNorm left as its own node: constant folding off keeps the exporter from fusing it.
        record("resnet18-ts-op13-unfused-bn", "resnet18", "torchscript", 13, style="BatchNormalization unfused",
               make=lambda p: export(net, p, "torchscript", 13, do_constant_folding=False))
        base = os.path.join(full, "resnet18-ts-op17.onnx")
        if not os.path.exists(base):
            export(net, base, "torchscript", 17)
        styles = [
            ("matmul-add", "MatMul+Add instead of Gemm", gemm_to_matmul_add),
            ("sum-residual", "Sum for residual adds", add_to_sum),
            ("constant-weights", "weights from Constant nodes", initializers_to_constants),
        ]
        for suffix, style, rewrite in styles:
            def make(p, rewrite=rewrite):
                m = rewrite(onnx.load(base))
                onnx.save(m, p)
                onnx.checker.check_model(p, full_check=True)
            record(f"resnet18-ts-op17-{suffix}", "resnet18", "torchscript", 17, style=style, make=make)

        # Written with external data by hydrate_corpus.py (the style is in the manifest).
        record("resnet18-ts-op17-external-data", "resnet18", "torchscript", 17, style="external data file",
               make=lambda p: shutil.copy(base, p))
        record("loop-ts-op17", "scripted loop", "torchscript", 17, style="control flow (Loop)",
               expect="unsupported", make=unsupported_loop)

    shutil.rmtree(full)
    if only:
        print(f"exported {len(graphs)} graphs to {args.out} (manifest not written: --only)")
        return
    with open(manifest_path, "w") as f:
        json.dump({"torch": torch.__version__, "torchvision": torchvision.__version__,
                   "seconds": round(time.time() - started), "graphs": graphs}, f, indent=1)
    print(f"exported {len(graphs)} graphs to {args.out} in {time.time() - started:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
