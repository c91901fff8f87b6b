"""Models whose weights stay quantised: GGUF files as stored, safetensors checkpoints quantised at load, `dgemma
quantize`. Each is compared with the same model given the dequantised values as float weights."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import dgemma
import dgemma.amx_int4
import dgemma.quantized
from dgemma.bench_breakdown import random_blocks
from dgemma.cache import KVCache
from dgemma.checkpoints import CheckpointError, bundled_model_dir, checkpoint_name, to_checkpoint_names
from dgemma.cli import build_parser, load_for_generation, main as cli_main
from dgemma.gguf import read_gguf, write_gguf
from dgemma.quantized import quantized_weights, scheme_type

from test_gguf import K_CONFIG, model_tensors

TYPES = ("Q4_K", "Q8_0", "Q6_K", "Q4_0", "Q5_K", "Q4_1", "Q5_0", "Q5_1")
# fp32 logits of a kept-quantised model against the same values as float weights: the matmuls see the same numbers,
# but one expert or tile at a time instead of in one call, which may sum in another order.
LOGITS_ATOL = 1e-4


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """A MoE model with every matrix in one of the kept types (each type on several kinds of tensor)."""
    config = dict(K_CONFIG, text_config=dict(K_CONFIG["text_config"], vocab_size=8192))
    tensors = model_tensors(config)
    matrices = sorted(name for name, tensor in tensors.items() if tensor.dim() > 1)
    types = {name: TYPES[i % len(TYPES)] for i, name in enumerate(matrices)}
    path = tmp_path_factory.mktemp("kept") / "mixed.gguf"
    tokenizer_dir = bundled_model_dir()
    write_gguf(path, config, tensors, types=types,
               tokenizer_json=(tokenizer_dir / "tokenizer.json").read_text(),
               tokenizer_config=json.loads((tokenizer_dir / "tokenizer_config.json").read_text()))
    return path, types


def both_logits(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoder logits of the prompt, and decoder logits of a canvas after it (with self-conditioning)."""
    cache = KVCache(model.config, ids.shape[0], model.dtype, model.device, capacity=ids.shape[1] + 8)
    valid = torch.ones_like(ids, dtype=torch.bool)
    encoder = model.logits(model.encode(ids, cache.encoder_plan(model.rope, valid)))
    cache.commit(valid)
    canvas = ids[:, :model.config.canvas_length]
    plan = cache.decoder_plan(model.rope, ids.shape[0], canvas.shape[1])
    first = model.logits(model.decode(canvas, plan))
    second = model.logits(model.decode(canvas, plan, model.soft_embeddings(first)))
    return encoder, second


def last_token_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """An autoregressive token's logits, [B, V]: the prompt but its last token encoded, then that token alone (one
    row per sequence through every matrix of every layer), and the vocabulary head on it."""
    cache = KVCache(model.config, ids.shape[0], model.dtype, model.device, capacity=ids.shape[1])
    for part in (ids[:, :-1], ids[:, -1:]):
        valid = torch.ones_like(part, dtype=torch.bool)
        hidden = model.encode(part, cache.encoder_plan(model.rope, valid))
        cache.commit(valid)
    return model.logits(hidden[:, -1])


def test_gguf_matrices_stay_quantised_and_compute_what_their_dequantised_values_compute(mixed):
    path, types = mixed
    kept = dgemma.load(path, dtype=torch.float32)
    expanded = dgemma.load(path, dtype=torch.float32, keep_quantized=False)
    held = dict(quantized_weights(kept))
    # Every quantised matrix is held as it is stored (in the decoder, and tied into the encoder), none as floats.
    assert {checkpoint_name(name): w.qtype for name, w in held.items()} == types
    assert all(p.dim() == 1 for p in kept.parameters())
    assert kept.encoder.layers[0].self_attn.q_proj.weight is kept.decoder.layers[0].self_attn.q_proj.weight
    floats = to_checkpoint_names(expanded)
    checkpoint = read_gguf(path)
    for name, weight in held.items():
        stored = checkpoint_name(name)
        assert torch.equal(weight.dequantize(), checkpoint.dequantized(stored)), name
        assert torch.equal(weight.dequantize(), floats[stored]), name
    ids = torch.randint(3, 8192, (2, 12), generator=torch.Generator().manual_seed(0))
    for ours, reference in zip(both_logits(kept, ids), both_logits(expanded, ids)):
        torch.testing.assert_close(ours, reference, atol=LOGITS_ATOL, rtol=0)


def test_kept_quantised_model_generates_in_both_sampling_modes(mixed):
    path, _ = mixed
    model = dgemma.load(path)
    assert model.dtype == torch.bfloat16  # quantised files compute in bf16 by default
    ids = torch.randint(3, 8192, (1, 6), generator=torch.Generator().manual_seed(1))
    for sampling in ("fast", "reference"):
        out = model.generate(ids, max_new_tokens=10, max_denoising_steps=4, sampling=sampling,
                             generator=torch.Generator().manual_seed(0))
        assert out.sequences.shape == (1, 16) and out.sequences.dtype == torch.long


def test_a_kept_quantised_model_is_not_saved_as_safetensors(mixed, tmp_path):
    with pytest.raises(CheckpointError, match="kept quantised"):
        dgemma.load(mixed[0]).save_pretrained(tmp_path / "out")


@pytest.mark.parametrize("scheme", ["int8", "int4", "q4_k_m", "int4_experts"])
def test_quantize_at_load_computes_what_the_quantised_values_compute(random_checkpoint, scheme):
    directory = random_checkpoint("moe")
    kept = dgemma.load(directory, dtype=torch.float32, quantize=scheme)
    floats = dgemma.load(directory, dtype=torch.float32)
    expected = {name: scheme_type(name, tuple(t.shape), scheme) for name, t in to_checkpoint_names(floats).items()}
    held = dict(quantized_weights(kept))
    assert {checkpoint_name(name): w.qtype for name, w in held.items()} == {n: t for n, t in expected.items() if t}
    # The float model given the quantised values computes the same logits.
    with torch.no_grad():
        for name, weight in held.items():
            floats.get_parameter(name).copy_(weight.dequantize())
    ids = torch.randint(3, floats.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    for ours, reference in zip(both_logits(kept, ids), both_logits(floats, ids)):
        torch.testing.assert_close(ours, reference, atol=LOGITS_ATOL, rtol=0)


def test_schemes_choose_each_tensors_type():
    assert scheme_type("model.decoder.embed_tokens.weight", (1024, 256), "int4") == "Q8_0"
    assert scheme_type("model.decoder.layers.0.self_attn.q_proj.weight", (512, 256), "int4") == "Q8_0"
    assert scheme_type("model.decoder.layers.0.router.proj.weight", (4, 256), "int4") == "Q8_0"
    assert scheme_type("model.decoder.layers.0.experts.gate_up_proj", (4, 512, 256), "int4") == "Q4_K"
    assert scheme_type("model.decoder.layers.0.experts.down_proj", (4, 2816, 704), "int4") == "Q4_0"
    assert scheme_type("model.decoder.layers.0.mlp.up_proj.weight", (512, 256), "int8") == "Q8_0"
    assert scheme_type("model.decoder.norm.weight", (256,), "int4") is None
    assert scheme_type("model.decoder.layers.0.mlp.up_proj.weight", (512, 40), "int4") is None  # rows not in blocks
    assert scheme_type("model.decoder.embed_tokens.weight", (1024, 256), "q4_k_m") == "Q6_K"
    assert scheme_type("model.decoder.layers.0.experts.down_proj", (4, 2816, 704), "q4_k_m") == "Q8_0"
    assert scheme_type("model.decoder.layers.0.self_attn.q_proj.weight", (512, 256), "q4_k_m") == "Q4_K"
    assert scheme_type("model.decoder.layers.0.experts.gate_up_proj", (4, 512, 2816 + 32), "q4_k_m") == "Q5_0"
    assert scheme_type("model.decoder.layers.0.experts.gate_up_proj", (4, 512, 256), "int4_experts") == "Q4_K"
    assert scheme_type("model.decoder.layers.0.experts.down_proj", (4, 2816, 704), "int4_experts") == "Q4_0"
    for name in ("embed_tokens.weight", "layers.0.self_attn.q_proj.weight", "layers.0.mlp.up_proj.weight",
                 "layers.0.router.proj.weight", "self_conditioning.up_proj.weight"):
        assert scheme_type(f"model.decoder.{name}", (512, 256), "int4_experts") is None
    with pytest.raises(ValueError, match="int2"):
        scheme_type("model.decoder.norm.weight", (256,), "int2")


def test_dgemma_quantize_writes_a_gguf_that_loads_as_the_quantised_checkpoint(random_checkpoint, tmp_path, capsys):
    directory = random_checkpoint("moe")
    out = tmp_path / "model-int4.gguf"
    assert cli_main(["quantize", str(directory), str(out), "--scheme", "int4"]) == 0
    assert str(out) in capsys.readouterr().out
    from_file = dgemma.load(out, dtype=torch.float32)
    at_load = dgemma.load(directory, dtype=torch.float32, quantize="int4")
    file_weights, load_weights = dict(quantized_weights(from_file)), dict(quantized_weights(at_load))
    assert sorted(file_weights) == sorted(load_weights)
    for name in file_weights:
        assert torch.equal(file_weights[name].dequantize(), load_weights[name].dequantize()), name
    assert from_file.generation_config.max_denoising_steps == at_load.generation_config.max_denoising_steps


def test_a_gguf_files_experts_alone_stay_quantised_with_keep_quantized_experts(mixed, random_checkpoint):
    path, types = mixed
    model = dgemma.load(path, dtype=torch.float32, keep_quantized="experts")
    held = {checkpoint_name(name): w.qtype for name, w in quantized_weights(model)}
    assert held == {name: qtype for name, qtype in types.items() if ".experts." in name} and held
    expanded = dgemma.load(path, dtype=torch.float32, keep_quantized=False)
    ids = torch.randint(3, 8192, (2, 12), generator=torch.Generator().manual_seed(0))
    for ours, reference in zip(both_logits(model, ids), both_logits(expanded, ids)):
        torch.testing.assert_close(ours, reference, atol=LOGITS_ATOL, rtol=0)
    with pytest.raises(ValueError, match="not a GGUF file: keep_quantized='experts'"):
        dgemma.load(random_checkpoint("moe"), keep_quantized="experts")
    with pytest.raises(ValueError, match="keep_quantized must be True, False or 'experts'"):
        dgemma.load(path, keep_quantized="attention")


def test_a_four_bit_embedding_stays_tiles_while_the_linear_matrices_take_a_cpu_int4_kernel(tmp_path):
    """A file with every matrix Q4_0 (llama.cpp writes such files): the embedding, which is also the head the sampler
    reads as a matrix, is reached by more than F.linear and must stay tiles; the model generates."""
    config = dict(K_CONFIG, text_config=dict(K_CONFIG["text_config"], vocab_size=512))
    tensors = model_tensors(config)
    path = write_gguf(tmp_path / "q4.gguf", config, tensors,
                      types={name: "Q4_0" for name, t in tensors.items() if t.dim() > 1})
    model = dgemma.load(path)
    weights = {checkpoint_name(name): w for name, w in quantized_weights(model)}
    assert type(weights.pop("model.decoder.embed_tokens.weight")).__name__ == "GroupQuantized"
    fast = dgemma.quantized.fast_int4_layout()
    for name, weight in weights.items():
        # experts always; every other matrix whose rows are in 16s (not the router's 2): in the fast kernel (AMX or
        # AVX-512 BF16) where they fill its 32-column blocks, else in torch's codes layout (read by dgemma's AVX2
        # kernel where it runs) with its tiles kept for a canvas's rows
        rows, expert = weight.shape[-2], ".experts." in name
        assert type(weight).__name__ == ("CpuInt4" if expert or rows % 16 == 0 else "GroupQuantized"), name
        if not expert and rows % 16 == 0:
            on_fast = fast and rows % 32 == 0
            eager = dgemma.quantized.int4_layout_without_fast_kernel(rows)
            assert (weight.layout, weight.tiles is not None) == ((fast, False) if on_fast else (eager, True))
    assert any(".mlp." in name and type(w).__name__ == "CpuInt4" for name, w in weights.items())
    out = model.generate(torch.tensor([[2, 5, 6, 7]]), max_new_tokens=16, max_denoising_steps=4,
                         generator=torch.Generator().manual_seed(0))
    assert out.sequences.shape == (1, 4 + 16)


def test_bf16_logits_on_the_cpu_int4_kernels_stay_as_close_to_fp32_as_plain_bf16(tmp_path):
    """The int4 scheme's layout in bf16, with the experts' down projections at Q8_0 (as q4_k_m's fallback for their
    rows of 704): experts (the Q8_0 ones as two 4-bit halves), dense MLP and self-conditioning on a CPU int4 kernel
    (repacked with bf16 scales and zeros), the rest tiles, and the 8-bit head (2^21 values) on the few-row kernel for
    a last token's row. Against the same file dequantised in fp32, its logits' RMS error stays within 2x the error of
    the same file dequantised to bf16 (the kernels add their bf16 scales and their summation order to bf16's own
    rounding; a misread layout would be off by the logits' whole scale). The same for the model loaded for
    autoregressive decoding (its experts in torch's int4 kernel's layout); the last token's single row also goes
    through the one-row copies of the other 4-bit matrices."""
    config = dict(K_CONFIG, text_config=dict(K_CONFIG["text_config"], vocab_size=8192))
    tensors = model_tensors(config)
    eight_bit = ("embed", "router", "self_attn", "experts.down_proj")
    types = {name: ("Q8_0" if any(part in name for part in eight_bit) else "Q4_K")
             for name, t in tensors.items() if t.dim() > 1}
    tokenizer_dir = bundled_model_dir()  # a tokenizer, for the command line's loading below
    path = write_gguf(tmp_path / "int4.gguf", config, tensors, types=types,
                      tokenizer_json=(tokenizer_dir / "tokenizer.json").read_text(),
                      tokenizer_config=json.loads((tokenizer_dir / "tokenizer_config.json").read_text()))
    kernels = dgemma.load(path)
    assert any(type(w).__name__ == "CpuInt4" for _, w in quantized_weights(kernels))
    ids = torch.randint(3, 8192, (2, 12), generator=torch.Generator().manual_seed(0))
    compiling = os.environ.get("DGEMMA_COMPILE") != "0"
    assert dgemma.quantized._takes_few_rows_kernel(torch.zeros(1, 256, dtype=torch.bfloat16),
                                                   kernels.head_matrix) == compiling

    def all_logits(model) -> tuple[torch.Tensor, ...]:
        return (*both_logits(model, ids), last_token_logits(model, ids[:1]))

    # Loaded for autoregressive decoding, as `dgemma generate --decode autoregressive` loads it: the experts in
    # torch's one-row layout on AMX or without a fast kernel, in the AVX-512 kernel where that is the fast one; the
    # other 4-bit matrices in the fast kernel (on AMX with a copy for single rows), as loaded for diffusion, in
    # torch's layout without one (loaded for diffusion, with their tiles kept for more rows); the other 8-bit ones as
    # before, except on the AVX-512 kernel, where those nn.Linear ones with rows in 32s (attention, the router) join
    # it as 4-bit halves for a token's row. Q8_0 experts loaded for diffusion without a fast kernel stay tiles.
    args = build_parser().parse_args(["generate", "x", "--model", str(path), "--decode", "autoregressive"])
    one_row, _ = load_for_generation(args)
    fast = dgemma.quantized.fast_int4_layout()
    # A server loaded for autoregressive requests lays its weights out the same way.
    served, _ = load_for_generation(build_parser().parse_args(["serve", "--model", str(path), "--load-for",
                                                               "autoregressive"]))
    assert [(name, getattr(w, "layout", None)) for name, w in quantized_weights(served)] == \
        [(name, getattr(w, "layout", None)) for name, w in quantized_weights(one_row)]
    del served
    one_row_experts = "avx512" if fast == "avx512" else None
    for model, experts in ((kernels, fast), (one_row, one_row_experts)):
        for name, weight in quantized_weights(model):
            eager = dgemma.quantized.int4_layout_without_fast_kernel(weight.shape[-2])  # without a fast kernel
            eight_bit_linear = "self_attn" in name or "router" in name
            if eight_bit_linear and model is one_row and fast == "avx512" and weight.shape[-2] % 32 == 0:
                assert (type(weight).__name__, weight.layout, weight.halves) == ("CpuInt4", "avx512", True), name
            elif "embed" in name or eight_bit_linear:
                assert type(weight).__name__ == "GroupQuantized", name
            elif ".experts.down_proj" in name and model is kernels and not fast:
                assert type(weight).__name__ == "GroupQuantized", name
            elif ".experts." in name:
                assert (weight.layout, weight.one_row_codes) == (experts or eager, None), name
                assert weight.halves == ("down_proj" in name), name
            else:  # without a fast kernel, loaded for diffusion: torch's kernel for one row, tiles for more
                assert weight.layout == (fast or eager), name
                assert (weight.one_row_codes is not None) == (fast == "amx"), name
                assert (weight.tiles is not None) == (model is kernels and not fast), name
    if fast == "avx512":
        assert any("self_attn" in name and getattr(w, "halves", False) for name, w in quantized_weights(one_row))
    with pytest.raises(ValueError, match="decode must be one of diffusion, autoregressive, speculative, not 'side"):
        dgemma.load(path, decode="sideways")

    exact = all_logits(dgemma.load(path, dtype=torch.float32, keep_quantized=False))
    plain = all_logits(dgemma.load(path, keep_quantized=False))
    for model in (kernels, one_row):
        for ours, bf16, truth in zip(all_logits(model), plain, exact):

            def rms(x: torch.Tensor) -> float:
                return float((x.detach().float() - truth.detach()).pow(2).mean().sqrt())

            assert rms(ours) <= 2 * rms(bf16), (rms(ours), rms(bf16))


def test_weights_option_on_the_command_line(mixed, tmp_path, capsys):
    path, _ = mixed
    for weights in ("stored", "float", "experts"):
        assert cli_main(["generate", "hello", "--model", str(path), "--weights", weights, "--max-new-tokens", "8",
                         "--steps", "2", "--seed", "0"]) == 0
    capsys.readouterr()
    assert cli_main(["generate", "hello", "--model", str(path), "--weights", "int8", "--max-new-tokens", "8"]) == 2
    assert "GGUF" in capsys.readouterr().err


@pytest.mark.parametrize("scheme", ["int4", "int8"])
def test_resident_memory_of_a_kept_quantised_model_is_within_1_5x_its_file(tmp_path, scheme):
    """Measured in a fresh process: resident memory after loading, less before (the runtime), against the file. int4:
    4-bit experts and MLP, the rest Q8_0; int8: every matrix Q8_0 (its experts as two 4-bit halves on a CPU)."""
    config = dict(K_CONFIG, text_config=dict(K_CONFIG["text_config"], vocab_size=32768, hidden_size=1024,
                                             intermediate_size=1024, moe_intermediate_size=512, num_experts=8))
    tensors = model_tensors(config)
    eight_bit = ("embed", "self_attn", "router") if scheme == "int4" else ("",)
    types = {name: ("Q8_0" if any(part in name for part in eight_bit) else "Q4_K")
             for name, t in tensors.items() if t.dim() > 1}
    # Random codes and scales (memory does not depend on the values; gguf's Q4_K search in numpy takes half a minute)
    rng = np.random.default_rng(0)
    blocks = {name: random_blocks(qtype, tuple(tensors[name].shape), 0.02, rng) for name, qtype in types.items()}
    path = write_gguf(tmp_path / "m.gguf", config, tensors, types=types, blocks=blocks)
    del tensors, blocks
    script = textwrap.dedent(f"""
        import json, torch, dgemma, dgemma.amx_int4
        from dgemma.quantized import quantized_weights
        def rss():
            with open("/proc/self/status") as f:
                return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))
        dgemma.load({str(bundled_model_dir())!r})  # the runtime's first-use costs, outside the measurement,
        dgemma.amx_int4.available()  # as is Inductor, which checks the AMX int4 kernel on a CPU with AMX
        before = rss()
        model = dgemma.load({str(path)!r})
        print(json.dumps({{"loaded": rss() - before,
                          "held": sum(w.nbytes() for _, w in quantized_weights(model))}}))
    """)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    measured = json.loads(result.stdout)
    size = path.stat().st_size
    assert measured["held"] <= 1.5 * size
    assert measured["loaded"] <= 1.5 * size, (measured, size)
