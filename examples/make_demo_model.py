#!/usr/bin/env python
"""Build the llmbatch demo model locally (no hub): a byte-level BPE tokenizer with a chat
template and a small LlamaForCausalLM trained on CPU for at most ~2 minutes on the word-list
tasks of demo_tasks.py (Repeat / Reverse / First / Last).

    python examples/make_demo_model.py                 # -> examples/demo-model/
    python examples/make_demo_model.py --force --max-seconds 60

Training is seeded and stops at --max-steps or --max-seconds, whichever comes first; the learning
rate anneals on the same progress measure, so a slow machine still ends with a decayed LR. With
the same number of steps (the step limit reached first) and thread count, the weights are
bit-identical.
At the end it prints the exact-match rate of greedy `model.generate` on held-out prompts that
never occur in training.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # demo_tasks lives next to this file

import demo_tasks  # noqa: E402

# Special tokens; the role markers make the chat template unambiguous to a byte-level BPE.
BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
SPECIAL_TOKENS = [BOS, EOS, PAD] + ROLE_TOKENS

# Every turn is "<|role|>content<|eos|>", so the model ends its own turn by emitting EOS, which is
# the generation stop token. Unknown roles fail loudly (a row error in llmbatch, not a silent
# mis-render).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown chat role: ' + message['role']) }}"
    "{% endif %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}<|eos|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

# Model shapes. "demo" is what the README quickstart uses: small enough for ~2,500 steps in
# 110 s on one busy core, which the copy tasks need more than width (a 1.4 M-parameter shape
# with 2 threads on a busy machine managed under 300 steps and learned nothing). "tiny" is for
# the test suite.
SHAPES = {
    "demo": dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2),
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                 num_attention_heads=4, num_key_value_heads=2),
}


def build_tokenizer(seed: int, vocab_size: int):
    """Train a byte-level BPE on generated task text; return a transformers fast tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # Every whitespace character is its own token ("fox sky" -> "fox", " ", "sky"), so a word
    # has the same id at the start of the answer as inside the prompt: copying a word is
    # copying a token id. (GPT-2-style leading-space words give the answer's first word a
    # different id; measured, a tiny model also learns the copy tasks faster with the
    # separate space tokens than with spaces glued to the words.)
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\s"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,  # ids 0..len-1 in this order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # any UTF-8 input still encodes
        show_progress=False,
    )
    tok.train_from_iterator(demo_tasks.corpus_lines(random.Random(seed), 20_000), trainer)
    bos_id = tok.token_to_id(BOS)
    # Plain (non-chat) text gets a BOS like Llama; the chat template writes its own BOS, so a
    # rendered conversation must be encoded with add_special_tokens=False.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        additional_special_tokens=ROLE_TOKENS, chat_template=CHAT_TEMPLATE,
        model_max_length=512, padding_side="left", clean_up_tokenization_spaces=False)


def portable_tokenizer_config(out: Path, template: str) -> None:
    """Make the saved tokenizer loadable by transformers 4.x as well as 5.x.

    transformers 5 writes tokenizer_class "TokenizersBackend" and the template to
    chat_template.jinja; 4.x knows neither, but both versions load the class name
    "PreTrainedTokenizerFast" and a "chat_template" key in tokenizer_config.json.
    """
    path = out / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["chat_template"] = template
    path.write_text(json.dumps(cfg, indent=2) + "\n")


def build_model(tokenizer, shape: str, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), max_position_embeddings=512, rope_theta=10000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=False, hidden_act="silu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **SHAPES[shape])
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).float()


def encode_example(tokenizer, messages, answer):
    """(input_ids, labels): the rendered prompt, then the answer and EOS; loss on the answer only."""
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids


def heldout_set(seed: int, n: int):
    """n (messages, answer) pairs with distinct user texts, drawn from their own RNG."""
    rng, seen, out = random.Random(seed + 1), set(), []
    while len(out) < n:
        messages, answer = demo_tasks.sample_messages(rng)
        if messages[-1]["content"] not in seen:
            seen.add(messages[-1]["content"])
            out.append((messages, answer))
    return out, seen


def train(model, tokenizer, args, excluded: set[str]) -> dict:
    """AdamW on freshly sampled batches until max_steps or max_seconds; returns a summary."""
    import torch

    rng = random.Random(args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = 30
    start, step, loss_ema = time.monotonic(), 0, None
    model.train()
    while step < args.max_steps:
        elapsed = time.monotonic() - start
        # Progress in [0, 1] by whichever limit is closer; drives the cosine LR decay.
        progress = max(step / args.max_steps, elapsed / args.max_seconds)
        if progress >= 1.0:
            break
        lr = args.lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * progress))
        for group in opt.param_groups:
            group["lr"] = lr

        # A batch is all with or all without a system prompt: mixing them would pad every
        # short row to the length of the long ones (measured ~1.6x fewer steps per second).
        system_prob = 1.0 if rng.random() < args.system_prob else 0.0
        batch = []
        while len(batch) < args.batch_size:
            messages, answer = demo_tasks.sample_messages(rng, system_prob)
            if messages[-1]["content"] in excluded:  # keep held-out prompts unseen
                continue
            batch.append(encode_example(tokenizer, messages, answer))
        # Right padding: causal attention means pads (at the end) never influence real tokens,
        # and their labels are -100, so no attention mask is needed.
        max_len = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((len(batch), max_len), tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), max_len), -100, dtype=torch.long)
        for row, (ids, lab) in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            labels[row, : len(lab)] = torch.tensor(lab)

        loss = model(input_ids=input_ids, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        loss_ema = loss.item() if loss_ema is None else 0.95 * loss_ema + 0.05 * loss.item()
        if args.log_every and step % args.log_every == 0:
            print(f"step {step:5d}  {time.monotonic() - start:6.1f}s  loss {loss_ema:.4f}  "
                  f"lr {lr:.2e}", flush=True)
    return {"steps": step, "train_seconds": round(time.monotonic() - start, 1),
            "final_loss_ema": None if loss_ema is None else round(loss_ema, 4)}


def evaluate(model, tokenizer, heldout) -> tuple[float, list[tuple[str, str, str]]]:
    """Greedy generate on each held-out conversation; exact match of the decoded reply."""
    import torch

    model.eval()
    results = []
    with torch.no_grad():
        for messages, answer in heldout:
            prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                   tokenize=False)
            ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16,
                                 do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id)
            reply = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
            results.append((messages[-1]["content"], answer, reply))
    accuracy = sum(a == r for _, a, r in results) / max(1, len(results))
    return accuracy, results


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=HERE / "demo-model", help="output directory")
    p.add_argument("--max-seconds", type=float, default=110.0, help="training wall-clock cap")
    p.add_argument("--max-steps", type=int, default=3000, help="training step cap")
    p.add_argument("--shape", choices=sorted(SHAPES), default="demo", help="model size")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--system-prob", type=float, default=0.25,
                   help="fraction of training conversations with a system prompt")
    p.add_argument("--seed", type=int, default=0)
    # One thread by default: for a model this small, a second OpenMP thread gains little on an
    # idle machine and costs 10x or more when the cores are shared (threads spin at barriers);
    # measured 55 ms/step with 1 thread vs 800 ms/step with 2 under a load of ~5 on 2 cores.
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--eval-prompts", type=int, default=20, help="held-out prompts to score")
    p.add_argument("--log-every", type=int, default=100, help="0 = quiet")
    p.add_argument("--force", action="store_true", help="rebuild even if --out has a model")
    args = p.parse_args(argv)
    if args.max_seconds <= 0 or args.max_steps <= 0 or args.batch_size <= 0:
        p.error("--max-seconds, --max-steps and --batch-size must be positive")
    if args.eval_prompts < 0:
        p.error("--eval-prompts must be >= 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    out: Path = args.out
    if (out / "config.json").exists() and not args.force:
        print(f"demo model already exists at {out} (use --force to rebuild)")
        return 0

    import torch
    from transformers import GenerationConfig

    t0 = time.monotonic()
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    tokenizer = build_tokenizer(args.seed, args.vocab_size)
    model = build_model(tokenizer, args.shape, args.seed)
    num_params = sum(p.numel() for p in model.parameters())
    print(f"tokenizer: {len(tokenizer)} tokens; model: {args.shape} shape, "
          f"{num_params / 1e6:.2f}M params; training up to {args.max_steps} steps / "
          f"{args.max_seconds:.0f}s on {args.threads} threads", flush=True)

    heldout, heldout_texts = heldout_set(args.seed, args.eval_prompts)
    summary = train(model, tokenizer, args, heldout_texts)
    accuracy, results = evaluate(model, tokenizer, heldout)
    summary.update(heldout_prompts=len(results), heldout_exact_match=round(accuracy, 4),
                   shape=args.shape, seed=args.seed, num_params=num_params)

    out.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, do_sample=False, max_new_tokens=16)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    portable_tokenizer_config(out, CHAT_TEMPLATE)

    per_task = {}
    for prompt, answer, reply in results:
        hits, total = per_task.get(prompt.split(":")[0], (0, 0))
        per_task[prompt.split(":")[0]] = (hits + (reply == answer), total + 1)
    summary["heldout_by_task"] = {t: f"{h}/{n}" for t, (h, n) in sorted(per_task.items())}
    for prompt, answer, reply in results[:5]:
        print(f"  {prompt!r:45} -> {reply!r}  ({'ok' if reply == answer else 'want ' + repr(answer)})")
    if results:
        print(f"held-out exact match: {sum(a == r for _, a, r in results)}/{len(results)} "
              f"({accuracy:.0%}) after {summary['steps']} steps in {summary['train_seconds']}s; "
              f"total {time.monotonic() - t0:.0f}s")
        print("by task: " + ", ".join(f"{t} {v}" for t, v in summary["heldout_by_task"].items()))
    (out / "demo_training.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"saved demo model + tokenizer to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
