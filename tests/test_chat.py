"""`python -m pipeline chat DIR`: scripted on stdin against small finished stages, checked against plain transformers."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

from pipeline.__main__ import main
from pipeline.config import load_config
from tests.conftest import ROOT, small_overrides


def chat(directory: Path, script: str, *options: str) -> subprocess.CompletedProcess[str]:
    """Run the chat as a user would, its stdin a script of lines."""
    return subprocess.run(
        [sys.executable, "-m", "pipeline", "chat", str(directory), *options],
        input=script, capture_output=True, text=True, cwd=ROOT, timeout=300,
        env={**os.environ, "WANDB_MODE": "disabled"},
    )


def prompts_shown(stderr: str) -> list[str]:
    """The exact model inputs that --show-prompt printed, in order."""
    return [ast.literal_eval(line.removeprefix("prompt: ")) for line in stderr.splitlines() if line.startswith("prompt: ")]


def generate(directory: Path, prompt: str, max_new_tokens: int, seed: int | None = None, **sampling: float) -> str:
    """The reply plain transformers gives for `prompt` (greedy unless sampling options are passed)."""
    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    tok = AutoTokenizer.from_pretrained(directory)
    if seed is not None:
        set_seed(seed)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=bool(sampling),
                             max_new_tokens=max_new_tokens, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id, **sampling)
    new = out[0, ids.shape[1]:]
    eos = (new == tok.eos_token_id).nonzero()
    return tok.decode(new[: int(eos[0]) if len(eos) else len(new)], skip_special_tokens=True)


@pytest.fixture(scope="module")
def chat_sft_dir(tmp_path_factory: pytest.TempPathFactory, small_data: dict[str, Path], sft_dir: Path) -> Path:
    """An SFT model trained on conversations (`messages` rows), from the small pretrain model."""
    from pipeline.stages import sft

    run = tmp_path_factory.mktemp("chat-sft")
    for split in ("train", "eval"):
        rows = [json.loads(line) for line in small_data[f"demos_{split}"].read_text().splitlines()]
        (run / f"{split}.jsonl").write_text("".join(json.dumps({"messages": [
            {"role": "user", "content": r["prompt"].rstrip("\n")},
            {"role": "assistant", "content": r["completion"]}]}) + "\n" for r in rows))
    sft.run(load_config("configs/tiny.yaml", [
        *small_overrides(small_data, run), f"sft.init={sft_dir.parent / 'pretrain'}",
        f"sft.data.train={run / 'train.jsonl'}", f"sft.data.eval={run / 'eval.jsonl'}", "sft.max_steps=10",
    ]))
    return run / "sft"


def test_plain_policy_gets_each_line_as_its_trained_prompt_and_replies_like_transformers(sft_dir: Path) -> None:
    # The tiny SFT model was trained on prompt→completion rows like {"prompt": "count to three\n", ...}.
    result = chat(sft_dir, "count to three\nlist two colours\n/reset\n", "--greedy", "--show-prompt")
    assert result.returncode == 0, result.stderr
    assert prompts_shown(result.stderr) == ["count to three\n", "list two colours\n"]  # no history
    budget = json.loads((sft_dir / "summary.json").read_text())["config"]["sft"]["generation"]["max_new_tokens"]
    expected = [generate(sft_dir, p, budget) for p in ("count to three\n", "list two colours\n")]
    assert result.stdout == "".join(f"{r}\n" for r in expected)
    assert "plain prompt→completion" in result.stderr and "nothing to reset" in result.stderr


def test_sampling_options_and_seed_are_those_of_generate(sft_dir: Path) -> None:
    options = {"temperature": 0.7, "top_k": 5, "top_p": 0.9}
    result = chat(sft_dir, "count to four\n", "--seed", "3", "--temperature", "0.7", "--top-k", "5",
                  "--top-p", "0.9", "--max-new-tokens", "6")
    assert result.returncode == 0, result.stderr
    assert result.stdout == generate(sft_dir, "count to four\n", 6, seed=3, **options) + "\n"
    again = chat(sft_dir, "count to four\n", "--seed", "3", "--temperature", "0.7", "--top-k", "5",
                 "--top-p", "0.9", "--max-new-tokens", "6")
    assert again.stdout == result.stdout  # a scripted session repeats exactly


@pytest.mark.slow  # a chat-template SFT of its own: make test-all
def test_chat_policy_keeps_the_conversation_in_its_template_and_reset_forgets_it(chat_sft_dir: Path) -> None:
    result = chat(chat_sft_dir, "count to two\ncount to three\n/reset\ncount to four\n", "--greedy",
                  "--show-prompt", "--max-new-tokens", "6")
    assert result.returncode == 0, result.stderr
    assert "chat template, with history" in result.stderr
    tok = AutoTokenizer.from_pretrained(chat_sft_dir)

    def template(*turns: str) -> str:
        roles = ("user", "assistant")
        messages = [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)]
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    first = generate(chat_sft_dir, template("count to two"), 6)
    second = generate(chat_sft_dir, template("count to two", first, "count to three"), 6)
    # The second prompt is the whole conversation; after /reset the history is gone.
    assert prompts_shown(result.stderr) == [
        template("count to two"), template("count to two", first, "count to three"), template("count to four")]
    assert result.stdout.startswith(f"{first}\n{second}\n")


@pytest.mark.slow  # a chat-template SFT of its own: make test-all
def test_a_conversation_longer_than_the_context_loses_its_earliest_turns(chat_sft_dir: Path) -> None:
    # 256 positions, 236 of them reserved for the reply: the prompt may take 20 tokens, about one exchange.
    result = chat(chat_sft_dir, "count to two\ncount to three\ncount to four\n", "--greedy", "--show-prompt",
                  "--max-new-tokens", "236")
    assert result.returncode == 0, result.stderr
    tok = AutoTokenizer.from_pretrained(chat_sft_dir)
    shown = prompts_shown(result.stderr)
    assert len(shown) == 3 and all(len(tok(p, add_special_tokens=False).input_ids) <= 20 for p in shown)
    assert shown[2].endswith("<|user|>\ncount to four\n<|assistant|>\n")
    assert "count to two" not in shown[2] and "earliest turns no longer fit" in result.stderr


def test_reward_models_and_unfinished_stages_are_refused_with_one_line(
    rm_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    partial = tmp_path / "ppo.partial"
    shutil.copytree(rm_dir.parent / "rm", partial)
    (partial / "summary.json").unlink()
    cases = [
        (rm_dir, f"{rm_dir} is a reward model: it scores text, it does not write any"),
        (partial, f"{partial} is not a finished stage (no summary.json: a stage writes it last): "
                  "build it with `make ppo`"),
        (tmp_path / "sft", f"no directory {tmp_path / 'sft'}: build it with `make sft`"),
    ]
    for directory, message in cases:
        assert main(["chat", str(directory)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {message}") and err.count("\n") == 1, err
