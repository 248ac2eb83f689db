"""`flare generate` end to end: JSON output, text prompts, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from flare.cli import main
from flare.decoding import SamplingParams
from flare.engine import decode


def _run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_generate_json_matches_library(tiny_dirs, tiny_models, capsys):
    code, out, _ = _run(capsys, "generate", "--model", str(tiny_dirs["qwen3_5"]), "--prompt-ids", "5,6,7",
                        "--temperature", "0", "--max-new-tokens", "9", "--json")
    assert code == 0
    result = json.loads(out)
    expected = decode(tiny_models["qwen3_5"][0], [[5, 6, 7]], SamplingParams(temperature=0, max_new_tokens=9))
    assert result["token_ids"] == expected.token_ids[0]
    assert result["forwards"] == expected.forwards
    assert result["tokens_per_forward"] == 1.0
    assert result["mode"] == "causal"
    assert isinstance(result["text"], str)


def test_generate_text_prompt_is_seeded(tiny_dirs, capsys):
    args = ["generate", "--model", str(tiny_dirs["llama"]), "--prompt", "12+34=", "--seed", "3",
            "--max-new-tokens", "6", "--json"]
    a = json.loads(_run(capsys, *args)[1])
    b = json.loads(_run(capsys, *args)[1])
    assert a["token_ids"] == b["token_ids"] and len(a["prompt_ids"]) == 6


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--prompt-ids", "1,2,9999"], "outside the vocabulary"),
        (["--prompt-ids", ""], "empty"),
        (["--prompt-ids", "1", "--mode", "beam"], "unknown decoding mode"),
        (["--prompt-ids", "1", "--mode", "ar_trust"], "mask token"),
        (["--prompt-ids", "1", "--mode", "ar_trust", "--block-size", "3"], "takes options"),
        (["--prompt-ids", "1", "--top-p", "0"], "top_p"),
    ],
)
def test_generate_errors(tiny_dirs, capsys, extra, message):
    code, _, err = _run(capsys, "generate", "--model", str(tiny_dirs["qwen3_5"]), *extra)
    assert code == 2 and message in err


def test_missing_model_dir(tmp_path, capsys):
    code, _, err = _run(capsys, "generate", "--model", str(tmp_path / "nope"), "--prompt-ids", "1")
    assert code == 2 and "does not exist" in err


def test_console_entry_point(tiny_dirs, tiny_models):
    proc = subprocess.run(
        [sys.executable, "-m", "flare", "generate", "--model", str(tiny_dirs["qwen3_next"]), "--prompt-ids", "3,4",
         "--temperature", "0", "--max-new-tokens", "3", "--json"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    # The subprocess's greedy tokens == decoding the same checkpoint in process.
    expected = decode(tiny_models["qwen3_next"][0], [[3, 4]], SamplingParams(temperature=0, max_new_tokens=3))
    assert json.loads(proc.stdout)["token_ids"] == expected.token_ids[0]
