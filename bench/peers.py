"""The transformers peers, run in the same process on the same checkpoint (BENCH.md, "Peers").

- hf-static: `model.generate`, batches of 64 in submission order, left padding. Each batch runs to
  the longest output in it (max_new_tokens = min_new_tokens = the batch's max, EOS disabled), but
  only each request's OWN output length counts as useful output tokens: the padding work is the
  static batcher's cost, exactly as BENCH.md measured it (74,250 tokens / 68.6 s = 1,083 tok/s).
- hf-cb: transformers' continuous batching (`continuous_batching_context_manager`, one
  `add_request` per request with its own max_new_tokens, eos_token_id=-1 so EOS never stops a
  request), `ContinuousBatchingConfig(use_cuda_graph=True)` on CUDA (its best setting), block
  sharing (its prefix cache) on by default. The same API exists in transformers 5.17 and 5.24.
- hf-batch1: plain `generate` for one request; TPOT = time between the first and the last streamed
  token / (tokens - 1).
Throughput = useful output tokens / wall seconds from the first submission to the last result;
model load and warm-up (CUDA graph capture) are excluded and reported separately.
"""

from __future__ import annotations

import time

from bench.workloads import Workload

STATIC_BATCH_SIZE = 64
PAD_TOKEN_ID = 3          # the bench tokenizer's <3> (bench/model_shapes.py)


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def load_hf_model(model_dir: str, dtype: str, device: str):
    import torch
    from transformers import LlamaForCausalLM

    t0 = time.perf_counter()
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype),
                                             attn_implementation="sdpa").to(device).eval()
    model.generation_config.eos_token_id = None       # EOS ignored in every workload
    _sync(device)
    return model, time.perf_counter() - t0


def _greedy_config(max_new_tokens: int):
    from transformers import GenerationConfig

    return GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens,
                            min_new_tokens=max_new_tokens, eos_token_id=None,
                            pad_token_id=PAD_TOKEN_ID)


def _static_batch(model, prompts: list[list[int]], max_new: int, device: str):
    """Left-pad one batch and generate exactly max_new tokens per row; returns new tokens."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), PAD_TOKEN_ID, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = 1
    with torch.no_grad():
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                             generation_config=_greedy_config(max_new))
    new = out[:, width:]
    if new.shape[1] != max_new:
        raise RuntimeError(f"hf-static generated {new.shape[1]} tokens, expected {max_new}")
    return new


def run_static_generate(model, workload: Workload, device: str,
                        batch_size: int = STATIC_BATCH_SIZE) -> dict:
    reqs = workload.requests
    # Warm-up on a short batch of the same width class (kernels, allocator), excluded.
    _static_batch(model, [r.prompt_token_ids[:16] for r in reqs[:2]], 2, device)
    _sync(device)
    t0 = time.perf_counter()
    useful = generated = 0
    for start in range(0, len(reqs), batch_size):
        batch = reqs[start:start + batch_size]
        max_new = max(r.max_new_tokens for r in batch)
        _static_batch(model, [r.prompt_token_ids for r in batch], max_new, device)
        useful += sum(r.max_new_tokens for r in batch)
        generated += max_new * len(batch)
    _sync(device)
    wall = time.perf_counter() - t0
    return {"system": "hf-static", "wall_s": wall, "output_tokens": useful,
            "generated_tokens_incl_padding": generated, "out_tok_per_s": useful / wall,
            "batch_size": batch_size}


def _cb_config(device: str, use_cuda_graph: bool):
    from transformers import ContinuousBatchingConfig

    if device.startswith("cuda"):
        return ContinuousBatchingConfig(use_cuda_graph=use_cuda_graph)
    # On CPU, a fixed small pool skips transformers' memory probing (slow without psutil).
    import dataclasses

    # transformers 5.24 renamed block_size to page_size; 5.17 (the GPU machine) has block_size.
    names = {f.name for f in dataclasses.fields(ContinuousBatchingConfig)}
    size_key = "page_size" if "page_size" in names else "block_size"
    return ContinuousBatchingConfig(num_blocks=512, max_batch_tokens=512, **{size_key: 16})


def run_continuous_batching(model, workload: Workload, device: str,
                            use_cuda_graph: bool = True) -> dict:
    from transformers import GenerationConfig

    reqs = workload.requests
    cuda_graph = use_cuda_graph and device.startswith("cuda")
    gen_config = GenerationConfig(do_sample=False, eos_token_id=-1, pad_token_id=PAD_TOKEN_ID,
                                  max_new_tokens=max(r.max_new_tokens for r in reqs))
    # The same hints generate_batch() gives it, so the peer sizes its batches for this workload.
    from transformers.generation.continuous_batching.utils import WorkloadHints

    hints = WorkloadHints(max_prompt_length=max(len(r.prompt_token_ids) for r in reqs),
                          max_generated_length=max(r.max_new_tokens for r in reqs),
                          num_requests=len(reqs))
    t_setup = time.perf_counter()
    with model.continuous_batching_context_manager(
            generation_config=gen_config, warmup=True, workload_hints=hints,
            continuous_batching_config=_cb_config(device, cuda_graph)) as manager:
        warmup_s = time.perf_counter() - t_setup
        t0 = time.perf_counter()
        for i, r in enumerate(reqs):
            manager.add_request(r.prompt_token_ids, request_id=f"r{i}",
                                max_new_tokens=r.max_new_tokens, eos_token_id=-1)
        results = {}
        while len(results) < len(reqs):
            res = manager.get_result(timeout=1)
            if res is None:
                if not manager.is_running():
                    raise RuntimeError(f"hf-cb: generation loop stopped with "
                                       f"{len(reqs) - len(results)} requests unfinished")
                continue
            if res.is_finished():
                results[res.request_id] = res
        wall = time.perf_counter() - t0
    errors = [r.error for r in results.values() if r.error]
    if errors:
        raise RuntimeError(f"hf-cb: {len(errors)} requests failed, first: {errors[0]}")
    out_tokens = sum(len(r.generated_tokens) for r in results.values())
    expected = workload.num_output_tokens
    if out_tokens != expected:
        raise RuntimeError(f"hf-cb generated {out_tokens} tokens, expected {expected}")
    return {"system": "hf-cb", "wall_s": wall, "warmup_s": warmup_s, "output_tokens": out_tokens,
            "out_tok_per_s": out_tokens / wall, "use_cuda_graph": cuda_graph}


class _TokenClock:
    """A generate() streamer that timestamps each streamed step (the first put is the prompt)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.times: list[float] = []
        self._seen_prompt = False

    def put(self, value) -> None:
        if not self._seen_prompt:
            self._seen_prompt = True
            return
        _sync(self.device)
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def run_batch1_generate(model, workload: Workload, device: str) -> dict:
    import torch

    if len(workload.requests) != 1:
        raise ValueError(f"W-BATCH1 has one request, got {len(workload.requests)}")
    req = workload.requests[0]
    ids = torch.tensor([req.prompt_token_ids], device=device)
    with torch.no_grad():
        model.generate(input_ids=ids[:, :16], generation_config=_greedy_config(2))  # warm-up
        clock = _TokenClock(device)
        t0 = time.perf_counter()
        out = model.generate(input_ids=ids, generation_config=_greedy_config(req.max_new_tokens),
                             streamer=clock)
        wall = time.perf_counter() - t0
    n = out.shape[1] - ids.shape[1]
    if n != req.max_new_tokens or len(clock.times) != n:
        raise RuntimeError(f"hf-batch1 generated {n} tokens ({len(clock.times)} timed), "
                           f"expected {req.max_new_tokens}")
    tpot = (clock.times[-1] - clock.times[0]) / (n - 1) if n > 1 else None
    return {"system": "hf-generate", "wall_s": wall, "output_tokens": n,
            "out_tok_per_s": n / wall, "tpot_s": tpot, "ttft_s": clock.times[0] - t0}
