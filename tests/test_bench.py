"""`dgemma bench` end to end on the tiny config: every system runs in its own process and the report adds up."""

from __future__ import annotations

import json

import pytest
import torch

import dgemma
from dgemma.cli import main
from dgemma.generation import autoregressive_steps
pytest.importorskip("transformers")
pytestmark = pytest.mark.oracle
from oracle import load_reference  # noqa: E402


def test_bench_reports_every_system_with_ratios_and_a_chart(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--config", "tiny", "--canvas", "16", "--prompt-length", "8", "--max-new-tokens", "32",
                 "--steps", "3", "--repeat", "1", "--threads", "1", "--work-dir", str(tmp_path), "--out",
                 str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["summary"]) == {"dgemma-fast", "dgemma-reference", "transformers", "dgemma-ar"}
    for system, summary in report["summary"].items():
        assert summary["tokens_per_second"]["median"] > 0 and summary["peak_rss_bytes"]["median"] > 0
        expected = 32 if system != "dgemma-ar" else None
        if expected:
            assert summary["tokens"]["median"] <= expected
    # 32 tokens = two canvases of 16, three steps each
    assert report["runs"]["dgemma-fast"][0]["forwards"] == 6 == report["runs"]["transformers"][0]["forwards"]
    assert set(report["ratios"]) == {"dgemma-fast / dgemma-reference", "dgemma-fast / transformers",
                                     "dgemma-fast / dgemma-ar"}
    assert out.with_suffix(".png").stat().st_size > 1000
    assert "dgemma-fast" in capsys.readouterr().out
    # what it ran on, told apart by more than a virtual machine's model name
    assert report["machine"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert report["machine"]["avx512_bf16"] == torch.cpu._is_avx512_bf16_supported()
    assert report["machine"]["amx"] == torch.cpu._is_amx_tile_supported()


def test_autoregressive_decoding_matches_the_reference_encoder(checkpoint_dir):
    """Greedy next-token decoding through dgemma's KV cache equals re-running the reference encoder each time:
    every token is the reference's argmax, up to a tie within the fp32 parity tolerance (1e-5)."""
    path = checkpoint_dir("moe")
    ours, ref = dgemma.load(path), load_reference(path)
    prompt = torch.tensor([[2, 9, 14, 33, 5, 21, 8, 40, 17, 3, 11, 6]])  # longer than the sliding window
    tokens = list(autoregressive_steps(ours, prompt, 10, temperature=0))
    sequence = prompt
    with torch.no_grad():
        for token in tokens:
            hidden = ref.model.encoder(input_ids=sequence).last_hidden_state
            logits = ref.lm_head(hidden[0, -1])
            assert float(logits.max() - logits[token]) <= 1e-5
            sequence = torch.cat([sequence, torch.tensor([[token]])], dim=1)
    with pytest.raises(ValueError, match="one sequence"):
        next(autoregressive_steps(ours, prompt.expand(2, -1), 3))
