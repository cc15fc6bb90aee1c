// CPU emulation of the CUDA execution model, so CI machines without a GPU run the csrc/
// kernels' own code (index math, masking, online softmax, split merge) against the references.
// Built by csrc/emu/build.py with g++ (never part of the extension). Blocks run one after
// another; a block's threads are std::threads: __syncthreads is a block barrier, warp shuffles
// exchange through a buffer with a warp barrier, `__shared__` is `static` (one block at a time)
// and dynamic shared memory is a buffer poisoned with 0xff before each block. cp.async takes its
// plain-copy fallback (no __CUDA_ARCH__). What it cannot check: real warp scheduling, alignment
// faults, register limits, the cp.async PTX itself: the gpu tests do that. It does check the
// launch configuration (grid/block limits, dynamic shared memory and its 48 KB opt-in).
#pragma once
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstring>
#include <functional>
#include <map>
#include <thread>
#include <vector>
#include <memory>
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
using std::min; using std::max;
inline thread_local uint3 emu_tid, emu_bid;
inline dim3 emu_bdim, emu_gdim;
#define threadIdx emu_tid
#define blockIdx emu_bid
#define blockDim emu_bdim
#define gridDim emu_gdim
inline void* emu_dyn_smem = nullptr;
inline std::barrier<>* emu_block_bar = nullptr;
inline std::vector<std::unique_ptr<std::barrier<>>> emu_warp_bars;
inline float emu_shfl_buf[1024];
inline void __syncthreads() { emu_block_bar->arrive_and_wait(); }
inline float __shfl_xor_sync(unsigned, float v, int o) {
  int t = emu_tid.x, w = t / 32, l = t % 32;
  auto& b = *emu_warp_bars[w];
  emu_shfl_buf[t] = v; b.arrive_and_wait();
  float r = emu_shfl_buf[w * 32 + (l ^ o)]; b.arrive_and_wait();
  return r;
}
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __fmul_rn(float a, float b) { volatile float r = a * b; return r; }
inline float __fadd_rn(float a, float b) { volatile float r = a + b; return r; }
inline float __fsub_rn(float a, float b) { volatile float r = a - b; return r; }
// Launch-configuration errors a GPU would report: grid/block limits, and dynamic shared
// memory over 48 KB without cudaFuncSetAttribute(MaxDynamicSharedMemorySize) for that kernel.
inline cudaError_t emu_error = cudaSuccess;
inline std::map<const void*, size_t> emu_smem_optin;
constexpr size_t kEmuSmemDefault = 48 * 1024, kEmuSmemMax = 227 * 1024;  // sm_90
template <typename F>
cudaError_t emu_func_set_attribute(F* kernel, cudaFuncAttribute attr, int value) {
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
template <typename... P, typename... A>
void emu_launch(void (*k)(P...), dim3 g, dim3 b, size_t smem, cudaStream_t, A... args) {
  int nthr = b.x * b.y * b.z;
  const auto optin = emu_smem_optin.find(reinterpret_cast<const void*>(k));
  const size_t smem_max = optin == emu_smem_optin.end() ? kEmuSmemDefault : optin->second;
  if (nthr % 32 || nthr > 1024 || b.y != 1 || b.z != 1 || g.x == 0 || g.y == 0 || g.z == 0 ||
      g.x > 0x7fffffffu || g.y > 65535 || g.z > 65535 || smem > smem_max) {
    emu_error = cudaErrorInvalidConfiguration;
    return;
  }
  emu_bdim = b; emu_gdim = g;
  std::vector<char> buf(smem + 64);
  void* base = reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(buf.data()) + 15) & ~uintptr_t(15));
  for (unsigned z = 0; z < g.z; ++z) for (unsigned y = 0; y < g.y; ++y) for (unsigned x = 0; x < g.x; ++x) {
    // poison smem: the kernels must not rely on zero-initialised shared memory
    std::memset(buf.data(), 0xff, buf.size());
    emu_dyn_smem = base;
    std::barrier<> bar(nthr); emu_block_bar = &bar;
    emu_warp_bars.clear();
    for (int w = 0; w < nthr / 32; ++w) emu_warp_bars.emplace_back(new std::barrier<>(32));
    std::vector<std::thread> ts;
    for (int t = 0; t < nthr; ++t) ts.emplace_back([&, t] {
      emu_tid = make_uint3(t, 0, 0); emu_bid = make_uint3(x, y, z);
      k(args...);
      bar.arrive_and_drop();  // an early return must not block later __syncthreads
    });
    for (auto& th : ts) th.join();
  }
}
#define cudaGetLastError() emu_get_last_error()
#define cudaFuncSetAttribute(kernel, attr, value) emu_func_set_attribute(kernel, attr, value)
