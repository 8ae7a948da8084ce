#!/usr/bin/env python3
"""Cross-check harness for graphs relucompile emits (a checker, not part of the product).

For each case of a JSON manifest it checks that the model
  1. passes onnx.checker.check_model(full_check=True),
  2. contains no Identity node and no dead node (every node output feeds a node or an output),
     every INT/FLOAT attribute carries its value field (zeros included) and no initializer is
     an integer tensor (both refused by CrypTen's importer),
  3. loads in onnxruntime and gives the same outputs as tract (tract's outputs are read
     from the .npy file `relucompile run` wrote for the same inputs),
  4. when a reference model is named, gives under onnxruntime the same outputs as it,
  5. when `relus` is given, has that many ReLU elements per sample, counted here from the
     graph with onnx's own shape inference (independently of relucompile's census),
  6. when `accuracy` is given, has under onnxruntime the top-1 accuracy relucompile reported on
     a labelled data set that this script decodes itself (CIFAR-10/100 binaries, or a uint8
     .npy with its labels) and normalises by the model's relucompile.* metadata.

Manifest: [{"model": "...", "input": "x.npy", "tract_output": "y.npy",
            "reference": "orig.onnx" (optional),
            "accuracy": {"data": "dir or x.npy", "format": "cifar10" | "cifar100" | "npy",
                         "split": "test", "expected": 0.75, "images": 8} (optional)}, ...]
"input" and "tract_output" may be left out when only the accuracy is checked.
Exits 1 if any check fails; prints one line per case and a closing "N passed, M failed".
"""
import json
import sys

import numpy as np
import onnx
import onnxruntime as ort

ort.set_default_logger_severity(3)

# Relative to the largest output magnitude (at least 1): two float32 runtimes summing in
# different orders differ by rounding only.
REL_TOL = 1e-4


def run_ort(path, x):
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    # A model exported with a fixed batch takes the samples that many at a time.
    step = inp.shape[0] if isinstance(inp.shape[0], int) and inp.shape[0] > 0 else len(x)
    return np.concatenate([sess.run(None, {inp.name: x[i:i + step]})[0] for i in range(0, len(x), step)])


def rel_diff(a, b):
    a = np.asarray(a, dtype=np.float32).reshape(len(a), -1)
    b = np.asarray(b, dtype=np.float32).reshape(len(b), -1)
    if a.shape != b.shape:
        raise AssertionError(f"output shapes differ: {a.shape} vs {b.shape}")
    return float(np.max(np.abs(a - b)) / max(1.0, float(np.max(np.abs(a)))))


def count_relus(model):
    """ReLU elements per sample: Relu outputs, and Clip outputs with a lower bound of 0. Shapes
    come from onnx's shape inference; those it cannot infer (a Reshape to a computed shape)
    are read off an onnxruntime run with those values exposed as outputs."""
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    shapes = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
        dims = vi.type.tensor_type.shape.dim
        shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    relus = []
    for n in model.graph.node:
        relu_like = n.op_type == "Relu"
        if n.op_type == "Clip":
            lo = next((a.f for a in n.attribute if a.name == "min"), None)
            if lo is None and len(n.input) > 1 and n.input[1] in inits:
                lo = float(inits[n.input[1]])
            relu_like = lo == 0.0
        if relu_like:
            relus.append(n.output[0])
    unknown = [v for v in relus if shapes.get(v) is None or any(d is None for d in shapes[v][1:])]
    if unknown:
        shapes.update(run_shapes(model, unknown))
    return sum(int(np.prod(shapes[v][1:])) for v in relus)


def run_shapes(model, values):
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for v in values:
        probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(v))
    sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    x = np.zeros([d if isinstance(d, int) and d > 0 else 1 for d in inp.shape], dtype=np.float32)
    outs = sess.run(values, {inp.name: x})
    return {v: list(o.shape) for v, o in zip(values, outs)}


def read_labelled(data, fmt, split):
    """Images (uint8 [N,3,32,32] or as stored) and labels, decoded here, not by relucompile."""
    if fmt == "npy":
        return np.load(data), np.load(data[:-len(".npy")] + "_labels.npy")
    if fmt == "cifar10":
        import glob
        import re
        files = ([f"{data}/test_batch.bin"] if split == "test" else
                 sorted(glob.glob(f"{data}/data_batch_*.bin"),
                        key=lambda f: int(re.search(r"_(\d+)\.bin$", f).group(1))))
        rec = np.concatenate([np.fromfile(f, np.uint8) for f in files]).reshape(-1, 3073)
        return rec[:, 1:].reshape(-1, 3, 32, 32), rec[:, 0].astype(np.int64)
    if fmt == "cifar100":
        rec = np.fromfile(f"{data}/{split}.bin", np.uint8).reshape(-1, 3074)
        return rec[:, 2:].reshape(-1, 3, 32, 32), rec[:, 1].astype(np.int64)
    raise AssertionError(f"unknown data format {fmt}")


def normalise(model, pixels):
    """(pixel * scale - mean[c]) / std[c] in float32, from the model's relucompile.* metadata."""
    meta = {p.key: [float(v) for v in p.value.split(",")] for p in model.metadata_props
            if p.key.startswith("relucompile.")}
    scale = np.float32(meta.get("relucompile.scale", [1.0 / 255.0])[0])
    c = pixels.shape[1]
    mean = np.array(meta.get("relucompile.mean", [0.0]), np.float32)
    std = np.array(meta.get("relucompile.std", [1.0]), np.float32)
    mean = np.broadcast_to(mean, (c,)).reshape(1, c, 1, 1)
    std = np.broadcast_to(std, (c,)).reshape(1, c, 1, 1)
    return (pixels.astype(np.float32) * scale - mean) / std


def check_accuracy(path, model, spec):
    pixels, labels = read_labelled(spec["data"], spec["format"], spec.get("split", "test"))
    logits = run_ort(path, normalise(model, pixels))
    correct = int((logits.argmax(1) == labels).sum())
    if len(labels) != spec["images"]:
        raise AssertionError(f"{spec['data']} holds {len(labels)} images, relucompile read {spec['images']}")
    if abs(correct / len(labels) - spec["expected"]) > 1e-9:
        raise AssertionError(f"onnxruntime accuracy {correct}/{len(labels)} on {spec['data']}, "
                             f"relucompile reported {spec['expected']}")
    return f"accuracy {correct}/{len(labels)} on {spec['data']} as reported"


def check_case(case):
    path = case["model"]
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    graph = model.graph
    identities = [n.name for n in graph.node if n.op_type == "Identity"]
    if identities:
        raise AssertionError(f"Identity nodes left: {identities[:5]}")
    # Importers that test for field presence (CrypTen) refuse an INT or FLOAT attribute whose
    # value field is missing, as happens when an encoder drops zeros.
    for n in graph.node:
        for a in n.attribute:
            field = {onnx.AttributeProto.INT: "i", onnx.AttributeProto.FLOAT: "f"}.get(a.type)
            if field and not a.HasField(field):
                raise AssertionError(f"attribute {a.name} of {n.name} has no '{field}' field")
    # CrypTen turns initializers into trainable parameters, which integer tensors cannot be.
    ints = [t.name for t in graph.initializer
            if t.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16)]
    if ints:
        raise AssertionError(f"integer initializers (CrypTen refuses them): {ints[:5]}")
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    dead = [n.name for n in graph.node if not any(o in used for o in n.output if o)]
    if dead:
        raise AssertionError(f"dead nodes: {dead[:5]}")
    msg = "checker ok"
    if "accuracy" in case:
        msg += ", " + check_accuracy(path, model, case["accuracy"])
    if "input" not in case:
        return msg
    x = np.load(case["input"]).astype(np.float32)
    y_ort = run_ort(path, x)
    y_tract = np.load(case["tract_output"])
    d_tract = rel_diff(y_ort, y_tract)
    if not d_tract <= REL_TOL:
        raise AssertionError(f"onnxruntime and tract differ: relative {d_tract:.3e}")
    msg += f", ort-vs-tract {d_tract:.1e}"
    if "relus" in case:
        counted = count_relus(model)
        if counted != case["relus"]:
            raise AssertionError(f"graph has {counted} ReLU elements, relucompile reported {case['relus']}")
        msg += f", {counted} ReLUs"
    if case.get("reference"):
        d_ref = rel_diff(run_ort(case["reference"], x), y_ort)
        if not d_ref <= REL_TOL:
            raise AssertionError(f"differs from reference under onnxruntime: relative {d_ref:.3e}")
        msg += f", vs-reference {d_ref:.1e}"
    return msg


def main():
    cases = json.load(open(sys.argv[1]))
    passed = failed = 0
    for case in cases:
        try:
            msg = check_case(case)
            print(f"ok   {case['model']}: {msg}")
            passed += 1
        except Exception as e:  # report every case, then fail once
            print(f"FAIL {case['model']}: {e}")
            failed += 1
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
