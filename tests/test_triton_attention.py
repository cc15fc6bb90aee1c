"""Triton ragged paged attention vs the float64 PyTorch reference.

CPU: the Triton interpreter, fp16 and fp32, small awkward shapes (tens of tokens, few heads).
GPU (`gpu` marker): fp16/bf16 Llama shapes, every head dim and group size, long contexts,
int64 addressing in a 131072+-block cache, CUDA-graph replay and torch.compile.
Tolerance (tests/tolerance.py): err(kernel vs float64) <= 2 x err(PyTorch in the kernel's
dtype vs float64) + a few-ulp floor.
"""
import json

import pytest
import torch

import kernels
from kernels import reference
from tests.attention_cases import attn_args, cast, check_paged_attention, make_batch
from tests.tolerance import EPS, FACTOR, assert_close, errors

# A plain import: importorskip would turn a broken kernels/triton_attention.py into a skipped
# (green) module instead of a failure.
from kernels import triton_attention as ta  # noqa: E402
# The interpreter converts loop bounds loaded from memory with a numpy call numpy 2 deprecates
# (triton/runtime/interpreter.py): thousands of identical warnings, none ours.
# `interpreter`: on a GPU machine conftest runs this module's CPU tests in a TRITON_INTERPRET=1 child.
pytestmark = [pytest.mark.interpreter,
              pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")]

CPU_DTYPES = [torch.float16, torch.float32]


def _check(q_lens, kv_lens, **kw):
    """The Triton kernel through kernels.paged_attention, asserted against the reference."""
    return check_paged_attention("triton", q_lens, kv_lens, **kw)


# --------------------------------------------------------------------------- batch shapes
@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_mixed_batch_one_launch(dtype):
    # prefill chunk with cached context (q 40 > 16: the prefill tile class), decodes, and
    # speculative-verification queries of 2..8 tokens, in one call
    _check([40, 1, 3, 1, 8, 2, 1], [97, 33, 17, 1, 25, 2, 64], hq=8, hkv=2, d=80, dtype=dtype)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_short_queries_decode_class(dtype):
    # max q_len <= 16: the decode tile class, several q blocks per sequence (G=5: 3 tokens/block)
    _check([1, 7, 2, 16, 5], [40, 7, 50, 33, 5], hq=10, hkv=2, d=64, dtype=dtype)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_all_decode_many_sequences(dtype):
    # 23 sequences: the binary search over cu_seqlens_q must place every q block
    kv = [1 + (7 * i) % 45 for i in range(23)]
    _check([1] * 23, kv, hq=4, hkv=1, d=64, dtype=dtype)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_all_prefill_no_context(dtype):
    _check([33, 17, 1, 50], [33, 17, 1, 50], hq=4, hkv=4, d=96, dtype=dtype)


@pytest.mark.parametrize("window", [None, 200])
def test_deferred_pv_never_reads_past_a_sequence(window):
    """The prefill tile's unmasked body defers P.V by one tile (_kv_tiles_deferred): the
    first deferred P.V adds zeros without reading a page and the last is added before the
    masked loops (with a window: body first, then the window edge). Contexts of 263 and 130
    keys give each q block 2-4 body tiles. Every cache slot outside the sequences (partial
    last pages, unused blocks) holds NaN, so any unmasked read of one poisons the output
    (0 * NaN = NaN)."""
    b = make_batch([37, 20, 1], [300, 150, 40], num_q_heads=8, num_kv_heads=2, head_dim=64,
                   block_size=16, dtype=torch.float64)
    # relabel so that block 0 (where a zero offset points) is one no sequence uses
    nblk = [-(-n // 16) for n in b["seq_lens"].tolist()]
    used = {int(b["block_table"][i, j]) for i, n in enumerate(nblk) for j in range(n)}
    u = min(set(range(b["k_cache"].shape[0])) - used)
    t = b["block_table"]
    b["block_table"] = torch.where(t == 0, u, torch.where(t == u, 0, t)).to(torch.int32)
    for key in ("k_cache", "v_cache"):
        b[key][[0, u]] = b[key][[u, 0]]
    valid = torch.zeros(b["k_cache"].shape[0] * 16, dtype=torch.bool)
    for i, n in enumerate(b["seq_lens"].tolist()):
        p = torch.arange(n)
        valid[b["block_table"][i, p // 16].long() * 16 + p % 16] = True
    for key in ("k_cache", "v_cache"):
        b[key].view(-1, 2, 64)[~valid] = float("nan")
    plan = ta._plan(58, 3, 2, 64, torch.float16, 4, 37, 300, None, torch.device("cpu"))
    assert ta._defer_pv(plan, torch.float16, 90)            # the path under test runs
    _check(None, None, batch=b, dtype=torch.float16, window=window,
           name=f"NaN outside the sequences, window {window}")


def test_deferred_pv_only_on_wgmma_prefill_tiles():
    """P.V is deferred where the search-class dots are wgmma (sm_90, half precision, >= 64
    rows per warpgroup), never for decode-only launches, fp32 (FMA dots), sm_80, a softcap
    or fp8 pages (kernels/triton_attention.py _defer_pv says why)."""
    cpu = torch.device("cpu")

    def defer(dtype, max_q, arch=90, D=128, G=4, B=2):
        return ta._defer_pv(ta._plan(4096, B, 8, D, dtype, G, max_q, 4096, None, cpu),
                            dtype, arch)
    assert defer(torch.bfloat16, 4096) and defer(torch.float16, 17)
    assert not defer(torch.bfloat16, 1) and not defer(torch.bfloat16, 16)   # decode-only
    assert not defer(torch.float32, 4096)
    assert not defer(torch.bfloat16, 4096, arch=80)
    assert not defer(torch.bfloat16, 4096, D=256)           # 64x32 / 8 warps: 32 rows per WG
    plan = ta._plan(4096, 2, 8, 128, torch.bfloat16, 4, 4096, 4096, None, cpu)
    assert not ta._defer_pv(plan, torch.bfloat16, 90, softcap=True)
    assert not ta._defer_pv(plan, torch.bfloat16, 90, kv_fp8=True)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_kv_len_one(dtype):
    _check([1, 1], [1, 1], hq=4, hkv=1, d=64, dtype=dtype)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_empty_sequences_and_keyless_rows(dtype):
    # q_len 0 with KV, q_len 0 without KV, and (by editing seq_lens) a sequence whose new
    # tokens see no key at all and one where only the last new token sees a key
    b = make_batch([0, 3, 0, 2, 1, 4], [9, 12, 0, 5, 1, 6], num_q_heads=4, num_kv_heads=2,
                   head_dim=64, dtype=torch.float64)
    b["seq_lens"][3] = 0
    b["seq_lens"][5] = 1
    got, _, _ = _check(None, None, dtype=dtype, batch=b, name="empty/keyless")
    cu = b["cu_seqlens_q"].tolist()
    assert got[cu[3]:cu[4]].abs().max() == 0                 # seq_len 0: zeros
    assert got[cu[5]:cu[5] + 3].abs().max() == 0             # rows before key 0 is visible
    assert got[cu[5] + 3].abs().max() > 0


def test_no_new_tokens_and_wide_groups():
    got, _, _ = _check([0, 0], [5, 0], name="T=0")                      # nothing to launch
    assert got.shape == (0, 4, 64)
    _check([3, 1, 2], [20, 9, 2], hq=16, hkv=1, d=64, name="G=16")      # one token per q block
    _check([2, 1], [30, 7], hq=32, hkv=1, d=64, name="G=32")            # tile grows past 16 rows


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("hq", [4, 16])
def test_mixed_launch_two_tile_classes(hq, splits):
    # q_len > 16 rows take the prefill tile (found by search), q_len <= 16 the decode tile
    # (found by index; 16 rows, so at G=4 a 16-token query loops over 4 q blocks and at
    # G=16 over 16), in one launch; 16/17 is the boundary. With splits only the decode
    # class splits: prefill rows are written directly and the merge must leave them alone
    # (NaN-poisoned out catches a row written by nobody or merged from garbage). Two grid
    # bounds: T // 17 < B (slot starts cu // Q + cu // 17) and T // 17 >= B (cu // Q + b).
    cases = [([16, 17, 1, 0, 40, 3, 1], [30, 17, 50, 5, 100, 3, 1]), ([60, 1], [70, 33])]
    for q_lens, kv_lens in cases:
        b = make_batch(q_lens, kv_lens, num_q_heads=hq, num_kv_heads=1, head_dim=64,
                       dtype=torch.float64)
        plan = ta._plan(sum(q_lens), len(q_lens), 1, 64, torch.float16, hq, max(q_lens),
                        max(kv_lens), splits, torch.device("cpu"))
        assert plan.mixed and plan.block_m_d < plan.cfg.block_m
        assert (plan.seq_div > 0) == (sum(q_lens) // 17 < len(q_lens))
        out = torch.full(b["q"].shape, float("nan"), dtype=torch.float16)
        _check(None, None, batch=b, out=out, splits=splits, name=f"mixed G={hq} splits={splits}")
        assert not out.isnan().any()


def test_mixed_launch_single_class_fallback(monkeypatch):
    # TWO_CLASSES=False (kept for A/B timing on a GPU): the same batch in one prefill-tile class
    monkeypatch.setattr(ta, "TWO_CLASSES", False)
    assert not ta._plan(24, 3, 1, 64, torch.float16, 4, 20, 50, 2, torch.device("cpu")).mixed
    _check([20, 1, 3], [50, 9, 3], hq=4, hkv=1, splits=2, name="single class")


# --------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("group", [1, 4, 5, 7])
@pytest.mark.parametrize("d", [64, 80, 96])
def test_group_sizes_and_head_dims(group, d):
    dtype = torch.float16 if (group + d) % 2 else torch.float32   # both dtypes across the grid
    _check([20, 1, 3, 1], [45, 30, 3, 17], hq=2 * group, hkv=2, d=d, dtype=dtype)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_head_dim_128(dtype):
    _check([18, 1, 2], [40, 19, 6], hq=8, hkv=2, d=128, dtype=dtype)


@pytest.mark.parametrize("bs", [16, 32, 48, 64, 128, 256])
def test_block_sizes(bs):
    # block_size is a constexpr: 16/32 (several pages per 64-key tile), 64/128/256 (one
    # block id per tile), 48 (neither: per-key page ids by constexpr division); decode-only
    # (direct class) and mixed launches
    _check([20, 1, 4, 1], [300, 97, 260, 17], hq=4, hkv=1, d=64, bs=bs)
    _check([1, 1, 3], [300, 97, 129], hq=4, hkv=1, d=64, bs=bs, splits=2)


# --------------------------------------------------------------------------- options
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("window", [1, 7, 70])
def test_sliding_window(dtype, window):
    _check([30, 1, 5, 1], [150, 97, 40, 3], hq=4, hkv=2, d=64, dtype=dtype, window=window)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_softcap_and_scale(dtype):
    _check([20, 1, 4], [60, 30, 9], hq=4, hkv=2, d=64, dtype=dtype, softcap=5.0, scale=0.3)
    _check([20, 1, 4], [60, 30, 9], hq=4, hkv=2, d=64, dtype=dtype, softcap=30.0, window=9)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_split_count_invariance(dtype):
    # 13 splits over sequences of 1..9 tiles: many splits are empty and must weigh nothing
    b = make_batch([1, 3, 1, 12], [140, 70, 2, 90], num_q_heads=4, num_kv_heads=2,
                   head_dim=64, dtype=torch.float64)
    outs = {s: _check(None, None, dtype=dtype, batch=b, splits=s, name=f"splits={s}")
            for s in (1, 2, 5, 13)}
    _, ref, lowp = outs[1]
    tol = FACTOR * errors(lowp, ref)[0] + 4 * EPS[dtype] * ref.abs().max().item()
    for s in (2, 5, 13):
        diff = (outs[s][0].double() - outs[1][0].double()).abs().max().item()
        print(f"splits {s} vs 1: max diff {diff:.3e} (tol {tol:.3e})")
        assert diff <= tol


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_out_given_strided_inputs(dtype):
    # q as a slice of a fused QKV output and out as a strided view: only the last dim is dense
    b = make_batch([6, 1, 2], [20, 9, 2], num_q_heads=4, num_kv_heads=2, head_dim=64,
                   dtype=torch.float64)
    qkv = torch.randn(b["q"].shape[0], 8, 64, dtype=torch.float64)
    qkv[:, :4] = b["q"]
    b["q"] = qkv[:, :4]
    backing = torch.zeros(b["q"].shape[0], 4, 128, dtype=dtype)
    out = backing[..., 32:96]
    got, _, _ = _check(None, None, dtype=dtype, batch=b, out=out, name="out= strided")
    assert got.data_ptr() == out.data_ptr()
    assert backing[..., :32].abs().max() == 0 and backing[..., 96:].abs().max() == 0


@pytest.mark.parametrize("splits", [1, 3])
def test_poisoned_output_fully_written(splits):
    b = make_batch([5, 0, 1, 2, 1], [20, 4, 1, 30, 1], num_q_heads=6, num_kv_heads=2,
                   head_dim=80, dtype=torch.float64)
    out = torch.full(b["q"].shape, float("nan"), dtype=torch.float16)
    _check(None, None, batch=b, out=out, splits=splits, name=f"poisoned splits={splits}")
    assert not out.isnan().any()


def test_validation_errors_name_the_argument():
    b = cast(make_batch([2, 1], [5, 3], num_q_heads=4, num_kv_heads=2, head_dim=64), torch.float16)
    args = dict(zip(("q", "k_cache", "v_cache", "block_table", "cu_seqlens_q", "seq_lens"),
                    attn_args(b)))

    def call(**over):
        kw = {**args, **over}
        return kernels.paged_attention(*[kw.pop(k) for k in list(args)], backend="triton", **kw)

    bad = {
        "block_table": dict(block_table=args["block_table"].long()),
        "cu_seqlens_q": dict(cu_seqlens_q=args["cu_seqlens_q"][:-1]),
        "k_cache": dict(k_cache=args["k_cache"].float()),
        "v_cache": dict(v_cache=args["v_cache"][:, :, :1]),
        "q": dict(q=args["q"][:, :3]),
        "out": dict(out=torch.empty(4, 4, 64, dtype=torch.float16)),
        "num_kv_splits": dict(num_kv_splits=0),
        "sliding_window": dict(sliding_window=0),
        "softcap": dict(softcap=-1.0),
        "max_seqlen_k": dict(max_seqlen_k=-1),
        "seq_lens": dict(seq_lens=args["seq_lens"].long()),
    }
    for name, over in bad.items():
        with pytest.raises(ValueError, match=f"^{name}:"):
            call(**over)
    with pytest.raises(ValueError, match="^k_cache:"):       # block size not a multiple of 16
        kc = torch.zeros(4, 24, 2, 64, dtype=torch.float16)
        call(k_cache=kc, v_cache=kc.clone())


# --------------------------------------------------------------------------- host logic
def test_tile_config_holds_a_group_and_splits_only_when_idle():
    for group in (1, 4, 5, 7, 8, 16, 32):
        for mq in (1, 4, 16, 17, 4096):
            cfg = ta._config(128, torch.bfloat16, group, mq)
            assert cfg.block_m >= max(16, group) and cfg.block_m % 16 == 0
    assert ta._config(128, torch.bfloat16, 4, 1).block_m == 16          # decode: small tiles
    assert ta._config(128, torch.bfloat16, 4, 4096).block_m == 128      # prefill: FA2 tiles
    assert ta._config(128, torch.bfloat16, 4, 4096, 80) == ta._Config(64, 64, 8, 3)  # A100
    # Llama-3-8B mixed step (2048-token chunk + 256 decodes): decodes get a 16-row tile (one
    # program per sequence and KV head), the chunk 128-row tiles; few spare programs
    p = ta._plan(2048 + 256, 257, 8, 128, torch.bfloat16, 4, 2048, 2048, None,
                 torch.device("cpu"))
    assert p.mixed and (p.cfg.block_m, p.block_m_d, p.q_per_block_d) == (128, 16, 4)
    assert p.num_search == 2304 // 32 + 2304 // 17 and p.num_programs == p.num_search + 257
    assert not ta._plan(40, 3, 8, 128, torch.float32, 4, 40, 99, 1, torch.device("cpu")).mixed
    assert not ta._plan(40, 3, 8, 128, torch.float16, 4, 16, 99, 1, torch.device("cpu")).mixed
    cpu = torch.device("cpu")
    assert ta._num_splits(64, 300, cpu) == 1                            # short context
    assert ta._num_splits(8192 // 32 * 8, 65536, cpu) == 1              # prefill: busy enough
    assert ta._num_splits(1, 65536, cpu) == 4 * ta._sm_count(cpu)
    assert ta._num_splits(1, 10 ** 7, cpu) <= ta.MAX_SPLITS
    bf16 = torch.bfloat16
    # a 64-token chunk beside 2 decodes at 64k context: the decodes split (the chunk's
    # programs do not count: they finish long before a 64k-key decode)
    assert ta._plan(66, 3, 1, 128, bf16, 4, 64, 65536, None, cpu).direct_splits > 1
    assert ta._plan(66, 3, 1, 128, bf16, 4, 64, 300, None, cpu).direct_splits == 1


def test_decode_only_launch_indexes_sequences_directly(monkeypatch):
    # decode-only launches: B x splits programs per KV head, no search class compiled in
    cpu = torch.device("cpu")
    for q_lens, G in (([1] * 23, 4), ([1, 7, 2, 16, 5], 5), ([3, 1, 2], 16)):
        T, B = sum(q_lens), len(q_lens)
        for splits in (1, 3):
            p = ta._plan(T, B, 2, 64, torch.float16, G, max(q_lens), 2000, splits, cpu)
            assert not p.search and p.direct and p.num_search == 0
            assert p.num_programs == B * splits and p.direct_splits == splits
            # one q block per sequence unless the longest query needs more (then a loop)
            assert p.q_loop == (max(q_lens) > p.q_per_block_d)
    grids = []
    real = ta._paged_attn_kernel

    class Rec:
        fn = real

        def __getitem__(self, grid):
            def launch(*args, **kw):
                grids.append((grid, kw["SEARCH"], kw["Q_LOOP"]))
                return real[grid](*args, **kw)
            return launch
    monkeypatch.setattr(ta, "_paged_attn_kernel", Rec())
    _check([1, 0, 1, 1], [40, 3, 1, 17], hq=8, hkv=2, d=64, name="direct decode")
    assert grids == [((4 * 2,), False, False)], grids


def test_split_count_from_resident_ctas(monkeypatch):
    # one wave: SMs x CTAs resident per SM (registers, warps, shared memory), not more
    cpu = torch.device("cpu")
    monkeypatch.setattr(ta, "_sm_count", lambda d: 132)
    dec = ta._config(128, torch.bfloat16, 4, 1)
    res = ta._resident_ctas(dec, 128, 2, 90)
    assert res == min(65536 // (ta._DECODE_REGS * 32 * dec.num_warps),
                      228 * 1024 // ((dec.num_stages - 1) * 2 * dec.block_n * 128 * 2))
    p = ta._plan(8, 8, 8, 128, torch.bfloat16, 4, 1, 32768, None, cpu)     # 64 programs
    assert p.direct_splits == -(-132 * res // 64)
    assert ta._plan(64, 64, 8, 128, torch.bfloat16, 4, 1, 2048, None, cpu).direct_splits == \
        (1 if 512 >= 132 * res else min(-(-132 * res // 512), 4))
    assert ta._plan(1, 1, 8, 128, torch.bfloat16, 4, 1, 700, None, cpu).direct_splits == 1


def test_one_split_is_one_launch(monkeypatch):
    # one split writes the output directly: no workspace, no merge kernel
    class NoLaunch:
        def __getitem__(self, grid):
            raise AssertionError("merge kernel launched for a single split")
    monkeypatch.setattr(ta, "_merge_kernel", NoLaunch())
    _check([3, 1], [40, 20], splits=1, name="single launch")
    with pytest.raises(AssertionError, match="merge kernel launched"):
        _check([3, 1], [40, 20], splits=2)


# Compiled-code facts of these kernels (spills, wgmma, copies in flight in every K/V loop)
# are asserted by tests/test_kernel_report.py on the kernel report's sm_90a/sm_80 compiles.


def test_custom_op_and_compile_cpu():
    # the registered op passes torch's schema/fake checks, and a function calling the
    # public function compiles with fullgraph=True (aot_eager: no GPU codegen needed here)
    b = make_batch([5, 1, 0, 3], [37, 20, 9, 3], num_q_heads=8, num_kv_heads=2, head_dim=64)
    out = torch.empty_like(b["q"])
    torch.library.opcheck(ta._paged_attention_op,
                          (*attn_args(b), out, 0.125, 5, 37, None, None, None))

    def f(q, kc, vc, bt, cu, sl):
        return ta.paged_attention(q, kc, vc, bt, cu, sl, scale=0.125, max_seqlen_q=5,
                                  max_seqlen_k=37) * 2

    got = torch.compile(f, fullgraph=True, backend="aot_eager")(*attn_args(b))
    ref = reference.paged_attention(*attn_args(cast(b, torch.float64)), scale=0.125)
    lowp = reference.paged_attention(*attn_args(b), scale=0.125)
    assert_close(got / 2, ref, lowp, name="compiled")



# --------------------------------------------------------------------------- workspace
def _alloc_log(monkeypatch):
    """(shape, dtype) of every torch.empty the attention module itself calls."""
    log, real = [], torch.empty

    def empty(*shape, **kw):
        import sys
        if sys._getframe(1).f_globals.get("__name__") == ta.__name__:
            log.append((tuple(shape[0]) if len(shape) == 1 and not isinstance(shape[0], int)
                        else shape, kw.get("dtype")))
        return real(*shape, **kw)
    monkeypatch.setattr(torch, "empty", empty)
    return log


def test_workspace_only_for_rows_that_split(monkeypatch):
    cpu = torch.device("cpu")
    log = _alloc_log(monkeypatch)
    # a lone prefill on a long context (it used to split every q block) and prefills of
    # several prompts: nothing but the output, which is given
    for q_lens, kv_lens in (([40], [1500]), ([20, 30, 17], [20, 30, 17])):
        b = make_batch(q_lens, kv_lens, num_q_heads=4, num_kv_heads=1, head_dim=64,
                       dtype=torch.float64)
        out = torch.empty(b["q"].shape, dtype=torch.float16)
        _check(None, None, batch=b, out=out, name=f"no decode {q_lens}")
        assert log == [], log
    # a chunk beside a 1100-key decode: the decode splits, workspace 16 rows per sequence
    # (not per token), fp32 partial outputs + lse
    b = make_batch([40, 1], [60, 1100], num_q_heads=4, num_kv_heads=1, head_dim=64,
                   dtype=torch.float64)
    _check(None, None, batch=b, out=torch.empty(41, 4, 64, dtype=torch.float16), name="mixed")
    plan = ta._plan(41, 2, 1, 64, torch.float16, 4, 40, 1100, None, cpu)
    assert plan.direct_splits == 2 and plan.ws_rows == 32
    assert log == [((2, 32, 4, 64), torch.float32), ((2, 32, 4), torch.float32)], log
    log.clear()
    # decode-only: one row per token
    b = make_batch([1, 1, 1], [1100, 5, 700], num_q_heads=4, num_kv_heads=1, head_dim=64,
                   dtype=torch.float64)
    _check(None, None, batch=b, out=torch.empty(3, 4, 64, dtype=torch.float16), name="decode")
    assert [s for s, _ in log] == [(2, 3, 4, 64), (2, 3, 4)], log
    # the cap: fewer splits (here 3 -> 2, then none) rather than more memory
    assert ta._plan(3, 3, 1, 64, torch.float16, 4, 1, 2000, 3, cpu).direct_splits == 3
    monkeypatch.setattr(ta, "WORKSPACE_CAP", 2 * 3 * 4 * 65 * 4)
    assert ta._plan(3, 3, 1, 64, torch.float16, 4, 1, 2000, 3, cpu).direct_splits == 2
    monkeypatch.setattr(ta, "WORKSPACE_CAP", 3 * 4 * 65 * 4)
    assert ta._plan(3, 3, 1, 64, torch.float16, 4, 1, 2000, 3, cpu).ws_rows == 0


def test_workspace_bound_llama3_8b_shapes():
    # issue 12's cases on an H100 (132 SMs), Llama-3-8B heads: a 16k prefill allocated
    # 8.3 GB and a 2048-token chunk at 32k context beside one decode 1.06 GB
    cpu = torch.device("cpu")
    ws = lambda T, B, mq, mk: ta.workspace_bytes(T, B, 32, 8, 128, torch.bfloat16, mq, mk, cpu)  # noqa: E731
    saved = ta._sm_count
    try:
        ta._sm_count = lambda d: 132
        assert ws(16384, 1, 16384, 16384) == 0
        assert 0 < ws(2049, 2, 2048, 32768) <= 2 * 16 * 32 * 129 * 4 * ta.MAX_SPLITS   # < 17 MB
        for B in (1, 8, 64, 256):                                        # decode-only
            assert ws(B, B, 1, 32768) <= ta.WORKSPACE_CAP
    finally:
        ta._sm_count = saved


def test_profiler_reserves_the_worst_steps_workspace(monkeypatch):
    monkeypatch.setattr(ta, "_sm_count", lambda d: 132)          # plan for an H100
    from model.config import ModelConfig
    from ragged.config import EngineConfig
    from ragged.profiling import attention_workspace_bytes

    class M:                                          # what the profiler reads of a model
        config = ModelConfig(num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                             max_position_embeddings=32768)
        backend, dtype = "triton", torch.float16
    cfg = EngineConfig(max_num_seqs=64, max_model_len=32768)
    got = attention_workspace_bytes(M(), cfg, 2048, "cpu")
    want = max(ta.workspace_bytes(B, B, 32, 8, 128, torch.float16, 1, 32768, torch.device("cpu"))
               for B in range(1, 65))
    print(f"worst workspace {got / 2**20:.1f} MiB (decode-only scan {want / 2**20:.1f} MiB)")
    mixed = ta.workspace_bytes(2049, 2, 32, 8, 128, torch.float16, 2048, 32768, torch.device("cpu"))
    assert got >= max(want, mixed) and want > 0 and mixed > 0 and got <= ta.WORKSPACE_CAP
    M.backend = "torch"
    assert attention_workspace_bytes(M(), cfg, 2048, "cpu") == 0


# --------------------------------------------------------------------------- variants
def _signature(fn, args, kw):
    """What Triton keys a compile on: constexprs, the specialisation of every other argument
    (ints: == 1, % 16; pointers: dtype and 16-byte alignment; both skipped where the kernel
    says do_not_specialize / _on_alignment), num_warps and num_stages."""
    import inspect
    params = list(inspect.signature(fn.fn).parameters.values())
    names = [p.name for p in params]
    vals = dict(zip(names, args), **kw)
    dns = set(fn.kwargs.get("do_not_specialize") or ())
    dna = set(fn.kwargs.get("do_not_specialize_on_alignment") or ())
    sig = []
    for p in params:
        v = vals[p.name]
        if "constexpr" in str(p.annotation):
            sig.append((p.name, v))
        elif isinstance(v, torch.Tensor):
            sig.append((p.name, v.dtype, None if p.name in dna else v.data_ptr() % 16 == 0))
        elif isinstance(v, bool) or isinstance(v, float):
            sig.append((p.name, type(v).__name__))
        elif isinstance(v, int):
            sig.append((p.name, "int") if p.name in dns else (p.name, v == 1, v % 16 == 0))
    return (fn.fn.__name__, tuple(sig), kw.get("num_warps"), kw.get("num_stages"))


def _record_signatures(monkeypatch, call):
    sigs = set()
    real = {n: getattr(ta, n) for n in ("_paged_attn_kernel", "_merge_kernel")}

    class Rec:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            def launch(*args, **kw):
                sigs.add(_signature(self.fn, args, kw))
            return launch
    for n, f in real.items():
        monkeypatch.setattr(ta, n, Rec(f))
    try:
        call()
    finally:
        for n, f in real.items():
            monkeypatch.setattr(ta, n, f)
    return sigs


@pytest.mark.parametrize("window,softcap,bs,max_q,fp8", [(None, None, 16, 1, None),
                                                         (64, 30.0, 32, 4, None),
                                                         (None, None, 16, 1, "per_slot")])
def test_warmup_covers_every_variant_of_mixed_steps(monkeypatch, window, softcap, bs, max_q,
                                                    fp8):
    # a run's steps (decode-only at many batch sizes and contexts, split and not; spec
    # decodes up to max_q tokens; lone prefills; chunks beside decodes), with metadata as the
    # batch builder makes it (views into one packed buffer: odd offsets and table widths)
    # launch only variants the warm-up compiled: no JIT compile inside a timed step
    hq, hkv, d = 8, 2, 64
    dt = torch.float16
    warm = _record_signatures(monkeypatch, lambda: ta.warmup(
        hq, hkv, d, dt, bs, "cpu", sliding_window=window, softcap=softcap, max_query_len=max_q,
        kv_cache_dtype=torch.float8_e4m3fn if fp8 else None))
    steps = [([1] * 3, [5, 17, 1200]), ([1, 1], [5, 9]), ([1] * 64, [33] * 64), ([1], [5000]), ([2000], [2000]),
             ([40, 1, 1], [3000, 9, 2500]), ([17] + [1] * 30, [17] + [900] * 30),
             ([max_q, 1], [60, 2000]), ([max_q] * 5, [70] * 5), ([300, 200], [300, 9000])]
    cache = torch.zeros(700, bs, hkv, d, dtype=torch.float8_e4m3fn if fp8 else dt)
    scales = dict(k_scale=torch.ones(700, bs, hkv), v_scale=torch.ones(700, bs, hkv)) if fp8 else {}

    def run():
        for i, (q_lens, kv_lens) in enumerate(steps):
            T, B = sum(q_lens), len(q_lens)
            need = max(-(-k // bs) for k in kv_lens)       # widths 1, 16k and others
            width = need if i % 2 else -(-need // 16) * 16
            packed = torch.zeros(8 + 2 * B + 1 + B * width + i, dtype=torch.int32)
            off = 1 + i                                        # misaligned views, as packed
            cu = packed[off:off + B + 1]
            cu[1:] = torch.cumsum(torch.tensor(q_lens), 0)
            sl = packed[off + B + 1:off + 2 * B + 1]
            sl[:] = torch.tensor(kv_lens)
            bt = packed[off + 2 * B + 1:off + 2 * B + 1 + B * width].view(B, width)
            q = torch.zeros(T, hq, d, dtype=dt)
            ta.paged_attention(q, cache, cache, bt, cu, sl, scale=0.1, max_seqlen_q=max(q_lens),
                               max_seqlen_k=max(kv_lens), sliding_window=window, softcap=softcap,
                               **scales)
    used = _record_signatures(monkeypatch, run)
    flags = lambda s: {e[0]: e[1] for e in s[1] if len(e) == 2}       # noqa: E731
    kinds = {(s[0], flags(s).get("SPLIT"), flags(s).get("SEARCH")) for s in used}
    print(f"{len(used)} variants used, {len(warm)} warmed: {sorted(map(str, kinds))}")
    assert len(used) >= 4                    # split / unsplit decode, mixed, merge at least
    missing = used - warm
    for m in missing:                        # the closest warmed variant, field by field
        near = max((w for w in warm if w[0] == m[0]), key=lambda w: sum(
            a == b for a, b in zip(w[1], m[1])))
        print("not warmed:", [(a, b) for a, b in zip(m[1], near[1]) if a != b], m[2:], near[2:])
    assert not missing


# --------------------------------------------------------------------------- GPU
gpu = pytest.mark.gpu
GPU_DTYPES = [torch.float16, torch.bfloat16]
LLAMA3_8B = dict(hq=32, hkv=8, d=128)


@gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("bs", [16, 64, 256])
def test_gpu_llama3_8b_mixed_batch(dtype, bs):
    # prefill chunk on a long context, a fresh 513-token prompt, 12 decodes, two spec queries
    q_lens = [300, 513] + [1] * 12 + [4, 7]
    kv_lens = [1300, 513] + [100 + 397 * i for i in range(12)] + [2000, 777]
    _check(q_lens, kv_lens, bs=bs, dtype=dtype, device="cuda", **LLAMA3_8B)


@gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("group", [1, 4, 5, 7, 8, 16])
@pytest.mark.parametrize("d", [64, 80, 96, 128, 256])
def test_gpu_head_dims_and_groups(d, group, dtype):
    _check([77, 1, 1, 9, 200, 3], [1025, 2048, 17, 500, 200, 3], hq=2 * group, hkv=2, d=d,
           dtype=dtype, device="cuda")
    _check([1] * 5 + [16], [4097, 1, 33, 600, 1999, 16], hq=2 * group, hkv=2, d=d,   # decode class
           dtype=dtype, device="cuda")


@gpu
@pytest.mark.parametrize("d", [80, 128, 256])
def test_gpu_fp32_ieee(d):
    _check([40, 1, 5], [700, 1500, 5], hq=8, hkv=2, d=d, dtype=torch.float32, device="cuda")


@gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_gpu_window_and_softcap(dtype):
    q, kv = [257, 1, 1, 12], [3000, 4096, 100, 700]
    _check(q, kv, dtype=dtype, device="cuda", window=1000, **LLAMA3_8B)
    _check(q, kv, dtype=dtype, device="cuda", softcap=50.0, hq=16, hkv=8, d=256)
    _check(q, kv, dtype=dtype, device="cuda", softcap=30.0, window=33, **LLAMA3_8B)


@gpu
@pytest.mark.parametrize("chunk", [0, 40])
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_gpu_long_context_split_invariance(dtype, chunk):
    # chunk=40: a mixed launch (prefill tile unsplit, decode tile split, merge skips the
    # chunk's rows); chunk=0: decode-only, every q block split
    q_lens, kv_lens = [1, 1, 5, 16], [65536 + 13, 30000, 40001, 9000]
    if chunk:
        q_lens, kv_lens = q_lens + [chunk], kv_lens + [20000]
    b = make_batch(q_lens, kv_lens, num_q_heads=32,
                   num_kv_heads=8, head_dim=128, dtype=torch.float64, device="cuda")
    outs = {s: _check(None, None, dtype=dtype, batch=b, splits=s, name=f"splits={s}")
            for s in (None, 1, 7, 64)}
    _, ref, lowp = outs[1]
    tol = FACTOR * errors(lowp, ref)[0] + 4 * EPS[dtype] * ref.abs().max().item()
    for s in (None, 7, 64):
        diff = (outs[s][0].double() - outs[1][0].double()).abs().max().item()
        print(f"splits {s} vs 1: max diff {diff:.3e} (tol {tol:.3e})")
        assert diff <= tol


@gpu
@pytest.mark.parametrize("splits", [1, 4])
def test_gpu_int64_addressing_high_block_ids(splits):
    # 131072+ blocks of 16 x 8 x 128: block id x block stride passes 2^31 elements
    dtype, bs = torch.float16, 16
    small = make_batch([3, 1, 40], [700, 1500, 40], num_q_heads=16, num_kv_heads=8,
                       head_dim=128, block_size=bs, dtype=torch.float64, device="cuda")
    nb, offset = small["k_cache"].shape[0], 131072 + 7
    big = {}
    for name in ("k_cache", "v_cache"):
        big[name] = torch.zeros(offset + nb, bs, 8, 128, dtype=dtype, device="cuda")
        big[name][offset:] = small[name].to(dtype)
    table = small["block_table"] + offset
    got = kernels.paged_attention(
        small["q"].to(dtype), big["k_cache"], big["v_cache"], table, small["cu_seqlens_q"],
        small["seq_lens"], max_seqlen_q=40, max_seqlen_k=1500, num_kv_splits=splits,
        backend="triton")
    ref = reference.paged_attention(*attn_args(small))
    lowp = reference.paged_attention(*attn_args(cast(small, dtype)))
    assert_close(got, ref, lowp, name=f"high block ids, splits={splits}")


def _shifted_table(t, width, shift):
    out = torch.zeros(t.shape[0], width, dtype=torch.int32, device=t.device)
    out[:, :t.shape[1]] = t + shift
    return out


@gpu
def test_gpu_cuda_graph_replay_with_new_metadata():
    # capture once, then replay with other sequences' lengths / block tables (same T and B):
    # nothing may depend on the metadata contents seen at capture time
    dtype = torch.bfloat16
    kw = dict(num_q_heads=32, num_kv_heads=8, head_dim=128, dtype=torch.float64, device="cuda")
    a = make_batch([1, 1, 3, 20], [1500, 250, 1040, 60], **kw)
    c = make_batch([10, 1, 13, 1], [30, 2100, 13, 700], **kw)
    na = a["k_cache"].shape[0]
    kc64 = torch.cat([a["k_cache"], c["k_cache"]])
    vc64 = torch.cat([a["v_cache"], c["v_cache"]])
    width = max(a["block_table"].shape[1], c["block_table"].shape[1])
    st = dict(q=a["q"].to(dtype), k_cache=kc64.to(dtype), v_cache=vc64.to(dtype),
              block_table=_shifted_table(a["block_table"], width, 0),
              cu_seqlens_q=a["cu_seqlens_q"].clone(), seq_lens=a["seq_lens"].clone())

    def run():
        return kernels.paged_attention(*attn_args(st), max_seqlen_q=20, max_seqlen_k=2100,
                                       backend="triton")

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):             # compile + warm up outside the capture
        run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    for batch, shift in ((c, na), (a, 0)):
        st["q"].copy_(batch["q"])
        st["block_table"].copy_(_shifted_table(batch["block_table"], width, shift))
        st["cu_seqlens_q"].copy_(batch["cu_seqlens_q"])
        st["seq_lens"].copy_(batch["seq_lens"])
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        args64 = [batch["q"], kc64, vc64, _shifted_table(batch["block_table"], width, shift),
                  batch["cu_seqlens_q"], batch["seq_lens"]]
        ref = reference.paged_attention(*args64)
        lowp = reference.paged_attention(*[x.to(dtype) if x.is_floating_point() else x
                                           for x in args64])
        assert_close(out, ref, lowp, name=f"graph replay shift={shift}")


@gpu
def test_gpu_torch_compile_fullgraph_and_opcheck():
    dtype = torch.bfloat16
    b = make_batch([9, 1, 1, 3], [300, 1024, 5, 3], num_q_heads=8, num_kv_heads=2,
                   head_dim=128, dtype=torch.float64, device="cuda")
    bl = cast(b, dtype)

    def f(q, kc, vc, bt, cu, sl):
        o = ta.paged_attention(q * 1.0, kc, vc, bt, cu, sl, scale=0.1, max_seqlen_q=9,
                               max_seqlen_k=1024)
        return o * 2.0                        # exact: the check divides it back

    got = torch.compile(f, fullgraph=True)(*attn_args(bl)) / 2.0
    ref = reference.paged_attention(*attn_args(b), scale=0.1)
    lowp = reference.paged_attention(*attn_args(bl), scale=0.1)
    assert_close(got, ref, lowp, name="compiled")
    out = torch.empty_like(bl["q"])
    torch.library.opcheck(ta._paged_attention_op,
                          (*attn_args(bl), out, 0.1, 9, 1024, None, None, None))


# --------------------------------------------------------------------------- tuned configs
@pytest.fixture
def tuned_table(tmp_path, monkeypatch):
    """Point the launcher at a temporary tuned table; caches cleared before and after."""
    path = tmp_path / "tuned.json"
    monkeypatch.setattr(ta, "TUNED_FILE", path)

    def write(entries):
        path.write_text(json.dumps({"devices": {"interpreter": entries}}))
        ta._tuned.cache_clear()
        ta._config.cache_clear()
    yield write
    ta._tuned.cache_clear()
    ta._config.cache_clear()


def test_tuned_table_is_used_and_validated(tuned_table):
    """A stored decode config for this device replaces the heuristic (and the kernel is
    still right with it); a prefill entry leaves decode launches alone; a malformed entry
    raises instead of silently falling back."""
    cpu = torch.device("cpu")
    heur = ta._config(64, torch.float16, 2, 1, 90, "")
    tuned = ta._Config(16, 32, 2, 2)
    assert tuned != heur
    tuned_table({ta.tuned_key("decode", 64, 2, torch.float16): {"config": [16, 32, 2, 2]},
                 ta.tuned_key("prefill", 64, 2, torch.float16): {"config": [64, 32, 4, 2]}})
    plan = ta._plan(5, 5, 2, 64, torch.float16, 2, 1, 40, None, cpu)
    assert plan.cfg == tuned
    assert ta._plan(40, 2, 2, 64, torch.float16, 2, 30, 60, None, cpu).cfg == ta._Config(64, 32, 4, 2)
    assert ta._plan(5, 5, 2, 64, torch.float32, 2, 1, 40, None, cpu).cfg != tuned   # other dtype
    _check([1] * 5, [7, 33, 16, 1, 40], hq=4, hkv=2, d=64, dtype=torch.float16)
    _check([30, 1, 1], [45, 20, 3], hq=4, hkv=2, d=64, dtype=torch.float16)
    tuned_table({ta.tuned_key("decode", 64, 2, torch.float16): {"config": [8, 32, 2, 2]}})
    with pytest.raises(ValueError, match="not a valid config"):
        ta._plan(5, 5, 2, 64, torch.float16, 2, 1, 40, None, cpu)


def test_tune_triton_quick_writes_a_loadable_table(tuned_table, tmp_path, monkeypatch):
    """bench.tune_triton (interpreter, tiny shapes; MIN_GAIN 0 so the fastest candidate is
    written whatever the CPU's noise) merges winners the launcher then loads and uses."""
    from bench import tune_triton
    monkeypatch.setattr(tune_triton, "MIN_GAIN", 0.0)
    tuned_table({})
    payload = tune_triton.main(["--device", "cpu", "--quick", "--head-dims", "32", "--groups", "2",
                                "--dtypes", "float16", "--write", "--table", str(ta.TUNED_FILE),
                                "--out", str(tmp_path)])
    keys = {ta.tuned_key(c, 32, 2, torch.float16) for c in ("decode", "prefill")}
    assert set(payload["results"]) == keys
    for r in payload["results"].values():
        assert all("rejected" not in c for c in r["candidates"]), r["candidates"]
    stored = json.loads(ta.TUNED_FILE.read_text())["devices"]["interpreter"]
    assert set(stored) == keys
    cfg = ta._config(32, torch.float16, 2, 1, 90, "interpreter")
    assert [cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages] == stored[
        ta.tuned_key("decode", 32, 2, torch.float16)]["config"]


def test_tune_triton_searches_deep_pipelines_and_16x32_decode_tiles():
    """Issue 12: the tuner's full grid holds num_stages 4-6 for both classes (K/V copies stay
    in flight num_stages - 1 deep once block ids are prefetched) and 16x32 decode tiles."""
    from bench import tune_triton
    dec = tune_triton.candidates("decode", 128, 4, False, ta._config(128, torch.bfloat16, 4, 1))
    pre = tune_triton.candidates("prefill", 128, 4, False,
                                 ta._config(128, torch.bfloat16, 4, 4096))
    assert (16, 32) in {(c.block_m, c.block_n) for c in dec}
    for cands in (dec, pre):
        assert {4, 5, 6} <= {c.num_stages for c in cands}
    assert {4, 5, 6} <= {c.num_stages for c in pre if (c.block_m, c.block_n) == (128, 64)}
    assert all(ta._valid(c, cls, 4) for cls, cs in (("decode", dec), ("prefill", pre))
               for c in cs)                              # the table would accept every winner


# --------------------------------------------------------------------------- fp8 KV cache
@pytest.mark.parametrize("mode", ["per_slot", "per_tensor"])
def test_fp8_cache_all_modes(mode):
    # the same quantised codes and scales for kernel and reference (tests.attention_cases):
    # mixed launch (both classes), decode-only split-KV, window + softcap, group 5, fp32 q
    _check([40, 1, 3, 1], [97, 33, 17, 70], hq=8, hkv=2, d=80, fp8=mode, splits=3,
           name=f"fp8 {mode} mixed split")
    _check([1, 1, 5], [1100, 20, 60], hq=10, hkv=2, d=64, fp8=mode, name=f"fp8 {mode} decode")
    _check([30, 1, 5, 1], [150, 97, 40, 3], hq=4, hkv=2, d=64, fp8=mode, window=7,
           softcap=30.0, splits=2, name=f"fp8 {mode} window softcap")
    _check([20, 1], [45, 30], hq=4, hkv=1, d=64, fp8=mode, dtype=torch.float32,
           name=f"fp8 {mode} fp32 q")


@pytest.mark.parametrize("splits", [1, 2])
def test_fp8_fp16_small_v_per_slot(splits):
    # fp16 q, per-slot scales, |v| ~ 1e-2 (V scales ~ 7e-5): P x the keys' V scales went to
    # fp16 for P V in fp16's subnormals (< 6.1e-5), losing the small products on a long
    # decode; _kv_tiles now packs them x 2^8 and _attend takes it out.
    from tests.attention_cases import quantize_cache
    b = make_batch([1, 1], [1024, 700], num_q_heads=4, num_kv_heads=1, head_dim=64,
                   block_size=16, dtype=torch.float64,
                   generator=torch.Generator().manual_seed(21))
    b = quantize_cache(dict(b, v_cache=b["v_cache"] * 1e-2), "per_slot")
    bl = cast(b, torch.float16)
    kw = dict(scale=None, sliding_window=None, softcap=None, k_scale=b["k_scale"],
              v_scale=b["v_scale"])
    got = kernels.paged_attention(*attn_args(bl), max_seqlen_q=1, max_seqlen_k=1024,
                                  num_kv_splits=splits, backend="triton", **kw)
    want = reference.paged_attention(*attn_args(b), **kw)
    assert want.abs().max() < 1e-2      # the regime: every P x scale below 6.1e-5
    # no absolute floor: the outputs are ~1e-3, below the floor's 1e-3 scale, where the
    # subnormal loss (4x PyTorch's own error before the fix) would hide under it
    assert_close(got, want, reference.paged_attention(*attn_args(bl), **kw), floor_ulps=0.0,
                 name=f"fp8 fp16 small v {splits} splits")


@gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("mode", ["per_slot", "per_tensor"])
def test_gpu_fp8_cache_llama3_8b(dtype, mode):
    # the compiled fp8 path (sm_89+): a mixed Llama-3-8B batch with split decodes, and a
    # windowed + softcapped one, against the reference on the same e4m3 codes
    q_lens = [300, 1, 1, 1, 4, 1]
    kv_lens = [1300, 4097, 100, 2000, 777, 1]
    _check(q_lens, kv_lens, dtype=dtype, device="cuda", fp8=mode, splits=4, **LLAMA3_8B)
    _check([257, 1, 1], [3000, 4096, 700], dtype=dtype, device="cuda", fp8=mode, window=1000,
           softcap=50.0, **LLAMA3_8B)
