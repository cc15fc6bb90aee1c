"""The kernel report (bench/kernel_report.py, sass.py, kernel_model.py, jit_sim.py): its SASS
analysis and model on synthetic input, and the invariants every shipped kernel must keep, on
the quick launch set compiled for sm_90a.

Invariants the kernels do not meet yet are strict expected failures naming the issue whose
work fixes them: when that work lands the test XPASSes, fails, and the line below is flipped
to None. Nothing else in this file needs to change.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import kernel_model as km
from bench import kernel_report as kr
from bench import sass

# invariant -> None (must hold today) or the reason it does not yet ("issue N: ...")
XFAIL = {
    "no_spills_half[triton]": None,
    "no_spills_half[cuda]": None,
    "prefill_tensor_cores[triton]": None,
    "prefill_tensor_cores[cuda]": None,
    "copy_in_flight[triton]": None,
    "copy_in_flight[cuda]": None,
    "decode_85pct_hbm_h100[triton]": None,
    "decode_85pct_hbm_h100[cuda]": None,
    "jit_warm[triton]": None,
    "wgmma_not_serialised[triton]": None,
    "wgmma_not_serialised[cuda]": None,
}
ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- synthetic SASS
def _sass(lines):
    """cuobjdump -sass text of one function from (address, instruction) pairs."""
    body = "\n".join(f"        /*{a:04x}*/                   {i} ;  /* 0x0 */" for a, i in lines)
    return f"\t\tFunction : _Z6kernelv\n{body}\n"


LOOP = [  # a tile loop (0x100-0x1f0) around an 8-trip inner loop (0x140-0x180), one wait of 1
    (0x0f0, "MOV R1, c[0x0][0x28]"),
    (0x100, "LDGSTS.E.BYPASS.128 [R9+0x2900], desc[UR10][R6.64], !P0"),
    (0x110, "LDGSTS.E [R9], desc[UR10][R4.64]"),                  # block id: not K/V bytes
    (0x120, "DEPBAR.LE SB0, 0x1"),
    (0x130, "HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24"),
    (0x140, "FFMA R1, R2, R3, R1"),
    (0x150, "MUFU.EX2 R5, R5"),
    (0x160, "VIADD R29, R29, 0x4"),
    (0x170, "ISETP.NE.AND P1, PT, R29, 0x20, PT"),
    (0x180, "@P1 BRA 0x140"),
    (0x190, "NOP"),
    (0x1a0, "HMMA.16816.F32.BF16 R8, R12, R16, R8"),
    (0x1b0, "ISETP.GE.AND P0, PT, R45, R47, PT"),                # runtime bound
    (0x1f0, "@!P0 BRA 0x100"),
    (0x200, "EXIT"),
    (0x210, "BRA 0x160"),                                        # out-of-line, back into the loop
]


def test_sass_loops_trip_counts_and_kv_loop():
    ins = next(iter(sass.parse_sass(_sass(LOOP)).values()))
    top = sass.find_loops(ins)
    assert [(lp.start, lp.end) for lp in top] == [(0x100, 0x1f0)]   # 0x160-0x210 crosses: dropped
    (inner,) = top[0].children
    assert (inner.start, inner.end, inner.trip) == (0x140, 0x180, 8) and top[0].trip is None
    facts = sass.sass_facts(ins)
    (lp,) = facts["kv_loops"]
    # its own 7 instructions (the NOP excluded) + 8 trips x 5 inner ones
    assert lp["instr"] == 7 + 8 * 5
    assert lp["copy_bytes"] == 32 * 16                 # one 16-byte LDGSTS per lane
    assert lp["groups_in_flight"] == 2 and lp["depbar_waits"] == [1]
    assert lp["mma"] == {"wgmma": 1, "mma.sync": 1} and lp["mufu"] == 8
    assert lp["mma_flops_per_instr"] == 2 * 64 * 64 * 16 // 4      # a warp's share of HGMMA
    assert lp["flops"] == 2 * 64 * 64 * 16 // 4 + 2 * 16 * 8 * 16 + 8 * 64
    assert facts["mma_kinds"] == ["mma.sync", "wgmma"]


PREFETCH = [  # plain loads for the next tile at the bottom, consumed at the top (registers)
    (0x100, "HMMA.16816.F32.BF16 R8, R24, R16, R8"),             # reads R24..R27: live-in
    (0x110, "LDG.E.128 R24, desc[UR10][R6.64]"),
    (0x120, "ISETP.GE.AND P0, PT, R45, R47, PT"),
    (0x130, "@!P0 BRA 0x100"),
]


def test_sass_register_prefetch_counts_as_in_flight():
    ins = next(iter(sass.parse_sass(_sass(PREFETCH)).values()))
    (lp,) = sass.sass_facts(ins)["kv_loops"]
    assert lp["prefetched_bytes"] == 512 and lp["groups_in_flight"] == 2
    # the same load consumed after it, in the same iteration: nothing in flight across tiles
    same = [PREFETCH[1], (0x120, PREFETCH[0][1])] + [(0x130, PREFETCH[2][1]),
                                                      (0x140, "@!P0 BRA 0x110")]
    ins = next(iter(sass.parse_sass(_sass(same)).values()))
    (lp,) = sass.sass_facts(ins)["kv_loops"]
    assert lp["prefetched_bytes"] == 0 and lp["groups_in_flight"] == 1


def _wgmma_loop(softmax_after_wait: bool, pv_at_end: bool = False):
    """A prefill-like tile loop: a 2-HGMMA QK^T group, its wait, a 2-HGMMA P.V group, and 64
    MUFU.EX2 of softmax either under the P.V group (before the wait that retires it: the
    deferred order) or after a wait 0 (tile order). pv_at_end: the P.V group is issued last
    and waited for at the top of the next iteration (the back edge)."""
    qk = [("HGMMA.64x64x16.F32.BF16 R88, gdesc[UR8], RZ, !UPT", ),
          ("HGMMA.64x64x16.F32.BF16 R88, gdesc[UR8], R88, gsb0", )]
    pv = [("HGMMA.64x128x16.F32.BF16 R24, R120, gdesc[UR8].tnspB, R24", ),
          ("HGMMA.64x128x16.F32.BF16 R24, R124, gdesc[UR8].tnspB, R24, gsb0", )]
    exp = [("MUFU.EX2 R140, R96", )] * 64
    wait0 = [("WARPGROUP.DEPBAR.LE gsb0, 0x0", )]
    ld = [("LDGSTS.E.BYPASS.128 [R9+0x2900], desc[UR10][R6.64], !P0", )]
    if pv_at_end:
        body = ld + wait0 + qk + wait0 + exp + pv
    elif softmax_after_wait:
        body = ld + qk + wait0 + pv + wait0 + exp
    else:
        body = ld + qk + wait0 + pv + exp
    body += [("ISETP.GE.AND P0, PT, R45, R47, PT", )]
    lines = [(0x100 + 16 * i, x[0]) for i, x in enumerate(body)]
    lines.append((lines[-1][0] + 16, "@!P0 BRA 0x100"))
    ins = next(iter(sass.parse_sass(_sass(lines)).values()))
    (lp,) = sass.sass_facts(ins)["kv_loops"]
    return lp


def test_overlap_credit_only_for_work_under_a_pending_wgmma():
    dev = km.DEVICES["H100"]
    issue = 4 * dev["clock_ghz"] * 1e9
    deferred, ordered = _wgmma_loop(False), _wgmma_loop(True)
    assert deferred["mma_events"][-4:-1] == [["mma", 65536], ["commit"], ["mufu", 64]]
    # exact MMA FLOPs: the two shapes, not the larger one x 4
    assert deferred["mma_flops"] == 2 * 32768 + 2 * 65536
    # P.V at peak: 2 x 65536 FLOPs x 8 warps / (989 TFLOP/s / 132 SMs); 64 MUFU x 8 warps x
    # 32 lanes / 16 per clock: the MUFU work is the longer, so all of P.V hides under it
    t_pv = 2 * 65536 * 8 / (989e12 / 132)
    assert km.overlap_credit(deferred["mma_events"], 8, issue, dev) == pytest.approx(t_pv)
    assert km.overlap_credit(ordered["mma_events"], 8, issue, dev) == 0.0
    # issued last, waited for at the next iteration's top: the wait comes before any work
    late = _wgmma_loop(False, pv_at_end=True)
    assert km.overlap_credit(late["mma_events"], 8, issue, dev) == pytest.approx(
        3 * 8 / issue)              # only ISETP, BRA and the next LDGSTS come before the wait
    assert deferred["wgmma_groups"] == 2                   # QK^T's and P.V's commits
    # ptxas C7515: every HGMMA its own group, waited for at once
    ser = [(0x100, "HGMMA.64x64x16.F32.BF16 R88, gdesc[UR8], RZ, !UPT, gsb0"),
           (0x110, "WARPGROUP.DEPBAR.LE gsb0, 0x0"),
           (0x120, "HGMMA.64x64x16.F32.BF16 R88, gdesc[UR8], R88, gsb0"),
           (0x130, "WARPGROUP.DEPBAR.LE gsb0, 0x0"),
           (0x140, "LDGSTS.E.BYPASS.128 [R9+0x2900], desc[UR10][R6.64], !P0"),
           (0x150, "@!P0 BRA 0x100")]
    (lp,) = sass.sass_facts(next(iter(sass.parse_sass(_sass(ser)).values())))["kv_loops"]
    assert lp["wgmma_groups"] == lp["mma"]["wgmma"] == 2
    # the credit raises the no-overlap bracket and nothing else
    kern = dict(warps=8, grid=132, regs=255, smem=160 * 1024)
    a = km.predict_part(0, 10 ** 12, deferred, kern, dev)
    b = km.predict_part(0, 10 ** 12, ordered, kern, dev)
    assert a["flop_no_overlap_tflops"] > b["flop_no_overlap_tflops"]
    assert a["flop_ceiling_tflops"] == b["flop_ceiling_tflops"]
    assert a["flop_overlap_credit"] == pytest.approx(2 / 3)   # P.V of P.V + QK^T


def test_occupancy_limits():
    h100 = km.DEVICES["H100"]
    # 161 registers x 4 warps: 168 x 32 = 5376 per warp -> 3 CTAs in 64k registers
    assert km.occupancy(161, 39424, 4, h100) == dict(ctas_per_sm=3, warps_per_sm=12, limit="regs")
    # 45 KB dynamic shared memory + 1 KB reserved: 5 CTAs in 228 KB
    assert km.occupancy(64, 45312, 4, h100)["ctas_per_sm"] == 5
    assert km.occupancy(16, 0, 32, h100) == dict(ctas_per_sm=2, warps_per_sm=64, limit="warps")


def _loop(**kw):
    base = dict(instr=500, copy_bytes=8192, flops=0, mma={}, mma_flops_per_instr=0,
                mma_instr=0, mufu=0, groups_in_flight=3)
    return dict(base, **kw)


def test_model_picks_the_binding_ceiling():
    dev = km.DEVICES["H100"]
    kern = dict(warps=4, grid=132 * 4 * 10, regs=64, smem=0)
    lean = km.predict_part(10 ** 9, 0, _loop(instr=100), kern, dev)        # 82 B/instr
    assert lean["mem_bound"] == "hbm" and lean["mem_ceiling_gbs"] == pytest.approx(3350)
    fat = km.predict_part(10 ** 9, 0, _loop(instr=8000), kern, dev)        # 1 B/instr
    clk = dev["clock_ghz"] * 1e9
    issue = 132 * 4 * clk * 8192 / 8000 / 1e9
    assert fat["mem_bound"] == "issue" and fat["mem_ceiling_gbs"] == pytest.approx(issue)
    # one group in flight, one CTA of one warp per SM: latency + own issue time per tile
    k1 = dict(warps=1, grid=132, regs=255, smem=200 * 1024)
    one = km.predict_part(10 ** 9, 0, _loop(instr=100, groups_in_flight=1), k1, dev)
    period = 700e-9 + 100 / clk
    assert one["mem_bound"] == "in-flight"
    assert one["mem_ceiling_gbs"] == pytest.approx(132 * 8192 / period / 1e9)
    mma = _loop(instr=1000, flops=10 ** 7, mma={"wgmma": 10}, mma_flops_per_instr=10 ** 6,
                mma_instr=10)
    comp = km.predict_part(0, 10 ** 12, mma, kern, dev)
    assert comp["flop_bound"] == "tensor" and comp["flop_ceiling_tflops"] == pytest.approx(989)
    assert comp["flop_no_overlap_tflops"] < comp["flop_ceiling_tflops"]


def test_wgmma_operand_forms_and_smem_bytes():
    # SS: the first source is a descriptor (A and B in smem); RS: A in registers, B a descriptor
    ss = ("HGMMA.64x32x16.F32.BF16", "R24, gdesc[UR4], R24")
    rs = ("HGMMA.64x128x16.F32.BF16", "R24, R120, gdesc[UR8].tnspB, R24, gsb0")
    assert sass.wgmma_form(*ss) == "ss" and sass.wgmma_form(*rs) == "rs"
    assert sass.wgmma_form("HMMA.16816.F32.BF16", "R8, R12, R16, R8") is None
    # per warp, a quarter of the warpgroup's: SS A 64x16x2 = 2 KB + B 32x16x2 = 1 KB; RS B only
    assert 4 * sass.wgmma_smem_bytes(*ss) == 2048 + 1024
    assert 4 * sass.wgmma_smem_bytes(*rs) == 128 * 16 * 2
    assert [sass.smem_copy_bytes(op) for op in (
        "LDSM.16.M88.4", "LDSM.16.MT88.2", "STSM.16.M88", "LDS.128", "STS", "LDS.U16",
        "LDGSTS.E.BYPASS.128", "LDG.E.128", "UTMALDG.2D")] == [
        512, 256, 128, 512, 128, 64, 512, 0, 0]
    lp = _wgmma_loop(False)               # 2 SS 64x64 (QK^T), 2 RS 64x128 (P.V), 1 LDGSTS.128
    assert (lp["wgmma_ss"], lp["wgmma_rs"]) == (2, 2)
    assert lp["smem_operand_bytes"] == 2 * 32 * (64 + 64) // 4 + 2 * 32 * 128 // 4 == 4096
    assert lp["smem_copy_bytes"] == 512


def test_smem_cap_and_no_overlap_bracket():
    # one CTA tile of 4 warps: 1 MFLOP on tensor cores, 54272 B through shared memory (the CUDA
    # D128 wgmma tile's counts), 400 warp-instructions. Hand-computed at 1.83 GHz, 128 B/clk:
    # smem cap = 132 x 128 x 1.83e9 B/s x 1048576 / 54272 FLOP/B = 597.39 TFLOP/s (< 989 tensor,
    # < 2533 issue); no overlap = tensor time max(139.95 ns at peak, 231.69 ns smem) + the
    # other 360 instructions at 4 x 1.83e9/s (49.18 ns): 1048576 / 280.87 ns x 132 = 492.79
    dev = km.DEVICES["H100"]
    assert dev["clock_ghz"] == 1.83 and km.SMEM_B_PER_CLK == 128
    kern = dict(warps=4, grid=132 * 4 * 10, regs=64, smem=0)
    loop = _loop(instr=100, flops=262144, mma={"wgmma": 10}, mma_flops=262144,
                 mma_flops_per_instr=32768, mma_instr=10, smem_operand_bytes=8192,
                 smem_copy_bytes=5376, mma_events=[])
    p = km.predict_part(0, 10 ** 12, loop, kern, dev)
    assert p["flop_bound"] == "smem"
    assert p["flop_ceiling_tflops"] == pytest.approx(597.39, rel=1e-4)
    assert p["flop_no_overlap_tflops"] == pytest.approx(492.79, rel=1e-4)
    assert p["flop_smem_over_tensor"] == pytest.approx(231.69 / 139.95, rel=1e-3)
    # all operands in registers and no copies: no smem term at all, tensor-bound again
    q = km.predict_part(0, 10 ** 12, dict(loop, smem_operand_bytes=0, smem_copy_bytes=0),
                        kern, dev)
    assert "smem" not in q["flop_caps_tflops"] and q["flop_bound"] == "tensor"
    assert q["flop_no_overlap_tflops"] == pytest.approx(1048576 / (139.95e-9 + 49.18e-9)
                                                        * 132 / 1e12, rel=1e-4)


PTXAS_LOG = """\
ptxas info    : 0 bytes gmem
ptxas info    : (C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized \
due to non wgmma instructions defining accumulator registers of a wgmma between start and end \
of the pipeline stage in the function '_Z3wgmv'
ptxas info    : Compiling entry function '_Z3wgmv' for 'sm_90a'
ptxas info    : Function properties for _Z3wgmv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 128 registers, used 1 barriers
ptxas info    : Compiling entry function '_Z5cleanv' for 'sm_90a'
ptxas info    : Function properties for _Z5cleanv
    8 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers
"""


def _wgmma_kernel(name, notes):
    lp = dict(start="0x100", mma={"wgmma": 10}, wgmma_groups=2)
    k = dict(backend="cuda", kernel=f"void {name}<__nv_bfloat16, 128>", arch=90, stack=0,
             local=0, mma_kinds=["wgmma"], kv_loops=[lp])
    return k if notes is None else dict(k, ptxas_notes=notes)


def test_ptxas_notes_flag_serialised_wgmma():
    p = kr.parse_ptxas(PTXAS_LOG)
    (note,) = p["_Z3wgmv"]["notes"]
    assert note.startswith("C7515 info: Potential Performance Loss") and "_Z3wgmv" in note
    assert p["_Z5cleanv"] == dict(notes=[], spill_bytes=12)
    inv = lambda ks: kr.invariants(dict(rows=[], kernels=ks))["wgmma_not_serialised[cuda]"]  # noqa: E731
    assert inv([_wgmma_kernel("clean", [])])["ok"]
    bad = inv([_wgmma_kernel("clean", []), _wgmma_kernel("ser", p["_Z3wgmv"]["notes"])])
    assert not bad["ok"] and bad["checked"] == 4 and "C7515" in bad["failing"][0]
    # no ptxas log parsed at all fails too: the check must not pass by not looking
    assert inv([_wgmma_kernel("nolog", None)])["failing"] == [
        "nolog<__nv_bfloat16, 128> sm_90: no ptxas log"]
    # the SASS rule still applies: one commit group per HGMMA
    ser = _wgmma_kernel("clean", [])
    ser["kv_loops"][0]["wgmma_groups"] = 10
    assert not inv([ser])["ok"]


# the real ptxas: a wgmma whose accumulator a mov redefines between two mma_async of one group
SERIAL_PTX = """.version 8.4
.target sm_90a
.address_size 64
.visible .entry ser_kernel(.param .u64 p)
{
.reg .f32 %d<4>;
.reg .b64 %da, %db;
.reg .pred %sd;
.reg .u64 %rp;
ld.param.u64 %rp, [p];
mov.b64 %da, 0;
mov.b64 %db, 0;
setp.ne.u64 %sd, %rp, 0;
mov.f32 %d0, 0f00000000; mov.f32 %d1, 0f00000000; mov.f32 %d2, 0f00000000; mov.f32 %d3, 0f00000000;
wgmma.fence.sync.aligned;
wgmma.mma_async.sync.aligned.m64n8k16.f32.f16.f16 {%d0, %d1, %d2, %d3}, %da, %db, %sd, 1, 1, 0, 0;
mov.f32 %d0, 0f3F800000;
wgmma.mma_async.sync.aligned.m64n8k16.f32.f16.f16 {%d0, %d1, %d2, %d3}, %da, %db, %sd, 1, 1, 0, 0;
wgmma.commit_group.sync.aligned;
wgmma.wait_group.sync.aligned 0;
st.global.f32 [%rp], %d0;
st.global.f32 [%rp+4], %d1;
ret;
}
"""


def test_real_ptxas_serialisation_note_is_parsed(tmp_path):
    ptxas = Path(kr.NVCC).parent / "ptxas"
    src = tmp_path / "ser.ptx"
    src.write_text(SERIAL_PTX)
    res = subprocess.run([str(ptxas), "-v", "--gpu-name", "sm_90a", str(src), "-o",
                          str(tmp_path / "ser.cubin")], capture_output=True, text=True,
                         timeout=60, check=True)
    notes = kr.parse_ptxas(res.stdout + res.stderr)["ser_kernel"]["notes"]
    assert any(n.startswith("C75") and "serialized" in n for n in notes), notes


def test_launch_cost_matches_bench_kernels():
    import torch
    from bench.kernels import attention_case, attention_cost
    x = kr.Launch("t", "m", 4, 2, 16, "fp16", 16, (1, 5, 37), (20, 9, 37))
    c = attention_case(list(x.q_lens), list(x.kv_lens), 4, 2, 16, 16, torch.float16, "cpu")
    cost = kr.launch_cost(x)
    assert (cost["decode"][0] + cost["prefill"][0], cost["decode"][1] + cost["prefill"][1]) \
        == attention_cost(c, 2)
    assert cost["prefill"][1] == 4 * 16 * 4 * (37 * 38 // 2)       # the q_len 37 prompt


def test_rows_follow_the_kernels_tile_class():
    # CUDA picks its tile by rows q_len x G (tensor cores above 4 rows in 16-bit types, above
    # 16 with an fp8 cache); Triton by q_len > 16. The report must charge the loop that runs.
    import dataclasses
    x = kr.Launch("t", "m", 32, 8, 128, "bf16", 16, (1, 2, 3, 5, 17), (50,) * 5)   # G 4
    cls = lambda y, be: [kr._prefill_class(y, q, be) for q in y.q_lens]  # noqa: E731
    assert cls(x, "cuda") == [False, True, True, True, True]
    assert cls(x, "triton") == [False, False, False, False, True]
    assert cls(dataclasses.replace(x, kv="fp8"), "cuda") == [False, False, False, True, True]
    # fp8 on sm_90a (D 64 / 128, 16-bit q): every row takes the wgmma tile; not D 80 / fp32 q
    cls90 = lambda y: [kr._prefill_class(y, q, "cuda", 90) for q in y.q_lens]  # noqa: E731
    assert cls90(dataclasses.replace(x, kv="fp8")) == [True] * 5
    assert cls90(dataclasses.replace(x, kv="fp8", d=80)) == [False, False, False, True, True]
    assert cls90(dataclasses.replace(x, kv="fp8", dtype="fp32")) == \
        [False, False, False, True, True]
    assert cls90(x) == cls(x, "cuda")
    assert cls(dataclasses.replace(x, dtype="fp32"), "cuda") == [False, False, False, True, True]
    fp8 = kr.launch_cost(dataclasses.replace(x, kv="fp8"))["decode"][0]
    assert fp8 == sum(k * 8 * (2 * 128 + 8) + 2 * q * 32 * 128 * 2
                      for q, k in zip(x.q_lens, x.kv_lens) if q <= 16)   # codes + scales


def test_measured_join(tmp_path):
    # a FIXTURE shaped like bench.kernels' JSON, not a measurement
    row = dict(launch="decode B=256 ctx=2048", model="llama3-8b", backend="triton", dtype="bf16",
               hq=32, hkv=8, d=128, bs=16, window=0, device="H100", predicted_us=600.0,
               predicted_gbs=3000.0, predicted_tflops=10.0)
    other = dict(row, hkv=4)
    card = tmp_path / "nvidia-h100-80gb-hbm3"
    card.mkdir()
    meas = dict(kind="decode", name="decode B=256 ctx=2048", impl="triton", dtype="torch.bfloat16",
                shape=dict(B=256, hq=32, hkv=8, d=128, bs=16), median_us=900.0, gbs=2000.0,
                tflops=6.6)
    (card / "kernels-nvidia-h100.json").write_text(json.dumps(dict(
        run_info=dict(device="NVIDIA H100 80GB HBM3"),
        results=[meas, dict(meas, impl="cuda"), dict(meas, name="prefill 2048")])))
    (m,) = kr.join_measured(dict(rows=[other, row]), tmp_path)
    assert m["time_ratio"] == pytest.approx(1.5) and m["measured_gbs"] == 2000.0
    assert m["predicted_gbs"] == 3000.0 and m["device"] == "H100"


# --------------------------------------------------------------------------- the real kernels
@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """The quick report for sm_90a, in a subprocess: kernels must be @triton.jit, not the
    interpreter this test process runs them under."""
    out = tmp_path_factory.mktemp("report") / "report.json"
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    res = subprocess.run([sys.executable, "-m", "bench.kernel_report", "--quick", "--arch", "90",
                          "--jobs", "2", "--json", str(out)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    print(res.stdout[-6000:])
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return json.loads(out.read_text())


def test_report_compiles_every_launch(report):
    assert report["errors"] == []
    rows = [r for r in report["rows"] if r["device"] == "H100"]
    assert {r["backend"] for r in rows} == {"triton", "cuda"}
    assert all("predicted_us" in r and r["predicted_us"] > 0 for r in rows), \
        [r.get("error") for r in rows if "predicted_us" not in r]
    # every predicted figure is a ceiling below the device's peaks
    for r in rows:
        dev = km.DEVICES[r["device"]]
        assert r["predicted_gbs"] <= dev["hbm_gbs"] * 1.001, r
        assert r["predicted_tflops"] <= dev["tc_tflops"] * 1.001, r


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=[pytest.mark.xfail(strict=True, reason=r)] if r else [],
                 id=n.replace("[triton]", "/tl").replace("[cuda]", "/cu"))
    for n, r in XFAIL.items()])
def test_invariant(report, name):
    inv = report["invariants"][name]
    print(inv)
    assert inv["checked"] > 0
    assert inv["ok"], inv["failing"]


def test_invariant_table_covers_the_report(report):
    assert set(report["invariants"]) == set(XFAIL)
