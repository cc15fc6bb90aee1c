"""SASS facts for the kernel report (bench/kernel_report.py): loops, their instructions per
iteration, K/V copy bytes, copies in flight, MMA kinds and FLOPs, from cuobjdump output.

A back-edge branch closes a loop; inner loops count times their trip count when the bound
is an immediate (a runtime bound counts once: instruction counts are lower bounds). The K/V
loop is a loop that copies K/V (LDGSTS / UTMALDG; plain wide LDG only if no loop copies
asynchronously) and computes (MMA / FFMA), with no such loop inside it.
A K/V loop with wgmma (HGMMA) and no inner loop also yields `mma_events`, its body in issue
order for the model's overlap credit (bench/kernel_model.py overlap_credit).
Per K/V loop also the shared-memory traffic the model's smem term charges: wgmma operand
bytes (SS: A and B descriptors, RS: B only; wgmma_smem_bytes) and copy / load / store bytes
(LDS, STS, LDSM, STSM, LDGSTS destinations; smem_copy_bytes).
"""
from __future__ import annotations

import collections
import math
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path


_INS = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Za-z0-9_.]*)\s*([^;]*);")
_MMA_SHAPE = re.compile(r"(\d+)x(\d+)x(\d+)")


def parse_sass(text: str) -> dict[str, list[tuple[int, str, str, str]]]:
    """{function: [(address, predicate, opcode, operands)]} from cuobjdump -sass output."""
    funcs, cur = {}, None
    for line in text.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            cur = funcs.setdefault(m.group(1), [])
            continue
        m = _INS.search(line)
        if m and cur is not None:
            cur.append((int(m.group(1), 16), (m.group(2) or "").strip(), m.group(3),
                        m.group(4).strip()))
    return funcs


def _width(op: str) -> int:
    """Bytes per lane of a load/copy opcode (LDG.E.128 -> 16; default 4)."""
    for bits, nbytes in ((".128", 16), (".64", 8), (".U16", 2), (".S16", 2), (".U8", 1),
                         (".S8", 1)):
        if bits in op:
            return nbytes
    return 4


def mma_flops(op: str) -> int:
    """FLOPs of one warp's issue of an MMA instruction: HMMA.16816 = m16n8k16 per warp;
    HGMMA.64xNx16 is one warpgroup (4 warps) instruction: a quarter per warp."""
    if op.startswith("HMMA") or op.startswith("IMMA"):
        digits = op.split(".")[1]
        m, n, k = {"16816": (16, 8, 16), "1688": (16, 8, 8), "884": (8, 8, 4),
                   "16832": (16, 8, 32)}.get(digits, (16, 8, 16))
        return 2 * m * n * k
    s = _MMA_SHAPE.search(op)
    if op.startswith(("HGMMA", "QGMMA", "IGMMA")) and s:
        m, n, k = map(int, s.groups())
        return 2 * m * n * k // 4
    return 0


# Dense wgmma's K step is 32 bytes of every input type (k16 x 2 B f16/bf16, k32 x 1 B e4m3 /
# s8, k8 x 4 B tf32), so an operand tile of R rows is 32 R bytes.
_WGMMA_K_BYTES = 32


def wgmma_form(op: str, args: str) -> str | None:
    """"ss" (A and B from shared memory: the first source is a `gdesc[..]` descriptor), "rs"
    (A in registers, only B a descriptor), None for anything else. SASS: `HGMMA.64x32x16.F32
    R24, gdesc[UR4], R24` (SS) vs `HGMMA.64x128x16.F32.BF16 R24, R120, gdesc[UR8].tnspB,
    R24` (RS)."""
    if _mma_kind(op) != "wgmma":
        return None
    a = [x.strip() for x in args.split(",")]
    if len(a) > 1 and a[1].startswith("gdesc"):
        return "ss"
    if len(a) > 2 and a[2].startswith("gdesc"):
        return "rs"
    return None


def wgmma_smem_bytes(op: str, args: str) -> int:
    """Shared-memory operand bytes one warp's issue of a wgmma reads, a quarter of the
    warpgroup instruction's (as mma_flops): SS reads A (64 x 32 B) and B (N x 32 B), RS only
    B. B counted once per instruction (shared by the 4 warps), not per warp."""
    form, s = wgmma_form(op, args), _MMA_SHAPE.search(op)
    if form is None or not s:
        return 0
    m, n, _ = map(int, s.groups())
    return _WGMMA_K_BYTES * ((m if form == "ss" else 0) + n) // 4


def smem_copy_bytes(op: str) -> int:
    """Shared-memory bytes a warp's instruction moves, counted from SASS: LDS / STS (32 lanes
    x width), LDSM / STSM (ldmatrix / stmatrix: 128 B per 8x8 16-bit matrix, .4 = 4 of
    them), LDGSTS (cp.async: its destination, 32 lanes x width). Not counted: TMA (UTMALDG:
    the tile size is in the descriptor, not the SASS), atomics, and inactive lanes (every
    lane is assumed active)."""
    if op.startswith(("LDSM", "STSM")):
        m = re.search(r"\.(\d)$", op)
        return 128 * (int(m.group(1)) if m else 1)
    if op.startswith(("LDS", "STS", "LDGSTS")) and not op.startswith(("LDSM", "STSM")):
        return 32 * _width(op)
    return 0


def _mma_kind(op: str) -> str | None:
    if op.startswith(("HGMMA", "QGMMA", "IGMMA")):
        return "wgmma"
    if op.startswith(("HMMA", "IMMA")):
        return "mma.sync"
    return None


@dataclass
class Loop:
    start: int
    end: int                   # address of the back-edge branch
    children: list = field(default_factory=list)
    trip: int | None = None    # static trip count per entry, None: runtime bound

    def contains(self, o: "Loop") -> bool:
        return self.start <= o.start and o.end <= self.end and (self.start, self.end) != (o.start, o.end)


def find_loops(ins) -> list[Loop]:
    """Top-level loops (nested ones in .children), one per back-edge target."""
    by_start = {}
    for addr, pred, op, args in ins:
        if op.startswith("BRA") and not op.startswith("BRA.DIV"):
            m = re.search(r"0x([0-9a-f]+)", args)
            if m and int(m.group(1), 16) <= addr:
                t = int(m.group(1), 16)
                by_start[t] = max(by_start.get(t, addr), addr)
    # An out-of-line block (ptxas puts divergent-path code after the kernel's exits) that
    # branches back into a loop makes an interval crossing that loop's: not a loop itself.
    spans = sorted(by_start.items())
    crossing = {a for a in spans for b in spans
                if b[0] < a[0] <= b[1] < a[1]}
    loops = sorted((Loop(s, e) for s, e in spans if (s, e) not in crossing),
                   key=lambda l: (l.start, -l.end))
    top = []
    for lp in loops:                       # sorted by start, widest first: a stack nests them
        parent, level = None, top
        while True:
            up = next((p for p in level if p.contains(lp)), None)
            if up is None:
                break
            parent, level = up, up.children
        level.append(lp)
    for lp in loops:
        lp.trip = _trip(ins, lp)
    return top


def _trip(ins, lp: Loop) -> int | None:
    """Trip count from `ISETP R, imm` + `IADD R, R, imm` at the back edge (counter from ~0)."""
    body = [x for x in ins if lp.start <= x[0] <= lp.end]
    br = body[-1]
    pm = re.match(r"@!?(P\d)", br[1])
    if not pm:
        return None
    for addr, pred, op, args in reversed(body[:-1]):
        a = [s.strip() for s in args.split(",")]
        if op.startswith("ISETP") and a and a[0] == pm.group(1):
            if len(a) < 4 or not a[3].startswith("0x"):
                return None
            reg, bound = a[2].split(".")[0], int(a[3], 16)
            for _, _, op2, args2 in body:
                b = [s.strip().split(".")[0] for s in args2.split(",")]
                if (op2.startswith(("IADD3", "VIADD", "IADD")) and len(b) >= 3 and b[0] == reg
                        and b[1] == reg and b[2].startswith("0x")):
                    step = int(b[2], 16)
                    if 0 < step < 1 << 20:
                        return max(1, math.ceil(bound / step))
            return None
    return None


_REG = re.compile(r"\bR(\d+)\b")


def _prefetched_bytes(own) -> int:
    """K/V bytes of wide LDGs whose destination is live into the loop (its first access in
    the body is a read, before the load): the load of iteration i feeds iteration i + 1, so
    it is in flight across the math in between (a register double buffer)."""
    total = 0
    for i, (_, _, op, args) in enumerate(own):
        if not (op.startswith("LDG") and not op.startswith("LDGSTS") and _width(op) >= 8):
            continue
        m = _REG.search(args.split(",")[0])
        if not m:
            continue
        first = int(m.group(1))
        regs = {f"R{first + j}" for j in range(max(1, _width(op) // 4))}
        for _, _, op2, args2 in own[:i]:
            ops = [o.strip() for o in args2.split(",")]
            dst = {f"R{v}" for v in _REG.findall(ops[0])} if ops else set()
            src = {f"R{v}" for o in ops[1:] for v in _REG.findall(o)}
            if regs & src:
                total += 32 * _width(op)
                break
            if regs & dst and not op2.startswith(("ST", "BRA")):
                break
    return total


def _loop_stats(ins, lp: Loop) -> dict:
    """Per-warp dynamic counts of one iteration of lp (inner loops x their trip counts)."""
    inner = [(c.start, c.end) for c in lp.children]
    st = collections.Counter()
    waits = []
    for addr, pred, op, args in ins:
        if not (lp.start <= addr <= lp.end) or any(s <= addr <= e for s, e in inner):
            continue
        if op == "NOP":
            continue
        st["instr"] += 1
        if op.startswith("LDGSTS") and _width(op) >= 8:
            st["copy_bytes"] += 32 * _width(op)
            st["ldgsts"] += 1
        elif op.startswith("LDGSTS"):
            st["ldgsts_narrow"] += 1          # index copies (block ids), not K/V bytes
        elif op.startswith("LDG") and _width(op) >= 8:
            st["copy_bytes"] += 32 * _width(op)
        elif op.startswith("LDG"):
            st["ldg_narrow"] += 1
        elif op.startswith("UTMALDG"):
            st["tma"] += 1
        elif op.startswith(("STG", "ST.")):
            st["store_bytes"] += 32 * _width(op)
        elif op.startswith("FFMA"):
            st["flops"] += 64
            st["ffma"] += 1
        elif op.startswith("HFMA2") and not op.startswith("HFMA2.MMA"):   # .MMA: a move
            st["flops"] += 128
            st["hfma2"] += 1
        elif op.startswith("MUFU"):
            st["mufu"] += 1
        st["smem_copy_bytes"] += smem_copy_bytes(op)
        form = wgmma_form(op, args)
        if form:
            st[f"wgmma_{form}"] += 1
            st["smem_operand_bytes"] += wgmma_smem_bytes(op, args)
        kind = _mma_kind(op)
        if kind == "wgmma" and "gsb0" in args:
            st["wgmma_groups"] += 1           # commits: one per HGMMA = ptxas serialised them
        if kind:
            st[f"mma:{kind}"] += 1
            st["flops"] += mma_flops(op)
            st["mma_flops"] += mma_flops(op)   # the sum: a loop may mix shapes (QK^T vs PV)
            st["mma_flops_per_instr"] = max(st["mma_flops_per_instr"], mma_flops(op))
        if op.startswith("DEPBAR"):
            m = re.search(r"SB0,\s*0x([0-9a-f]+)|SB0,\s*(\d+)", args)
            if m:
                waits.append(int(m.group(1) or m.group(2), 16 if m.group(1) else 10))
    own = [x for x in ins if lp.start <= x[0] <= lp.end
           and not any(a <= x[0] <= b for a, b in inner) and x[2] != "NOP"]
    st["prefetched_bytes"] = _prefetched_bytes(own)
    for c in lp.children:
        cs = _loop_stats(ins, c)
        trip = c.trip or 1
        for k, v in cs.items():
            if k in ("waits", "runtime_trips", "mma_flops_per_instr"):
                continue
            st[k] += v * trip
        st["mma_flops_per_instr"] = max(st["mma_flops_per_instr"], cs["mma_flops_per_instr"])
        st["runtime_trips"] += cs["runtime_trips"] + (c.trip is None)
        waits += cs["waits"]
    out = dict(st)
    out["waits"] = sorted(set(waits))
    out.setdefault("runtime_trips", 0)
    out.setdefault("mma_flops_per_instr", 0)
    return out


def mma_events(ins, lp: Loop) -> list[list]:
    """lp's body in issue order, runs of one kind merged: ["mma", FLOPs per warp] (an HGMMA;
    it starts the tensor cores), ["commit"] (an HGMMA carrying gsb0 closes its group),
    ["wait", N] (WARPGROUP.DEPBAR.LE gsb0, N: the warp stalls until <= N groups are
    pending), ["mufu", n], ["issue", n] (every other instruction). Only for loops with
    HGMMA and no inner loop (else []): wgmma is the one MMA that runs while the warp goes on."""
    if lp.children:
        return []
    out = []
    for addr, pred, op, args in ins:
        if not lp.start <= addr <= lp.end or op == "NOP":
            continue
        if op.startswith("HGMMA"):
            ev = [["mma", mma_flops(op)]] + ([["commit"]] if "gsb0" in args else [])
        elif op.startswith("WARPGROUP.DEPBAR"):
            m = re.search(r"gsb0,\s*(0x[0-9a-f]+|\d+)", args)
            ev = [["wait", int(m.group(1), 0) if m else 0]]
        elif op.startswith("MUFU"):
            ev = [["mufu", 1]]
        else:
            ev = [["issue", 1]]
        for e in ev:
            if out and e[0] in ("issue", "mufu") and out[-1][0] == e[0]:
                out[-1][1] += 1
            else:
                out.append(e)
    return out if any(e[0] == "mma" for e in out) else []


def _all_loops(loops):
    for lp in loops:
        yield lp
        yield from _all_loops(lp.children)


def sass_facts(ins) -> dict:
    """Kernel-level MMA kinds and the K/V loops (see the module docstring). A K/V loop copies
    K/V (LDGSTS / UTMALDG; plain wide LDG only if no loop copies asynchronously) and computes
    (MMA / FFMA), and no loop inside it does both: Triton's tile loops inside a loop over q
    blocks, CUDA's tile loop around its copy and math loops."""
    kinds = sorted({k for _, _, op, _ in ins if (k := _mma_kind(op))})
    stats = {id(lp): (lp, _loop_stats(ins, lp)) for lp in _all_loops(find_loops(ins))}
    is_async = any(s.get("ldgsts") or s.get("tma") for _, s in stats.values())

    def kv(lp):
        s = stats[id(lp)][1]
        copies = (s.get("ldgsts") or s.get("tma")) if is_async else s.get("copy_bytes")
        return bool(copies) and s.get("flops", 0) > 0
    loops = []
    for lp, s in stats.values():
        if not kv(lp) or any(kv(c) for c in _all_loops(lp.children)):
            continue
        mma = {k.split(":")[1]: v for k, v in s.items() if k.startswith("mma:")}
        in_flight = 1 + max(s["waits"]) if s["waits"] and (s.get("ldgsts") or s.get("tma")) else 1
        prefetch = s.get("prefetched_bytes", 0)
        if in_flight == 1 and prefetch and 2 * prefetch >= s.get("copy_bytes", 0):
            in_flight = 2
        loops.append(dict(start=hex(lp.start), instr=s["instr"],
                          copy_bytes=s.get("copy_bytes", 0), tma=s.get("tma", 0),
                          flops=s.get("flops", 0), mma=mma,
                          mma_flops_per_instr=s["mma_flops_per_instr"],
                          mma_flops=s.get("mma_flops", 0),
                          ffma=s.get("ffma", 0), mufu=s.get("mufu", 0),
                          mma_instr=sum(mma.values()), depbar_waits=s["waits"],
                          groups_in_flight=in_flight, prefetched_bytes=prefetch,
                          runtime_trips=s["runtime_trips"],
                          wgmma_groups=s.get("wgmma_groups", 0),
                          wgmma_ss=s.get("wgmma_ss", 0), wgmma_rs=s.get("wgmma_rs", 0),
                          smem_operand_bytes=s.get("smem_operand_bytes", 0),
                          smem_copy_bytes=s.get("smem_copy_bytes", 0),
                          mma_events=mma_events(ins, lp)))
    total = [x for x in ins if x[2] != "NOP"]
    whole = dict(instr=len(total),
                 copy_bytes=sum(32 * _width(op) for _, _, op, _ in total if op.startswith("LDG")),
                 store_bytes=sum(32 * _width(op) for _, _, op, _ in total if op.startswith("STG")))
    return dict(mma_kinds=kinds, kv_loops=loops, whole=whole)


def pick_loop(facts: dict, cls: str) -> dict | None:
    """The hot K/V loop for a class: "prefill" = most FLOPs per iteration, "decode" = fewest;
    among those (within 10%), the one with fewest instructions (the unmasked body)."""
    loops = facts.get("kv_loops") or []
    if not loops:
        return None
    ref = (max if cls == "prefill" else min)(x["flops"] for x in loops)
    same = [x for x in loops if abs(x["flops"] - ref) <= 0.1 * ref]
    return min(same, key=lambda x: x["instr"])


def _tool(name: str) -> str:
    import triton
    p = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(p) if p.exists() else (shutil.which(name) or name)


def cubin_facts(cubin: bytes) -> dict[str, dict]:
    """{mangled symbol: resource usage + SASS facts} for every function of a cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", f.name], capture_output=True,
                              text=True, check=True).stdout
    out = {}
    for name, body in re.findall(r"Function (\S+):\s*\n\s*(REG:.*)", res):
        u = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", body))
        out[name] = dict(regs=int(u.get("REG", 0)), stack=int(u.get("STACK", 0)),
                         local=int(u.get("LOCAL", 0)), static_smem=int(u.get("SHARED", 0)))
    for name, ins in parse_sass(sass).items():
        out.setdefault(name, {}).update(sass_facts(ins))
    return out


def demangle(names: list[str]) -> dict[str, str]:
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    res = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True)
    dem = res.stdout.splitlines()
    return dict(zip(names, dem)) if len(dem) == len(names) else {n: n for n in names}


def _clean(name: str) -> str:
    """Demangled name without the anonymous-namespace hash nvcc adds."""
    return re.sub(r"_GLOBAL__N__\w+", "(anonymous namespace)", name)


