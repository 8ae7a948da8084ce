#!/usr/bin/env python3
"""Independent reference for relucompile's lossy passes.

Builds the shipped ResNet-18 (width 16) in PyTorch with the same weights as
models/resnet18w16.pt and with ReLUs switched off by hand, as DeepReDuce's
`cull stages 1,2 + thin bottom` prescribes: every ReLU of stages 1 and 2 (layer1,
layer2) and the ReLU after the residual add (relu2) of every block of stages 3 and 4.
The graph is exported with the TorchScript exporter; the tests compare it with what
`relucompile models/resnet18w16.onnx --cull 1,2 --thin bottom` emits.

    python3 models/reference_reduced.py   # writes fixtures/models/reference_resnet18w16_cull12_thin_bottom.onnx
"""
import os
import sys

import torch
import torch.nn as nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import train  # noqa: E402  (the model definitions the weights were trained with)

OUT = os.path.join(HERE, "..", "fixtures", "models", "reference_resnet18w16_cull12_thin_bottom.onnx")


def main():
    model = train.build("resnet18w16")
    model.load_state_dict(torch.load(os.path.join(HERE, "resnet18w16.pt"), map_location="cpu"))
    model.eval()
    for layer in (model.layer1, model.layer2):
        for block in layer:
            block.relu1 = nn.Identity()
            block.relu2 = nn.Identity()
    for layer in (model.layer3, model.layer4):
        for block in layer:
            block.relu2 = nn.Identity()
    x = torch.zeros(1, 1, 28, 28)
    torch.onnx.export(model, x, OUT, dynamo=False, opset_version=13, input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
                      do_constant_folding=True)
    print("wrote", os.path.normpath(OUT))


if __name__ == "__main__":
    main()
