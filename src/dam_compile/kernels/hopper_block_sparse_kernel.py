"""The Hopper (sm_90) path of the block-sparse attention kernel, in Gluon: warp-specialised, FlashAttention-3's
schedule on the plan's block lists.

The grid walks work items, a query tile of ``2 * BLOCK_M`` rows of one batch x head each, the heaviest
query tiles first in bands, one KV head's items after another within a band (:func:`_work_item`). A persistent
grid (one CTA per SM) takes them from a shared counter in order, so the CTAs stay on neighbouring items: they
read one KV head's K/V, which L2 holds, and the query heads of a GQA group read the same K/V tiles at about the
same time (a static round-robin lets CTAs drift apart and lost 10-15% dense), and one tile's loads overlap the
previous tile's last steps. With one CTA per item the same code runs each item once. Each CTA
runs three partitions that talk through mbarriers:

- a **loader** (one warp, few registers) takes the next item (``atomic_add`` on the counter) and issues TMA
  copies: the tile's two query halves into one of two Q slots (with the item's index, for the consumers), then
  for every kept key tile of the plan row (full blocks, then partial ones) K and V into a ring of
  ``NUM_STAGES`` shared-memory slots, each slot freed by the consumers;
- two **consumers** (one warpgroup each, ``BLOCK_M`` query rows each, most of the registers) run the online
  softmax with ``warpgroup_mma``. Each overlaps its own work FlashAttention-3 style: it issues ``Q K_j^T`` and
  the previous tile's ``P V_{j-1}`` together and runs the softmax of tile ``j`` while ``P V_{j-1}`` is still on
  the tensor cores; and the two take turns to issue their products (FlashAttention-3's ping-pong), so one's
  softmax runs while the other's products hold the tensor cores.

The key tiles of one plan row are visited in one flat loop of ``count * PLAN_BLOCK // BLOCK_N`` steps; a step
masks its scores only where it must (a partial block: causality and the keys' bounds; a full block cut by the
keys' end; any block under ``kv_range``). TMA zero-fills rows past the tensors' ends.

This path takes what Hopper's hardware path covers (fp16/bf16, head dim 64 or 128, plan blocks of at least
``BLOCK_N`` keys, no attention-mask tensor or token pattern); the portable kernel
(:mod:`.block_sparse_kernel`) takes everything and is the reference this one is tested against.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait

from .constants import LN2, LOG2E

# Triton 3.6 (the GPU image) names the TMA load async_copy_global_to_shared; later Triton, async_load.
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared

CONSUMERS = gl.constexpr(2)  # warpgroups that split a query tile's rows
# Query tiles per band of the work order: 64 x 4 query heads = 256 items of one KV head, about two per CTA, so the
# CTAs at work share one KV head's K/V (H200, same run: 1-7% faster than all heads at once at every density at
# 32K and 128K; 16 and 32 were slower, one band over the whole sequence 3% slower dense at 32K).
Q_BAND = gl.constexpr(64)
LOADER_REGISTERS = gl.constexpr(24)  # the fewest a warp can hold: the loader only computes addresses
CONSUMER_REGISTERS = gl.constexpr(240)  # the rest of the SM's register file, for the two consumers


@gluon.jit
def _plan_row(lists, b, h, plan_row):
    """``(count, indices pointer)`` of one plan row (as the portable kernel's ``_plan_row``)."""
    counts, count_strides, indices, index_strides = lists
    count = gl.load(counts + b * count_strides[0] + h * count_strides[1] + plan_row * count_strides[2])
    return count, indices + b * index_strides[0] + h * index_strides[1] + plan_row * index_strides[2]


@gluon.jit
def _work_item(item, problem, SHAPE: gl.constexpr, MODE: gl.constexpr):
    """Work item ``item``: the query tiles go heaviest (under causality: last) first in bands of ``Q_BAND``
    tiles; within a band, one KV head's items after another (batch-major), each KV head's tiles in order with
    the query heads that share it side by side. So the CTAs at work at any time share one KV head's K/V, which
    L2 holds (all heads at once need every KV head's). Returns ``(b, h, kvh, q_start, n_full, full_idx,
    partial_idx, n_steps, kv_lo, kv_hi)``."""
    heads, group, q_len, kv_len, q_offset, qk_scale, n_bh, n_tiles, partial_lists, full_lists, KvRange = problem
    PLAN_BLOCK: gl.constexpr = SHAPE[0]
    BLOCK_M: gl.constexpr = SHAPE[1]
    BLOCK_N: gl.constexpr = SHAPE[2]
    HAS_FULL: gl.constexpr = MODE[3]
    HAS_KV_RANGE: gl.constexpr = MODE[2]
    band_start = item // (Q_BAND * n_bh) * Q_BAND
    per_kv_head = gl.minimum(n_tiles - band_start, Q_BAND) * group  # items of one (batch, KV head) in the band
    rest = item - band_start * n_bh
    bkv = rest // per_kv_head
    kv_heads = heads // group
    b = bkv // kv_heads
    kvh = bkv % kv_heads
    h = kvh * group + rest % group
    q_start = (n_tiles - 1 - band_start - rest % per_kv_head // group) * (CONSUMERS * BLOCK_M)
    plan_row = q_start // PLAN_BLOCK
    n_partial, partial_idx = _plan_row(partial_lists, b, h, plan_row)
    n_full = 0
    full_idx = partial_idx
    if HAS_FULL:
        n_full, full_idx = _plan_row(full_lists, b, h, plan_row)
    kv_lo = 0
    kv_hi = kv_len
    if HAS_KV_RANGE:
        kv_lo = gl.load(KvRange + 2 * b)
        kv_hi = gl.load(KvRange + 2 * b + 1)
    return (b, h, kvh, q_start, n_full, full_idx, partial_idx, (n_full + n_partial) * (PLAN_BLOCK // BLOCK_N),
            kv_lo, kv_hi)


@gluon.jit
def _key_start(step, work, kv_len, SHAPE: gl.constexpr, MODE: gl.constexpr):
    """First key of loop step ``step`` of a work item (the full blocks' tiles first, then the partial blocks'),
    and whether its scores need masking: a partial block, a block the keys' end cuts, or any block under
    ``kv_range``."""
    b, h, kvh, q_start, n_full, full_idx, partial_idx, n_steps, kv_lo, kv_hi = work
    PLAN_BLOCK: gl.constexpr = SHAPE[0]
    BLOCK_N: gl.constexpr = SHAPE[2]
    HAS_KV_RANGE: gl.constexpr = MODE[2]
    SUB: gl.constexpr = PLAN_BLOCK // BLOCK_N
    entry = step // SUB
    if entry < n_full:
        block = gl.load(full_idx + entry)
    else:
        block = gl.load(partial_idx + (entry - n_full))
    start_n = block * PLAN_BLOCK + (step % SUB) * BLOCK_N
    needs_mask = (entry >= n_full) | (start_n + BLOCK_N > kv_len)
    if HAS_KV_RANGE:
        needs_mask = needs_mask | (kv_lo > 0) | (kv_hi < kv_len)
    return start_n, needs_mask


@gluon.jit
def _load_partition(args, SHAPE: gl.constexpr, MODE: gl.constexpr):
    """The loader: for each work item this CTA takes, its index and two query halves into a free Q slot, then
    every key tile's K and V into the ring, as slots free up (across work items: the next tile's loads overlap
    this one's last steps and epilogue); past the last item, an index past the end for the consumers."""
    descs, bufs, bars, problem, sched = args
    desc_q, desc_k, desc_v, out_args = descs
    q_bufs, k_bufs, v_bufs, item_slots = bufs
    q_ready, q_empty, k_ready, k_empty, v_ready, v_empty, turns = bars
    kv_len = problem[3]
    n_items = problem[6] * problem[7]
    BLOCK_M: gl.constexpr = SHAPE[1]
    NUM_STAGES: gl.constexpr = k_bufs.type.shape[0]
    Q_SLOTS: gl.constexpr = q_ready.type.shape[0]
    item_layout: gl.constexpr = gl.BlockedLayout([1], [32], [1], [0])
    done = 0  # key tiles this CTA loaded so far: the ring's position
    t = 0  # work items so far: the Q slots' position
    item = gl.program_id(0)  # the first item is the CTA's own; later ones come from the shared counter
    while item < n_items:
        work = _work_item(item, problem, SHAPE, MODE)
        b, h, kvh, q_start = work[0], work[1], work[2], work[3]
        n_steps = work[7]
        q_slot = t % Q_SLOTS
        mbarrier.wait(q_empty.index(q_slot), ((t // Q_SLOTS) & 1) ^ 1)
        # The item goes to the consumers with the Q slot: the barrier's arrival (release) orders this store.
        item_slots.index(q_slot).store(gl.full([1], item, gl.int32, layout=item_layout))
        mbarrier.expect(q_ready.index(q_slot), CONSUMERS * desc_q.block_type.nbytes)
        for half in gl.static_range(CONSUMERS):
            _tma_load(desc_q, [b, h, q_start + half * BLOCK_M, 0], q_ready.index(q_slot),
                      q_bufs.index(q_slot * CONSUMERS + half))
        for step in range(n_steps):
            start_n, needs_mask = _key_start(step, work, kv_len, SHAPE, MODE)
            slot = (done + step) % NUM_STAGES
            phase = ((done + step) // NUM_STAGES) & 1
            # A slot is free once both consumers released it; barriers start as if a phase had completed.
            mbarrier.wait(k_empty.index(slot), phase ^ 1)
            mbarrier.expect(k_ready.index(slot), desc_k.block_type.nbytes)
            _tma_load(desc_k, [b, kvh, start_n, 0], k_ready.index(slot), k_bufs.index(slot))
            mbarrier.wait(v_empty.index(slot), phase ^ 1)
            mbarrier.expect(v_ready.index(slot), desc_v.block_type.nbytes)
            _tma_load(desc_v, [b, kvh, start_n, 0], v_ready.index(slot), v_bufs.index(slot))
        done += n_steps
        t += 1
        item = gl.atomic_add(sched, 1) + gl.num_programs(0)
    # Past the end: tell the consumers, and the last CTA here zeroes the counter for the next launch (every CTA
    # has taken its last item by then).
    q_slot = t % Q_SLOTS
    mbarrier.wait(q_empty.index(q_slot), ((t // Q_SLOTS) & 1) ^ 1)
    item_slots.index(q_slot).store(gl.full([1], item, gl.int32, layout=item_layout))
    mbarrier.arrive(q_ready.index(q_slot), count=1)
    if gl.atomic_add(sched + 1, 1) == gl.num_programs(0) - 1:
        gl.atomic_xchg(sched, 0)
        gl.atomic_xchg(sched + 1, 0)


@gluon.jit
def _masked_scores(s, start_n, positions, kv_bounds, IS_CAUSAL: gl.constexpr, HAS_KV_RANGE: gl.constexpr,
                   s_layout: gl.constexpr, BLOCK_N: gl.constexpr):
    """``s`` with ``-inf`` where a key is past the keys' end, outside ``kv_range`` or (causal) after the row."""
    kv_len, kv_lo, kv_hi = kv_bounds
    cols = start_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
    in_keys = cols < kv_len
    if HAS_KV_RANGE:
        in_keys = in_keys & (cols >= kv_lo) & (cols < kv_hi)
    keep = in_keys[None, :] & (positions[:, None] >= 0)
    if IS_CAUSAL:
        keep = keep & (cols[None, :] <= positions[:, None])
    return gl.where(keep, s, float("-inf"))


@gluon.jit
def _online_softmax(s, m_i, l_i, qk_scale):
    """One tile's step of the online softmax in base 2: ``(p, m, l, alpha)``; rows with no key yet keep
    ``m = -inf`` and get ``p = 0`` (the max is made safe before ``exp2``)."""
    m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
    m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
    p = gl.exp2(s * qk_scale - m_safe[:, None])
    alpha = gl.exp2(m_i - m_safe)
    return p, m_new, l_i * alpha + gl.sum(p, 1), alpha


@gluon.jit
def _take_turn(turns, taken, HALF: gl.constexpr):
    """Wait until it is this consumer's turn to issue matrix products: the consumers take turns (FlashAttention-3's
    ping-pong), so one's softmax runs while the other's products hold the tensor cores. The first consumer's first
    turn is free (a fresh barrier counts as a completed phase for the parity before it)."""
    mbarrier.wait(turns.index(HALF), (taken & 1) ^ (1 - HALF))


@gluon.jit
def _pass_turn(turns, taken, HALF: gl.constexpr):
    """Hand the turn to the other consumer once this one's products are issued; returns the turns taken."""
    mbarrier.arrive(turns.index(1 - HALF), count=1)
    return taken + 1


@gluon.jit
def _consume(args, SHAPE: gl.constexpr, MODE: gl.constexpr, HALF: gl.constexpr):
    """One consumer warpgroup: for each work item the loader hands over (until an index past the end), rows
    ``[q_start + HALF * BLOCK_M, + BLOCK_M)`` of the tile through every key tile the loader streams; writes
    their output (and log-sum-exp)."""
    descs, bufs, bars, problem, sched = args
    q_bufs, k_bufs, v_bufs, item_slots = bufs
    q_ready, q_empty, k_ready, k_empty, v_ready, v_empty, turns = bars
    kv_len, q_offset, qk_scale = problem[3], problem[4], problem[5]
    n_items = problem[6] * problem[7]
    BLOCK_M: gl.constexpr = SHAPE[1]
    BLOCK_N: gl.constexpr = SHAPE[2]
    HEAD_DIM: gl.constexpr = SHAPE[3]
    IS_CAUSAL: gl.constexpr = MODE[0]
    HAS_KV_RANGE: gl.constexpr = MODE[2]
    NUM_STAGES: gl.constexpr = k_bufs.type.shape[0]
    Q_SLOTS: gl.constexpr = q_ready.type.shape[0]
    dtype: gl.constexpr = descs[0].dtype
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    o_rows: gl.constexpr = gl.SliceLayout(1, o_layout)
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)

    item_layout: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
    done = 0
    t = 0
    taken = 0  # turns at the tensor cores so far
    mbarrier.wait(q_ready.index(0), 0)
    item = gl.max(item_slots.index(0).load(item_layout), 0)
    while item < n_items:
        work = _work_item(item, problem, SHAPE, MODE)
        n_steps = work[7]
        kv_bounds = (kv_len, work[8], work[9])
        rows = work[3] + HALF * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout))
        positions = rows + q_offset
        m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_layout))
        l_i = gl.zeros([BLOCK_M], gl.float32, layout=gl.SliceLayout(1, s_layout))
        o = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=o_layout)
        q_slot = t % Q_SLOTS
        q = q_bufs.index(q_slot * CONSUMERS + HALF).reshape([BLOCK_M, HEAD_DIM])
        if n_steps > 0:
            # Step 0: scores and softmax only; its P V joins step 1's scores.
            start_n, needs_mask = _key_start(0, work, kv_len, SHAPE, MODE)
            slot = done % NUM_STAGES
            mbarrier.wait(k_ready.index(slot), (done // NUM_STAGES) & 1)
            _take_turn(turns, taken, HALF)
            s = warpgroup_mma(q, k_bufs.index(slot).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0)), s_zero,
                              use_acc=False, is_async=True)
            taken = _pass_turn(turns, taken, HALF)
            s = warpgroup_mma_wait(0, deps=(s,))
            mbarrier.arrive(k_empty.index(slot), count=1)
            if needs_mask:
                s = _masked_scores(s, start_n, positions, kv_bounds, IS_CAUSAL, HAS_KV_RANGE, s_layout, BLOCK_N)
            p, m_i, l_i, alpha = _online_softmax(s, m_i, l_i, qk_scale)
            p = gl.convert_layout(p.to(dtype), p_layout)
            for step in range(1, n_steps):
                slot = (done + step) % NUM_STAGES
                prev = (done + step - 1) % NUM_STAGES
                start_n, needs_mask = _key_start(step, work, kv_len, SHAPE, MODE)
                mbarrier.wait(k_ready.index(slot), ((done + step) // NUM_STAGES) & 1)
                mbarrier.wait(v_ready.index(prev), ((done + step - 1) // NUM_STAGES) & 1)
                _take_turn(turns, taken, HALF)
                s = warpgroup_mma(q, k_bufs.index(slot).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0)), s_zero,
                                  use_acc=False, is_async=True)
                o = warpgroup_mma(p, v_bufs.index(prev).reshape([BLOCK_N, HEAD_DIM]), o, is_async=True)
                taken = _pass_turn(turns, taken, HALF)
                # Groups retire in order: one left outstanding is P V, so the scores are ready.
                s = warpgroup_mma_wait(1, deps=(s,))
                mbarrier.arrive(k_empty.index(slot), count=1)
                if needs_mask:
                    s = _masked_scores(s, start_n, positions, kv_bounds, IS_CAUSAL, HAS_KV_RANGE, s_layout, BLOCK_N)
                p_next, m_i, l_i, alpha = _online_softmax(s, m_i, l_i, qk_scale)
                o = warpgroup_mma_wait(0, deps=(o,))
                mbarrier.arrive(v_empty.index(prev), count=1)
                o = o * gl.convert_layout(alpha, o_rows)[:, None]
                p = gl.convert_layout(p_next.to(dtype), p_layout)
            last = (done + n_steps - 1) % NUM_STAGES
            mbarrier.wait(v_ready.index(last), ((done + n_steps - 1) // NUM_STAGES) & 1)
            _take_turn(turns, taken, HALF)
            o = warpgroup_mma(p, v_bufs.index(last).reshape([BLOCK_N, HEAD_DIM]), o, is_async=True)
            taken = _pass_turn(turns, taken, HALF)
            o = warpgroup_mma_wait(0, deps=(o,))
            mbarrier.arrive(v_empty.index(last), count=1)
        mbarrier.arrive(q_empty.index(q_slot), count=1)  # every score of this tile is computed
        _write_rows(descs[3], work, o, m_i, l_i, rows, SHAPE, MODE, o_layout)
        done += n_steps
        t += 1
        mbarrier.wait(q_ready.index(t % Q_SLOTS), (t // Q_SLOTS) & 1)
        item = gl.max(item_slots.index(t % Q_SLOTS).load(item_layout), 0)


@gluon.jit
def _write_rows(out_args, work, o, m_i, l_i, rows, SHAPE: gl.constexpr, MODE: gl.constexpr, o_layout: gl.constexpr):
    """Normalise and store a consumer's rows (zeros and ``-inf`` log-sum-exp where a row kept no key)."""
    Out, o_strides, Lse, q_len, heads = out_args
    b, h = work[0], work[1]
    HEAD_DIM: gl.constexpr = SHAPE[3]
    WRITE_LSE: gl.constexpr = MODE[1]
    has_keys = l_i > 0.0
    l_safe = gl.where(has_keys, l_i, 1.0)
    out = o / gl.convert_layout(l_safe, gl.SliceLayout(1, o_layout))[:, None]
    o_rows = gl.convert_layout(rows, gl.SliceLayout(1, o_layout))
    dims = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
    o_ptrs = (Out + b.to(gl.int64) * o_strides[0] + h.to(gl.int64) * o_strides[1]
              + o_rows[:, None].to(gl.int64) * o_strides[2] + dims[None, :] * o_strides[3])
    gl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=(o_rows[:, None] < q_len) & (dims[None, :] < HEAD_DIM))
    if WRITE_LSE:
        lse = gl.where(has_keys, (m_i + gl.log2(l_safe)) * LN2, float("-inf"))
        gl.store(Lse + (b * heads + h).to(gl.int64) * q_len + rows, lse, mask=rows < q_len)


@gluon.jit
def _consume_first_half(args, SHAPE: gl.constexpr, MODE: gl.constexpr):
    _consume(args, SHAPE, MODE, 0)


@gluon.jit
def _consume_second_half(args, SHAPE: gl.constexpr, MODE: gl.constexpr):
    _consume(args, SHAPE, MODE, 1)


@gluon.jit
def hopper_block_sparse_fwd(
    Q, q_strides, K, k_strides, V, v_strides, Out, o_strides, Lse, partial_lists, full_lists, KvRange,
    heads, group, q_len, kv_len, q_offset, sm_scale, n_bh, n_tiles, Sched,
    HEAD_DIM: gl.constexpr, PLAN_BLOCK: gl.constexpr, IS_CAUSAL: gl.constexpr, HAS_FULL: gl.constexpr,
    HAS_KV_RANGE: gl.constexpr, WRITE_LSE: gl.constexpr, NUM_STAGES: gl.constexpr,
    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, Q_LAYOUT: gl.constexpr, KV_LAYOUT: gl.constexpr,
):
    """Grid ``(G,)`` over the ``n_bh * n_tiles`` work items (:func:`_work_item`): CTA ``i`` takes item ``i``, then
    ``G + atomic_add(Sched[0], 1)`` until past the end; ``G`` is the SM count (persistent) or the item count.
    ``Sched``: int32 ``[2]`` (next item, CTAs done), zero at launch; the last CTA zeroes it again. ``n_bh = B * H``,
    ``n_tiles = cdiv(q_len, 2 * BLOCK_M)``; ``num_warps=4`` (the first consumer). Q ``[B, H, Lq, E]`` and K/V
    ``[B, KVH, Lk, E]`` with their strides (the last 1, the others 16-byte multiples): each CTA makes their TMA
    descriptors (boxes ``[1, 1, BLOCK_M, E]`` and ``[1, 1, BLOCK_N, E]``, shared layouts ``Q_LAYOUT`` and
    ``KV_LAYOUT``) in the launch's global scratch, so the host passes pointers, not descriptors; the other
    operands as :func:`block_sparse_attention_fwd`'s.
    """
    gl.static_assert(PLAN_BLOCK % (CONSUMERS * BLOCK_M) == 0)
    gl.static_assert(PLAN_BLOCK % BLOCK_N == 0)
    batch = n_bh // heads
    desc_q = tma.make_tensor_descriptor(Q, [batch, heads, q_len, HEAD_DIM], q_strides, [1, 1, BLOCK_M, HEAD_DIM],
                                        Q_LAYOUT)
    desc_k = tma.make_tensor_descriptor(K, [batch, heads // group, kv_len, HEAD_DIM], k_strides,
                                        [1, 1, BLOCK_N, HEAD_DIM], KV_LAYOUT)
    desc_v = tma.make_tensor_descriptor(V, [batch, heads // group, kv_len, HEAD_DIM], v_strides,
                                        [1, 1, BLOCK_N, HEAD_DIM], KV_LAYOUT)
    Q_SLOTS: gl.constexpr = 2  # the next tile's query loads while this one runs
    q_bufs = gl.allocate_shared_memory(desc_q.dtype, [Q_SLOTS * CONSUMERS] + desc_q.block_type.shape, desc_q.layout)
    k_bufs = gl.allocate_shared_memory(desc_k.dtype, [NUM_STAGES] + desc_k.block_type.shape, desc_k.layout)
    v_bufs = gl.allocate_shared_memory(desc_v.dtype, [NUM_STAGES] + desc_v.block_type.shape, desc_v.layout)
    item_slots = gl.allocate_shared_memory(gl.int32, [Q_SLOTS, 1], gl.SwizzledSharedLayout(1, 1, 1, [0]))
    q_ready = gl.allocate_shared_memory(gl.int64, [Q_SLOTS, 1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [Q_SLOTS, 1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    turns = gl.allocate_shared_memory(gl.int64, [CONSUMERS, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(Q_SLOTS):
        mbarrier.init(q_ready.index(i), count=1)
        mbarrier.init(q_empty.index(i), count=CONSUMERS)  # one arrival per consumer warpgroup
    for i in gl.static_range(CONSUMERS):
        mbarrier.init(turns.index(i), count=1)  # the other consumer's hand-over
    for i in gl.static_range(NUM_STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=CONSUMERS)
        mbarrier.init(v_empty.index(i), count=CONSUMERS)

    problem = (heads, group, q_len, kv_len, q_offset, sm_scale * LOG2E, n_bh, n_tiles, partial_lists, full_lists,
               KvRange)
    out_args = (Out, o_strides, Lse, q_len, heads)
    SHAPE: gl.constexpr = (PLAN_BLOCK, BLOCK_M, BLOCK_N, HEAD_DIM)
    MODE: gl.constexpr = (IS_CAUSAL, WRITE_LSE, HAS_KV_RANGE, HAS_FULL)
    # Every partition takes the same argument tuple (worker partitions must share one signature).
    args = ((desc_q, desc_k, desc_v, out_args), (q_bufs, k_bufs, v_bufs, item_slots),
            (q_ready, q_empty, k_ready, k_empty, v_ready, v_empty, turns), problem, Sched)
    gl.warp_specialize([
        (_consume_first_half, (args, SHAPE, MODE)),
        (_consume_second_half, (args, SHAPE, MODE)),
        (_load_partition, (args, SHAPE, MODE)),
    ], [4, 1], [CONSUMER_REGISTERS, LOADER_REGISTERS])
