"""runtime/graph_logits.py on CPU: decode / verify graphs of <= logits_max_rows tokens also
compute the logits and their greedy argmax, and the runner hands both to the sampler, which
takes the graph's argmax unless a row edits its logits. The capture itself runs on CUDA
(tests/gpu/test_cuda_graphs.py); here the graphs are "replayed" eagerly through their own
persistent buffers (DecodeGraphRunner(capture=False) with each key's body run on replay), so
every host-side path of a graph step, the staging, the padding and the tail, runs as on a GPU.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from llmbatch.runtime.cuda_graphs import DecodeGraphRunner
from llmbatch.runtime.graph_logits import LOGITS_MAX_ROWS
from llmbatch.runtime.request import Request
from llmbatch.runtime.sampling_params import SamplingParams
from tests.runtime.tiny_models import EchoLast, make_prompts, new_engine


class EagerGraph:
    """Stands in for a captured graph: replay() runs the graph's body over the persistent
    buffers and writes its outputs where the capture would have left them."""

    def __init__(self, graphs: DecodeGraphRunner, key, poison_greedy: bool = False) -> None:
        self.graphs, self.key, self.poison_greedy = graphs, key, poison_greedy

    def replay(self) -> None:
        g, key = self.graphs, self.key
        with torch.inference_mode():
            out = g._body(*key)
        g._outputs[key].copy_(out[0])
        if len(out) > 1:
            logits, greedy = g._tails[key]
            logits.copy_(out[1])
            # poison_greedy: token 7 everywhere, to show which rows take the graph's argmax.
            greedy.copy_(torch.full_like(out[2], 7) if self.poison_greedy else out[2])


def install_eager_graphs(engine, *, logits_max_rows=LOGITS_MAX_ROWS, verify_tokens=0,
                         poison_greedy=False) -> DecodeGraphRunner:
    runner = engine.runner
    graphs = DecodeGraphRunner(runner.model, runner.kv_caches, runner.attn_backend,
                               max_num_seqs=runner.config.max_num_seqs,
                               max_model_len=runner.max_model_len, block_size=runner.block_size,
                               device=runner.device, verify_tokens=verify_tokens,
                               verify_max_num_seqs=4, logits_max_rows=logits_max_rows,
                               capture=False)
    for key in graphs.keys:
        graphs._stage([], [], [], [], [], *key)   # all padding: writes no K/V
        with torch.inference_mode():
            out = graphs._body(*key)
        graphs._outputs[key] = out[0].clone()
        if len(out) > 1:
            graphs._tails[key] = tuple(t.clone() for t in out[1:])
        graphs._graphs[key] = EagerGraph(graphs, key, poison_greedy)
    runner.graph_runner = graphs
    return graphs


def _requests(prompts, params):
    return [Request(i, p, params[i % len(params)]) for i, p in enumerate(prompts)]


def _outputs(engine, reqs):
    return {r.request_id: r.output_token_ids for r in engine.generate(reqs)}


def test_only_small_graphs_compute_the_logits(llama_setup):
    engine = new_engine(llama_setup, max_num_seqs=32)
    graphs = install_eager_graphs(engine, verify_tokens=5)
    with_logits = sorted(key for key in graphs.keys if key in graphs._tails)
    assert with_logits == [(1, 1), (1, 5), (2, 1), (2, 5), (4, 1), (8, 1), (16, 1)]
    assert all(graphs.has_logits(*key) == (key[0] * key[1] <= 16) for key in graphs.keys)
    assert install_eager_graphs(engine, logits_max_rows=0)._tails == {}


def test_the_tail_is_the_eager_lm_head_and_argmax(llama_setup):
    engine = new_engine(llama_setup, max_num_seqs=4)
    graphs = install_eager_graphs(engine)
    with torch.inference_mode():
        graphs._stage([], [], [], [], [], 4)
        hidden, logits, greedy = graphs._body(4)
        want = engine.runner.model.compute_logits(hidden)
    assert logits.dtype == torch.float32 and logits.shape == want.shape
    torch.testing.assert_close(logits, want, atol=0, rtol=0)
    assert torch.equal(greedy, torch.argmax(want, dim=-1))


# Greedy, seeded temperature sampling, logprobs, a repetition penalty (edits its logits: the
# argmax after the edit), and a logit bias (edits too).
PARAMS = [
    SamplingParams(max_new_tokens=9, ignore_eos=True),
    SamplingParams(max_new_tokens=9, ignore_eos=True, temperature=0.9, seed=3),
    SamplingParams(max_new_tokens=9, ignore_eos=True, logprobs=2),
    SamplingParams(max_new_tokens=9, ignore_eos=True, repetition_penalty=1.5),
    SamplingParams(max_new_tokens=9, ignore_eos=True, logit_bias={9: 5.0}),
]


@pytest.mark.parametrize("num_prompts", [1, 10])
@pytest.mark.parametrize("params", ["mixed", "greedy"])
@pytest.mark.parametrize("engine_kwargs", [dict(), dict(async_scheduling=True)],
                         ids=["sync", "async"])
def test_graph_steps_with_logits_give_the_eager_outputs(llama_setup, engine_kwargs, params,
                                                        num_prompts):
    """Greedy only: every step's tokens are the graph's argmax itself (a view of graph memory),
    the next async step's deferred inputs read it before the next replay, and the host reads
    its copy after that replay (the copy must not alias the graph's buffer)."""
    prompts = make_prompts(num_prompts, seed=5)
    params = PARAMS if params == "mixed" else PARAMS[:1]
    kwargs = dict(max_num_seqs=8, **engine_kwargs)
    want = _outputs(new_engine(llama_setup, **kwargs), _requests(prompts, params))
    engine = new_engine(llama_setup, **kwargs)
    graphs = install_eager_graphs(engine)
    got = _outputs(engine, _requests(prompts, params))
    assert got == want
    assert graphs.num_replays > 0 and sum(graphs.replays_by_size.values()) == graphs.num_replays


def test_the_sampler_takes_the_graphs_argmax_unless_a_row_edits_its_logits(llama_setup):
    """With the graph's greedy ids poisoned (token 7): in batches where no row edits its
    logits, the greedy rows (logprobs or not) emit 7 once only graph steps run and the
    temperature rows are untouched; in batches with a row that
    edits its logits, the argmax is taken after the edits for every row, so nothing reads the
    poisoned ids."""
    prompts = make_prompts(10, seed=5)
    plain, edits = PARAMS[:3], [PARAMS[0], PARAMS[3]]
    # max_num_seqs 16: the ten prompts prefill in the first two steps (eager; the second
    # mixes decodes in), then every step is a graph step of <= 16 tokens.
    for (params, poisoned), async_scheduling in itertools.product(
            ((plain, True), (edits, False)), (False, True)):
        kwargs = dict(max_num_seqs=16, async_scheduling=async_scheduling)
        want = _outputs(new_engine(llama_setup, **kwargs), _requests(prompts, params))
        engine = new_engine(llama_setup, **kwargs)
        install_eager_graphs(engine, poison_greedy=True)
        got = _outputs(engine, _requests(prompts, params))
        for i in range(len(prompts)):
            if poisoned and params[i % len(params)].greedy:
                assert got[i][0] == want[i][0] and set(got[i][2:]) == {7}, (i, got[i])
            else:
                assert got[i] == want[i], (i, got[i], want[i])


def test_verify_steps_take_the_graphs_logits_too(llama_setup):
    """A speculative engine: batch-1 verify steps (5 tokens) replay a graph with the logits;
    the accepted tokens are those of the eager engine."""
    prompts = make_prompts(3, seed=2)
    params = [SamplingParams(max_new_tokens=12, ignore_eos=True)]
    kwargs = dict(max_num_seqs=1, num_speculative_tokens=4, speculative_max_num_seqs=4)
    eager = new_engine(llama_setup, **kwargs)
    eager.set_proposer(EchoLast())
    want = _outputs(eager, _requests(prompts, params))
    engine = new_engine(llama_setup, **kwargs)
    engine.set_proposer(EchoLast())
    graphs = install_eager_graphs(engine, verify_tokens=5)
    got = _outputs(engine, _requests(prompts, params))
    assert got == want
    assert graphs.verify_replays_by_size[1] > 0 and (1, 5) in graphs._tails


def test_a_failing_tail_costs_only_itself(monkeypatch):
    """_maybe_capture_decode_graphs: when the capture with the LM head inside fails, the
    graphs are captured once more without it (graph_logits_error says why), not dropped; when
    that fails too, the runner decodes eagerly (cuda_graph_error)."""
    from types import SimpleNamespace

    from llmbatch.runtime import cuda_graphs
    from llmbatch.runtime.model_runner_cuda import CudaFastPathsMixin

    tried = []

    def fake_runner(*args, logits_max_rows, **kwargs):
        tried.append(logits_max_rows)
        if logits_max_rows or fail_without_tail:
            raise RuntimeError(f"capture failed at {logits_max_rows} rows")
        return "graphs"

    monkeypatch.setattr(cuda_graphs, "DecodeGraphRunner", fake_runner)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    config = SimpleNamespace(cuda_graphs=True, graph_logits=True, max_num_seqs=4,
                             num_speculative_tokens=4, speculative_max_num_seqs=4)
    for fail_without_tail, want in ((False, "graphs"), (True, None)):
        tried.clear()
        runner = SimpleNamespace(config=config, device=torch.device("cuda"),
                                 attn_backend=SimpleNamespace(name="triton"), tp_size=1,
                                 model=None, kv_caches=None, max_model_len=64, block_size=4,
                                 cuda_graph_error=None, graph_logits_error=None)
        assert CudaFastPathsMixin._maybe_capture_decode_graphs(runner) == want
        assert tried == [LOGITS_MAX_ROWS, 0]
        failed = "RuntimeError: capture failed at {} rows"
        assert runner.graph_logits_error == failed.format(LOGITS_MAX_ROWS)
        assert runner.cuda_graph_error == (None if want else failed.format(0))
    config.graph_logits = False
    tried.clear()
    fail_without_tail = False
    CudaFastPathsMixin._maybe_capture_decode_graphs(runner)
    assert tried == [0]


# Ops that make the device work (a kernel or a copy) when their tensors are on a GPU; views,
# host-side numpy views of the pinned staging and allocations are left out.
WORK_OPS = {"copy_", "clone", "_to_copy", "index_select", "index_copy_", "index_copy", "linear",
            "mm", "addmm", "argmax", "max", "gather", "cat", "embedding", "index_put_"}


def test_a_steady_batch1_decode_step_is_three_operations_around_the_graph(llama_setup):
    """What this feature and deferred_tokens.py / staged_tables.py are for, counted at the
    torch dispatcher on CPU: a steady async batch-1 decode step launches, besides its graph
    replay, only the ints upload, the deferred token's slice copy and the token copy to the
    host (PendingSample's; on CUDA the pinned download) -- and the block-table copies on the
    step whose table grew. stop 20's profile had ~10."""
    from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    engine = new_engine(llama_setup, max_num_seqs=4, async_scheduling=True, block_size=4)
    graphs = install_eager_graphs(engine)
    for graph in graphs._graphs.values():   # the replay's own ops are inside the graph
        replay = graph.replay

        def unrecorded(replay=replay):
            with _disable_current_modes():
                replay()
        graph.replay = unrecorded
    runner, steps = engine.runner, []
    launch = runner.launch

    def recorded_launch(out, prev=None):
        with Record() as rec:
            step = launch(out, prev)
        work = sorted(op for op in rec.ops if op in WORK_OPS)
        steps.append((step._kind, graphs.block_table_uploads, work))
        return step
    runner.launch = recorded_launch
    prompt = make_prompts(1, seed=3)[0]
    list(engine.generate([Request(0, prompt, SamplingParams(max_new_tokens=24,
                                                            ignore_eos=True))]))
    graph_steps = [(uploads, work) for kind, uploads, work in steps if kind == "graph"]
    assert len(graph_steps) >= 20
    steady = ["clone", "copy_", "copy_"]          # token copy; ints upload, slice copy
    grew = sorted(steady + ["copy_", "copy_"])    # + staging -> block_tables
    kinds = []
    for (before, _), (uploads, work) in zip(graph_steps, graph_steps[1:]):
        assert work == (grew if uploads > before else steady), (uploads, work)
        kinds.append(uploads > before)
    # 4-token blocks: the table grows every 4th token, and only then are tables copied.
    assert 4 <= sum(kinds) <= len(kinds) // 3, kinds
