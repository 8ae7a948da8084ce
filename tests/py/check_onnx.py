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
     graph with onnx's own shape inference (independently of relucompile's census).

Manifest: [{"model": "...", "input": "x.npy", "tract_output": "y.npy",
            "reference": "orig.onnx" (optional)}, ...]
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
    x = np.load(case["input"]).astype(np.float32)
    y_ort = run_ort(path, x)
    y_tract = np.load(case["tract_output"])
    d_tract = rel_diff(y_ort, y_tract)
    if not d_tract <= REL_TOL:
        raise AssertionError(f"onnxruntime and tract differ: relative {d_tract:.3e}")
    msg = f"ort-vs-tract {d_tract:.1e}"
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
