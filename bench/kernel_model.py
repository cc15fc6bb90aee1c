"""The kernel report's model (bench/kernel_report.py): device figures, occupancy, and the
predicted ceiling of one part of a launch. Every figure it yields is a prediction.

  memory-bound part: bytes / min(HBM BW, issue = SMs x min(4, warps/SM) x clock x K/V bytes
      per warp-instruction, in-flight = SMs x CTAs/SM x copy groups x tile bytes / period)
      x wave efficiency; period = DRAM latency (+ the CTA's issue time for a tile when only
      one copy group is in flight: copies and math alternate)
  compute-bound part: FLOPs / min(tensor-core peak (FP32 FMA without MMA) x SMs used / SMs,
      issue = SMs x min(4, warps/SM) x clock x FLOPs per warp-instruction); "no overlap":
      tensor-core time at peak + MUFU time + issue time of the rest, added, less only the
      overlap the SASS shows (overlap_credit: work a warp issues while its own wgmma group
      is pending, before the WARPGROUP.DEPBAR that retires it). Shared memory: a tile's
      smem bytes (wgmma SS/RS operand reads + LDS/STS/LDSM/STSM/LDGSTS bytes, bench/sass.py)
      at SMEM_B_PER_CLK per SM cap the ceiling ("smem") and, in the no-overlap bracket, the
      tensor term is max(tensor time, smem time).
"""
from __future__ import annotations

import math

# clock_ghz is the clock every per-clock rate (issue, MUFU, smem) runs at, and it must be the
# one the peak figures imply: 989 TFLOP/s dense bf16 = 132 SMs x 4096 FLOP/clk (4 tensor
# cores x 512 FMA) x 1.83 GHz. 1.98 GHz is the H100 SXM's max boost clock; using it for
# issue / MUFU while the tensor term runs at the datasheet peak made those terms ~8%
# optimistic against it (review F1). Whether a loaded GPU holds 1.83 is not measured here.
# H200: same SM count and 989 TFLOP/s peak, so 1.83 GHz likewise. A100: 312 TFLOP/s = 108 x 2048 FLOP/clk x 1.41 GHz, consistent already.
DEVICES = {
    "H100": dict(arch=90, sms=132, clock_ghz=1.83, hbm_gbs=3350.0, tc_tflops=989.0,
                 fma_tflops=67.0, smem_sm=228 * 1024, regs_sm=65536, warps_sm=64, ctas_sm=32,
                 latency_ns=700.0),
    "H200": dict(arch=90, sms=132, clock_ghz=1.83, hbm_gbs=4800.0, tc_tflops=989.0,
                 fma_tflops=67.0, smem_sm=228 * 1024, regs_sm=65536, warps_sm=64, ctas_sm=32,
                 latency_ns=700.0),
    "A100": dict(arch=80, sms=108, clock_ghz=1.41, hbm_gbs=2039.0, tc_tflops=312.0,
                 fma_tflops=19.5, smem_sm=164 * 1024, regs_sm=65536, warps_sm=64, ctas_sm=32,
                 latency_ns=600.0),
}
MUFU_PER_SM = 16              # exp2 / rcp lanes per clock per SM (sm_80, sm_90)
ISSUE_PER_SM = 4              # warp schedulers per SM, one warp-instruction per clock each
# Shared memory: 32 banks x 4 bytes per clock per SM (CUDA C++ Programming Guide, shared
# memory of compute capability 5.x, which 8.x / 9.0 refer to). The usual H100 figure, not
# measured here; whether wgmma's descriptor reads have a wider path is not documented.
SMEM_B_PER_CLK = 128
RESERVED_SMEM = 1024          # per CTA, taken by the driver on sm_80 / sm_90

def occupancy(regs: int, smem: int, warps: int, dev: dict) -> dict:
    regs_warp = math.ceil(max(regs, 1) * 32 / 256) * 256           # 256-register granules
    by_regs = dev["regs_sm"] // (regs_warp * warps) if warps else 0
    by_smem = dev["smem_sm"] // (smem + RESERVED_SMEM)
    by_warps = dev["warps_sm"] // warps if warps else 0
    ctas = max(0, min(by_regs, by_smem, by_warps, dev["ctas_sm"]))
    limit = min((by_regs, "regs"), (by_smem, "smem"), (by_warps, "warps"),
                (dev["ctas_sm"], "ctas"))[1]
    return dict(ctas_per_sm=ctas, warps_per_sm=ctas * warps, limit=limit)


def overlap_credit(events: list, warps: int, issue_sm: float, dev: dict) -> float:
    """Seconds of a tile's tensor-core time that run under other work of the same warps, from
    the loop body in issue order (bench/sass.py mma_events). wgmma is asynchronous: an HGMMA
    starts the tensor cores and the warp goes on until a WARPGROUP.DEPBAR.LE gsb0, N makes it
    wait for all but its N newest groups. So MUFU and other instructions issued while a group
    is pending overlap that group's tensor time, up to that time (groups run in order, the
    oldest first); a wait drops what is left of the groups it retires (the warp stalls for
    them: no overlap). The body is walked twice and only the second pass counts, so groups
    left pending at the back edge (issued late in one iteration, waited for in the next)
    shadow the next iteration's work. Per-SM times as in predict_part's no-overlap bracket:
    tensor FLOPs x warps at the SM's share of the peak, MUFU 16 lanes/clock, the rest at
    issue_sm warp-instructions/s. What it does not credit: one warpgroup's math under the
    other warpgroup's wgmma (the two interleave only as the schedulers allow), and work under
    mma.sync (HMMA: not asynchronous)."""
    tc_sm = dev["tc_tflops"] * 1e12 / dev["sms"]
    clk = dev["clock_ghz"] * 1e9
    pending, open_group, credit = [], False, 0.0
    for lap in (0, 1):
        for ev in events:
            kind = ev[0]
            if kind == "mma":
                t = ev[1] * warps / tc_sm
                if open_group:
                    pending[-1] += t
                else:
                    pending.append(t)
                    open_group = True
            elif kind == "commit":
                open_group = False
            elif kind == "wait":
                keep = ev[1] + (1 if open_group else 0)
                pending = pending[len(pending) - keep:] if keep else []
            else:
                w = ev[1] * warps * (32 / (MUFU_PER_SM * clk) if kind == "mufu" else 1 / issue_sm)
                while w > 0 and pending:
                    c = min(pending[0], w)
                    pending[0] -= c
                    w -= c
                    credit += c if lap else 0.0
                    if pending[0] <= 0:
                        pending.pop(0)
                        if not pending:
                            open_group = False
    return credit


def predict_part(nbytes: int, flops: int, loop: dict | None, kern: dict, dev: dict,
                 whole: bool = False) -> dict:
    """Predicted time of one part (see the module docstring) with its ceilings and bound."""
    warps, grid = kern["warps"], max(1, kern["grid"])
    occ = occupancy(kern["regs"], kern["smem"], warps, dev)
    ctas = max(1, min(occ["ctas_per_sm"], math.ceil(grid / dev["sms"])))
    sms = min(dev["sms"], grid)
    issue = sms * min(ISSUE_PER_SM, ctas * warps) * dev["clock_ghz"] * 1e9   # warp-instr/s
    src = loop if loop is not None else kern.get("whole")
    if src is None or not src.get("instr"):
        return dict(error="no loop facts")
    cta_instr = src["instr"] * warps
    cta_bytes = (src.get("copy_bytes", 0) + (src.get("store_bytes", 0) if whole else 0)) * warps
    cta_flops = src.get("flops", 0) * warps
    r = dict(instr_per_iter=src["instr"], cta_bytes_per_iter=cta_bytes,
             bytes_per_instr=cta_bytes / cta_instr, ctas_per_sm=occ["ctas_per_sm"],
             occupancy_limit=occ["limit"], sms_used=sms)
    t, bound = 0.0, "-"
    if nbytes:
        caps = {"hbm": dev["hbm_gbs"] * 1e9, "issue": issue * cta_bytes / cta_instr}
        groups = (loop or {}).get("groups_in_flight", 1)
        # One group in flight: a CTA's copies and its math alternate, so a tile takes the
        # latency plus the CTA's share of the SM's issue time; more groups overlap them.
        period = dev["latency_ns"] * 1e-9
        if groups <= 1:
            period += cta_instr * ctas / (issue / sms)
        caps["in-flight"] = sms * ctas * groups * cta_bytes / period
        # Uniform CTAs run in waves: the last, partial wave leaves SMs idle.
        waves = grid / (dev["sms"] * max(1, occ["ctas_per_sm"]))
        r["wave_efficiency"] = waves / math.ceil(waves)
        bw = min(v for v in caps.values() if v > 0) * r["wave_efficiency"]
        r["mem_ceiling_gbs"] = bw / 1e9
        r["mem_caps_gbs"] = {k: v / 1e9 for k, v in caps.items()}
        r["mem_bound"] = min(caps, key=lambda k: caps[k] if caps[k] > 0 else math.inf)
        t, bound = (nbytes / bw if bw else math.inf), r["mem_bound"]
    if flops:
        mma = bool(loop and loop.get("mma"))
        peak = (dev["tc_tflops"] if mma else dev["fma_tflops"]) * 1e12 * sms / dev["sms"]
        caps = {"tensor" if mma else "fma": peak}
        if cta_flops:
            caps["issue"] = issue * cta_flops / cta_instr
        # Shared memory per CTA tile: wgmma operands read from smem (SS: A and B, RS: B) and
        # the loads / stores / cp.async destinations the SASS shows, at 128 B/clk per SM.
        smem_bw = SMEM_B_PER_CLK * dev["clock_ghz"] * 1e9
        cta_smem = (src.get("smem_operand_bytes", 0) + src.get("smem_copy_bytes", 0)) * warps
        r["cta_smem_bytes_per_iter"] = cta_smem
        if cta_flops and cta_smem:
            caps["smem"] = smem_bw * sms * cta_flops / cta_smem
        fl = min(caps.values())
        r["flop_ceiling_tflops"] = fl / 1e12
        r["flop_caps_tflops"] = {k: v / 1e12 for k, v in caps.items()}
        if loop is not None and cta_flops:
            # No overlap at all (the other bracket): per tile an SM runs its tensor-core
            # work at peak, then its MUFU work (16 lanes/clock/SM), then issues the rest.
            clk = dev["clock_ghz"] * 1e9
            # The loop's summed MMA FLOPs where known: max-per-instr x count overstates a loop
            # of mixed shapes (wgmma m64n32 QK^T + m64n128 PV: 2.5x at D 128).
            mflops = loop.get("mma_flops") or loop["mma_flops_per_instr"] * loop["mma_instr"]
            t_mma = (mflops * warps / (dev["tc_tflops"] * 1e12 / dev["sms"])) if mma else 0.0
            # The tensor cores cannot run faster than their operands (and the tile's copies)
            # move through shared memory: the tensor term is the slower of the two.
            # (MMA loops only: an FMA loop's smem reads are part of its issue term.)
            t_smem = cta_smem / smem_bw if mma else 0.0
            r["flop_smem_over_tensor"] = t_smem / t_mma if t_mma else None
            t_mma = max(t_mma, t_smem)
            t_mufu = loop["mufu"] * warps * 32 / (MUFU_PER_SM * clk)
            t_rest = (cta_instr - (loop["mma_instr"] + loop["mufu"]) * warps) / (issue / sms)
            credit = overlap_credit(loop.get("mma_events") or [], warps, issue / sms, dev)
            r["flop_overlap_credit"] = credit / max(t_mma, 1e-30)
            r["flop_no_overlap_tflops"] = (cta_flops / (t_mma + t_mufu + t_rest - credit)
                                           * sms / 1e12)
        r["flop_bound"] = min(caps, key=caps.get)
        if flops / fl > t:
            t, bound = flops / fl, r["flop_bound"]
    r.update(time_us=t * 1e6, bound=bound)
    return r


