"""The runner's side of Engine.stats(): what the model runner actually did and holds.

Options are ignored where they cannot apply (e.g. CUDA graphs or fused kernels on a CPU), so
the stats report what the runner took, read from its attributes, not what the config asked
for. Runners without an attribute (the TP executor, test fakes) report None for it.
"""

from __future__ import annotations

from llmbatch.runtime.config import EngineConfig
from llmbatch.runtime.kernel_paths import PATH_STATS
from llmbatch.runtime.launched_step import STEP_KINDS


def runner_stats(runner, config: EngineConfig) -> dict:
    """KV blocks, CUDA graphs, kernel paths, step timings, device timing (while on), weight
    bytes and quantization of `runner`, as Engine.stats() keys."""
    s: dict = {}
    s["num_kv_blocks"] = runner.num_kv_blocks
    s["cuda_graphs_active"] = getattr(runner, "graph_runner", None) is not None
    s["cuda_graph_error"] = getattr(runner, "cuda_graph_error", None)
    # Graphs of up to this many tokens run the LM head and greedy argmax (graph_logits.py).
    graphs = getattr(runner, "graph_runner", None)
    s["graph_logits_max_rows"] = graphs.logits_max_rows if graphs is not None else 0
    s["graph_logits_error"] = getattr(runner, "graph_logits_error", None)
    s["triton_argmax_error"] = getattr(runner, "triton_argmax_error", None)
    s["block_size"] = config.block_size
    # Which kernel paths the runner actually took (options are ignored where they cannot
    # apply, e.g. on CPU): fused kernels, the skinny decode path, int8 / nf4 layers on Triton.
    for key in PATH_STATS:
        s[key] = getattr(runner, key, None)
    s["rotary_in_attention"] = getattr(runner, "rotary_in_attention_active", False)
    s["prepare_s"] = getattr(runner, "prepare_s", None)  # part of execute_s
    s["prefill_graphs_active"] = getattr(runner, "prefill_graph_runner", None) is not None
    s["prefill_graph_error"] = getattr(runner, "prefill_graph_error", None)
    # Steps that replayed a decode / verify graph, a prefill graph, or ran eagerly, and their
    # forward + sampling seconds.
    for kind in STEP_KINDS:
        s[f"{kind}_steps"] = getattr(runner, "step_count", {}).get(kind)
        s[f"{kind}_step_s"] = getattr(runner, "step_time_s", {}).get(kind)
        s[f"{kind}_launch_s"] = getattr(runner, "step_launch_s", {}).get(kind)
    # Device seconds per step part and idle gaps, while runner.device_timer is on.
    timer = getattr(runner, "device_timer", None)
    if timer is not None:
        s.update(timer.stats())
    # Bytes of the loaded weights on each TP rank (quantized buffers included), and the
    # quantization in effect (a pre-quantized checkpoint's method when config says none).
    per_rank = getattr(runner, "weight_bytes_per_rank", None)
    if per_rank is None and getattr(runner, "weight_bytes", None) is not None:
        per_rank = [runner.weight_bytes]
    s["weight_bytes_per_rank"] = [int(b) for b in per_rank] if per_rank is not None else None
    s["quantization"] = getattr(runner, "quantization", None) or config.quantization
    return s
