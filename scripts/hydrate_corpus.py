#!/usr/bin/env python3
"""Fill the exporter corpus's stripped weights back in (see scripts/make_corpus.py), so that
tests/integration/corpus.rs can run every graph. A test-input generator, not part of the product; it needs
only numpy and onnx (tests/py/requirements.txt).

Each stripped float tensor gets seeded random values: He-scaled normals for weights (fan-in
from the dims), 0.5..1.5 for BatchNorm scales and variances, small normals for biases and
means. The seed comes from the graph's and the tensor's names, so every run writes the same
bytes. Graphs whose style is "external data file" are written with their weights in a
separate .data file. Every hydrated graph must pass onnx.checker (full check).

    python3 scripts/hydrate_corpus.py fixtures/corpus target/corpus
"""
import argparse
import hashlib
import json
import os
import shutil

import numpy as np
import onnx
from onnx import numpy_helper

STRIPPED = "relucompile-corpus: weights stripped"


def seed(*names):
    return int.from_bytes(hashlib.sha256("/".join(names).encode()).digest()[:8], "little")


def fill(t, role, rng):
    dims = tuple(int(d) for d in t.dims)
    if role in ("bn_scale", "bn_var"):
        data = rng.uniform(0.5, 1.5, dims)
    elif len(dims) <= 1 or role in ("bn_bias", "bn_mean"):
        data = 0.1 * rng.standard_normal(dims)
    else:
        fan_in = int(np.prod(dims[1:])) if role != "matmul_b" else dims[0]
        data = rng.standard_normal(dims) * np.sqrt(2.0 / max(fan_in, 1))
    t.CopyFrom(numpy_helper.from_array(data.astype(np.float32), t.name))


def hydrate(src, dst, name, external_location):
    model = onnx.load(src)
    roles = {}
    for n in model.graph.node:
        if n.op_type == "BatchNormalization":
            for i, role in zip(n.input[1:], ["bn_scale", "bn_bias", "bn_mean", "bn_var"]):
                roles[i] = role
        if n.op_type == "MatMul" and len(n.input) > 1:
            roles.setdefault(n.input[1], "matmul_b")
    tensors = [(t.name, t) for t in model.graph.initializer]
    tensors += [(n.output[0], a.t) for n in model.graph.node if n.op_type == "Constant"
                for a in n.attribute if a.name == "value"]
    for value, t in tensors:
        if t.doc_string == STRIPPED:
            fill(t, roles.get(value, ""), np.random.default_rng(seed(name, value)))
    if external_location:
        onnx.save(model, dst, save_as_external_data=True, all_tensors_to_one_file=True,
                  location=external_location, size_threshold=1024)
    else:
        onnx.save(model, dst)
    onnx.checker.check_model(dst, full_check=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("corpus", help="the committed corpus (fixtures/corpus)")
    ap.add_argument("out", help="where the hydrated graphs go")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    manifest = json.load(open(os.path.join(args.corpus, "manifest.json")))
    for g in manifest["graphs"]:
        src = os.path.join(args.corpus, g["file"])
        dst = os.path.join(args.out, g["file"])
        if os.path.exists(dst) and os.path.getmtime(dst) >= max(os.path.getmtime(src), os.path.getmtime(__file__)):
            continue  # cached
        external = g["file"] + ".data" if g["style"] == "external data file" else None
        hydrate(src, dst + ".tmp", g["name"], external)
        os.replace(dst + ".tmp", dst)  # a run cut short leaves no half-written graph
    shutil.copy(os.path.join(args.corpus, "manifest.json"), os.path.join(args.out, "manifest.json"))
    print(f"{len(manifest['graphs'])} graphs ready in {args.out}")


if __name__ == "__main__":
    main()
