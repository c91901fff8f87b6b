"""`dgemma bench --breakdown`'s pieces: random quantised blocks that are valid GGUF, one form's parts measured on a
tiny slice and adding up, and the projection's arithmetic. (The measurement itself is a command, not a test.)"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from dgemma.bench import build_checkpoint, named_config
from dgemma.bench_breakdown import (FORMS, ONE_ROW_LAYOUT_FORMS, SCHEME_OF_FORM, floors, floors_beside, kv_bytes,
                                    measure_parts, median_of, one_row_layout_forms, project, random_blocks,
                                    rates_here, weights_file, worker_parts)
from dgemma.gguf import read_gguf
from dgemma.quantized import CpuInt4, fast_int4_layout, quantized_weights


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q5_0", "Q4_K", "Q6_K"])
def test_random_blocks_decode_to_finite_values_of_about_the_asked_spread(qtype):
    shape = (64, 512)
    blocks = random_blocks(qtype, shape, 0.02, np.random.default_rng(0))
    values = dequantize(blocks, GGMLQuantizationType[qtype]).reshape(shape)
    assert np.isfinite(values).all()
    assert 0.01 < values.std() < 0.04


def test_parts_of_a_kept_quantised_slice_add_up(tmp_path):
    checkpoint = build_checkpoint("tiny", None, 16, tmp_path / "tiny", layers=2)
    path = weights_file(checkpoint, "int4")
    assert path.suffix == ".gguf" and weights_file(checkpoint, "int4") == path  # built once
    file = read_gguf(path)
    assert file.raw("model.decoder.layers.0.experts.gate_up_proj")[1].name == "Q4_0"  # rows of 64: no Q4_K
    parts = measure_parts(path, threads=1, prompt_length=8, repeat=1, ar_tokens=2, seed=0)
    assert parts["layer_types"] == [True, False]
    for total, layers in (("decoder_seconds", "decoder_layers"), ("prefill_seconds", "prefill_layers"),
                          ("ar_token_seconds", "ar_layers")):
        assert len(parts[layers]) == 2 and all(t > 0 for t in parts[layers])
        assert sum(parts[layers]) <= parts[total]
    assert parts["sampler_seconds"] > 0
    held = parts["held_bytes"]
    assert set(held) == {"rest", "layer0", "layer1", "layer0.experts", "layer1.experts"}
    # (resident_bytes is measured in the worker's fresh process; here, inside pytest's, it means nothing)
    # Loaded for autoregressive decoding: the prompt and the tokens only, in the one-row layout, the same bytes held
    # but for the tiles a load for diffusion keeps beside torch's layout without a fast kernel (the layers' dense
    # matrices), and on the AVX-512 kernel the 8-bit attention and router as 4-bit halves (1.25 bytes a value against
    # the tiles' 1.125)
    tokens = measure_parts(path, threads=1, prompt_length=8, repeat=1, ar_tokens=2, seed=0, decode="autoregressive",
                           ar_context=600)
    assert "decoder_seconds" not in tokens and "sampler_seconds" not in tokens
    # and tokens once more with the cache filled to 600 (two prompts: 512, then the rest)
    assert tokens["ar_context"] == 600 and "ar_context" not in parts
    assert len(tokens["ar_layers_at_context"]) == 2
    assert sum(tokens["ar_layers_at_context"]) <= tokens["ar_token_seconds_at_context"]
    assert len(tokens["ar_layers"]) == 2 and sum(tokens["ar_layers"]) <= tokens["ar_token_seconds"]
    assert all(tokens["held_bytes"][place] == held[place] for place in ("layer0.experts", "layer1.experts"))
    fast = fast_int4_layout()
    for place in ("layer0", "layer1"):
        assert {"amx": tokens["held_bytes"][place] == held[place], "avx512": tokens["held_bytes"][place] > held[place],
                None: tokens["held_bytes"][place] < held[place]}[fast]
    # the rest: the embedding (8-bit tiles in either load) and the self-conditioning block (4-bit, with its tiles
    # beside torch's layout when loaded for diffusion without a fast kernel)
    rest, rest_for_tokens = held["rest"], tokens["held_bytes"]["rest"]
    assert rest_for_tokens < rest if fast is None else rest_for_tokens == rest


def test_load_keeps_the_slices_four_bit_matrices_in_a_cpu_int4_kernels_layout(tmp_path):
    import dgemma

    model = dgemma.load(weights_file(build_checkpoint("tiny", None, 16, tmp_path / "tiny", layers=2), "int4"))
    weights = dict(quantized_weights(model))
    assert all(isinstance(weights[name], CpuInt4) for name in weights if ".experts." in name)
    # The dense MLP and self-conditioning (Q4_0 here) join them: on a fast kernel (AMX, AVX-512 BF16), which beats
    # tiles at any number of rows, or without one in torch's kernel for one row, their tiles kept for more; the 8-bit
    # embedding, attention and router stay tiles.
    on_kernel = {name for name, weight in weights.items() if isinstance(weight, CpuInt4)}
    four_bit = {name for name, weight in weights.items() if weight.qtype == "Q4_0"}
    assert on_kernel == four_bit
    assert {".experts.", ".mlp.", "self_conditioning."} <= {
        part for name in four_bit for part in (".experts.", ".mlp.", "self_conditioning.") if part in name}
    fast = fast_int4_layout()
    assert all((weights[name].tiles is not None) == (not fast and ".experts." not in name) for name in four_bit)


def test_the_forms_measured_loaded_for_tokens_are_those_whose_layout_depends_on_the_load(tmp_path):
    """A form whose weights the load for autoregressive decoding lays out differently gets its own token worker: on
    AMX, every form with 4-bit matrices or Q8_0 experts (`int8`'s experts run as 4-bit halves); on the AVX-512 kernel
    the forms with 8-bit matrices other than experts (those take it as halves for a token's row only); without a fast
    kernel, a subset (there 4-bit experts take torch's kernel either way)."""
    import dgemma

    checkpoint = build_checkpoint("tiny", None, 16, tmp_path / "tiny", layers=2)

    def layouts(path, decode: str) -> dict:
        model = dgemma.load(path, decode=decode)
        return {name: (type(w).__name__, getattr(w, "layout", None), getattr(w, "halves", None),
                       getattr(w, "tiles", None) is not None) for name, w in quantized_weights(model)}

    depends = set()
    for form in FORMS:
        path = weights_file(checkpoint, SCHEME_OF_FORM[form]) if SCHEME_OF_FORM[form] else checkpoint
        if layouts(path, "diffusion") != layouts(path, "autoregressive"):
            depends.add(form)
    assert depends <= set(one_row_layout_forms()) <= set(ONE_ROW_LAYOUT_FORMS)
    fast = fast_int4_layout()
    if fast:
        assert depends == set(one_row_layout_forms())
    else:  # Q8_0 experts in the eager kernel; 4-bit linear matrices keep tiles for many rows
        assert {"int8", "int4"} <= depends


def test_a_one_layer_slice_is_refused_by_name(tmp_path, capsys):
    from dgemma.cli import main

    assert main(["bench", "--breakdown", "--config", "tiny", "--layers", "1", "--work-dir", str(tmp_path)]) == 2
    assert "--layers 1: the breakdown projects each layer kind" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # refused before any checkpoint is built


def test_a_tokens_floor_counts_the_bytes_held_in_the_layout_its_time_is_measured_in():
    full = named_config("release", 256)
    rates = {"matmul_flops": 1e12, "copy_bytes_per_second": 1e10}
    canvas = {"layer_types": [True, False],
              "held_bytes": {"rest": 100, "layer0": 30, "layer0.experts": 1280, "layer1": 40, "layer1.experts": 1280}}
    tokens = dict(canvas, held_bytes=dict(canvas["held_bytes"], layer0=10, layer1=20))  # no second copies
    per_layer = (10 + 20) / 2 + 8 / 128 * 1280
    assert floors(canvas, full, 256, rates, tokens)["ar_token_bytes"] == pytest.approx(30 * per_layer + 100)
    assert floors(canvas, full, 256, rates)["ar_token_bytes"] == pytest.approx(30 * (per_layer + 20) + 100)


def test_a_token_at_a_longer_context_adds_the_cached_keys_and_values_it_reads():
    full = named_config("release", 256)  # 25 sliding layers (8 key heads of 256, window 1024), 5 full (2 of 512)
    assert kv_bytes(full, 4096) == 25 * 2 * 1024 * 8 * 256 * 2 + 5 * 2 * 4096 * 2 * 512 * 2
    assert kv_bytes(full, 100) == 25 * 2 * 100 * 8 * 256 * 2 + 5 * 2 * 100 * 2 * 512 * 2
    rates = {"matmul_flops": 1e12, "copy_bytes_per_second": 1e10}
    parts = {"layer_types": [True, False], "held_bytes": {"rest": 100, "layer0": 10, "layer1": 20},
             "ar_context": 4096}
    floor = floors(parts, full, 256, rates)
    assert floor["ar_token_bytes_at_context"] == floor["ar_token_bytes"] + kv_bytes(full, 4096)
    assert floor["ar_token_seconds_at_context"] == pytest.approx(floor["ar_token_bytes_at_context"] / 1e10)
    assert "ar_token_seconds_at_context" not in floors({**parts, "ar_context": None}, full, 256, rates)


def test_a_context_no_longer_than_the_tokens_already_timed_is_refused_by_name(tmp_path, capsys):
    from dgemma.cli import main

    assert main(["bench", "--breakdown", "--config", "tiny", "--prompt-length", "256", "--ar-context", "100",
                 "--work-dir", str(tmp_path), "--out", str(tmp_path / "out.json")]) == 2
    assert "--ar-context 100: tokens are timed after the 256-token prompt" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_projection_counts_each_layer_kind_of_the_full_model():
    full = named_config("release", 256)  # 30 layers: 25 sliding, 5 full
    parts = {"layer_types": [True, False], "decoder_layers": [1.0, 2.0], "decoder_seconds": 3.5, "sampler_seconds": 1.0,
             "prefill_layers": [0.1, 0.2], "prefill_seconds": 0.4, "ar_layers": [0.01, 0.02], "ar_token_seconds": 0.05,
             "held_bytes": {"rest": 100, "layer0": 10, "layer0.experts": 1000, "layer1": 20, "layer1.experts": 1000},
             "resident_bytes": 3000}
    projected = project(parts, full, steps=16)
    assert projected["step_seconds"] == pytest.approx(25 * 1.0 + 5 * 2.0 + 0.5 + 1.0)
    assert projected["ar_token_seconds"] == pytest.approx(25 * 0.01 + 5 * 0.02 + 0.02)
    assert projected["prefill_seconds"] == pytest.approx(25 * 0.1 + 5 * 0.2 + 0.1)
    assert projected["weights_bytes"] == pytest.approx(25 * 1010 + 5 * 1020 + 100)
    assert projected["break_even_tokens_per_forward"] == pytest.approx(36.5 / 0.37)
    assert projected["diffusion_tokens_per_second"]["16.0"] == pytest.approx(16 / 36.5)
    assert "ar_token_seconds_canvas_layout" not in projected
    # The same form loaded for autoregressive decoding gives the AR token; the canvas layout's is kept beside it.
    tokens = {**parts, "ar_layers": [0.004, 0.008], "ar_token_seconds": 0.03, "prefill_layers": [0.3, 0.6],
              "prefill_seconds": 1.0}
    del tokens["decoder_layers"], tokens["decoder_seconds"], tokens["sampler_seconds"]
    with_tokens = project(parts, full, steps=16, tokens=tokens)
    assert with_tokens["ar_token_seconds"] == pytest.approx(25 * 0.004 + 5 * 0.008 + 0.018)
    assert with_tokens["ar_token_seconds_canvas_layout"] == pytest.approx(projected["ar_token_seconds"])
    assert with_tokens["prefill_seconds_token_layout"] == pytest.approx(25 * 0.3 + 5 * 0.6 + 0.1)
    assert with_tokens["step_seconds"] == projected["step_seconds"]
    assert with_tokens["break_even_tokens_per_forward"] == pytest.approx(36.5 / with_tokens["ar_token_seconds"])
    assert "ar_token_seconds_at_context" not in with_tokens
    # Tokens timed at a longer context are projected the same way.
    longer = {**tokens, "ar_context": 4096.0,  # a median over rounds
              "ar_layers_at_context": [0.006, 0.02], "ar_token_seconds_at_context": 0.05}
    at_context = project(parts, full, steps=16, tokens=longer)
    assert at_context["ar_context"] == 4096 and isinstance(at_context["ar_context"], int)
    assert at_context["ar_token_seconds_at_context"] == pytest.approx(25 * 0.006 + 5 * 0.02 + 0.024)
    assert at_context["ar_tokens_per_second_at_context"] == pytest.approx(1 / 0.274)


def test_rounds_merge_into_medians_of_numbers_and_lists_keeping_the_rest():
    rounds = [{"step": 3.0, "layers": [1.0, 9.0], "kinds": [True, False], "held": {"a": 1}, "name": "x"},
              {"step": 1.0, "layers": [2.0, 7.0], "kinds": [True, False], "held": {"a": 1}, "name": "x"},
              {"step": 2.0, "layers": [3.0, 8.0], "kinds": [True, False], "held": {"a": 1}, "name": "x"}]
    assert median_of(rounds) == {"step": 2.0, "layers": [2.0, 8.0], "kinds": [True, False], "held": {"a": 1},
                                 "name": "x"}
    assert median_of(rounds[:1]) == rounds[0]


def test_a_worker_takes_the_floors_rates_around_its_parts_and_their_floors_take_them(tmp_path):
    """The rates the floors use, read in the worker before and after its measurements (`worker_parts`: their means),
    and floors at them: a step's at its own worker's rates, a token's at the rates of the worker that timed it."""
    checkpoint = build_checkpoint("tiny", None, 16, tmp_path / "tiny", layers=2)
    readings = iter([{"matmul_flops": 1e11, "copy_bytes_per_second": 1e10},
                     {"matmul_flops": 3e11, "copy_bytes_per_second": 3e10}])
    parts = worker_parts(weights_file(checkpoint, "int4"), threads=1, prompt_length=8, repeat=1, ar_tokens=2, seed=0,
                         measure_rates=lambda: next(readings))
    assert parts["matmul_flops"] == 2e11 and parts["copy_bytes_per_second"] == 2e10 and parts["decoder_seconds"] > 0
    assert next(readings, None) is None  # read twice: before and after
    full = named_config("release", 256)
    canvas = {"layer_types": [True, False], "held_bytes": {"rest": 100, "layer0": 30, "layer1": 40},
              "matmul_flops": 1e12, "copy_bytes_per_second": 1e10}
    tokens = dict(canvas, matmul_flops=3e12, copy_bytes_per_second=2e10)
    beside = floors_beside(canvas, full, 256, tokens)
    at_canvas_rates = floors(canvas, full, 256, {"matmul_flops": 1e12, "copy_bytes_per_second": 1e10}, tokens)
    assert beside["step_seconds"] == at_canvas_rates["step_seconds"]
    assert beside["ar_token_seconds"] == pytest.approx(at_canvas_rates["ar_token_seconds"] / 2)
    assert beside["token_rates"] == {"matmul_flops": 3e12, "copy_bytes_per_second": 2e10}
    assert floors_beside(canvas, full, 256)["ar_token_seconds"] == at_canvas_rates["ar_token_seconds"]


def test_the_floors_rates_are_measured_here():
    rates = rates_here(1, copy_bytes=2**22, repeat=1)
    assert set(rates) == {"matmul_flops", "copy_bytes_per_second"} and all(value > 0 for value in rates.values())
