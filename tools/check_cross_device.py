"""Train on a GPU (bf16 autocast), then prove the CPU fold reproduces the codes the GPU forward used.

The quantizer forms W0 + alpha*B@A as a fixed-order sum of rank-1 outer products and uses only
element-wise IEEE ops, so the codes should not depend on the device. This tool checks that claim on a real
training run: for every quantized layer, codes and dequantized weights computed by the training layer on
the GPU are compared with the CPU fold of the written checkpoint.

    python tools/check_cross_device.py --model BASE --data DATA --out RUN [l4q-train options...]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from l4q_export.fold import fold
from l4q_export.quant import QuantizedTensor
from l4q_export.training import trainer as tr
from l4q_export.training.surgery import quantized_layers


def main(argv: list[str]) -> None:
    from l4q_export.cli import train_cmd

    captured = {}
    real_train = tr.train

    def train_and_capture(args):
        # keep the trained model around: wrap the method registry's setup_model to grab the module tree
        orig = tr.methods.setup_model

        def grab(model, *a, **k):
            captured["model"] = model
            return orig(model, *a, **k)

        tr.methods.setup_model = grab
        try:
            t0 = time.time()
            rep = real_train(args)
            captured["seconds"] = time.time() - t0
            return rep
        finally:
            tr.methods.setup_model = orig

    tr.train = train_and_capture
    try:
        train_cmd.main(argv, standalone_mode=False)
    finally:
        tr.train = real_train
    out = Path(argv[argv.index("--out") + 1])
    model = captured["model"]
    gpu = {name + ".weight": layer.quantized(name + ".weight") for name, layer in quantized_layers(model)}
    device = next(model.parameters()).device
    same_codes = same_bits = n = 0
    for name, t in fold(out):
        if not isinstance(t, QuantizedTensor):
            continue
        g = gpu[name]
        n += 1
        same_codes += torch.equal(g.codes.cpu(), t.codes)
        same_bits += torch.equal(g.dequantize().cpu().view(torch.int32), t.dequantize().view(torch.int32))
    report = {
        "train_device": str(device),
        "layers": n,
        "codes_identical": same_codes,
        "dequant_bit_identical": same_bits,
        "train_seconds": captured["seconds"],
        "train_report": json.loads((out / "train_report.json").read_text()),
    }
    print(json.dumps(report, indent=2))
    (out / "cross_device.json").write_text(json.dumps(report, indent=2))
    sys.exit(0 if same_codes == same_bits == n else 1)


if __name__ == "__main__":
    main(sys.argv[1:])
