"""How to multiply by a kept-quantised weight on this CPU: dequantise tile by tile, or torch's weight-only kernels,
at the released model's matrix shapes, for a denoising step's canvas (256 rows), an expert's share of it (16 rows:
2,048 (token, expert) pairs over 128 experts) and an autoregressive token (1 row). Writes JSON and prints a table.

    python scripts/quantized_matmul.py [--out docs/quantized_matmul.json] [--threads 2] [--repeats 5]

Each method multiplies by enough copies of the matrix (at least 256 MB of bf16) that the weights come from memory,
not cache, as in a model whose every matrix is read once per step; times are per matrix, with the allocator settings
the CLI uses (`dgemma.allocator`). Methods, each on the same random Q4_K / Q8_0 weight:
- `bf16`: the dequantised weight held in bf16 and F.linear (the float baseline).
- `bf16-one-row` (1 row only): the same bf16 weight in `dgemma.one_row.row_product`, the compiled one-row product
  an autoregressive token takes (`exact=False`; on a CPU with AVX2 and no AVX-512, dgemma's AVX2 kernel,
  `dgemma.avx2_rows`).
- `tiles-q4k`, `tiles-q8`: `GroupQuantized.dequantize(bf16)` then F.linear, per call (dgemma's path for matrices
  without an int4 kernel; Q8_0 tiles take its one compiled pass).
- `q8`, `q6k`: F.linear on the Q8_0 and Q6_K `GroupQuantized` itself, as the network calls it: tiles, or at up to
  `FEW_ROWS` rows the compiled few-row product over the codes (on AVX2 without AVX-512, dgemma's AVX2 kernel for
  it, up to `AVX2_FEW_ROWS` rows; `q6k` is Q8_0 where rows are not a multiple of Q6_K's 256, as under dgemma's
  q4_k_m scheme).
- `int4pack`: `dgemma.quantized.CpuInt4` (`torch._weight_int4pack_mm_for_cpu` on the same 4-bit codes repacked with
  bf16 scales and zeros, or on a CPU with AVX2 and no AVX-512 dgemma's AVX2 kernel over the codes in its own layout,
  the pairs in blocks of 32 columns: the layout `dgemma.quantized.int4_layout_without_fast_kernel` gives, what dgemma
  runs experts with in bf16 on a CPU without AVX-512 BF16); the relative RMS error of the
  repacked values against the exact ones is reported. (The expert down matrix, rows of 704, is Q4_0 under dgemma's int4
  scheme: Q4_K needs rows of 256.)
- `int4amx` or `int4avx512`: the same codes in the layout of this CPU's fast int4 kernel
  (`dgemma.quantized.fast_int4_layout`): Inductor's AMX int4 template (`dgemma.amx_int4`) where there is AMX, else
  dgemma's AVX-512 BF16 kernel (`dgemma.avx512_int4`); what dgemma runs 4-bit matrices with where this process's
  check passes (columns left out where there is neither).
- `q8halves`, `q8halves-amx` / `q8halves-avx512`: the Q8_0 weight as two 4-bit halves (`CpuInt4` with `halves`:
  twice the 4-bit work) in torch's eager kernel and in the fast one: what dgemma runs Q8_0 experts with
  (docs/quantization.md).
- `int8pack`: `torch._weight_int8pack_mm` (per-channel int8: a different, coarser quantisation than Q8_0's
  per-32 scales, timed for its speed only).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dgemma.allocator import tune_allocator  # noqa: E402
from dgemma.one_row import row_product  # noqa: E402
from dgemma.quantized import (CpuInt4, GroupQuantized, fast_int4_layout,  # noqa: E402
                               int4_layout_without_fast_kernel)

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


COPIES_BYTES = 256 << 20  # bf16 bytes of weight copies a timing cycles through: past this CPU's caches


def copies_of(weight, count: int) -> list:
    """`count` copies of a tensor, GroupQuantized or CpuInt4 in distinct memory (the same values)."""
    if isinstance(weight, torch.Tensor):
        return [weight.clone() for _ in range(count)]
    if isinstance(weight, CpuInt4):
        return [replace(weight, codes=weight.codes.clone(), scales_and_zeros=weight.scales_and_zeros.clone())
                for _ in range(count)]
    return [replace(weight, codes=weight.codes.clone(), scale=weight.scale.clone(),
                    offset=None if weight.offset is None else weight.offset.clone()) for _ in range(count)]


def per_matrix(multiply, weights: list, repeats: int) -> float:
    """Best time of one pass of `multiply` over every copy, per copy."""
    return timed(lambda: [multiply(weight) for weight in weights], repeats) / len(weights)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="docs/quantized_matmul.json")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    fast = fast_int4_layout()  # "amx", "avx512" or None
    tune_allocator()  # as the CLI runs: a tile's fresh megabytes come from the heap, not from new page mappings
    rows_out = []
    for name, n, k in SHAPES:
        values = torch.randn(n, k, generator=generator) * 0.02
        q4k = GroupQuantized.quantize(values, "Q4_K") if k % 256 == 0 else GroupQuantized.quantize(values, "Q4_0")
        q8 = GroupQuantized.quantize(values, "Q8_0").to(dtype=torch.bfloat16)
        q6k = GroupQuantized.quantize(values, "Q6_K" if k % 256 == 0 else "Q8_0").to(dtype=torch.bfloat16)
        exact = q4k.dequantize()
        count = max(1, COPIES_BYTES // (2 * n * k))
        dense = copies_of(q4k.dequantize(dtype=torch.bfloat16), count)
        tiles_q4k, tiles_q8 = copies_of(q4k.to(dtype=torch.bfloat16), count), copies_of(q8, count)
        sixes = copies_of(q6k, count)
        eager = int4_layout_without_fast_kernel(n)  # torch's eager kernel's ("int4pack") or dgemma's AVX2 one's
        int4 = CpuInt4.from_grouped(q4k.to(dtype=torch.bfloat16), eager)
        packed, halves = copies_of(int4, count), copies_of(CpuInt4.from_grouped(q8, eager), count)
        if fast:
            packed_fast = copies_of(CpuInt4.from_grouped(q4k.to(dtype=torch.bfloat16), fast), count)
            halves_fast = copies_of(CpuInt4.from_grouped(q8, fast), count)
        eye = torch.eye(k, dtype=torch.bfloat16)
        repacked = F.linear(eye, int4).t().float()
        repack_error = float((repacked - exact).pow(2).mean().sqrt() / exact.pow(2).mean().sqrt())
        int8_codes = copies_of((values / values.abs().amax(1, keepdim=True) * 127).round().to(torch.int8), count)
        int8_scales = (values.abs().amax(1) / 127).to(torch.bfloat16)
        for m in (256, 16, 4, 2, 1):
            x = torch.randn(m, k, generator=generator).to(torch.bfloat16)
            result = {"matrix": name, "shape": [n, k], "rows": m, "type": q4k.qtype, "copies": count,
                      "bf16": per_matrix(lambda w: F.linear(x, w), dense, args.repeats),
                      "tiles-q4k": per_matrix(lambda w: F.linear(x, w.dequantize(dtype=torch.bfloat16)), tiles_q4k,
                                              args.repeats),
                      "tiles-q8": per_matrix(lambda w: F.linear(x, w.dequantize(dtype=torch.bfloat16)), tiles_q8,
                                             args.repeats),
                      "q8": per_matrix(lambda w: F.linear(x, w), tiles_q8, args.repeats),
                      "q6k": per_matrix(lambda w: F.linear(x, w), sixes, args.repeats), "q6k_type": q6k.qtype,
                      "int4pack": per_matrix(lambda w: F.linear(x, w), packed, args.repeats),
                      "q8halves": per_matrix(lambda w: F.linear(x, w), halves, args.repeats),
                      "int8pack": per_matrix(lambda w: torch._weight_int8pack_mm(x, w, int8_scales), int8_codes,
                                             args.repeats),
                      "int4pack_repack_rel_rms_error": repack_error}
            if m == 1:
                result["bf16-one-row"] = per_matrix(lambda w: row_product(x, w), dense, args.repeats)
            if fast:
                result[f"int4{fast}"] = per_matrix(lambda w: F.linear(x, w), packed_fast, args.repeats)
                result[f"q8halves-{fast}"] = per_matrix(lambda w: F.linear(x, w), halves_fast, args.repeats)
            rows_out.append(result)
    report = {"cpu": platform.processor() or platform.machine(), "threads": args.threads, "torch": torch.__version__,
              "seconds_are": "best of --repeats", "results": rows_out}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    methods = ("bf16", "bf16-one-row", "tiles-q4k", "tiles-q8", "q8", "q6k", "int4pack",
               *((f"int4{fast}",) if fast else ()), "q8halves", *((f"q8halves-{fast}",) if fast else ()), "int8pack")
    print("| matrix | rows | " + " | ".join(f"{m} ms" for m in methods) + " | int4pack repack error |")
    print("|---|---:|" + "---:|" * (len(methods) + 1))
    for r in rows_out:
        cells = [f"{r[m] * 1e3:.2f}" if m in r else "-" for m in methods]
        error = f"{r['int4pack_repack_rel_rms_error']:.2e}"
        print(f"| {r['matrix']} {r['shape'][0]}x{r['shape'][1]} | {r['rows']} | " + " | ".join(cells) + f" | {error} |")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
