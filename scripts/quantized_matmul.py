"""How to multiply by a kept-quantised weight on this CPU: dequantise tile by tile (what dgemma does) or torch's
weight-only kernels, at the released model's matrix shapes, for a denoising step (256 rows) and an autoregressive
token (1 row). Writes JSON and prints a table.

    python scripts/quantized_matmul.py [--out docs/quantized_matmul.json] [--threads 2] [--repeats 5]

Methods, each on the same random Q4_K / Q8_0 weight:
- `bf16`: the dequantised weight held in bf16 and F.linear (the float baseline: what kept-quantised must not be
  much slower than).
- `tiles-q4k`, `tiles-q8`: `GroupQuantized.dequantize(bf16)` then F.linear, per call (dgemma's path).
- `int4pack`: `torch._weight_int4pack_mm_for_cpu` on the 4-bit codes repacked unchanged into group-32 int4, with
  bf16 scales and zeros ((q - 8) * scale + zero = q * d*sc - dmin*m for Q4_K): the repack rounds the scale and the
  zero to bf16, and its relative RMS error against the exact values is reported. (The expert down matrix, rows of
  704, is Q4_0 under dgemma's int4 scheme: Q4_K needs rows of 256.)
- `int8pack`: `torch._weight_int8pack_mm` (per-channel int8: a different, coarser quantisation than Q8_0's
  per-32 scales, timed for its speed only).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dgemma.quantized import GroupQuantized  # noqa: E402

# (name, N out, K in) of the released model's matrices: an expert's gate+up and down, attention q, the dense MLP's up
SHAPES = [("expert gate_up", 1408, 2816), ("expert down", 2816, 704),
          ("attention q (sliding)", 4096, 2816), ("dense MLP up", 2112, 2816)]


def timed(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def int4pack(weight: GroupQuantized) -> tuple[torch.Tensor, torch.Tensor]:
    """4-bit codes (value = (q - zero_code) * scale + offset) as the CPU int4 kernel's packed weight and bf16 scales
    and zeros [K / 32, N, 2] with value = (q - 8) * scale + zero: zero = (8 - zero_code) * scale + offset."""
    codes = torch.stack((weight.codes & 0x0F, weight.codes >> 4), dim=-1).reshape(weight.shape).to(torch.int32)
    packed = torch._convert_weight_to_int4pack_for_cpu(codes, 1)
    zero = (8 - weight.zero_code) * weight.scale + (0 if weight.offset is None else weight.offset)
    scales_and_zeros = torch.stack((weight.scale, zero), dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
    return packed, scales_and_zeros


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="docs/quantized_matmul.json")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    rows_out = []
    for name, n, k in SHAPES:
        values = torch.randn(n, k, generator=generator) * 0.02
        q4k = GroupQuantized.quantize(values, "Q4_K") if k % 256 == 0 else GroupQuantized.quantize(values, "Q4_0")
        q8 = GroupQuantized.quantize(values, "Q8_0")
        dense = q4k.dequantize(dtype=torch.bfloat16)
        exact = q4k.dequantize()
        packed, scales_and_zeros = int4pack(q4k)
        eye = torch.eye(k, dtype=torch.bfloat16)
        repacked = torch._weight_int4pack_mm_for_cpu(eye, packed, 32, scales_and_zeros).t().float()
        repack_error = float((repacked - exact).pow(2).mean().sqrt() / exact.pow(2).mean().sqrt())
        int8_codes = (values / values.abs().amax(1, keepdim=True) * 127).round().to(torch.int8)
        int8_scales = (values.abs().amax(1) / 127).to(torch.bfloat16)
        for m in (256, 1):
            x = torch.randn(m, k, generator=generator).to(torch.bfloat16)
            result = {"matrix": name, "shape": [n, k], "rows": m, "type": q4k.qtype,
                      "bf16": timed(lambda: F.linear(x, dense), args.repeats),
                      "tiles-q4k": timed(lambda: F.linear(x, q4k.dequantize(dtype=torch.bfloat16)), args.repeats),
                      "tiles-q8": timed(lambda: F.linear(x, q8.dequantize(dtype=torch.bfloat16)), args.repeats),
                      "int4pack": timed(lambda: torch._weight_int4pack_mm_for_cpu(x, packed, 32, scales_and_zeros),
                                        args.repeats),
                      "int8pack": timed(lambda: torch._weight_int8pack_mm(x, int8_codes, int8_scales), args.repeats),
                      "int4pack_repack_rel_rms_error": repack_error}
            rows_out.append(result)
    report = {"cpu": platform.processor() or platform.machine(), "threads": args.threads, "torch": torch.__version__,
              "seconds_are": "best of --repeats", "results": rows_out}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    methods = ("bf16", "tiles-q4k", "tiles-q8", "int4pack", "int8pack")
    print("| matrix | rows | " + " | ".join(f"{m} ms" for m in methods) + " | int4pack repack error |")
    print("|---|---:|" + "---:|" * (len(methods) + 1))
    for r in rows_out:
        cells = [f"{r[m] * 1e3:.2f}" for m in methods]
        error = f"{r['int4pack_repack_rel_rms_error']:.2e}"
        print(f"| {r['matrix']} {r['shape'][0]}x{r['shape'][1]} | {r['rows']} | " + " | ".join(cells) + f" | {error} |")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
