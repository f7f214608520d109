"""The Hopper path (warp-specialised Gluon kernel) against the float64 oracle and against the portable Triton
kernel, over the shape matrix of ``test_block_sparse_launch.py`` at its own tile sizes (plan blocks of 128 and 256
keys): head dims, GQA, ragged lengths, fewer queries than keys, padding ranges, empty rows, LSE, non-contiguous
inputs. On a CPU (or a GPU other than Hopper) only the routing tests run: what the path cannot take goes to the
portable kernel, and asking for it anyway names the reason.

Every launch writes into a NaN-poisoned buffer, so an unwritten element fails ``rel_err``.
"""

import pytest
import torch

from dam_compile.plan.block_plan import BlockSparsePlan
from dam_compile.plan.structured_plans import dense_plan, streaming_plan
from dam_compile.ops.attention import sparse_attention
from dam_compile.kernels.block_sparse_launch import triton_block_sparse_attention
from dam_compile.kernels import hopper_launch
from dam_compile.kernels.hopper_launch import hopper_args, hopper_constants, hopper_unsupported, launch_hopper
from dam_compile.kernels.common import CallShape

from dam_testing import rel_err, tolerance
from kernel_inputs import inputs, oracle, random_plan

ON_HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
needs_hopper = pytest.mark.skipif(not ON_HOPPER, reason="needs a Hopper GPU (sm_90)")


def run_path(path, q, k, v, plan, **kwargs):
    """One path on a poisoned output buffer: ``(out, lse)``."""
    out = torch.full_like(q, float("nan"))
    return triton_block_sparse_attention(q, k, v, plan, enable_gqa=True, out=out, return_lse=True, path=path,
                                         **kwargs)


def check_both_paths(q, k, v, plan, **kwargs):
    """Hopper equals the float64 oracle within the dtype's tolerance, and the portable kernel (output and LSE)."""
    out, lse = run_path("hopper", q, k, v, plan, **kwargs)
    expected = oracle(q, k, v, plan, is_causal=kwargs.get("is_causal", False), q_offset=kwargs.get("q_offset", 0),
                      kv_range=kwargs.get("kv_range"), scale=kwargs.get("scale"))
    assert rel_err(out.cpu(), expected) < tolerance(q.dtype)
    portable_out, portable_lse = run_path("portable", q, k, v, plan, **kwargs)
    assert rel_err(out.float(), portable_out.float()) < tolerance(q.dtype)
    finite = torch.isfinite(portable_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert rel_err(lse[finite], portable_lse[finite]) < 1e-3
    return out, lse


def plan_of(kind, q_len, kv_len, heads, causal, block=128, q_offset=0):
    g = torch.Generator(device="cuda").manual_seed(3)
    if kind == "dense":
        return dense_plan(q_len, kv_len, block, causal, "cuda", q_offset=q_offset)
    if kind == "streaming":
        return streaming_plan(q_len, kv_len, block, causal, 1, 2, "cuda")
    return random_plan(q_len, kv_len, block, float(kind), heads, causal, "cuda", g, q_offset=q_offset)


@needs_hopper
class TestHopperPath:
    @pytest.mark.parametrize("causal", [True, False])
    @pytest.mark.parametrize("kind", ["dense", "0.5", "0.1", "streaming"])
    @pytest.mark.parametrize("head_dim", [64, 128])
    def test_plans_and_head_dims(self, kind, causal, head_dim):
        q, k, v = inputs(b=2, h=8, kvh=2, q_len=1024, d=head_dim, device="cuda")
        check_both_paths(q, k, v, plan_of(kind, 1024, 1024, 8, causal), is_causal=causal)

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
    @pytest.mark.parametrize("n", [1000, 1500, 129])
    def test_ragged_lengths(self, n, dtype):
        q, k, v = inputs(h=4, kvh=4, q_len=n, d=128, dtype=dtype, device="cuda")
        check_both_paths(q, k, v, plan_of("0.5", n, n, 4, True), is_causal=True, scale=0.2)

    @pytest.mark.parametrize("group", [1, 4, 8])
    def test_gqa(self, group):
        q, k, v = inputs(h=8, kvh=8 // group, q_len=768, d=128, device="cuda")
        check_both_paths(q, k, v, plan_of("0.5", 768, 768, 8, True), is_causal=True)

    @pytest.mark.parametrize("block", [128, 256])
    def test_plan_block_sizes(self, block):
        q, k, v = inputs(h=4, kvh=2, q_len=1300, d=128, device="cuda")
        check_both_paths(q, k, v, plan_of("0.5", 1300, 1300, 4, True, block=block), is_causal=True)

    @pytest.mark.parametrize("aligned_to_end", [False, True])
    def test_fewer_queries_than_keys(self, aligned_to_end):
        q, k, v = inputs(h=4, kvh=2, q_len=300, kv_len=1100, d=128, device="cuda")
        offset = 800 if aligned_to_end else 0
        check_both_paths(q, k, v, plan_of("0.5", 300, 1100, 4, True, q_offset=offset), is_causal=True,
                         q_offset=offset)

    @pytest.mark.parametrize("side", ["left", "right"])
    def test_padding_ranges(self, side):
        q, k, v = inputs(b=3, h=4, kvh=2, q_len=640, d=128, device="cuda")
        lengths = torch.tensor([640, 333, 70])
        starts = 640 - lengths if side == "left" else torch.zeros_like(lengths)
        kv_range = torch.stack([starts, starts + lengths], 1).to(torch.int32).cuda()
        check_both_paths(q, k, v, plan_of("dense", 640, 640, 4, False), is_causal=False, kv_range=kv_range)

    def test_rows_without_kept_blocks(self):
        q, k, v = inputs(h=4, kvh=2, q_len=512, d=128, device="cuda")
        table = torch.rand(1, 4, 4, 4, device="cuda") < 0.6
        table[:, :, 2] = False
        out, lse = check_both_paths(q, k, v, BlockSparsePlan.from_block_tables(table, 128), is_causal=True)
        assert torch.equal(out[:, :, 256:384], torch.zeros_like(out[:, :, 256:384]))
        assert torch.isneginf(lse[:, :, 256:384]).all()

    def test_non_contiguous_inputs(self):
        b, h, kvh, n, d = 2, 8, 2, 900, 128
        q = torch.randn(b, n, h, d, dtype=torch.bfloat16, device="cuda").transpose(1, 2)
        k = torch.randn(b, n, kvh, d, dtype=torch.bfloat16, device="cuda").transpose(1, 2)
        v = torch.randn(b, n, kvh, d, dtype=torch.bfloat16, device="cuda").transpose(1, 2)
        check_both_paths(q, k, v, plan_of("0.5", n, n, h, True), is_causal=True)

    @pytest.mark.parametrize("kind", ["dense", "0.1"])
    def test_persistent_grid_equals_one_cta_per_tile(self, kind):
        """A CTA per SM taking tiles from the counter computes what a CTA per tile does, bit for bit; the counter
        is back at zero after each launch (the next one starts from item 0)."""
        q, k, v = inputs(b=2, h=8, kvh=2, q_len=1500, d=128, device="cuda")
        plan = plan_of(kind, 1500, 1500, 8, True)
        shape = CallShape(2, 8, 1500, 128, 2, 1500)
        outs = []
        for persistent in (False, True):
            out, lse = torch.full_like(q, float("nan")), torch.full((2, 8, 1500), float("nan"), device="cuda")
            launch_hopper(hopper_args(q, k, v, out, lse, plan, shape, None, 0, None),
                          hopper_constants(q.dtype, plan, shape, None, True, True), q.device, persistent=persistent)
            outs.append((out, lse))
        assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
        assert torch.equal(hopper_args(q, k, v, q, q, plan, shape, None, 0, None)["Sched"].cpu(),
                           torch.zeros(2, dtype=torch.int32))
        assert rel_err(outs[0][0].cpu(), oracle(q, k, v, plan, is_causal=True)) < tolerance(q.dtype)

    @pytest.mark.parametrize("persistent", [True, False])
    def test_work_order_covers_several_bands(self, persistent):
        """Long enough for the work order's bands of query tiles (two whole, one cut short) over two batches and
        two KV heads: every row is written once (the buffer is poisoned), as the portable kernel computes it."""
        from dam_compile.kernels.hopper_block_sparse_kernel import Q_BAND  # Gluon: imported on Hopper only

        b, h, kvh, d = 2, 4, 2, 64
        n = 2 * hopper_launch.CONSUMERS * hopper_launch.BLOCK_M * Q_BAND.value + 300
        q, k, v = inputs(b=b, h=h, kvh=kvh, q_len=n, d=d, device="cuda")
        plan = plan_of("0.05", n, n, h, True)
        shape = CallShape(b, h, n, d, kvh, n)
        out, lse = torch.full_like(q, float("nan")), torch.full((b, h, n), float("nan"), device="cuda")
        launch_hopper(hopper_args(q, k, v, out, lse, plan, shape, None, 0, None),
                      hopper_constants(q.dtype, plan, shape, None, True, True), q.device, persistent=persistent)
        portable_out, portable_lse = run_path("portable", q, k, v, plan, is_causal=True)
        assert rel_err(out.float(), portable_out.float()) < tolerance(q.dtype)
        finite = torch.isfinite(portable_lse)
        assert torch.equal(torch.isfinite(lse), finite) and rel_err(lse[finite], portable_lse[finite]) < 1e-3

    def test_replays_from_a_cuda_graph(self):
        """mode="reduce-overhead" replays the launch: the counter the persistent grid shares must be zero again
        at every replay, or a replay would skip work items (and leave the NaN poison)."""
        q, k, v = inputs(h=8, kvh=2, q_len=2000, d=128, device="cuda")
        plan = plan_of("0.1", 2000, 2000, 8, True)
        expected = triton_block_sparse_attention(q, k, v, plan, is_causal=True, enable_gqa=True)
        out = torch.full_like(q, float("nan"))
        run = lambda: triton_block_sparse_attention(  # noqa: E731 (as the op calls it: no plan check, no sync)
            q, k, v, plan, is_causal=True, enable_gqa=True, out=out, check_plan=False)
        run()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            run()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run()
        for _ in range(3):
            out.fill_(float("nan"))
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(out, expected)

    @pytest.mark.parametrize("variant", ["plain", "lse", "kv_range"])
    def test_repeat_calls_reuse_the_kept_launch_with_their_own_tensors(self, variant):
        """The op's call (no ``out``, no plan check) keeps its compiled launch; a repeat with the same shapes,
        other tensors and another plan of the same layout is served from it (no new entry) and computes exactly
        what the binder's launch does on those tensors: nothing of the first call's tensors is reused."""
        hopper_launch._LAUNCHES.clear()
        options = dict(is_causal=True, enable_gqa=True, return_lse=variant == "lse")
        if variant == "kv_range":
            options["kv_range"] = torch.tensor([[100, 1500], [0, 1200]], dtype=torch.int32, device="cuda")
        results = []
        for seed in (5, 6):
            q, k, v = inputs(b=2, h=8, kvh=2, q_len=1500, d=128, device="cuda")
            plan = random_plan(1500, 1500, 128, 0.3, 8, True, "cuda", torch.Generator(device="cuda").manual_seed(seed))
            torch.full_like(q, float("nan"))  # poison: freed at once, the allocator hands this block out next
            kept = triton_block_sparse_attention(q, k, v, plan, check_plan=False, **options)
            assert len(hopper_launch._LAUNCHES) == 1
            bound = triton_block_sparse_attention(q, k, v, plan, path="hopper", **options)
            if variant == "lse":
                assert torch.equal(kept[1], bound[1])
                kept, bound = kept[0], bound[0]
            assert torch.equal(kept, bound)
            results.append(kept)
            expected = oracle(q, k, v, plan, is_causal=True, kv_range=options.get("kv_range"))
            assert rel_err(kept.cpu(), expected) < tolerance(q.dtype)
        assert not torch.equal(results[0], results[1])

    def test_repeat_op_calls_take_the_kept_launch(self):
        """Through ``torch.ops.dam.sparse_attention`` (as a compiled model calls it) a repeat call goes straight
        to the kept launch, before any plan object is built, and computes what the binder's launch does."""
        hopper_launch._LAUNCHES.clear()
        for seed in (7, 8):
            q, k, v = inputs(b=1, h=8, kvh=2, q_len=2048, d=128, device="cuda")
            plan = random_plan(2048, 2048, 128, 0.2, 8, True, "cuda", torch.Generator(device="cuda").manual_seed(seed))
            torch.full_like(q, float("nan"))  # poison: freed at once, the allocator hands this block out next
            kept = sparse_attention(q, k, v, plan, is_causal=True, enable_gqa=True)
            assert len(hopper_launch._LAUNCHES) == 1
            bound = triton_block_sparse_attention(q, k, v, plan, is_causal=True, enable_gqa=True, path="hopper")
            assert torch.equal(kept, bound)

    def test_default_path_is_hopper_and_equals_sdpa_dense(self):
        q, k, v = inputs(h=8, kvh=2, q_len=4096, d=128, dtype=torch.float16, device="cuda")
        out = triton_block_sparse_attention(q, k, v, dense_plan(4096, 4096, 128, True, "cuda"), is_causal=True,
                                            enable_gqa=True)
        expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        assert rel_err(out.float(), expected.float()) < 5e-3


def test_routing_names_why_the_hopper_path_cannot_run():
    """What the Hopper path cannot take runs on the portable kernel; asking for Hopper names the reason."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v = inputs(h=4, kvh=2, q_len=256, d=96, device=device)
    plan = dense_plan(256, 256, 128, True, device)
    reason = hopper_unsupported(q, k, v, plan, None)
    assert reason is not None
    if ON_HOPPER:
        assert "head dim 96" in reason
    with pytest.raises(ValueError, match="path='hopper' cannot take this call"):
        triton_block_sparse_attention(q, k, v, plan, is_causal=True, enable_gqa=True, path="hopper")
    with pytest.raises(ValueError, match="path must be"):
        triton_block_sparse_attention(q, k, v, plan, is_causal=True, enable_gqa=True, path="gluon")


@needs_hopper
@pytest.mark.parametrize("feature", ["mask", "pattern", "block_64", "float32"])
def test_features_the_hopper_path_leaves_to_the_portable_kernel(feature):
    q, k, v = inputs(h=4, kvh=2, q_len=256, d=128, device="cuda",
                     dtype=torch.float32 if feature == "float32" else torch.bfloat16)
    plan = dense_plan(256, 256, 64 if feature == "block_64" else 128, True, "cuda")
    mask = torch.rand(1, 1, 256, 256, device="cuda") < 0.8 if feature == "mask" else None
    if feature == "pattern":
        columns = torch.zeros(4, 1, dtype=torch.int32, device="cuda")
        plan = plan.with_token_pattern(torch.zeros(4, 1, dtype=torch.int32, device="cuda"), columns)
    assert hopper_unsupported(q, k, v, plan, mask) is not None
    out = triton_block_sparse_attention(q, k, v, plan, is_causal=True, enable_gqa=True, attn_mask=mask)
    expected = triton_block_sparse_attention(q, k, v, plan, is_causal=True, enable_gqa=True, attn_mask=mask,
                                             path="portable")
    assert torch.equal(out, expected)
