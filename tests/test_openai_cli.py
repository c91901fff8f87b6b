"""The OpenAI sampling controls on the command line (issue 15): `dgemma generate` and `dgemma chat` take the
same controls as the server and the Python API, with the same meaning."""

from __future__ import annotations

import pytest

from dgemma.cli import build_parser, generation_overrides
from dgemma.generation_config import GenerationConfig


def overrides(*argv: str) -> dict:
    args = build_parser().parse_args(["generate", "x", *argv])
    return generation_overrides(args, GenerationConfig(t_min=0.4, t_max=0.8))


def test_sampling_flags_become_generation_settings():
    got = overrides("--top-k", "40", "--top-p", "0.9", "--frequency-penalty", "0.5", "--presence-penalty", "-0.25",
                    "--logit-bias", "50=-100", "--logit-bias", "7=2.5", "--temperature", "0.5")
    assert got == {"top_k": 40, "top_p": 0.9, "frequency_penalty": 0.5, "presence_penalty": -0.25,
                   "logit_bias": {50: -100.0, 7: 2.5}, "t_min": 0.2, "t_max": 0.4}
    GenerationConfig().updated(**got)  # valid settings
    assert overrides("--temperature", "0") == {"do_sample": False}  # the argmax, as the server's temperature 0
    assert overrides("--temperature", "2", "--t-min", "0.1", "--t-max", "0.3") == {"t_min": 0.2, "t_max": 0.6}
    assert overrides() == {}


@pytest.mark.parametrize("argv", [["--logit-bias", "x=1"], ["--logit-bias", "5"], ["--logit-bias", "5=inf"],
                                  ["--temperature", "-1"]])
def test_malformed_flags_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["generate", "x", *argv])
    assert exited.value.code == 2 and argv[0] in capsys.readouterr().err
