"""The ONNX target's command-line options, apart from the writer so that building the CLI (`l4q-export --help`,
every export to another target) does not import onnx (~1.2 s of start-up)."""

from __future__ import annotations

import click

CLI_FORMS = ("matmulnbits", "qdq")
CLI_DTYPES = ("fp32", "fp16")  # graph.DTYPES' keys (tests/test_onnx_export.py checks they agree)

CLI_OPTIONS = [
    click.Option(["--onnx-form", "onnx_form"], type=click.Choice(CLI_FORMS), default="matmulnbits", show_default=True,
                 help="ONNX: matmulnbits (com.microsoft::MatMulNBits) or qdq (standard DequantizeLinear + MatMul)."),
    click.Option(["--dtype", "dtype"], type=click.Choice(CLI_DTYPES), default="fp32", show_default=True,
                 help="ONNX: activation/scale dtype of the graph (fp16 needs scales/offsets on the fp16 grid)."),
    click.Option(["--onnx-fused/--no-onnx-fused", "onnx_fused"], default=None,
                 help="ONNX: ORT's fused GroupQueryAttention + SkipSimplifiedLayerNormalization contrib ops "
                      "[default: on for matmulnbits; qdq stays standard ops only]."),
    click.Option(["--onnx-accuracy-level", "onnx_accuracy_level"], type=click.IntRange(0, 4), default=0, show_default=True,
                 help="ONNX: MatMulNBits accuracy_level (0 = exact fp compute; 4 = int8 activations, faster, ~5e-3 error)."),
]
