"""bench.llmbatch_runner.warm_up must run, before any timed workload, a prefill step holding a
single sequence: the step W-BATCH1's TTFT is made of. No warm-up or earlier workload step has
one (W-RANDOM-shaped batches always prefill next to other sequences), and on a GPU that first
lone prefill launches new kernel variants (Triton specializes the attention kernel's
num_seqs == 1 as a constant; cuBLAS loads the kernels of its shapes), so the first W-BATCH1
request of a process paid a compile / module load inside its TTFT."""

from __future__ import annotations

from bench.llmbatch_runner import warm_up
from llmbatch.runtime.config import EngineConfig
from llmbatch.runtime.engine import Engine
from tests.runtime.tiny_models import VOCAB


def test_warm_up_runs_a_lone_single_sequence_prefill(llama_setup):
    path, tok = llama_setup
    engine = Engine(EngineConfig(model=str(path), device="cpu", dtype="float32"), tokenizer=tok)
    steps = []   # (sequences, longest span) of every step the warm-up runs
    launch = engine.runner.launch

    def recording_launch(out, prev=None):
        steps.append((len(out.scheduled), max(item.num_new_tokens for item in out.scheduled)))
        return launch(out, prev)

    engine.runner.launch = recording_launch
    warm_up(engine, VOCAB, scale=0.05)
    # Longer than a verify span (8 tokens): the attention's prefill tiling.
    assert any(n == 1 and span > 8 for n, span in steps), steps
