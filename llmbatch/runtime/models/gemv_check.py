"""Start-up check of the gemv layers (EngineConfig.skinny_gemv, on by default on CUDA).

layers/gemv.py was written and tested in the Triton interpreter and measured on one H200; on
another GPU or Triton a wrong kernel must cost speed, never tokens (as kernel_paths'
check_quant_kernel does for the int8 / nf4 GEMMs). So before the decode graphs are captured,
each of the four gemv launches of a decoder layer, with the prologue / epilogue the engine
uses, runs once on layer 0's weights and a seeded random row, against the same arithmetic in
float32 torch:

    qkv     = linear(rmsnorm(x) , W_qkv) + b          (RMSNorm prologue)
    o_proj  = linear(a, W_o) + b + residual            (residual epilogue)
    act     = silu(g) * u, [g; u] = linear(rmsnorm(x), W_gate_up) + b   (prologue + SiLU·mul)
    down    = linear(act, W_down) + b + residual       (residual epilogue)
    logits  = linear(x, W_head)                         (the LM head, when it uses gemv)

The norm launches run twice: on a unit-scale row and on one whose mean square equals the
norm's eps, where a wrong or dropped eps moves rstd by 1.4x or more (at unit scale it moves it
by ~eps, below any rounding). kernel_paths runs the check with the engine's gemv weight
prefetch switches set, so it checks the specialisations the engine will launch.

With EngineConfig.gemv_max_rows = R > 1 (steps of up to R tokens on gemv_linear's multi-row
kernel, layers/gemv_rows.py, written without a GPU) the five launches then run once more on R
distinct seeded rows (the norm launches with their eps-scale row last among unit-scale ones;
the residual R rows too), checked row by row against the same reference and bound, and a
failure is named with its row count ("qkv (5 rows): ..."). A step of 2..R-1 tokens runs
another compiled variant when it pads to fewer ROWS (the next power of two), so the launches
also run once per smaller padding, at its largest row count (multi_row_counts: R = 5 checks
5, 4 and 2 rows). R = 1 launches exactly the one-row cases above.

Tolerance, per output element (_error_bound): what the kernel's rounding steps and float32
summation in another order can move it by, with a 2-4x margin -- K * 2^-24 times the sum of
the magnitudes it is made of (mag = |x'| @ |W|^T + |b|), the dtype's eps times |y| for each
rounding of the output (linear, residual add, SiLU·mul), and eps * mag for the norm
prologue's two roundings of x'; SiLU·mul propagates its inputs' bounds (first and second
order). A worst-case bound, so a correct kernel never fails it, and far below the O(|y|) of a
wrong row, column or flag, and below a wrong bias, eps or a 1 % scale error (the former single
bound, 3 % of max |y|, let a halved bias, a 100x eps and a 2 % scale error through). The
reference sums elementwise products in float32 (no TF32 / reduced-precision GEMM, whatever
torch.backends says), a bounded number of weight rows at a time (no float32 copy of a whole
LM head).
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.nn.functional as F


logger = logging.getLogger(__name__)

_CHUNK_ELEMENTS = 1 << 22   # weight elements a reference step widens to float32 (16 MB)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x (M, K) float32 -> RMSNorm(x) * weight (each row its own rstd), float32."""
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps) * weight.float()


def _linear(x: torch.Tensor, weight: torch.Tensor,
            bias: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) float32, weight (N, K) -> (y, mag), both (M, N) float32: y = x @ W^T + b summed
    as float32 products, and mag = |x| @ |W|^T + |b|, what y's rounding errors scale with.
    Each row on its own, the one-row arithmetic."""
    step = max(1, _CHUNK_ELEMENTS // weight.shape[1])
    y = torch.empty(x.shape[0], weight.shape[0], device=x.device)
    mag = torch.empty_like(y)
    for lo in range(0, weight.shape[0], step):
        w = weight[lo:lo + step].float()                 # (rows, K)
        for i in range(x.shape[0]):
            prod = w * x[i]                              # (rows, K)
            y[i, lo:lo + step] = prod.sum(dim=1)
            mag[i, lo:lo + step] = prod.abs_().sum(dim=1)
    if bias is not None:
        y, mag = y + bias.float(), mag + bias.float().abs()
    return y, mag


def _error_bound(y: torch.Tensor, mag: torch.Tensor, dtype: torch.dtype, k: int,
                 normed: bool) -> torch.Tensor:
    """How far the kernel's rounded linear output round(x' @ W^T + b) may be from the float32
    reference y: float32 sums in two orders (K * 2^-24 * mag each, times 2 for margin), its
    rounding to the dtype (eps / 2 * |y|, times 4), and with the RMSNorm prologue x' rounded
    twice to the dtype (eps * mag, times 2)."""
    eps = torch.finfo(dtype).eps
    bound = 4 * k * 2.0 ** -24 * mag + 2 * eps * y.abs()
    return bound + 2 * eps * mag if normed else bound


def _plain(x: torch.Tensor, weight: torch.Tensor, bias, residual=None, normed: bool = False):
    """Reference and bound of a launch without SiLU·mul: (want, bound), (M, N) float32; with a
    residual the sum's own rounding too."""
    y, mag = _linear(x, weight, bias)
    bound = _error_bound(y, mag, weight.dtype, weight.shape[1], normed)
    if residual is not None:
        y = y + residual.float()
        bound = bound + 2 * torch.finfo(weight.dtype).eps * y.abs()
    return y, bound


def _silu_mul(x: torch.Tensor, weight: torch.Tensor, bias, normed: bool = True):
    """Reference and bound of the gate_up launch: silu(g) * u of [g; u] = x @ W^T + b. With
    |e_g|, |e_u| the bounds of g and u and |silu'| <= 1.1, the product moves by at most
    1.1 |u| e_g + |silu(g)| e_u + 1.1 e_g e_u, plus silu's and the product's roundings."""
    y, mag = _linear(x, weight, bias)
    e_g, e_u = _error_bound(y, mag, weight.dtype, weight.shape[1], normed).chunk(2, dim=-1)
    g, u = y.chunk(2, dim=-1)
    silu = F.silu(g)
    act = silu * u
    bound = (1.1 * u.abs() * e_g + silu.abs() * e_u + 1.1 * e_g * e_u
             + 4 * torch.finfo(weight.dtype).eps * act.abs())
    return act, bound


def _mismatch(got: torch.Tensor, want: torch.Tensor, bound: torch.Tensor,
              dtype: torch.dtype) -> Optional[str]:
    """got: the kernel's output (model dtype) as float32, (M, N). None when every element is
    within its bound (a NaN never is), else the worst one (its row too where M > 1)."""
    if got.shape != want.shape:
        return f"output shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    err = (got - want).abs().flatten()
    bound = (bound + torch.finfo(dtype).tiny).flatten()   # + tiny: subnormal outputs
    bad = ~(err <= bound)
    if not bool(bad.any()):
        return None
    ratio = torch.where(err.isnan(), torch.full_like(err, float("inf")), err / bound)
    i, (m, n) = int(ratio.argmax()), got.shape
    where = f"column {i} of {n}" if m == 1 else f"row {i // n}, column {i % n} of {m} x {n}"
    return (f"max |gemv - torch| = {err[i].item():.3g} exceeds {bound[i].item():.3g} "
            f"({where})")


def multi_row_counts(max_rows: int) -> list[int]:
    """Row counts the check launches for steps of 2..max_rows tokens: one per ROWS padding the
    kernel compiles for them (gemv_rows.rows_of, the next power of two), the largest count of
    each, max_rows first. E.g. 5 -> [5, 4, 2]; 8 -> [8, 4, 2]; 3 -> [3, 2]; 1 -> []."""
    from llmbatch.runtime.layers.gemv_rows import rows_of

    paddings = {rows_of(m) for m in range(2, max_rows + 1)}
    return sorted({min(max_rows, p) for p in paddings}, reverse=True)


def gemv_steps(max_rows: int) -> str:
    """The steps that run on the gemv kernels at gemv_max_rows = max_rows, for log lines."""
    return "one-token steps" if max_rows == 1 else f"steps of <= {max_rows} tokens"


@torch.inference_mode()
def check_gemv_layers(model, max_rows: int = 1) -> Optional[str]:
    """None when every gemv launch of the first LlamaModel with gemv layers matches torch on
    its layer 0, else a one-line reason (the first failing launch). model: the loaded model
    after llama_skinny.enable_skinny_matmul(..., gemv_rows=True, gemv_max_rows=max_rows);
    max_rows > 1: the launches on that many rows too, after the one-row ones."""
    from llmbatch.runtime.layers import gemv
    from llmbatch.runtime.models.llama import LlamaModel

    module = next((m for m in model.modules() if isinstance(m, LlamaModel)
                   and getattr(m, "skinny_gemv_counters", None) is not None and len(m.layers)),
                  None)
    if module is None:
        return None
    layer = module.layers[0]
    attn, mlp = layer.self_attn, layer.mlp
    in_norm, post_norm = layer.input_layernorm, layer.post_attention_layernorm
    qkv, o_proj, gate_up, down = attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj
    dtype, device = qkv.weight.dtype, qkv.weight.device
    gen = torch.Generator(device="cpu").manual_seed(0)

    def row(width: int, mean_square: float = 1.0) -> torch.Tensor:
        r = torch.randn(1, width, generator=gen)
        r = r * (mean_square / r.pow(2).mean()).sqrt()
        return r.to(dtype=dtype, device=device)

    def rows(m: int, width: int, last_mean_square: float = 1.0) -> torch.Tensor:
        """(m, width): m seeded rows of mean square 1 but the last (an eps of 0: 1 too)."""
        return torch.cat([row(width, (last_mean_square or 1.0) if i == m - 1 else 1.0)
                          for i in range(m)])

    hidden, o_in, inter = qkv.weight.shape[1], o_proj.weight.shape[1], down.weight.shape[1]
    x, a, act_in, res = row(hidden), row(o_in), row(inter), row(hidden)
    launch = dict(counters=module.skinny_gemv_counters, pdl=getattr(module, "skinny_pdl", False))

    def normed(h: torch.Tensor, norm) -> torch.Tensor:
        return _rms_norm(h.float(), norm.weight, norm.eps)

    def qkv_case(h):
        return (lambda: gemv.gemv_linear(h, qkv.weight, qkv.bias, norm_weight=in_norm.weight,
                                         eps=in_norm.eps, **launch),
                lambda: _plain(normed(h, in_norm), qkv.weight, qkv.bias, normed=True))

    def gate_up_case(h):
        return (lambda: gemv.gemv_linear(h, gate_up.weight, gate_up.bias,
                                         norm_weight=post_norm.weight, eps=post_norm.eps,
                                         gate_up=True, **launch),
                lambda: _silu_mul(normed(h, post_norm), gate_up.weight, gate_up.bias))

    def layer_cases(x_in, x_post, a, act_in, res):
        """The four launches of the layer: the norms on x_in / x_post, (M, hidden) each."""
        return [
            ("qkv", *qkv_case(x_in)),
            ("o_proj", lambda: gemv.gemv_linear(a, o_proj.weight, o_proj.bias, residual=res,
                                                **launch),
             lambda: _plain(a.float(), o_proj.weight, o_proj.bias, res)),
            ("gate_up", *gate_up_case(x_post)),
            ("down", lambda: gemv.gemv_linear(act_in, down.weight, down.bias, residual=res,
                                              **launch),
             lambda: _plain(act_in.float(), down.weight, down.bias, res)),
        ]

    def head_case(h):   # ParallelLMHead's calls on gemv (no prologue/epilogue)
        return ("lm_head", lambda: head.gemv_logits(h),
                lambda: _plain(h.float(), head.weight, None))

    cases = layer_cases(x, x, a, act_in, res)
    # The norms again on rows whose mean square is their eps: rstd = 1 / sqrt(2 eps) there.
    if in_norm.eps > 0:
        cases.append(("qkv at the norm's eps", *qkv_case(row(hidden, in_norm.eps))))
    if post_norm.eps > 0:
        cases.append(("gate_up at the norm's eps", *gate_up_case(row(hidden, post_norm.eps))))
    head = next((h for h in model.modules() if getattr(h, "use_gemv", False)), None)
    if head is not None:
        cases.append(head_case(x))
    for m in multi_row_counts(max_rows):   # distinct rows: one that reads another's input
        x_in = rows(m, hidden, in_norm.eps)  # or rstd shows
        more = layer_cases(x_in, rows(m, hidden, post_norm.eps), rows(m, o_in), rows(m, inter),
                           rows(m, hidden))
        if head is not None and getattr(head, "gemv_max_rows", 1) >= m:
            more.append(head_case(x_in))
        cases += [(f"{name} ({m} rows)", run, ref) for name, run, ref in more]
    for name, run, reference in cases:
        try:
            got = run().float()
        except Exception as exc:   # a compile or launch failure on this GPU / Triton
            return f"{name}: {type(exc).__name__}: {exc}"
        error = _mismatch(got, *reference(), dtype)
        if error is not None:
            return f"{name}: {error}"
    return None


def gemv_rows_after_check(model, skinny: bool, pdl: bool, prefetch_mode: str,
                          max_rows: int) -> tuple[int, Optional[str]]:
    """kernel_paths' use of the check on the just-enabled gemv layers (on max_rows rows too):
    (the gemv_max_rows that passed, the failure or None). Rows: max_rows; 1 where only the
    multi-row launches failed (one-token steps keep the one-row kernels, so a multi-row false
    alarm costs the verify steps' speed, not batch 1's); 0 where the one-row ones failed.
    Steps that leave the gemv kernels go back to the 16-row skinny tiles (skinny_matmul on) or
    the unfused layers, with a warning; the failure goes to stats()["skinny_gemv_error"].

    The check launches the kernels the engine will: with gemv_weight_prefetch's switches set
    (PREFETCH_W / PREFETCH_L2 are their own specialisations, the L2 one inline PTX), then put
    back as they were: cleared for an engine's runner (kernel_paths sets them for good where
    the layers stay on), the engine's for a draft's runner (inheriting_process_switches)."""
    from llmbatch.runtime.layers import gemv as gemv_layers
    from llmbatch.runtime.models.llama_skinny import (disable_skinny_matmul,
                                                      enable_skinny_matmul)

    before = gemv_layers.prefetch_mode()
    gemv_layers.set_prefetch_mode(prefetch_mode)
    try:
        error = check_gemv_layers(model, max_rows)
        one_row_ok = (error is not None and max_rows > 1
                      and check_gemv_layers(model) is None)
    finally:
        gemv_layers.set_prefetch_mode(before)
    if error is None:
        return max_rows, None
    if prefetch_mode != "off":
        error += f" (gemv_weight_prefetch {prefetch_mode})"
    layers = "skinny" if skinny else "unfused"
    if one_row_ok:
        logger.warning("gemv_max_rows %d off, steps of 2-%d tokens on the %s layers (one-token "
                       "steps stay on the gemv kernels): the start-up check of the multi-row "
                       "gemv kernel failed: %s", max_rows, max_rows, layers, error)
        enable_skinny_matmul(model, pdl=pdl, gemv_rows=True, small_steps=skinny)
        return 1, error
    logger.warning("skinny_gemv off, %s on the %s layers: the start-up check of the gemv "
                   "kernels failed: %s", gemv_steps(max_rows), layers, error)
    if skinny:
        enable_skinny_matmul(model, pdl=pdl, gemv_rows=False, small_steps=True)
    else:
        disable_skinny_matmul(model)
    return 0, error
