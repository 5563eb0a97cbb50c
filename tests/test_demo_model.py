"""examples/make_demo_model.py and make_demo_data.py: they build a loadable Llama model,
tokenizer and chat template, and a demo Parquet, without the job runner or the hub.

The model is built with the "tiny" shape and a handful of steps: what is checked is the
artifact (files, config, template, tokenizer behaviour, determinism), not what it learned.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
sys.path.insert(0, str(EXAMPLES))

import demo_tasks  # noqa: E402

# Step limit well below what 60 s allows, so the step limit ends training: the run is then
# deterministic and the two builds below must be bit-identical.
TINY = ["--shape", "tiny", "--max-steps", "8", "--max-seconds", "60", "--batch-size", "8",
        "--eval-prompts", "2", "--log-every", "0"]


def build(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(EXAMPLES / "make_demo_model.py"), "--out", str(out),
                           *TINY, *extra], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "model"
    proc = build(out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "held-out exact match:" in proc.stdout
    return out


def test_files_and_training_summary(model_dir):
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json", "demo_training.json"):
        assert (model_dir / name).is_file(), name
    summary = json.loads((model_dir / "demo_training.json").read_text())
    assert summary["steps"] == 8
    assert summary["shape"] == "tiny"
    assert summary["heldout_prompts"] == 2


def test_model_loads_as_llama_with_gqa(model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    cfg = model.config
    assert cfg.model_type == "llama"
    assert (cfg.hidden_size, cfg.num_hidden_layers) == (32, 1)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (4, 2)
    assert cfg.vocab_size == len(tok)
    assert model.dtype == torch.float32
    gen = GenerationConfig.from_pretrained(model_dir)
    assert gen.eos_token_id == tok.eos_token_id == tok.convert_tokens_to_ids("<|eos|>")
    assert gen.do_sample is False
    # One greedy step runs and yields a token of the vocabulary.
    ids = tok("Repeat: fox sky", return_tensors="pt")["input_ids"]
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2,
                         do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] >= ids.shape[1] + 1 and int(out.max()) < cfg.vocab_size


def test_chat_template_renders_turns_and_generation_prompt(model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    messages = [{"role": "system", "content": "Be exact."},
                {"role": "user", "content": "Repeat: fox sky"}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<|bos|><|system|>Be exact.<|eos|><|user|>Repeat: fox sky<|eos|><|assistant|>"
    no_gen = tok.apply_chat_template(messages, tokenize=False)
    assert no_gen == "<|bos|><|system|>Be exact.<|eos|><|user|>Repeat: fox sky<|eos|>"
    cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast"  # loadable by transformers 4.x
    assert cfg["chat_template"] == tok.chat_template
    with pytest.raises(Exception, match="unknown chat role: tool"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_tokenizer_special_tokens_and_word_tokens(model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|bos|>", "<|eos|>", "<|pad|>")
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}) == 3
    # Plain text gets one BOS; a rendered chat (which has its own BOS) is encoded without.
    plain = tok("fox sky")["input_ids"]
    assert plain[0] == tok.bos_token_id and plain.count(tok.bos_token_id) == 1
    # Spaces are their own tokens, so a word has the same id at the start of an answer as
    # inside the prompt: the answer's ids are a contiguous run of the prompt's ids.
    answer = tok("fox sky", add_special_tokens=False)["input_ids"]
    prompt = tok("Repeat: fox sky", add_special_tokens=False)["input_ids"]
    assert answer == prompt[-len(answer):]
    assert len(answer) == 3  # "fox", " ", "sky"
    for word in demo_tasks.WORDS:
        assert len(tok(word, add_special_tokens=False)["input_ids"]) == 1, word
    text = "Reverse: snow tree — naïve 42"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_rebuild_is_skipped_and_training_is_deterministic(model_dir, tmp_path):
    before = (model_dir / "model.safetensors").stat().st_mtime_ns
    proc = build(model_dir)
    assert proc.returncode == 0 and "already exists" in proc.stdout
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == before

    again = tmp_path / "again"
    assert build(again).returncode == 0
    assert (again / "model.safetensors").read_bytes() == (model_dir / "model.safetensors").read_bytes()
    assert (again / "tokenizer.json").read_text() == (model_dir / "tokenizer.json").read_text()


def test_bad_flags_fail_with_one_line(tmp_path):
    proc = build(tmp_path / "m", "--max-seconds", "0")
    assert proc.returncode == 2
    assert "--max-seconds, --max-steps and --batch-size must be positive" in proc.stderr
    assert not (tmp_path / "m").exists()


def test_demo_data(tmp_path):
    import pyarrow.parquet as pq

    out = tmp_path / "prompts.parquet"
    proc = subprocess.run([sys.executable, str(EXAMPLES / "make_demo_data.py"), "--out", str(out),
                           "--rows", "50"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = pq.read_table(out).to_pylist()
    assert len(rows) == 50
    assert [r["id"] for r in rows] == [f"q{i:05d}" for i in range(50)]
    assert len({r["prompt"] for r in rows}) == 50
    assert {r["system_prompt"] for r in rows} == set(demo_tasks.DEMO_SYSTEM_PROMPTS)
    for r in rows:
        assert r["messages"] == [{"role": "system", "content": r["system_prompt"]},
                                 {"role": "user", "content": r["prompt"]}]
        task, words = demo_tasks.parse_user_text(r["prompt"])
        assert r["task"] == task
        assert r["expected"] == demo_tasks.answer_text(task, words)
    # Same seed, same file.
    again = tmp_path / "again.parquet"
    subprocess.run([sys.executable, str(EXAMPLES / "make_demo_data.py"), "--out", str(again),
                    "--rows", "50"], check=True, capture_output=True, timeout=120)
    assert pq.read_table(again).equals(pq.read_table(out))


def test_demo_tasks_answers():
    assert demo_tasks.answer_text("Repeat", ["red", "fox"]) == "red fox"
    assert demo_tasks.answer_text("Reverse", ["red", "fox", "sky"]) == "sky fox red"
    assert demo_tasks.answer_text("First", ["red", "fox"]) == "red"
    assert demo_tasks.answer_text("Last", ["red", "fox"]) == "fox"
    assert demo_tasks.parse_user_text("Reverse: a b") == ("Reverse", ["a", "b"])
    with pytest.raises(ValueError, match="not a demo prompt"):
        demo_tasks.parse_user_text("Sort: a b")
