// CPU emulation of the CUDA execution model, so CI machines without a GPU run the csrc/
// kernels' own code (index math, masking, online softmax, split merge, the cp.async pipeline,
// tensor-core fragments) against the references. Built by csrc/emu/emulated.py with g++ (never
// part of the extension); RAGGED_EMU selects the emulated branches of cuda_utils.cuh.
//
// What it models, and how strictly:
// - Threads of a block are fibers (ucontext) on one OS thread, run one at a time, each until
//   it blocks (a barrier, a warp collective) or exits; the scheduler always resumes the first
//   runnable thread of a seeded order (warps shuffled, lanes shuffled within each), so the
//   first warp runs its whole phase before the next warp gets past its first collective: a
//   missing __syncthreads between a write and another warp's read shows deterministically
//   (the reader runs first, or the writer's next phase overwrites first), not by a lucky race.
// - __syncthreads: releases when every thread that has not exited has arrived (exited threads
//   do not count, as on sm_70+). A barrier that can never release (a __syncthreads in a
//   branch not all threads take, a lane stuck in a shuffle) is reported, not hung.
// - Warp collectives (__shfl_*_sync, __syncwarp, ldmatrix, mma.sync) wait for exactly the
//   lanes of their mask; they fail (launch error) if the caller is not in the mask, a source
//   lane is not in the mask, a mask lane has exited (a partial warp), or the lanes disagree on
//   the mask or the operation. mma.sync/ldmatrix require the full warp, as the PTX ISA does.
// - cp.async (16 B, 4 B): queued per thread with its destination poisoned (0xff bytes, NaN in
//   fp16/bf16/fp32) at issue; commit_group closes a group; wait_group<N> applies the oldest
//   committed groups until N remain; copies not yet committed are never applied by a wait.
//   Reading a stage before its wait (or before the barrier after the other threads' waits)
//   reads NaN. The source is read at issue (the kernels never write what they prefetch).
// - ldmatrix .x1/.x2/.x4 (.trans) and mma.sync.m16n8k16 (f16/bf16 in, f32 accumulate) with
//   the PTX ISA fragment layouts (lane l: group g = l / 4, t = l % 4). mma accumulates in fp32
//   in k order; the hardware's internal accumulation order/rounding may differ by an ulp.
// - wgmma (sm_90a; csrc/wgmma.cuh) with the PTX ISA semantics: wgmma.mma_async
//   .m64nNk16 (f16/bf16 in, f32 accumulate) is a collective of the 128 threads of a
//   warpgroup (all must arrive, with the same shape, flags and descriptors); A from
//   registers or shared memory, B from shared memory, both read through the decoded matrix
//   descriptor (start, LBO, SBO, swizzle none/32B/64B/128B applied to the shared-window
//   address bits, as the hardware does: a pattern off its 1024-byte boundary reads wrong
//   elements). Dynamic shared memory sits at shared address 0x300, 0x3d0 or 0x400 of the
//   window (launches take them in turn: a kernel must align its swizzled tiles itself). The issuing thread's
//   accumulators read NaN until a wgmma.wait_group retires its group; a wgmma chained on the
//   accumulators of an in-flight one (same shape) accumulates onto its result. Shared memory
//   an in-flight wgmma reads must not change before the wait (checked at the first and the
//   last thread's wait: launch error). A wgmma without a wgmma.fence by the thread since
//   its last wait_group (or its start) fails: the model's stand-in for "registers touched
//   since" (conservative). The generic->async proxy fence: shared memory a thread wrote in the
//   generic proxy (st.shared reported by emu_generic_write, a cp.async when its wait_group
//   applies it) is dirty per byte until that thread's fence.proxy.async (the ISA:
//   the fence orders the executing thread's own writes; the barrier after it carries them to
//   the warpgroup); a wgmma reading a dirty byte fails. Register operands in flight: the
//   accumulators hold a NaN with a payload from issue to the wait that retires the op (or the
//   last op chained on them), A registers (RS) their issue values; a store to either before
//   that wait fails there (the A array must outlive the wait, as the tile's does). Conservative
//   like the fence rule: C++ variables are not PTX registers (ptxas may rename a reused A
//   array), but a kernel that keeps them untouched until the wait needs no such luck. Not caught: a write that leaves the bits as they were (arithmetic
//   on the NaN keeps its payload: `o *= a` on in-flight accumulators computes on NaN, which the
//   wait then overwrites: harmless here, undefined on a GPU), a write between wgmma.fence and the mma
//   (C++ has no register view; the sm_90a PTX scan of review F3 covers it), negative
//   imm-scale, base offset != 0 (fails).
// - Blocks of a grid run one after another in a seeded shuffled order (a fresh order per
//   launch; set RAGGED_EMU_SEED to reproduce). Dynamic shared memory is poisoned (0xff) before
//   each block; `__shared__` is `static` (one block at a time).
// - Launch configuration: grid/block limits, dynamic shared memory and its 48 KB opt-in.
// What it cannot model: blocks running concurrently (an inter-block race or a spin-wait on
// another block deadlocks or passes by order), memory ordering/fences between blocks, real
// warp scheduling inside a phase (lanes of a warp do not run in lockstep here: a warp-
// synchronous read without __syncwarp is not caught), alignment faults of plain global
// accesses, bank conflicts, register limits and spills, timing, and approximate SFU math
// (fast_exp2 is exp2f here, ex2.approx.ftz on the GPU). The gpu tests do that.
#pragma once
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <ucontext.h>
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <vector>
#undef __global__
#undef __device__
#undef __shared__
#undef __launch_bounds__
#undef __forceinline__
#define __global__
#define __device__
#define __shared__ static
#define __launch_bounds__(...)
#define __forceinline__ inline
#define RAGGED_EMU 1
using std::min; using std::max;
inline uint3 emu_tid, emu_bid;  // of the running fiber (one runs at a time)
inline dim3 emu_bdim, emu_gdim;
#define threadIdx emu_tid
#define blockIdx emu_bid
#define blockDim emu_bdim
#define gridDim emu_gdim
inline void* emu_dyn_smem = nullptr;
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __fmul_rn(float a, float b) { volatile float r = a * b; return r; }
inline float __fadd_rn(float a, float b) { volatile float r = a + b; return r; }
inline float __fsub_rn(float a, float b) { volatile float r = a - b; return r; }

inline cudaError_t emu_error = cudaSuccess;
inline std::string emu_message;  // why the last launch failed (emulated.py shows it)
inline void emu_fail(const std::string& why) {
  if (emu_error == cudaSuccess) {
    emu_error = cudaErrorLaunchFailure;
    emu_message = why;
  }
}

// ------------------------------------------------------------------ fibers and the scheduler
enum EmuState { kRunnable, kAtBarrier, kAtWarp, kExited };
struct EmuCopy { void* dst; unsigned char data[16]; int n; };
struct EmuWgOp;  // one wgmma.mma_async of a warpgroup (below)
struct EmuWgPend {
  std::shared_ptr<EmuWgOp> op;
  float* acc;
  int nacc;
  const uint32_t* a;  // RS: the A registers, which must hold a_val until the wait
  uint32_t a_val[4];
};
// In-flight accumulators hold this NaN (a quiet NaN with a payload): a plain store to one
// before its wait_group shows as another bit pattern at the wait.
constexpr uint32_t kEmuWgPoison = 0x7fc0deadu;
struct EmuThread {
  ucontext_t ctx;
  EmuState state = kExited;
  std::vector<EmuCopy> open;               // issued, not committed
  std::deque<std::vector<EmuCopy>> groups; // committed, not yet waited for
  std::vector<EmuWgPend> wg_open;                // wgmma issued, not committed
  std::deque<std::vector<EmuWgPend>> wg_groups;  // committed wgmma groups, not waited for
  bool wg_fenced = false;                        // wgmma.fence since the last wait_group
  std::vector<std::pair<int, int>> gen_dirty;  // dynamic-smem byte ranges written since its
                                               // fence.proxy.async (offset, length)
};
struct EmuWarp {  // one pending collective at a time
  unsigned mask = 0, arrived = 0;
  const char* op = nullptr;
  std::function<void()> combine;
  unsigned long long in[32][12];   // per-lane inputs (up to 12 x 8 bytes)
  unsigned long long out[32][4];   // per-lane results
};
inline ucontext_t emu_sched_ctx;
inline std::vector<EmuThread> emu_threads;
inline std::vector<EmuWarp> emu_warps;
struct EmuWarpgroup;
inline std::vector<EmuWarpgroup> emu_wgs;
inline std::vector<std::unique_ptr<char[]>> emu_stacks;
constexpr size_t kEmuStack = 256 * 1024;
inline std::function<void()> emu_body;
inline bool emu_aborted = false;  // the block hit an error: fibers are abandoned

inline int emu_cur() { return static_cast<int>(emu_tid.x); }
inline void emu_yield() { swapcontext(&emu_threads[emu_cur()].ctx, &emu_sched_ctx); }

inline void __syncthreads() {
  emu_threads[emu_cur()].state = kAtBarrier;
  emu_yield();
}

// Run a warp collective: `fill` writes this lane's inputs, `combine` (run once, by the last
// lane of `mask` to arrive) computes every lane's outputs; returns this lane's out[] row.
inline unsigned long long* emu_collective(unsigned mask, const char* op,
                                          const std::function<void(unsigned long long*)>& fill,
                                          std::function<void()> combine) {
  const int t = emu_cur(), lane = t & 31, w = t >> 5;
  EmuWarp& wp = emu_warps[w];
  auto fail = [&](const char* why) {
    char buf[200];
    std::snprintf(buf, sizeof buf, "%s: %s (block %u,%u thread %d mask %08x)", op, why,
                  emu_bid.x, emu_bid.y, t, mask);
    emu_fail(buf);
    emu_aborted = true;
    emu_threads[t].state = kExited;
    swapcontext(&emu_threads[t].ctx, &emu_sched_ctx);  // never resumed
  };
  if (!(mask >> lane & 1u)) fail("calling lane not in the mask");
  for (int l = 0; l < 32; ++l)
    if ((mask >> l & 1u) && (w * 32 + l >= static_cast<int>(emu_threads.size()) ||
                             emu_threads[w * 32 + l].state == kExited))
      fail("a lane of the mask has exited or does not exist (partial warp)");
  if (wp.arrived == 0) {
    wp.mask = mask;
    wp.op = op;
  } else if (wp.mask != mask || std::strcmp(wp.op, op) != 0) {
    fail("lanes of the warp disagree on the collective (divergent mask or operation)");
  }
  fill(wp.in[lane]);
  wp.arrived |= 1u << lane;
  if (wp.arrived == mask) {  // the last lane: compute for all, release all
    combine();
    wp.arrived = 0;
    for (int l = 0; l < 32; ++l)
      if (mask >> l & 1u && l != lane) emu_threads[w * 32 + l].state = kRunnable;
  } else {
    emu_threads[t].state = kAtWarp;
    emu_yield();
  }
  return wp.out[lane];
}

template <typename V>
inline V emu_shfl(unsigned mask, V v, int src_of_lane_xor, int mode, const char* op) {
  static_assert(sizeof(V) <= 8, "shuffle of a 32/64-bit value");
  const int w = emu_cur() >> 5;
  unsigned long long* r = emu_collective(
      mask, op,
      [&](unsigned long long* in) {
        in[0] = 0;
        std::memcpy(in, &v, sizeof(V));
        in[1] = static_cast<unsigned long long>(src_of_lane_xor);
      },
      [w, mode, op] {
        EmuWarp& wp = emu_warps[w];
        for (int l = 0; l < 32; ++l) {
          if (!(wp.mask >> l & 1u)) continue;
          const int a = static_cast<int>(wp.in[l][1]);
          const int src = mode == 0 ? (l ^ a) : mode == 1 ? (a & 31) : (l + a);
          if (src > 31 || src < 0) {
            wp.out[l][0] = wp.in[l][0];  // shfl_down past the warp: own value (PTX)
            continue;
          }
          if (!(wp.mask >> src & 1u)) {
            emu_fail(std::string(op) + ": source lane not in the mask");
            emu_aborted = true;
          }
          wp.out[l][0] = wp.in[src][0];
        }
      });
  V out;
  std::memcpy(&out, r, sizeof(V));
  return out;
}
template <typename V> inline V __shfl_xor_sync(unsigned m, V v, int o) {
  return emu_shfl(m, v, o, 0, "__shfl_xor_sync");
}
template <typename V> inline V __shfl_sync(unsigned m, V v, int src) {
  return emu_shfl(m, v, src, 1, "__shfl_sync");
}
template <typename V> inline V __shfl_down_sync(unsigned m, V v, int d) {
  return emu_shfl(m, v, d, 2, "__shfl_down_sync");
}
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  emu_collective(mask, "__syncwarp", [](unsigned long long*) {}, [] {});
}

// ------------------------------------------------------------------ cp.async
inline void emu_cp_async(void* dst, const void* src, bool valid, int n) {
  EmuCopy c;
  c.dst = dst;
  c.n = n;
  if (reinterpret_cast<uintptr_t>(dst) % n || (valid && reinterpret_cast<uintptr_t>(src) % n))
    emu_fail("cp.async: address not aligned to the copy size");
  if (valid) std::memcpy(c.data, src, n);
  else std::memset(c.data, 0, n);
  std::memset(dst, 0xff, n);  // undefined until the wait: NaN for every float type
  emu_threads[emu_cur()].open.push_back(c);
}
inline void emu_cp_async16(void* dst, const void* src, bool valid) {
  emu_cp_async(dst, src, valid, 16);
}
inline void emu_cp_async_commit() {
  EmuThread& th = emu_threads[emu_cur()];
  th.groups.push_back(std::move(th.open));
  th.open.clear();
}
inline void emu_generic_write(const void* p, size_t n);  // (below: the proxy model)
inline void emu_cp_async_wait(int n) {
  EmuThread& th = emu_threads[emu_cur()];
  while (static_cast<int>(th.groups.size()) > n) {
    for (const EmuCopy& c : th.groups.front()) {
      std::memcpy(c.dst, c.data, c.n);
      emu_generic_write(c.dst, c.n);  // cp.async (non-bulk) writes in the generic proxy
    }
    th.groups.pop_front();
  }
}

// ------------------------------------------------------------------ ldmatrix / mma.sync
// ldmatrix.sync.aligned.m8n8.xN(.trans).shared.b16: lanes 8i..8i+7 give the row addresses of
// matrix i; register i of lane l holds row l/4, columns 2(l%4), 2(l%4)+1 of matrix i (of its
// transpose with .trans), the lower column in the low 16 bits.
inline void emu_ldmatrix(uint32_t* r, int n, bool trans, const void* row_addr) {
  const int w = emu_cur() >> 5;
  const char* op = n == 1 ? (trans ? "ldmatrix.x1.trans" : "ldmatrix.x1")
                 : n == 2 ? (trans ? "ldmatrix.x2.trans" : "ldmatrix.x2")
                          : (trans ? "ldmatrix.x4.trans" : "ldmatrix.x4");
  unsigned long long* o = emu_collective(
      0xffffffffu, op,
      [&](unsigned long long* in) { in[0] = reinterpret_cast<uintptr_t>(row_addr); },
      [w, n, trans] {
        EmuWarp& wp = emu_warps[w];
        for (int i = 0; i < n; ++i)
          for (int r = 0; r < 8; ++r)
            if (wp.in[8 * i + r][0] % 16) {
              emu_fail("ldmatrix: row address not 16-byte aligned");
              emu_aborted = true;
            }
        for (int l = 0; l < 32; ++l)
          for (int i = 0; i < n; ++i) {
            uint16_t e[2];
            for (int j = 0; j < 2; ++j) {
              const int row = trans ? 2 * (l % 4) + j : l / 4;
              const int col = trans ? l / 4 : 2 * (l % 4) + j;
              const uint16_t* base = reinterpret_cast<const uint16_t*>(wp.in[8 * i + row][0]);
              e[j] = base[col];
            }
            reinterpret_cast<uint32_t*>(wp.out[l])[i] = e[0] | static_cast<uint32_t>(e[1]) << 16;
          }
      });
  std::memcpy(r, o, sizeof(uint32_t) * n);
}

inline float emu_b16_to_f(uint16_t h, bool bf16) {
  if (bf16) {
    const uint32_t u = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  __half x;
  std::memcpy(&x, &h, 2);
  return __half2float(x);
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32: D = A B + C.
// A (16x16): reg0 (g, 2t..2t+1), reg1 (g+8, 2t..), reg2 (g, 2t+8..), reg3 (g+8, 2t+8..).
// B (16x8, k x n): reg0 (k = 2t..2t+1, n = g), reg1 (k = 2t+8.., n = g).
// C/D (16x8 f32): c0, c1 (g, 2t..2t+1), c2, c3 (g+8, 2t..2t+1).
inline unsigned long long emu_mma_count = 0;  // mma.sync calls, one a thread (tests read it)
inline void emu_mma_16816(float* d, const uint32_t* a, const uint32_t* b, const float* c,
                          bool bf16) {
  ++emu_mma_count;
  const int w = emu_cur() >> 5;
  unsigned long long* o = emu_collective(
      0xffffffffu, bf16 ? "mma.m16n8k16.bf16" : "mma.m16n8k16.f16",
      [&](unsigned long long* in) {
        uint32_t* u = reinterpret_cast<uint32_t*>(in);
        for (int i = 0; i < 4; ++i) u[i] = a[i];
        for (int i = 0; i < 2; ++i) u[4 + i] = b[i];
        std::memcpy(u + 6, c, 16);
      },
      [w, bf16] {
        EmuWarp& wp = emu_warps[w];
        float A[16][16], B[16][8], C[16][8];
        for (int l = 0; l < 32; ++l) {
          const int g = l / 4, t = l % 4;
          const uint32_t* u = reinterpret_cast<const uint32_t*>(wp.in[l]);
          for (int j = 0; j < 2; ++j) {
            A[g][2 * t + j] = emu_b16_to_f(u[0] >> 16 * j & 0xffff, bf16);
            A[g + 8][2 * t + j] = emu_b16_to_f(u[1] >> 16 * j & 0xffff, bf16);
            A[g][2 * t + 8 + j] = emu_b16_to_f(u[2] >> 16 * j & 0xffff, bf16);
            A[g + 8][2 * t + 8 + j] = emu_b16_to_f(u[3] >> 16 * j & 0xffff, bf16);
            B[2 * t + j][g] = emu_b16_to_f(u[4] >> 16 * j & 0xffff, bf16);
            B[2 * t + 8 + j][g] = emu_b16_to_f(u[5] >> 16 * j & 0xffff, bf16);
          }
          float cc[4];
          std::memcpy(cc, u + 6, 16);
          C[g][2 * t] = cc[0]; C[g][2 * t + 1] = cc[1];
          C[g + 8][2 * t] = cc[2]; C[g + 8][2 * t + 1] = cc[3];
        }
        for (int l = 0; l < 32; ++l) {
          const int g = l / 4, t = l % 4;
          float r[4];
          for (int q = 0; q < 4; ++q) {
            const int row = g + 8 * (q / 2), col = 2 * t + q % 2;
            float s = C[row][col];
            for (int k = 0; k < 16; ++k) s = std::fma(A[row][k], B[k][col], s);
            r[q] = s;
          }
          std::memcpy(wp.out[l], r, 16);
        }
      });
  std::memcpy(d, o, 16);
}


// ------------------------------------------------------------------ wgmma (sm_90a)
// Shared-window address of dynamic shared memory, per launch in turn 0x300, 0x3d0, 0x400 (a
// kernel's own 1024-byte alignment of swizzled tiles is exercised with 256, 48 and 0 bytes of
// padding; the hardware only promises 16-byte alignment).
inline uint32_t kEmuSmemBase = 0x300;
inline size_t emu_dyn_smem_size = 0;
inline void emu_abort_thread(const std::string& why) {
  char buf[300];
  std::snprintf(buf, sizeof buf, "%s (block %u,%u thread %d)", why.c_str(), emu_bid.x,
                emu_bid.y, emu_cur());
  emu_fail(buf);
  emu_aborted = true;
  emu_threads[emu_cur()].state = kExited;
  swapcontext(&emu_threads[emu_cur()].ctx, &emu_sched_ctx);  // never resumed
}
inline uint32_t emu_smem_addr(const void* p) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p), b = reinterpret_cast<uintptr_t>(emu_dyn_smem);
  if (a < b || a >= b + emu_dyn_smem_size)
    emu_abort_thread("shared address of a pointer outside dynamic shared memory");
  return kEmuSmemBase + static_cast<uint32_t>(a - b);
}
inline const uint16_t* emu_smem16(uint32_t addr) {
  if (addr < kEmuSmemBase || addr + 2 > kEmuSmemBase + emu_dyn_smem_size || addr % 2)
    emu_abort_thread("wgmma: operand address outside dynamic shared memory");
  return reinterpret_cast<const uint16_t*>(static_cast<char*>(emu_dyn_smem) + (addr - kEmuSmemBase));
}
// The generic -> async proxy rule (PTX ISA, wgmma.fence: "An async proxy fence must be used to
// establish an ordering between prior writes to shared memory matrices and subsequent reads of
// the same matrices in a wgmma.mma_async instruction"; cp.async (non-bulk) and st.shared
// write in the generic proxy, wgmma reads in the async proxy). fence.proxy.async orders the
// executing thread's own prior accesses; another thread's wgmma sees them through the barrier
// that follows (the scheduler's usual barrier semantics). So: each byte of dynamic shared
// memory remembers the thread whose generic write (a plain store reported through
// emu_generic_write, or a cp.async applied at its wait_group) has not been fenced yet; that
// thread's fence.proxy.async clears its bytes; a wgmma that reads a byte still dirty fails.
// Per byte, not per 16-byte granule: with one owner per granule, a neighbour's later store
// into the same granule (8 fp16 values from 8 threads) took ownership and its fence cleared
// the unfenced thread's bytes, so a missing fence passed or failed by the fiber order.
inline std::vector<int> emu_gen_owner;  // per byte: 0 clean, else writer thread + 1
inline void emu_generic_write(const void* p, size_t n) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p), b = reinterpret_cast<uintptr_t>(emu_dyn_smem);
  if (n == 0 || a < b || a + n > b + emu_dyn_smem_size) return;  // global / static __shared__
  const int t = emu_cur();
  for (size_t i = a - b; i < a - b + n; ++i) emu_gen_owner[i] = t + 1;
  emu_threads[t].gen_dirty.emplace_back(static_cast<int>(a - b), static_cast<int>(n));
}
inline void emu_fence_proxy_async() {
  const int t = emu_cur();
  for (const auto& [off, n] : emu_threads[t].gen_dirty)
    for (int i = off; i < off + n; ++i)
      if (emu_gen_owner[i] == t + 1) emu_gen_owner[i] = 0;
  emu_threads[t].gen_dirty.clear();
}

struct EmuDesc { uint32_t start, lbo, sbo; int base, swz; };
inline EmuDesc emu_desc(uint64_t d) {
  return {static_cast<uint32_t>(d & 0x3fff) << 4, static_cast<uint32_t>(d >> 16 & 0x3fff) << 4,
          static_cast<uint32_t>(d >> 32 & 0x3fff) << 4, static_cast<int>(d >> 49 & 7),
          static_cast<int>(d >> 62 & 3)};
}
// Shared address of element (mn, k) of a 16-bit operand (PTX ISA "Canonical Layouts", T = 8
// elements per 16 bytes; W = swizzle bytes):
//   K-major  none: ((8,m),(T,2k)):((1T,SBO),(1,LBO))   swizzled: ((8,m),(T,2k)):((W/16 T,SBO),(1,T))
//   MN-major none: ((T,1,m),(8,k)):((1,T,SBO),(1T,LBO)) swizzled: ((T,W/16,m),(8,k)):((1,T,LBO),(W/16 T,SBO))
// then Swizzle<log2(W/16),4,3> on the address: bits 4.. ^= bits 7.. (128B: 3 bits).
inline uint32_t emu_desc_addr(const EmuDesc& d, int mn, int k, bool mn_major) {
  const int W = d.swz == 1 ? 128 : d.swz == 2 ? 64 : d.swz == 3 ? 32 : 0;
  uint32_t off;
  if (!mn_major)
    off = W ? (mn % 8) * W + (mn / 8) * d.sbo + (k / 8) * 16 + (k % 8) * 2
            : (mn % 8) * 16 + (mn / 8) * d.sbo + (k / 8) * d.lbo + (k % 8) * 2;
  else
    off = W ? (mn % (W / 2)) * 2 + (mn / (W / 2)) * d.lbo + (k % 8) * W + (k / 8) * d.sbo
            : (mn % 8) * 2 + (mn / 8) * d.sbo + (k % 8) * 16 + (k / 8) * d.lbo;
  uint32_t a = d.start + off;
  if (W) {
    const uint32_t bits = d.swz == 1 ? 7 : d.swz == 2 ? 3 : 1;
    a ^= (a >> 7 & bits) << 4;
  }
  return a;
}
struct EmuWgOp {
  int nacc = 0;
  std::vector<float> res;  // [128][nacc]: each thread's accumulators after the op
  std::vector<std::pair<const uint16_t*, uint16_t>> reads;  // shared memory read, at issue
  int retired = 0;  // threads whose wait_group retired it
};
struct EmuWgIn { uint64_t da = 0, db = 0; uint32_t a[4] = {}; std::vector<float> c; };
struct EmuWarpgroup {
  int arrived = 0;
  std::string op;
  EmuWgIn in[128];
  std::shared_ptr<EmuWgOp> out;
  // The shared memory the op reads, as it was when the first warp issued it: the hardware may
  // read its operands from then on, so a write in between (another warp still converting or
  // storing, no barrier before the wgmma) is a race even though the last warp's issue sees
  // the final bytes.
  std::vector<std::pair<const uint16_t*, uint16_t>> first;
};

// wgmma.mma_async.sync.aligned.m64nNk16.f32.{f16,bf16}: d (N/2 floats a thread) = A B + (scale_d ?
// d : 0). a == nullptr: A from shared memory (descriptor da, M-major if trans_a), else the
// four A registers; B (descriptor db, N-major if trans_b).
inline unsigned long long emu_wgmma_count = 0;  // warpgroup wgmma ops executed (tests read it)
inline void emu_wgmma(float* d, int n, const uint32_t* a, uint64_t da, uint64_t db, bool scale_d,
                      bool trans_a, bool trans_b, bool bf16) {
  const int t = emu_cur(), w = t / 128, i = t % 128, nacc = n / 2;
  EmuThread& th = emu_threads[t];
  if (static_cast<int>(emu_threads.size()) < 128 * (w + 1))
    emu_abort_thread("wgmma: the block has no whole warpgroup for this thread");
  for (int j = 0; j < 128; ++j)
    if (emu_threads[128 * w + j].state == kExited)
      emu_abort_thread("wgmma: a thread of the warpgroup has exited (all 128 must arrive)");
  if (!th.wg_fenced)
    emu_abort_thread("wgmma.mma_async without a wgmma.fence since the thread's last "
                     "wgmma.wait_group (registers touched since)");
  if (n % 8 || n < 8 || n > 256) emu_abort_thread("wgmma: N must be a multiple of 8 in 8..256");
  char key[160];
  std::snprintf(key, sizeof key, "m64n%dk16 %s %s ta%d tb%d sd%d", n, a ? "RS" : "SS",
                bf16 ? "bf16" : "f16", trans_a, trans_b, scale_d);
  EmuWarpgroup& g = emu_wgs[w];
  // Every shared operand address of this op (A by da if SS, B by db), in read order.
  auto operand_addrs = [&](auto&& f) {
    if (a == nullptr) {
      const EmuDesc ds = emu_desc(da);
      for (int m = 0; m < 64; ++m)
        for (int k = 0; k < 16; ++k) f(ds, m, k, trans_a);
    }
    const EmuDesc ds = emu_desc(db);
    for (int k = 0; k < 16; ++k)
      for (int c = 0; c < n; ++c) f(ds, c, k, trans_b);
  };
  auto unfenced = [&](const uint16_t* p) {
    const size_t gi = reinterpret_cast<const char*>(p) - static_cast<char*>(emu_dyn_smem);
    const int own = emu_gen_owner[gi] ? emu_gen_owner[gi] : emu_gen_owner[gi + 1];
    if (own != 0) {
      char why[200];
      std::snprintf(why, sizeof why, "wgmma: shared memory read by wgmma without "
                    "fence.proxy.async after its generic write (byte %zu, thread %d)",
                    gi, own - 1);
      emu_abort_thread(why);
    }
  };
  if (g.arrived == 0) {
    g.op = key;
    g.first.clear();
    operand_addrs([&](const EmuDesc& ds, int mn, int k, bool mnm) {
      if (ds.base != 0) emu_abort_thread("wgmma: descriptor base offset != 0 (not modelled)");
      const uint16_t* p = emu_smem16(emu_desc_addr(ds, mn, k, mnm));
      unfenced(p);  // every writer fenced (and past a barrier) before the first warp issues
      g.first.emplace_back(p, *p);
    });
  } else if (g.op != key)
    emu_abort_thread(std::string("wgmma: threads of the warpgroup disagree (") + g.op + " vs " +
                     key + ")");
  EmuWgIn& in = g.in[i];
  in.da = da;
  in.db = db;
  for (int r = 0; r < 4; ++r) in.a[r] = a ? a[r] : 0;
  in.c.assign(nacc, 0.f);
  if (scale_d) {  // chained onto an in-flight wgmma with these accumulators: its result
    const EmuWgPend* prev = nullptr;
    for (auto it = th.wg_open.rbegin(); it != th.wg_open.rend() && !prev; ++it)
      if (it->acc == d) prev = &*it;
    for (auto gi = th.wg_groups.rbegin(); gi != th.wg_groups.rend() && !prev; ++gi)
      for (auto it = gi->rbegin(); it != gi->rend() && !prev; ++it)
        if (it->acc == d) prev = &*it;
    if (prev && prev->nacc != nacc)
      emu_abort_thread("wgmma: accumulators chained across different shapes");
    for (int j = 0; j < nacc; ++j) in.c[j] = prev ? prev->op->res[i * nacc + j] : d[j];
  }
  for (int j = 0; j < nacc; ++j) std::memcpy(&d[j], &kEmuWgPoison, 4);  // NaN until the wait
  if (++g.arrived == 128) {
    g.arrived = 0;
    for (int j = 1; j < 128; ++j)
      if (g.in[j].da != g.in[0].da || g.in[j].db != g.in[0].db)
        emu_abort_thread("wgmma: matrix descriptors differ across the warpgroup");
    for (const auto& [p, v] : g.first)
      if (*p != v)
        emu_abort_thread("wgmma: shared memory it reads was written after the warpgroup's "
                         "first warp issued it (no barrier between the writes and the wgmma)");
    auto op = std::make_shared<EmuWgOp>();
    op->nacc = nacc;
    op->res.assign(128 * nacc, 0.f);
    std::vector<float> A(64 * 16), B(16 * n);
    auto rd = [&](const EmuDesc& ds, int mn, int k, bool mnm) {
      if (ds.base != 0) emu_abort_thread("wgmma: descriptor base offset != 0 (not modelled)");
      const uint16_t* p = emu_smem16(emu_desc_addr(ds, mn, k, mnm));
      unfenced(p);
      op->reads.emplace_back(p, *p);
      return emu_b16_to_f(*p, bf16);
    };
    if (a == nullptr) {
      const EmuDesc ds = emu_desc(g.in[0].da);
      for (int m = 0; m < 64; ++m)
        for (int k = 0; k < 16; ++k) A[m * 16 + k] = rd(ds, m, k, trans_a);
    } else {
      for (int j = 0; j < 128; ++j) {
        const int row = 16 * (j / 32) + (j % 32) / 4, col = 2 * (j % 4);
        for (int r = 0; r < 4; ++r)
          for (int e = 0; e < 2; ++e)
            A[(row + 8 * (r & 1)) * 16 + col + 8 * (r >> 1) + e] =
                emu_b16_to_f(g.in[j].a[r] >> 16 * e & 0xffff, bf16);
      }
    }
    const EmuDesc dsb = emu_desc(g.in[0].db);
    for (int k = 0; k < 16; ++k)
      for (int c = 0; c < n; ++c) B[k * n + c] = rd(dsb, c, k, trans_b);
    for (int j = 0; j < 128; ++j) {
      const int row0 = 16 * (j / 32) + (j % 32) / 4, col0 = 2 * (j % 4);
      for (int q = 0; q < nacc; ++q) {
        const int row = row0 + 8 * (q % 4 / 2), col = 8 * (q / 4) + col0 + q % 2;
        float s = g.in[j].c[q];
        for (int k = 0; k < 16; ++k) s = std::fma(A[row * 16 + k], B[k * n + col], s);
        op->res[j * nacc + q] = s;
      }
    }
    g.out = op;
    ++emu_wgmma_count;
    for (int j = 0; j < 128; ++j)
      if (j != i) emu_threads[128 * w + j].state = kRunnable;
  } else {
    th.state = kAtWarp;
    emu_yield();
  }
  EmuWgPend pd{g.out, d, nacc, a, {}};
  if (a) std::memcpy(pd.a_val, a, sizeof pd.a_val);
  th.wg_open.push_back(pd);
}
inline void emu_wgmma_fence() { emu_threads[emu_cur()].wg_fenced = true; }
inline void emu_wgmma_commit() {
  EmuThread& th = emu_threads[emu_cur()];
  th.wg_groups.push_back(std::move(th.wg_open));
  th.wg_open.clear();
}
inline void emu_wgmma_wait(int n) {
  EmuThread& th = emu_threads[emu_cur()];
  while (static_cast<int>(th.wg_groups.size()) > n) {
    for (const EmuWgPend& pd : th.wg_groups.front()) {
      // Its reads must still hold at the first and the last thread's wait: a write before
      // the writer's own wait is caught either way (both, not every wait: ~4x the op's cost).
      const int r = ++pd.op->retired;
      if (r == 1 || r == 128)
        for (const auto& [p, v] : pd.op->reads)
          if (*p != v)
            emu_abort_thread("wgmma: shared memory an in-flight wgmma.mma_async reads was "
                             "overwritten before its wgmma.wait_group");
      // Registers the op owns until now (PTX ISA wgmma.mma_async: accessing the accumulator
      // or A registers before the wait that retires it is undefined): a store to them shows.
      if (pd.a && std::memcmp(pd.a, pd.a_val, sizeof pd.a_val) != 0)
        emu_abort_thread("wgmma: A registers of an in-flight wgmma.mma_async written before "
                         "its wgmma.wait_group");
      for (int j = 0; j < pd.nacc; ++j)
        if (std::memcmp(&pd.acc[j], &kEmuWgPoison, 4) != 0)
          emu_abort_thread("wgmma: accumulators of an in-flight wgmma.mma_async written "
                           "before its wgmma.wait_group");
      std::memcpy(pd.acc, pd.op->res.data() + (emu_cur() % 128) * pd.nacc,
                  sizeof(float) * pd.nacc);
      // A later op chained on these accumulators is still in flight: they stay undefined.
      bool later = false;
      for (size_t gi = 0; gi < th.wg_groups.size() && !later; ++gi)
        for (const EmuWgPend& q : th.wg_groups[gi])
          if (q.acc == pd.acc && (gi > 0 || &q > &pd)) later = true;
      for (const EmuWgPend& q : th.wg_open) later = later || q.acc == pd.acc;
      if (later)
        for (int j = 0; j < pd.nacc; ++j) std::memcpy(&pd.acc[j], &kEmuWgPoison, 4);
    }
    th.wg_groups.pop_front();
  }
  th.wg_fenced = false;
}
// ------------------------------------------------------------------ launches
// Launch-configuration errors a GPU would report: grid/block limits, and dynamic shared
// memory over 48 KB without cudaFuncSetAttribute(MaxDynamicSharedMemorySize) for that kernel.
inline std::map<const void*, size_t> emu_smem_optin;
constexpr size_t kEmuSmemDefault = 48 * 1024, kEmuSmemMax = 227 * 1024;  // sm_90
template <typename F>
cudaError_t emu_func_set_attribute(F* kernel, cudaFuncAttribute attr, int value) {
  if (attr == cudaFuncAttributePreferredSharedMemoryCarveout)
    return value >= -1 && value <= 100 ? cudaSuccess : cudaErrorInvalidValue;
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaSuccess;
  if (value < 0 || static_cast<size_t>(value) > kEmuSmemMax) return cudaErrorInvalidValue;
  emu_smem_optin[reinterpret_cast<const void*>(kernel)] = static_cast<size_t>(value);
  return cudaSuccess;
}
inline cudaError_t emu_get_last_error() {  // returns and clears, like cudaGetLastError
  const cudaError_t e = emu_error;
  emu_error = cudaSuccess;
  return e;
}
inline unsigned long long emu_launch_count = 0;

inline void emu_fiber_entry() {
  emu_body();
  emu_threads[emu_cur()].state = kExited;  // uc_link returns to the scheduler
}

// Run one block: fibers in `order`, each until it blocks; release barriers when all live
// threads wait at one; report a block that can make no progress.
inline void emu_run_block(int nthr, const std::vector<int>& order) {
  emu_threads.assign(nthr, EmuThread());
  emu_warps.assign(nthr / 32, EmuWarp());
  emu_wgs.assign((nthr + 127) / 128, EmuWarpgroup());
  while (static_cast<int>(emu_stacks.size()) < nthr)
    emu_stacks.emplace_back(new char[kEmuStack]);
  for (int t = 0; t < nthr; ++t) {
    EmuThread& th = emu_threads[t];
    getcontext(&th.ctx);
    th.ctx.uc_stack.ss_sp = emu_stacks[t].get();
    th.ctx.uc_stack.ss_size = kEmuStack;
    th.ctx.uc_link = &emu_sched_ctx;
    makecontext(&th.ctx, emu_fiber_entry, 0);
    th.state = kRunnable;
  }
  emu_aborted = false;
  while (!emu_aborted) {
    // Always resume the first runnable thread in `order` (warp-major): the first warp runs
    // its whole phase (every collective of it) before the next warp leaves its first one, so
    // a warp that overwrites a stage others still read, or reads one not yet landed, does.
    bool ran = false;
    for (size_t k = 0; k < order.size(); ++k) {
      const int t = order[k];
      if (emu_threads[t].state != kRunnable) continue;
      emu_tid = make_uint3(t, 0, 0);
      swapcontext(&emu_sched_ctx, &emu_threads[t].ctx);
      ran = true;
      if (emu_aborted) return;
      k = static_cast<size_t>(-1);  // rescan from the first
    }
    int live = 0, at_bar = 0, at_warp = 0;
    for (const EmuThread& th : emu_threads) {
      live += th.state != kExited;
      at_bar += th.state == kAtBarrier;
      at_warp += th.state == kAtWarp;
    }
    if (live == 0) return;
    if (at_bar == live) {
      for (EmuThread& th : emu_threads) th.state = kRunnable;
      continue;
    }
    if (!ran && at_bar + at_warp == live) {
      char buf[200];
      std::snprintf(buf, sizeof buf,
                    "block %u,%u deadlocked: %d threads at __syncthreads, %d in a warp "
                    "collective whose lanes never all arrive (divergent barrier/partial warp)",
                    emu_bid.x, emu_bid.y, at_bar, at_warp);
      emu_fail(buf);
      return;
    }
  }
}

inline std::mt19937_64& emu_rng() {
  static std::mt19937_64 g([] {
    const char* s = std::getenv("RAGGED_EMU_SEED");
    return s ? std::strtoull(s, nullptr, 10) : 0x5eedull;
  }());
  return g;
}

template <typename... P, typename... A>
void emu_launch(void (*k)(P...), dim3 g, dim3 b, size_t smem, cudaStream_t, A... args) {
  const int nthr = b.x * b.y * b.z;
  const auto optin = emu_smem_optin.find(reinterpret_cast<const void*>(k));
  const size_t smem_max = optin == emu_smem_optin.end() ? kEmuSmemDefault : optin->second;
  if (nthr % 32 || nthr > 1024 || b.y != 1 || b.z != 1 || g.x == 0 || g.y == 0 || g.z == 0 ||
      g.x > 0x7fffffffu || g.y > 65535 || g.z > 65535 || smem > smem_max) {
    emu_error = cudaErrorInvalidConfiguration;
    return;
  }
  if (emu_error != cudaSuccess) return;  // an earlier launch failed: skip, keep its error
  emu_bdim = b; emu_gdim = g;
  emu_dyn_smem_size = smem;
  kEmuSmemBase = emu_launch_count % 3 == 0 ? 0x300 : emu_launch_count % 3 == 1 ? 0x3d0 : 0x400;
  std::vector<char> buf(smem + 64);
  void* base = reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(buf.data()) + 15) & ~uintptr_t(15));
  emu_body = [&] { k(args...); };
  std::vector<uint3> blocks;
  for (unsigned z = 0; z < g.z; ++z)
    for (unsigned y = 0; y < g.y; ++y)
      for (unsigned x = 0; x < g.x; ++x) blocks.push_back(make_uint3(x, y, z));
  std::mt19937_64& rng = emu_rng();
  std::shuffle(blocks.begin(), blocks.end(), rng);
  std::vector<int> order(nthr);
  for (const uint3& blk : blocks) {
    // poison smem: the kernels must not rely on zero-initialised shared memory
    std::memset(buf.data(), 0xff, buf.size());
    emu_gen_owner.assign(smem + 1, 0);
    emu_dyn_smem = base;
    emu_bid = blk;
    // warps in a shuffled order, the lanes of each in a shuffled order
    std::vector<int> warps(nthr / 32);
    std::iota(warps.begin(), warps.end(), 0);
    std::shuffle(warps.begin(), warps.end(), rng);
    for (int w = 0; w < nthr / 32; ++w) {
      std::iota(order.begin() + 32 * w, order.begin() + 32 * w + 32, 32 * warps[w]);
      std::shuffle(order.begin() + 32 * w, order.begin() + 32 * w + 32, rng);
    }
    emu_run_block(nthr, order);
    if (emu_error != cudaSuccess) break;
  }
  ++emu_launch_count;
}
// The cubin a kernel runs as: this build's arch (the sm_90a path, or sm_80's).
template <typename F>
cudaError_t emu_func_get_attributes(cudaFuncAttributes* a, F* kernel) {
  (void)kernel;
  *a = cudaFuncAttributes{};
#if defined(RAGGED_EMU_SM90)
  a->binaryVersion = a->ptxVersion = 90;
#else
  a->binaryVersion = a->ptxVersion = 80;
#endif
  return cudaSuccess;
}
inline cudaError_t emu_get_device(int* d) {
  *d = 0;
  return cudaSuccess;
}
#define cudaGetLastError() emu_get_last_error()
#define cudaFuncSetAttribute(kernel, attr, value) emu_func_set_attribute(kernel, attr, value)
#define cudaFuncGetAttributes(attrs, kernel) emu_func_get_attributes(attrs, kernel)
#define cudaGetDevice(d) emu_get_device(d)
