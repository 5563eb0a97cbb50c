"""The LM head and the greedy argmax inside small decode / verify CUDA graphs.

Without it a graph step replays the layers, then the host launches the LM head and the two
argmax kernels one by one: three more device operations between two replays, each with its
launch gap, and three Triton launches of host time (stop 20's batch-1 profile, bench/
RESULTS.md: ~10 device operations outside the graph, ~70 us a token outside the graph step).
With it, a graph of at most LOGITS_MAX_ROWS tokens also computes every row's float32 logits
and their argmax; the sampler takes that argmax as the greedy tokens unless a row edits its
logits (penalties, token rules, a grammar, min_tokens), and every other use of the logits
(temperature sampling, logprobs) reads the graph's logits.

Same kernels and inputs as the eager LM head would see after the graph's layers: its rows are
the step's tokens padded to the graph's size (the padding rows' logits are computed and never
read). At batch 1 and for a batch-1 verify step nothing is padded, so the tokens are the eager
LM head's exactly; a padded batch runs the LM head's matmul at the padded row count, as the
graph's layers already do, so in bf16 a near-tie may round the other way. Why a row limit:
the logits of each such graph stay allocated in the graph pool, outside the KV budget: at most
LOGITS_MAX_ROWS x vocab x 4 bytes a graph (16 x 128256 x 4 = 8.2 MB), ~24 MB for the default
decode sizes 1..16 and two verify sizes. Larger batches are where launch gaps matter least.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from llmbatch.runtime.greedy_argmax import greedy_argmax

# Graphs of at most this many tokens (batch size x tokens per sequence) compute the logits.
# 16 is the greedy argmax's two-stage (Triton) limit, greedy_argmax._TWO_STAGE_MAX_ROWS.
LOGITS_MAX_ROWS = 16


class GraphStep(NamedTuple):
    """A replayed step's outputs, views into graph-owned memory: read them (enqueue the
    reads) before the next replay of ANY decode graph (they share one memory pool, so a
    graph captured earlier may reuse this one's output memory for its temporaries). hidden
    (n, hidden_size); logits (n, vocab) float32 and greedy_ids (n,) int64 when the graph
    computes them, else None."""

    hidden: torch.Tensor
    logits: Optional[torch.Tensor]
    greedy_ids: Optional[torch.Tensor]


def logits_tail(model, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The captured tail: (logits, greedy ids) of every row of hidden."""
    logits = model.compute_logits(hidden)
    return logits, greedy_argmax(logits)


def check_tail(logits: torch.Tensor, greedy_ids: torch.Tensor, what: str) -> None:
    """The captured argmax of a first replay must be the argmax of the captured logits (a
    kernel that did not survive capture would leave stale or garbage ids). Raises
    RuntimeError naming `what`."""
    want = torch.argmax(logits, dim=-1)
    if not torch.equal(greedy_ids, want):
        raise RuntimeError(f"{what}: the greedy ids differ from the argmax of its logits")
