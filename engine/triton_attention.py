"""Paged decode attention on CUDA: a Triton kernel that reads keys and values straight from the
KV pool through each row's block table (no gather, no copy), flash-decoding style.

One program per (row, KV head, split): the row's context is cut into ``splits`` equal parts, each
program runs an online softmax over its part for all the query heads that share the KV head (GQA),
and a second kernel merges the parts by their log-sum-exp. ``splits`` is a function of the number
of rows only (``splits_for``), so a CUDA graph captured for a batch size stays valid for every
context length, and an eager step and a graph replay of the same batch size do the same sums.

Used by engine/paged.py for the decode rows of every step on CUDA; the CPU path keeps its gather +
SDPA (tests/test_triton_attention.py runs this kernel in Triton's interpreter against it).
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

BLOCK_N = 64  # keys per inner iteration
MAX_SPLITS = 16


@triton.jit
def _partial(
    Q,
    K,
    V,
    Tables,
    Lens,
    Out,
    Lse,
    stride_qb,
    stride_qh,
    stride_ks,
    stride_kh,
    stride_tb,
    stride_ob,
    stride_oh,
    stride_os,
    stride_lb,
    stride_lh,
    scale,
    window,
    GROUP: tl.constexpr,
    GROUP_P: tl.constexpr,
    D: tl.constexpr,
    D_P: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLITS: tl.constexpr,
    IEEE: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    s = tl.program_id(2)
    length = tl.load(Lens + b).to(tl.int32)
    first = tl.where(window > 0, tl.maximum(length - window, 0), 0)
    per = tl.cdiv(length - first, SPLITS)
    lo = first + s * per
    hi = tl.minimum(lo + per, length)
    g = tl.arange(0, GROUP_P)
    d = tl.arange(0, D_P)
    heads = kvh * GROUP + g
    gmask = g < GROUP
    dmask = d < D
    q = tl.load(
        Q + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=gmask[:, None] & dmask[None, :], other=0.0
    )
    m = tl.full([GROUP_P], float("-inf"), tl.float32)
    den = tl.zeros([GROUP_P], tl.float32)
    acc = tl.zeros([GROUP_P, D_P], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        pmask = pos < hi
        blk = tl.load(Tables + b * stride_tb + pos // BLOCK_SIZE, mask=pmask, other=0)
        slot = blk.to(tl.int64) * BLOCK_SIZE + pos % BLOCK_SIZE
        kv_mask = pmask[:, None] & dmask[None, :]
        offs = slot[:, None] * stride_ks + kvh * stride_kh + d[None, :]
        k = tl.load(K + offs, mask=kv_mask, other=0.0)
        if IEEE:
            qk = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            qk = tl.dot(q, tl.trans(k))
        qk = tl.where(pmask[None, :], qk * scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(qk, 1))
        p = tl.exp(qk - m_new[:, None])
        alpha = tl.exp(m - m_new)
        v = tl.load(V + offs, mask=kv_mask, other=0.0)
        if IEEE:
            pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        den = den * alpha + tl.sum(p, 1)
        m = m_new
    nonempty = den > 0
    out = acc / tl.where(nonempty, den, 1.0)[:, None]
    lse = tl.where(nonempty, m + tl.log(tl.where(nonempty, den, 1.0)), float("-inf"))
    tl.store(
        Out + b * stride_ob + heads[:, None] * stride_oh + s * stride_os + d[None, :],
        out,
        mask=gmask[:, None] & dmask[None, :],
    )
    tl.store(Lse + b * stride_lb + heads * stride_lh + s, lse, mask=gmask)


@triton.jit
def _merge(
    Out,
    Lse,
    Final,
    stride_ob,
    stride_oh,
    stride_os,
    stride_lb,
    stride_lh,
    stride_fb,
    stride_fh,
    SPLITS: tl.constexpr,
    SPLITS_P: tl.constexpr,
    D: tl.constexpr,
    D_P: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, SPLITS_P)
    d = tl.arange(0, D_P)
    smask = s < SPLITS
    lse = tl.load(Lse + b * stride_lb + h * stride_lh + s, mask=smask, other=float("-inf"))
    w = tl.exp(lse - tl.max(lse, 0))
    w = w / tl.sum(w, 0)
    part = tl.load(
        Out + b * stride_ob + h * stride_oh + s[:, None] * stride_os + d[None, :],
        mask=smask[:, None] & (d < D)[None, :],
        other=0.0,
    )
    res = tl.sum(part * w[:, None], 0)
    tl.store(Final + b * stride_fb + h * stride_fh + d, res.to(Final.dtype.element_ty), mask=d < D)


_SM_COUNT: dict[int, int] = {}


def splits_for(rows: int, kv_heads: int, device) -> int:
    """How many parts each row's context is cut into: enough programs to fill the GPU when rows
    are few (long contexts at small batches), one part when rows alone fill it."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return 4
    idx = dev.index if dev.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    want = -(-2 * _SM_COUNT[idx] // max(1, rows * kv_heads))
    return max(1, min(MAX_SPLITS, triton.next_power_of_2(want)))


def paged_decode(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    tables: torch.Tensor,
    lens: torch.Tensor,
    block_size: int,
    scale: float,
    window: int | None = None,
    splits: int | None = None,
) -> torch.Tensor:
    """Attention of one query token per row over its context in the pool.

    q: [B, Hq, D] (the last dim contiguous); k_pool, v_pool: [slots, Hkv, D]; tables: [B, W] block
    ids (int32/int64); lens: [B] context lengths including the token being decoded (its keys are
    already in the pool), each >= 1; window: attend to the last ``window`` positions only.
    Returns [B, Hq, D] in q's dtype. Launched on q's device (Triton launches on the current CUDA
    device; a model spread over several GPUs calls this for layers on each of them).
    """
    on_device = torch.cuda.device(q.device) if q.device.type == "cuda" else contextlib.nullcontext()
    with on_device:
        return _paged_decode(q, k_pool, v_pool, tables, lens, block_size, scale, window, splits)


def _paged_decode(q, k_pool, v_pool, tables, lens, block_size, scale, window, splits) -> torch.Tensor:
    B, Hq, D = q.shape
    Hkv = k_pool.shape[1]
    group = Hq // Hkv
    splits = splits or splits_for(B, Hkv, q.device)
    assert q.stride(-1) == 1 and k_pool.stride(-1) == 1 and v_pool.stride() == k_pool.stride()
    part = torch.empty(B, Hq, splits, D, dtype=torch.float32, device=q.device)
    lse = torch.empty(B, Hq, splits, dtype=torch.float32, device=q.device)
    d_p = triton.next_power_of_2(D)
    _partial[(B, Hkv, splits)](
        q,
        k_pool,
        v_pool,
        tables,
        lens,
        part,
        lse,
        q.stride(0),
        q.stride(1),
        k_pool.stride(0),
        k_pool.stride(1),
        tables.stride(0),
        part.stride(0),
        part.stride(1),
        part.stride(2),
        lse.stride(0),
        lse.stride(1),
        float(scale),
        int(window or 0),
        GROUP=group,
        GROUP_P=max(16, triton.next_power_of_2(group)),
        D=D,
        D_P=max(16, d_p),
        BLOCK_SIZE=block_size,
        BLOCK_N=BLOCK_N,
        SPLITS=splits,
        IEEE=q.dtype == torch.float32,
        num_warps=4,
    )
    out = torch.empty(B, Hq, D, dtype=q.dtype, device=q.device)
    _merge[(B, Hq)](
        part,
        lse,
        out,
        part.stride(0),
        part.stride(1),
        part.stride(2),
        lse.stride(0),
        lse.stride(1),
        out.stride(0),
        out.stride(1),
        SPLITS=splits,
        SPLITS_P=max(2, triton.next_power_of_2(splits)),
        D=D,
        D_P=d_p,
        num_warps=4,
    )
    return out
