// Hopper warpgroup MMA (wgmma.mma_async, sm_90a) for the tensor-core attention tile
// (attention_wgmma.cuh): shared-memory matrix descriptors, fence / commit / wait, and
// m64nNk16 (N 32/64/128; RS also 80/96, D 80/96's P V) with A from shared memory (SS) or
// registers (RS), fp32 accumulate.
// The emulator (csrc/emu/emu.h, RAGGED_EMU) models each with the PTX ISA's semantics: a
// collective of the 128 threads of a warpgroup, descriptors decoded (start, LBO, SBO, swizzle
// on the shared address), results only at wgmma.wait_group (accumulators NaN until then).
//
// Fragments (PTX ISA "Register Fragments", m64nNk16): warp w of the warpgroup owns rows
// 16w..16w+15; lane l, g = l / 4, t = l % 4. Accumulator d[4j + q]: row 16w + g + 8 (q / 2),
// column 8j + 2t + q % 2 (mma.sync's C tile j). A registers (RS): a[0] (g, 2t..2t+1),
// a[1] (g+8, 2t..), a[2] (g, 2t+8..), a[3] (g+8, 2t+8..) of the warp's 16 x 16 slice.
// Shared-memory layout used here: 128-byte swizzle ("B128"), rows of 128 bytes (64 16-bit
// values), 16-byte chunk c of row r stored at chunk c ^ (r % 8), 8-row groups 1024 bytes
// apart, every 8-row group on a 1024-byte boundary of the shared window (the swizzle XORs
// address bits 4-6 with 7-9, so the pattern needs that alignment: base offset 0). D 80 / 96's
// V (the N-major B of P V, N = 80 / 96) takes the 32B / 64B swizzle instead (rows of 32 / 64
// bytes, chunk c ^ (r / 4 % 2) / c ^ (r / 2 % 4)): N is then a whole number of swizzle rows
// (5 of 16 values / 3 of 32), the ISA's canonical MN-major layout; 128B rows of 64 values
// would leave N = 80 / 96 at 1.25 / 1.5 repeats, a layout the ISA does not define.
#pragma once

#include <cstdint>

#include "cuda_utils.cuh"

#if defined(RAGGED_EMU) && defined(RAGGED_EMU_SM90)
#define RAGGED_WGMMA 1  // the emulator's "arch 90" build (emulated.py build(arch=90))
#elif defined(RAGGED_EMU)
#define RAGGED_WGMMA 0
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define RAGGED_WGMMA 1  // sm_90a only: wgmma is an arch-specific ("a") feature
#else
#define RAGGED_WGMMA 0
#endif

namespace ragged {

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
#if defined(RAGGED_EMU)
  return emu_smem_addr(p);
#else
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
#endif
}

// The launch's dynamic shared memory in bytes (%dynamic_smem_size).
__device__ __forceinline__ uint32_t dynamic_smem_bytes() {
#if defined(RAGGED_EMU)
  return static_cast<uint32_t>(emu_dyn_smem_size);
#else
  uint32_t r;
  asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(r));
  return r;
#endif
}

// A launch the host sized wrong: stop the kernel (a launch error), never compute garbage.
__device__ __forceinline__ void device_trap(const char* why) {
#if defined(RAGGED_EMU)
  emu_abort_thread(why);
#else
  (void)why;
  asm volatile("trap;");
#endif
}

// Descriptor of a swizzled operand at shared address `addr` (PTX ISA "Matrix Descriptor
// Format": bits 0-13 start >> 4, 16-29 LBO >> 4, 32-45 SBO >> 4, 49-51 base offset, 62-63
// swizzle mode: 1 = 128B, 2 = 64B, 3 = 32B). K-major: LBO unused (1), SBO = 8-row group
// stride. MN-major: LBO = stride of the next W / 2 MN values (one swizzle row of W bytes:
// 64 / 32 / 16 16-bit values), SBO = stride of the next 8 K rows.
template <int W = 128>
__device__ __forceinline__ uint64_t gmma_desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
  static_assert(W == 128 || W == 64 || W == 32, "swizzle 128B / 64B / 32B");
  constexpr uint64_t mode = W == 128 ? 1 : W == 64 ? 2 : 3;
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) |
         static_cast<uint64_t>((lbo & 0x3FFFF) >> 4) << 16 |
         static_cast<uint64_t>((sbo & 0x3FFFF) >> 4) << 32 | mode << 62;
}

// Orders this thread's register accesses before the wgmma that follows (required before the
// first wgmma and after any other instruction touched its accumulators or A registers).
__device__ __forceinline__ void wgmma_fence() {
#if defined(RAGGED_EMU)
  emu_wgmma_fence();
#elif RAGGED_WGMMA
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void wgmma_commit() {
#if defined(RAGGED_EMU)
  emu_wgmma_commit();
#elif RAGGED_WGMMA
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}

// Until at most N committed wgmma groups are pending; only then are their accumulators valid.
template <int N>
__device__ __forceinline__ void wgmma_wait() {
#if defined(RAGGED_EMU)
  emu_wgmma_wait(N);
#elif RAGGED_WGMMA
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}

// Pins N registers for the compiler (no code): after a wgmma_wait, the accumulators' uses
// stay after it. NVVM knows nothing of wgmma's asynchrony and may move an ordinary use of a
// wgmma's output above the (volatile) wait: a read of an in-flight accumulator
// (CUTLASS: warpgroup_fence_operand).
// Also before each wgmma_fence, on the accumulators and the A registers the wgmma reads: the
// ordinary instructions that define them (O's rescale, P's packs) stay above the fence. Sunk
// below it, they would write wgmma operand registers between wgmma.fence and the mma, which
// the ISA leaves undefined and ptxas answers by serialising the pipeline (C7515).
template <int N>
__device__ __forceinline__ void wgmma_pin(float (&r)[N]) {
#if !defined(RAGGED_EMU)
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
#endif
}
template <int N>
__device__ __forceinline__ void wgmma_pin(uint32_t (&r)[N]) {
#if !defined(RAGGED_EMU)
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+r"(r[i])::"memory");
#endif
}

// Shared memory written by the generic proxy (cp.async, st.shared) visible to the async proxy
// (wgmma operand reads): after the writes land, before the barrier that precedes the wgmma.
__device__ __forceinline__ void fence_proxy_async() {
#if defined(RAGGED_EMU)
  emu_fence_proxy_async();
#elif RAGGED_WGMMA
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

#if RAGGED_WGMMA && !defined(RAGGED_EMU)
// The wgmma.mma_async statements, one per (operand form, N), with the operand type TY
// ("f16" / "bf16") spliced into the instruction string (asm needs a string literal): fp16 and
// bf16 differ only there.
#define RAGGED_WGMMA_SS32(TY) \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n" \
  "wgmma.mma_async.sync.aligned.m64n32k16.f32." TY "." TY " " \
  "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15}, %16, %17, p, 1, 1, 0, %19;\n}\n" \
  : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
  "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]) \
  : "l"(da), "l"(db), "r"(static_cast<int>(acc)), "n"(static_cast<int>(TB)))
#define RAGGED_WGMMA_SS64(TY) \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n" \
  "wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY " " \
  "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15," \
  "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, %32, %33, p, 1, 1, 0, %35;\n}\n" \
  : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
  "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
  "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
  "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]) \
  : "l"(da), "l"(db), "r"(static_cast<int>(acc)), "n"(static_cast<int>(TB)))
#define RAGGED_WGMMA_SS128(TY) \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n" \
  "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY " " \
  "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15," \
  "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31," \
  "%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47," \
  "%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}, %64, %65, p, 1, 1, 0, %67;\n}\n" \
  : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
  "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
  "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
  "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), \
  "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
  "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
  "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
  "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]) \
  : "l"(da), "l"(db), "r"(static_cast<int>(acc)), "n"(static_cast<int>(TB)))
#define RAGGED_WGMMA_RS32(TY) \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %21, 0;\n" \
  "wgmma.mma_async.sync.aligned.m64n32k16.f32." TY "." TY " " \
  "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15}, {%16, %17, %18, %19}, %20, p, 1, 1, %22;\n}\n" \
  : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
  "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]) \
  : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(static_cast<int>(acc)), "n"(static_cast<int>(TB)))
#define RAGGED_WGMMA_RS64(TY) \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n" \
  "wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY " " \
  "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15," \
  "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, {%32, %33, %34, %35}, %36, p, 1, 1, %38;\n}\n" \
  : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
  "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
  "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
  "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]) \
  : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(static_cast<int>(acc)), "n"(static_cast<int>(TB)))
#define RAGGED_WGMMA_RS80(TY) \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %45, 0;\n" \
  "wgmma.mma_async.sync.aligned.m64n80k16.f32." TY "." TY " " \
  "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15," \
  "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31," \
  "%32,%33,%34,%35,%36,%37,%38,%39}, {%40, %41, %42, %43}, %44, p, 1, 1, %46;\n}\n" \
  : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
  "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
  "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
  "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), \
  "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]) \
  : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(static_cast<int>(acc)), "n"(static_cast<int>(TB)))
#define RAGGED_WGMMA_RS96(TY) \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %53, 0;\n" \
  "wgmma.mma_async.sync.aligned.m64n96k16.f32." TY "." TY " " \
  "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15," \
  "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31," \
  "%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47}, {%48, %49, %50, %51}, %52, p, 1, 1, %54;\n}\n" \
  : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
  "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
  "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
  "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), \
  "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
  "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]) \
  : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(static_cast<int>(acc)), "n"(static_cast<int>(TB)))
#define RAGGED_WGMMA_RS128(TY) \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n" \
  "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY " " \
  "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15," \
  "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31," \
  "%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47," \
  "%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}, {%64, %65, %66, %67}, %68, p, 1, 1, %70;\n}\n" \
  : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
  "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
  "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
  "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), \
  "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
  "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
  "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
  "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]) \
  : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(static_cast<int>(acc)), "n"(static_cast<int>(TB)))

#endif

// d (+)= A B, A [64 x 16] and B [16 x N] from shared memory (both K-major; TB: B N-major).
// `acc` false: d = A B (the accumulators' old values are ignored).
template <typename T, int N, bool TB>
__device__ __forceinline__ void wgmma_ss(float (&d)[N / 2], uint64_t da, uint64_t db, bool acc) {
#if defined(RAGGED_EMU)
  emu_wgmma(d, N, nullptr, da, db, acc, false, TB, IsBf16<T>::value);
#elif RAGGED_WGMMA
  static_assert(N == 32 || N == 64 || N == 128, "wgmma_ss: N 32/64/128");
  if constexpr (N == 32) {
    if constexpr (IsBf16<T>::value) RAGGED_WGMMA_SS32("bf16");
    else RAGGED_WGMMA_SS32("f16");
  }
  else if constexpr (N == 64) {
    if constexpr (IsBf16<T>::value) RAGGED_WGMMA_SS64("bf16");
    else RAGGED_WGMMA_SS64("f16");
  }
  else if constexpr (N == 128) {
    if constexpr (IsBf16<T>::value) RAGGED_WGMMA_SS128("bf16");
    else RAGGED_WGMMA_SS128("f16");
  }
#endif
}

// d (+)= A B, A [64 x 16] from registers (fragment above), B [16 x N] from shared memory.
template <typename T, int N, bool TB>
__device__ __forceinline__ void wgmma_rs(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t db,
                                         bool acc) {
#if defined(RAGGED_EMU)
  emu_wgmma(d, N, a, 0, db, acc, false, TB, IsBf16<T>::value);
#elif RAGGED_WGMMA
  static_assert(N == 32 || N == 64 || N == 80 || N == 96 || N == 128, "wgmma_rs: N 32/64/80/96/128");
  if constexpr (N == 32) {
    if constexpr (IsBf16<T>::value) RAGGED_WGMMA_RS32("bf16");
    else RAGGED_WGMMA_RS32("f16");
  }
  else if constexpr (N == 64) {
    if constexpr (IsBf16<T>::value) RAGGED_WGMMA_RS64("bf16");
    else RAGGED_WGMMA_RS64("f16");
  }
  else if constexpr (N == 80) {
    if constexpr (IsBf16<T>::value) RAGGED_WGMMA_RS80("bf16");
    else RAGGED_WGMMA_RS80("f16");
  }
  else if constexpr (N == 96) {
    if constexpr (IsBf16<T>::value) RAGGED_WGMMA_RS96("bf16");
    else RAGGED_WGMMA_RS96("f16");
  }
  else if constexpr (N == 128) {
    if constexpr (IsBf16<T>::value) RAGGED_WGMMA_RS128("bf16");
    else RAGGED_WGMMA_RS128("f16");
  }
#endif
}

}  // namespace ragged
