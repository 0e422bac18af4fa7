// The CUDA device and runtime API that csrc/cuda/ uses, implemented on the CPU, so that the CUDA
// kernels run (slowly, but as written) on a machine without a GPU. Test infrastructure only: it is
// compiled into the test library that tests/cuda_sim/build.py makes, never into amm_kernels._C.
//
// NOTE [CUDA on the CPU]: every CUDA thread of a launch is a fiber (its own stack, switched in user
// space) on the calling OS thread, and a deterministic round-robin scheduler runs them:
//   - __syncthreads, the warp shuffles and grid.sync() are barriers: a fiber that reaches one yields
//     until every live thread of its block / warp / grid has reached it. Barriers are counted per
//     kind, so a thread waiting at __syncthreads while another waits at a shuffle or has exited early
//     (a divergent barrier) is reported as a deadlock, not silently passed.
//   - A plain launch runs its blocks one after another; a cooperative launch runs the whole grid at
//     once (grid.sync needs every block resident), after checking the grid fits the simulated device.
//   - Shared memory is per block: tests/cuda_sim/build.py rewrites each `__shared__` declaration into
//     a call that returns this block's copy. It starts filled with 0xFF bytes (float NaN), so reading
//     shared memory before writing it shows up as NaN, and a canary after it catches overruns.
//   - Launch checks as the driver makes them: grid and block sizes, dynamic shared memory over 48 KB
//     only after cudaFuncSetAttribute raised the kernel's limit, kernel arguments within 32764 bytes.
//   - Stream capture, as a model of it: with AMM_SIM_CAPTURING=1 every stream reports an active capture
//     (cudaStreamIsCapturing). Kernels still run, so a test sees what the captured step computed, but a
//     launch that fails while capturing invalidates the capture, as the runtime does: every launch after
//     it fails with cudaErrorStreamCaptureInvalidated until the capture ends (the variable unset).
// What it cannot show: timing, memory ordering between threads (everything here is sequentially
// consistent), races (one schedule only), and the device's own rounding (setup.py builds with
// --fmad=false, so a GPU contracts no a * b + c either, but its math functions are not the host's),
// so results match the reference within tolerance, not a GPU bit for bit.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

// ---- execution-space qualifiers ------------------------------------------------------------
#define __host__
#define __device__
#define __global__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __grid_constant__
#define __restrict__ __restrict
// Every __shared__ declaration must have been rewritten by build.py (per-block storage).
#define __shared__ AMM_SIM_SHARED_DECLARATION_NOT_REWRITTEN

// ---- vector types --------------------------------------------------------------------------
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) float2 { float x, y; };
struct alignas(16) uint4 { unsigned int x, y, z, w; };
struct uint3 { unsigned int x, y, z; };
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }

// ---- 16-bit floats (round to nearest even, as the __float2*_rn intrinsics) -----------------
struct __nv_bfloat16 { unsigned short x; };
struct __half { unsigned short x; };
inline float __bfloat162float(__nv_bfloat16 h) {
  const uint32_t u = static_cast<uint32_t>(h.x) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{static_cast<unsigned short>((u >> 16) | 0x40u)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return __nv_bfloat16{static_cast<unsigned short>(u >> 16)};
}
inline float __half2float(__half h) {
  _Float16 v;
  std::memcpy(&v, &h.x, 2);
  return static_cast<float>(v);
}
inline __half __float2half_rn(float f) {
  const _Float16 v = static_cast<_Float16>(f);
  __half h;
  std::memcpy(&h.x, &v, 2);
  return h;
}
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) { return __nv_bfloat16{u}; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.x; }
inline __half __ushort_as_half(unsigned short u) { return __half{u}; }
inline unsigned short __half_as_ushort(__half h) { return h.x; }

// ---- runtime API types ---------------------------------------------------------------------
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDevice = 101,
  cudaErrorInvalidDeviceFunction = 98,
  cudaErrorLaunchFailure = 719,
  cudaErrorCooperativeLaunchTooLarge = 720,
  cudaErrorStreamCaptureInvalidated = 901,
};
using cudaError = cudaError_t;
struct CUstream_st;
using cudaStream_t = CUstream_st*;
enum cudaStreamCaptureStatus {
  cudaStreamCaptureStatusNone = 0,
  cudaStreamCaptureStatusActive = 1,
  cudaStreamCaptureStatusInvalidated = 2,
};
enum cudaDeviceAttr {
  cudaDevAttrMaxSharedMemoryPerBlock = 8,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrMaxSharedMemoryPerMultiprocessor = 81,
  cudaDevAttrCooperativeLaunch = 95,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
struct cudaFuncAttributes {
  size_t sharedSizeBytes;
  size_t constSizeBytes;
  size_t localSizeBytes;
  int maxThreadsPerBlock;
  int numRegs;
  int maxDynamicSharedSizeBytes;
};

namespace amm_sim {

// The simulated device (one, index 0): an H100-like shared-memory budget and a few SMs, so that a
// cooperative grid is small and every block walks several chunks.
constexpr int kSms = 4;
constexpr int kSharedPerSm = 233472;          // 228 KB
constexpr int kSharedOptin = 232448;          // 227 KB per block after cudaFuncSetAttribute
constexpr int kSharedDefault = 49152;         // 48 KB without it
constexpr int kStaticSharedReserve = 8192;    // what cudaFuncGetAttributes reports as static shared memory
constexpr int kMaxThreadsPerSm = 2048;
constexpr int kMaxParamBytes = 32764;

struct ThreadState {
  uint3 thread_idx;
  uint3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
};
extern ThreadState* g_thread;  // the running fiber's indices

// Kernel bodies and what a launch needs to know about its kernel.
struct KernelInfo {
  int max_dynamic_shared = kSharedDefault;
  std::function<void(void**)> invoke_packed;  // set for kernels seen through a typed runtime call
};
KernelInfo& kernel_info(const void* func);

// Runs body once per thread of the grid (NOTE [CUDA on the CPU]); returns the launch's error and
// throws std::runtime_error for a fault inside the kernel (deadlock, shared-memory overrun, ...).
cudaError_t run_grid(const void* func, dim3 grid, dim3 block, size_t dynamic_shared, bool cooperative,
                     size_t param_bytes, const std::function<void()>& body);
void set_last_error(cudaError_t err);

void sync_block();
void sync_grid();
// NOTE [traffic hook] in csrc/cuda/multi_tensor.cuh: bytes of list elements loaded and stored.
extern int64_t g_loaded_bytes, g_stored_bytes;
// Counts the bytes; an access of 16 bytes or more is a vector access (load_vec / store_vec), which a
// GPU faults unless its address is a multiple of 16 (here x86 would crash on it, or pass it silently).
inline void count_traffic(const void* address, int bytes, bool is_store) {
  if (bytes >= 16 && reinterpret_cast<uintptr_t>(address) % 16 != 0)
    throw std::runtime_error(std::string("cuda_sim: misaligned address: a vector ") + (is_store ? "store" : "load") +
                             " of " + std::to_string(bytes) + " bytes");
  (is_store ? g_stored_bytes : g_loaded_bytes) += bytes;
}
void shfl_down(void* value, size_t bytes, unsigned mask, unsigned delta, int width);
void* block_shared(const void* key, size_t bytes, size_t align);
void* dynamic_shared();

template <class T, unsigned Site>
T& shared_var() {
  static const char key = 0;  // one per (type, declaration site)
  return *static_cast<T*>(block_shared(&key, sizeof(T), alignof(T)));
}

template <class T>
T* dynamic_shared_array() {
  return static_cast<T*>(dynamic_shared());
}

template <class... P, size_t... I>
void invoke_packed_impl(void (*k)(P...), void** args, std::index_sequence<I...>) {
  k(*static_cast<std::decay_t<P>*>(args[I])...);
}

template <class... P>
void note_kernel(void (*k)(P...)) {
  KernelInfo& info = kernel_info(reinterpret_cast<const void*>(k));
  if (!info.invoke_packed) {
    info.invoke_packed = [k](void** args) { invoke_packed_impl(k, args, std::index_sequence_for<P...>{}); };
  }
}

// kernel<<<grid, block, shared, stream>>>(args...), as build.py rewrites it.
template <class... P, class... A>
void launch(void (*k)(P...), dim3 grid, dim3 block, size_t shared, cudaStream_t, A&&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "kernel launched with the wrong number of arguments");
  note_kernel(k);
  std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);  // the driver copies the arguments
  size_t bytes = 0;
  ((bytes += sizeof(std::decay_t<P>)), ...);
  set_last_error(run_grid(reinterpret_cast<const void*>(k), grid, block, shared, false, bytes,
                          [&] { std::apply(k, params); }));
}

}  // namespace amm_sim

#define AMM_CUDA_TRAFFIC(address, bytes, is_store) ::amm_sim::count_traffic((address), (bytes), (is_store))

// ---- built-in variables --------------------------------------------------------------------
#define threadIdx (::amm_sim::g_thread->thread_idx)
#define blockIdx (::amm_sim::g_thread->block_idx)
#define blockDim (::amm_sim::g_thread->block_dim)
#define gridDim (::amm_sim::g_thread->grid_dim)
constexpr int warpSize = 32;

// ---- device functions ----------------------------------------------------------------------
inline void __syncthreads() { ::amm_sim::sync_block(); }
template <class T>
inline T __shfl_down_sync(unsigned mask, T value, unsigned delta, int width = 32) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of at most 8 bytes");
  ::amm_sim::shfl_down(&value, sizeof(T), mask, delta, width);
  return value;
}
template <class T>
inline T __ldcg(const T* p) { return *p; }
// A vector store (NOTE [vector stores] in csrc/cuda/multi_tensor.cuh): a GPU faults on an address
// that is not a multiple of the vector's size, so the simulator does too.
template <class T>
inline void __stwb(T* p, const T& value) {
  if (reinterpret_cast<uintptr_t>(p) % sizeof(T) != 0)
    throw std::runtime_error("cuda_sim: misaligned address: a " + std::to_string(sizeof(T)) + "-byte vector store");
  *p = value;
}
template <class T>
inline T __ldg(const T* p) { return *p; }

// ---- runtime API ---------------------------------------------------------------------------
cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
const char* cudaGetErrorString(cudaError_t err);
cudaError_t cudaGetDevice(int* device);
cudaError_t cudaStreamIsCapturing(cudaStream_t stream, cudaStreamCaptureStatus* status);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);

template <class... P>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, void (*k)(P...)) {
  ::amm_sim::note_kernel(k);
  *attr = cudaFuncAttributes{};
  attr->sharedSizeBytes = ::amm_sim::kStaticSharedReserve;
  attr->maxThreadsPerBlock = 1024;
  attr->maxDynamicSharedSizeBytes = ::amm_sim::kernel_info(reinterpret_cast<const void*>(k)).max_dynamic_shared;
  return cudaSuccess;
}

template <class... P>
cudaError_t cudaFuncSetAttribute(void (*k)(P...), cudaFuncAttribute attr, int value) {
  ::amm_sim::note_kernel(k);
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  if (value < 0 || value + ::amm_sim::kStaticSharedReserve > ::amm_sim::kSharedOptin) return cudaErrorInvalidValue;
  ::amm_sim::kernel_info(reinterpret_cast<const void*>(k)).max_dynamic_shared = value;
  return cudaSuccess;
}

cudaError_t amm_sim_occupancy(int* blocks, const void* func, int block_size, size_t dynamic_shared);
template <class... P>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, void (*k)(P...), int block_size,
                                                          size_t dynamic_shared) {
  ::amm_sim::note_kernel(k);
  return amm_sim_occupancy(blocks, reinterpret_cast<const void*>(k), block_size, dynamic_shared);
}

cudaError_t cudaLaunchCooperativeKernel(const void* func, dim3 grid, dim3 block, void** args, size_t shared,
                                        cudaStream_t stream);

// ---- cooperative groups --------------------------------------------------------------------
namespace cooperative_groups {
struct grid_group {
  void sync() const { ::amm_sim::sync_grid(); }
};
inline grid_group this_grid() { return grid_group{}; }
}  // namespace cooperative_groups
