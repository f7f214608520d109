"""Context parallelism: PyTorch's ring attention, each ring step our block-sparse op.

    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cuda", (world_size,))
    with dam_compile.context_parallel(mesh, buffers=[ids, positions], buffer_seq_dims=[1, 1], model=model,
                                      options={"mask_source": "dynamic"}):
        logits = compiled(ids, position_ids=positions).logits     # each rank: its shard of the sequence

Inside, ``torch.distributed.tensor.experimental.context_parallel`` shards the buffers over the mesh (its
head-tail load balancing for causal attention included) and every ``scaled_dot_product_attention`` call of the
model reaches :class:`RingAttention` with the rank's query shard. Each call runs a ring (PyTorch's rotation of
the key/value shards, as ``_templated_ring_attention`` has it, and a log-sum-exp merge that leaves a row which
kept nothing so far unchanged), each step as ``dam::sparse_attention_lse`` on the received shard with the
rank's plan rows cut to the step (``ops/ring_step.py``); a step that keeps no block computes nothing. The
plan rows are those one process would build for the whole sequence:

- ``dense`` and ``streaming`` (and the first ``dense_layers`` layers, and sequences under ``min_seq_len``):
  from the global positions of the rank's tokens, no communication;
- ``dynamic``: the key shards are all-gathered (in sequence order); with the default ``sampled`` estimator each
  rank scores its own sampled query rows against them (the kernel's ``block_map``: its blocks at their places
  in the sequence), the rank holding the prompt's last block makes it exact, and the plan's few sums and
  minima over all rows (the Box-Cox shift, the pattern counts, the budgets) are all-reduced
  (``dynamic/dynamic_plan.QueryShard``): each rank pays ``1 / world_size`` of the plan. Other estimators
  gather the queries too and compute the whole plan on every rank;
- ``calibrated``: the profile's patterns give the whole plan from global positions, no communication; each call
  of a step gets the token pattern moved to its keys' start (``ops/ring_step.RankRows``). A hybrid profile's
  dynamic heads take the dynamic source's rows and the pass-through token pattern, as in one process.

Shards must be whole plan blocks: the sequence length a multiple of ``2 * world_size * block_size`` with load
balancing (``world_size * block_size`` without). The model must be given global ``position_ids`` as a buffer
(what ``context_parallel`` needs for RoPE anyway). Prefill only: decode steps are not sharded.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from .config import DAMConfig
from .ops.dispatch import call_path
from .dynamic.dynamic_plan import QueryShard, dynamic_block_plan
from .plan.pattern_plan import pattern_block_tables
from .ops.ring_step import RankRows, StepOptions, blocks_of, merge, position_runs
from .plan.structured_plans import causal_block_tables, streaming_window
from .module_stack import AttentionCallMode
from .passes.plan_call import DENSE_PLAN, DYNAMIC_PLAN, STREAMING_PLAN, PlanCall
from .reference_mode import plan_call_for

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh



class ShardLayout:
    """Which global token positions each rank of ``world`` holds, as ``context_parallel`` shards a sequence
    of ``world * local_len`` tokens: with head-tail load balancing rank ``r`` holds chunks ``r`` and
    ``2 * world - 1 - r`` of ``local_len / 2`` tokens, without it the ``r``-th run of ``local_len``."""

    def __init__(self, world: int, local_len: int, load_balanced: bool) -> None:
        self.world, self.local_len, self.load_balanced = world, local_len, load_balanced

    def positions(self, rank: int) -> Tensor:
        """int64 ``[local_len]``: the global positions of ``rank``'s tokens, in its order."""
        if not self.load_balanced:
            return torch.arange(rank * self.local_len, (rank + 1) * self.local_len)
        chunk = self.local_len // 2
        tail = 2 * self.world - 1 - rank
        return torch.cat([torch.arange(rank * chunk, (rank + 1) * chunk), torch.arange(tail * chunk, (tail + 1) * chunk)])

    def order(self) -> Tensor:
        """int64 ``[world * local_len]``: the global positions of the ranks' tokens concatenated in rank order
        (what an all-gather of the shards holds)."""
        return torch.cat([self.positions(r) for r in range(self.world)])


class RingAttention(AttentionCallMode):
    """Every SDPA call of ``model`` whose query is a ``DTensor`` sharded on the sequence (what
    ``context_parallel`` hands it) runs as PyTorch's ring attention with our op at each step, under
    ``config``; other calls run unchanged."""

    def __init__(self, model: torch.nn.Module, config: DAMConfig, record_rows: bool = False) -> None:
        super().__init__(model)
        self.config, self.record_rows = config, record_rows
        # With record_rows, per module its last call's kept blocks (RankRows' partial | full, bool
        # [B, H, Mq_rank, Nk]): off by default, at 1M tokens an 8B model's would hold ~270 MB per layer.
        self.rows: dict[str, Tensor] = {}
        self.dense_reasons: dict[str, str] = {}  # per module that ran the dense ring, why
        self.steps = {"run": 0, "skipped": 0}  # ring steps that computed, and those that kept no block

    def on_attention(self, module_name: str, a: dict[str, Any]) -> Tensor | None:
        from torch.distributed.tensor import DTensor, Shard
        from torch.distributed.tensor.experimental._attention import _cp_options

        query = a["query"]
        if not isinstance(query, DTensor):
            return None
        if a["dropout_p"] != 0 or a["attn_mask"] is not None or not a["is_causal"]:
            mask = None if a["attn_mask"] is None else tuple(a["attn_mask"].shape)
            raise ValueError(f"{module_name}: the context-parallel ring runs causal attention without a mask or "
                             f"dropout (context_parallel's load balancing needs is_causal=True); got is_causal="
                             f"{a['is_causal']}, attn_mask {mask}, dropout_p={a['dropout_p']}")
        mesh = query.device_mesh
        group = mesh.get_group()
        q, k, v = (a[name].to_local() for name in ("query", "key", "value"))
        layout = ShardLayout(mesh.size(), q.shape[-2], _cp_options.enable_load_balance)
        rank = dist.get_rank(group)
        rows = self.plan_rows(module_name, q, k, layout, rank, group, a["scale"])
        if self.record_rows:
            self.rows[module_name] = rows.partial | rows.full
        step = _RingStep(rows, layout, rank, StepOptions(a["scale"], k.shape[1] != q.shape[1], self.config.kernel),
                         self.steps)
        out = _ring(group, q, k.contiguous(), v.contiguous(), step)
        return DTensor.from_local(out.to(q.dtype), mesh, [Shard(2)], run_check=False)

    def plan_rows(self, module_name: str, q: Tensor, k: Tensor, layout: ShardLayout, rank: int,
                  group: dist.ProcessGroup, scale: float | None) -> RankRows:
        """The rank's rows of the one-process plan of the whole sequence (:class:`RankRows`): the plan call the
        pass would insert (:func:`plan_call_for`), where the ring runs sparse (:func:`call_path`)."""
        block = self.config.block_size
        seq_len = layout.world * layout.local_len
        if seq_len % (block * layout.world * (2 if layout.load_balanced else 1)):
            raise ValueError(f"{module_name}: a context-parallel shard must be whole blocks of block_size={block}: "
                             f"sequence length {seq_len} over {layout.world} ranks"
                             + (" with load balancing (two chunks each)" if layout.load_balanced else ""))
        positions = layout.positions(rank).to(q.device)
        path, reason = call_path(self.config, module_name, q, k, runner="ring", key_len=seq_len)
        if path == "dense":  # the dense ring: every causal block
            self.dense_reasons[module_name] = reason
            return _structured_rows(None, positions, seq_len, block)
        call = plan_call_for(self.config, q, True, scale, module_name)
        if call.op in (DENSE_PLAN, STREAMING_PLAN):
            return _structured_rows(call, positions, seq_len, block)
        if call.op is DYNAMIC_PLAN:
            return self._dynamic_rows(call, q, k, layout, positions, group)
        return self._pattern_rows(call, q, k, layout, positions, group)

    def _pattern_rows(self, call: PlanCall, q: Tensor, k: Tensor, layout: ShardLayout, positions: Tensor,
                      group: dist.ProcessGroup) -> RankRows:
        """A calibrated call's rows: its token pattern over global positions, no communication; a hybrid call's
        dynamic heads take the dynamic rows (its token pattern lets their partial blocks through)."""
        block, seq_len, pattern = call.kwargs["block_size"], layout.world * layout.local_len, call.token_pattern
        # The rank's rows only, run by run of its positions (the whole sequence's tables: gigabytes at 1M tokens).
        tables = [pattern_block_tables(pattern.diagonals, pattern.columns, pattern.corner, length, seq_len, block,
                                       True, q_offset=start) for _, start, length in position_runs(positions)]
        partial, full = (torch.cat(parts, dim=2) for parts in zip(*tables))
        if call.dynamic_heads:
            rows = self._dynamic_rows(call.dynamic_call(), q, k, layout, positions, group)
            heads = call.tensor_kwargs["dynamic_heads"][None, :, None, None]
            partial, full = torch.where(heads, rows.partial, partial), torch.where(heads, rows.full, full)
        return RankRows(partial, full, positions, block, pattern)

    def _dynamic_rows(self, call: PlanCall, q: Tensor, k: Tensor, layout: ShardLayout, positions: Tensor,
                      group: dist.ProcessGroup) -> RankRows:
        """The dynamic ``call``'s rows of the rank's tokens at ``positions``: the keys gathered in sequence order;
        with the sampled estimator each rank plans its own rows (the plan's sums and minima all-reduced), with
        another the whole plan everywhere."""
        block, seq_len = call.kwargs["block_size"], layout.world * layout.local_len
        q_blocks = blocks_of(positions, block)
        order = layout.order().to(q.device)
        restore = torch.empty_like(order)
        restore[order] = torch.arange(order.numel(), device=q.device)
        whole_k = _gather(k, group).index_select(2, restore)
        if call.kwargs["estimator"] == "sampled":
            shard = QueryShard(q_blocks, seq_len, lambda t: _all_reduce(t, dist.ReduceOp.SUM, group),
                               lambda t: _all_reduce(t, dist.ReduceOp.MIN, group))
            lists = dynamic_block_plan(q, whole_k, **call.planner_kwargs, shard=shard)
            partial, full = call.plan(lists).block_tables(seq_len)
            return _block_rows(partial | full, q_blocks, positions, block)
        whole_q = _gather(q, group).index_select(2, restore)
        # The planner itself, not the op: the op's min_seq_len and crossover would return an empty plan (its dense
        # signal) where the ring computes sparse.
        lists = dynamic_block_plan(whole_q, whole_k, **call.planner_kwargs)
        partial, full = call.plan(lists).block_tables(seq_len)
        return _block_rows((partial | full)[:, :, q_blocks], q_blocks, positions, block)


def _structured_rows(call: PlanCall | None, positions: Tensor, seq_len: int, block: int) -> RankRows:
    """Rows built from global positions alone: every causal block (the dense plan; ``call`` None: the dense
    ring), or a streaming call's sinks and window."""
    q_blocks = blocks_of(positions, block)
    kept = torch.cat([causal_block_tables(length, seq_len, block, True, positions.device, q_offset=start)[0]
                      for _, start, length in position_runs(positions)])
    if call is not None and call.op is STREAMING_PLAN:
        m, n = q_blocks[:, None], torch.arange(kept.shape[-1], device=positions.device)[None, :]
        kept = kept & streaming_window(m, n, call.kwargs["sink_blocks"], call.kwargs["local_blocks"], True)
    return _block_rows(kept[None, None], q_blocks, positions, block)


def _block_rows(kept: Tensor, q_blocks: Tensor, positions: Tensor, block: int) -> RankRows:
    """Block-level rows: kept blocks on the global diagonal partial (the causal test), the others full."""
    diagonal = q_blocks[:, None] == torch.arange(kept.shape[-1], device=kept.device)[None, :]
    return RankRows(kept & diagonal, kept & ~diagonal, positions, block)


class _RingStep:
    """One ring step: the rank's queries against the key/value shard of the rank ``i`` steps before it, over the
    rank's plan rows. Every step sees all of the rank's queries and the shard's keys: pairs of a query run and
    a later key run (causal) and pairs that keep no block compute nothing."""

    def __init__(self, rows: RankRows, layout: ShardLayout, rank: int, options: StepOptions,
                 counts: dict[str, int]) -> None:
        self.rows, self.layout, self.rank, self.options, self.counts = rows, layout, rank, options, counts

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, i: int) -> tuple[Tensor, Tensor]:
        """``(out [B, H, L_rank, Ev], lse float32 [B, H, L_rank])`` of step ``i``."""
        source = (self.rank - i) % self.layout.world
        k_positions = self.layout.positions(source).to(q.device)
        out, lse, calls = self.rows.attend(q, k, v, 0, k_positions, self.options)
        self.counts["run" if calls else "skipped"] += 1  # skipped: nothing kept from this shard, nothing computed
        return out, lse


def _ring(group: dist.ProcessGroup, q: Tensor, k: Tensor, v: Tensor, step: _RingStep) -> Tensor:
    """Ring attention: ``world`` steps, each receiving the previous rank's key/value shard through PyTorch's
    rotater (as ``_templated_ring_attention`` does) while this step computes, merged in float32 by
    ``ring_step.merge``. PyTorch's own merger turns a row's ``-inf`` running log-sum-exp into NaN at the next
    step; a row may keep nothing of its own shard (a calibrated head without diagonal 0: the previous token, or
    columns only), so the merge must leave such rows unchanged. Returns ``out [B, H, L_rank, Ev]`` float32."""
    try:
        from torch.distributed.tensor.experimental._context_parallel._attention import _create_rotater
    except ImportError:  # before the module moved
        from torch.distributed.tensor.experimental._attention import _create_rotater

    world = dist.get_world_size(group)
    rotater = _create_rotater(group, 2)
    shape = (*q.shape[:3], v.shape[-1])
    out, lse = merge([], shape, q.new_empty((), dtype=torch.float32))
    for i in range(world):
        if i > 0:
            received = rotater.next_buffer()
            k, v = received[:k.numel()].view(k.shape), received[k.numel():k.numel() + v.numel()].view(v.shape)
        if i != world - 1:
            rotater.exchange_buffers(torch.cat([k.flatten(), v.flatten()]))
        out, lse = merge([(out, lse), step(q, k, v, i)], shape, out)
    return out


def _all_reduce(value: Tensor, op, group: dist.ProcessGroup) -> Tensor:
    out = value.clone()
    dist.all_reduce(out, op=op, group=group)
    return out


def _gather(local: Tensor, group: dist.ProcessGroup) -> Tensor:
    """The ranks' shards concatenated on the sequence dim (dim 2), in rank order."""
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local.contiguous(), group=group)
    return torch.cat(parts, dim=2)


@contextmanager
def context_parallel(mesh: "DeviceMesh", *, buffers: Sequence[Tensor], buffer_seq_dims: Sequence[int],
                     model: torch.nn.Module, options: DAMConfig | Mapping[str, Any] | None = None,
                     no_restore_buffers: set[Tensor] | None = None,
                     record_rows: bool = False) -> Iterator[RingAttention]:
    """``torch.distributed.tensor.experimental.context_parallel(mesh, buffers=..., buffer_seq_dims=...,
    no_restore_buffers=...)`` with every attention call of ``model`` run as our block-sparse ring under
    ``options`` (``DAMConfig``'s; the ``dam`` backend's defaults when ``None``). Yields the
    :class:`RingAttention` mode (its ``dense_reasons`` and ``steps``; with ``record_rows``, each module's last
    plan rows in ``rows``)."""
    from torch.distributed.tensor.experimental import context_parallel as torch_context_parallel

    config = options if isinstance(options, DAMConfig) else DAMConfig.from_options(options)
    ring = RingAttention(model, config, record_rows)
    with torch_context_parallel(mesh, buffers=list(buffers), buffer_seq_dims=list(buffer_seq_dims),
                                no_restore_buffers=no_restore_buffers), ring:
        yield ring
