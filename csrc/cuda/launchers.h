// Host-side interface of the CUDA kernels of amm_kernels._C: plain-old-data argument structs and the
// launcher functions. Plain C++17 plus the CUDA runtime header (no torch): csrc/cuda/ops_cuda.cpp builds
// the structs from tensors; the .cu files implement the launchers.
//
// A step (SPEC.md, csrc/OPS.md) is at most three kinds of launch on one stream, with no host sync:
//   pass 1   launch_{amsgd,amadamw}_sums  one multi-tensor launch per TensorTable: float32 partial sums
//                                          per (tensor, chunk) slot, and each tensor's TensorMeta;
//            launch_write_meta            (adaptive=False) only the TensorMeta, one block per tensor;
//   finalize launch_finalize              one block: slots -> per-tensor sums -> per-scope beta, the
//                                          ScopeScratch that pass 2 reads, and the scope state;
//   pass 2   launch_{amsgd,amadamw}_update one multi-tensor launch per TensorTable.
// or, for an adaptive step that fits one TensorTable, all three in one launch:
//   launch_persistent_step                 a cooperative launch with two grid barriers.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#if defined(__CUDACC__)
#define AMM_CUDA_HD __host__ __device__
#else
#define AMM_CUDA_HD
#endif

namespace amm_cuda {

// ---------------------------------------------------------------------------------------------
// Geometry. NOTE [chunks and blocks]: every tensor is cut into chunks of kChunkSize elements (a
// tensor of 0 elements still gets one, empty, chunk so that its TensorMeta is written), and every
// chunk is one block of kBlockSize threads. A thread handles kVec consecutive elements per
// iteration: 2 x 16 bytes for float32, 1 x 16 bytes for bfloat16 / float16. kChunkSize is a
// multiple of kBlockSize * kVec, so an aligned tensor stays 16-byte aligned at every chunk start.
// kChunkSize is the default; a launch's own size is TensorTable::chunk_size (NOTE [chunk size] in
// ops_cuda.cpp), any multiple of kChunkQuantum up to kChunkSize.
constexpr int kChunkSize = 65536;
constexpr int kBlockSize = 512;
constexpr int kVec = 8;
constexpr int kFinalizeThreads = 512;
constexpr int kChunkQuantum = kBlockSize * kVec;  // one block iteration
static_assert(kChunkSize % kChunkQuantum == 0, "a chunk is a whole number of block iterations");

// The lists of a tensor table (named so every kernel indexes them the same way).
enum List : int { kX = 0, kG = 1, kD = 2, kV = 3, kMaxLists = 4 };

enum DType : uint32_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };
AMM_CUDA_HD constexpr uint32_t dtype_of(uint32_t packed, int list) { return (packed >> (4 * list)) & 0xFu; }
AMM_CUDA_HD constexpr uint32_t pack_dtype(uint32_t packed, int list, DType dt) {
  return (packed & ~(0xFu << (4 * list))) | (static_cast<uint32_t>(dt) << (4 * list));
}

enum TensorFlag : uint32_t {
  kAligned = 1u,      // every pointer of the tensor is 16-byte aligned: the vector path is used
  kScopeLeader = 2u,  // first tensor of its scope's run: the finalize combines [index, scope_end)
  kGroupLeader = 4u,  // first tensor of its group in this step: the finalize writes prev_lr[group]
};

// ---------------------------------------------------------------------------------------------
// NOTE [tensor table in kernel arguments]: the tensors of a launch travel by value as one kernel
// argument (`const __grid_constant__ TensorTable`), as in apex's multi_tensor_apply: nothing is
// copied host-to-device, so a step captured in a CUDA graph replays with its tables baked into the
// graph, and no pinned staging buffer has to outlive the launch. Unlike apex there is no per-block
// table: block_begin[] is the prefix sum of the tensors' chunk counts and a block finds its tensor by
// binary search (uniform across the block, in the constant bank), so one launch takes any number of
// chunks and a table fills only by tensor count (kMaxTensors). sizeof(TensorTable) is about 29 KB:
// above the 4 KB of old toolkits, within the 32 KB that CUDA >= 12.1 allows for sm_70 and newer.
// When a step has more tensors, the host makes several tables; slot_base keeps the slot numbering
// global (slot = slot_base + blockIdx.x), so the sums do not depend on how tensors were split.
//
// NOTE [one launch per pass]: each table is one launch of each pass, and a launch ends with its last
// blocks running on a partly idle GPU. On the H200 (2026-11-29) the 219-tensor step at 1e8 parameters,
// two tables of at most 128 tensors then, ran its update at 0.86 of copy bandwidth where Triton's, one
// launch, ran at 0.98 (NOTE [chunk size] in ops_cuda.cpp counts the tails). PyTorch measured the same
// cut on an H200 for its multi-tensor launches (pytorch/pytorch#178641, tables grown from 4 KB to 32 KB
// of arguments, fewer launches: 4-14% faster). So a table holds 384 tensors (a LLaMA-7B's 291 or a
// 13B's 363 in one launch per pass), as many as keep the largest kernel's arguments under 32,764
// bytes with room to spare. Each launch ships the whole table, so small steps send 29 KB where they
// sent 10; not yet measured. So does torch's own fused AdamW where it is built with CUDA 13: torch
// 2.13's MultiTensorApply.cuh (in its wheel's headers) then sizes every multi-tensor launch's table
// for 32 KB (252 tensors of 4 lists), whatever the step, where torch 2.11 on the H200 of 2026-11-29
// launched its fused AdamW 7 times for 219 tensors (4 KB tables; kernel_breakdown_nvidia_h200.csv).
// (Arguments over 4 KB need a driver of CUDA 12.1 or newer, which the 10 KB tables needed already;
// PyTorch gates its own on a CUDA 13 build for that reason.) A step of 129 to
// 384 tensors is now one table, so under AMM_CUDA_STEP=auto it may run as the persistent step, whose
// threshold was measured on 111-tensor lists (NOTE [step variant] in ops_cuda.cpp).
// AMM_CUDA_TABLE_TENSORS (read at every step, 1 to kMaxTensors) caps the tensors a table takes, so a GPU
// session can time 128 against 384 in one run and tests can split small steps over several tables.
constexpr int kMaxTensors = 384;

struct TensorEntry {
  void* ptr[kMaxLists];  // kX param, kG grad, kD momentum / exp_avg, kV exp_avg_sq (nullptr: absent)
  int64_t numel;
  int32_t index;         // position in the op's lists (the global tensor index t)
  int32_t group;         // param group (index into lr, prev_lr)
  int32_t scope;         // absolute beta scope (index into step, beta, beta_prod)
  int32_t scope_end;     // exclusive end (global index) of this tensor's scope run
  double weight_decay;   // the group's weight decay (coupled for AMSGD, decoupled for AMAdamW)
  uint32_t dtypes;       // 4 bits per list (DType)
  uint32_t flags;        // TensorFlag
};

struct TensorTable {
  int64_t slot_base;                    // global slot of this table's block 0
  int32_t num_tensors;
  int32_t num_blocks;                   // == block_begin[num_tensors]: the grid size
  int32_t chunk_size;                   // elements per chunk (a multiple of kChunkQuantum)
  int32_t block_begin[kMaxTensors + 1];
  TensorEntry tensors[kMaxTensors];
};
static_assert(sizeof(TensorTable) <= 32000, "kernel arguments are limited to 32764 bytes");

// What pass 1 writes per tensor for the finalize (global tensor index), see NOTE [tensor meta].
struct TensorMeta {
  int64_t slot_begin;
  int32_t n_slots;
  int32_t group;
  int32_t scope;
  int32_t scope_end;
  uint32_t flags;
  double weight_decay;
};

// What the finalize writes per scope for pass 2 (absolute scope index), see NOTE [scope scratch].
struct ScopeScratch {
  float beta;
  float first_step;  // 1 on the scope's first step, else 0
  float bias1;       // AMAdamW: 1 - beta_max * beta_prod (before this step), rounded from double
  float bias2;       // AMAdamW: 1 - beta2^t (t counts this step), rounded from double
};

// ---------------------------------------------------------------------------------------------
// Scalars and device pointers shared by the passes (one struct per step).
struct PassArgs {
  const float* lr;           // [G]
  const float* grad_scale;   // 0-d or nullptr
  const float* found_inf;    // 0-d or nullptr (pass 2 writes nothing when > 0)
  const float* step;         // [S] scope state before this step (pass 1: first step, bias corrections)
  const float* beta_prod;    // [S] AMAdamW only
  float* slots;              // [n_slots * n_sums] pass 1 output (nullptr when adaptive=False)
  TensorMeta* meta;          // [T] pass 1 output
  const ScopeScratch* scratch;  // [S] pass 2 input
  float lam;
  float beta_max;
  double beta_max_d;         // bias corrections are formed in double
  double beta2_d;
  float beta2;
  float eps;
  bool maximize;
};

struct FinalizeArgs {
  const float* slots;        // [n_slots * n_sums] (unused when adaptive=False)
  const TensorMeta* meta;    // [T]
  double* tensor_terms;      // [T * 2] workspace: weighted num, den per tensor
  ScopeScratch* scratch;     // [S]
  int32_t num_tensors;
  int32_t algorithm;         // 0 AM-SGD, 1 AM-AdamW
  float* step;               // [S]
  float* beta;               // [S]
  float* beta_prod;          // [S] AMAdamW only, else nullptr
  float* prev_lr;            // [G]
  float* prev_loss;          // 0-d (AMSGD)
  const float* loss;         // 0-d, AMSGD delta_f="loss" only, else nullptr
  const float* lr;           // [G]
  const float* found_inf;    // 0-d or nullptr
  // NOTE [sharded sums] (csrc/cpu/step_driver_cpu.cpp): the *_scope_sums ops run pass 1 and this
  // kernel with sums_out set, which writes each present scope's weighted (num, den) there ([S, 2],
  // absolute scope index) and nothing else; the step op after the all-reduce runs it with sums_in
  // set (and no pass 1), which takes num and den from there.
  const double* sums_in;     // [S * 2] or nullptr
  double* sums_out;          // [S * 2] or nullptr
  double lam;
  double beta_max;
  double beta_min;
  double beta2;
  bool adaptive;
};
// The largest AM launch's arguments (the persistent step: table, pass, finalize, cache_iters) within
// what a kernel takes (NOTE [one launch per pass]); rllc_launchers.h checks RLLC's.
constexpr size_t kMaxKernelArgBytes = 32764;
static_assert(sizeof(TensorTable) + sizeof(PassArgs) + sizeof(FinalizeArgs) + sizeof(int) <= kMaxKernelArgBytes,
              "the persistent step's arguments exceed what a kernel takes");

constexpr int kAlgoAmsgd = 0;
constexpr int kAlgoAmadamw = 1;

// Bytes of the step's workspace and the offsets of its parts (16-byte aligned), shared by host and device.
struct WorkspaceLayout {
  int64_t slots_offset, meta_offset, terms_offset, scratch_offset, total_bytes;
};
inline WorkspaceLayout workspace_layout(int64_t n_slots, int n_sums, int64_t n_tensors, int64_t n_scopes) {
  auto up = [](int64_t b) { return (b + 15) / 16 * 16; };
  WorkspaceLayout w{};
  w.slots_offset = 0;
  w.meta_offset = up(n_slots * n_sums * static_cast<int64_t>(sizeof(float)));
  w.terms_offset = w.meta_offset + up(n_tensors * static_cast<int64_t>(sizeof(TensorMeta)));
  w.scratch_offset = w.terms_offset + up(n_tensors * 2 * static_cast<int64_t>(sizeof(double)));
  w.total_bytes = w.scratch_offset + up(n_scopes * static_cast<int64_t>(sizeof(ScopeScratch)));
  return w;
}

// ---------------------------------------------------------------------------------------------
// Launchers: each returns cudaGetLastError() after its launch (cudaSuccess for an empty table).
cudaError_t launch_write_meta(const TensorTable& table, TensorMeta* meta, cudaStream_t stream);
cudaError_t launch_amsgd_sums(const TensorTable& table, const PassArgs& args, cudaStream_t stream);
cudaError_t launch_amsgd_update(const TensorTable& table, const PassArgs& args, cudaStream_t stream);
cudaError_t launch_amadamw_sums(const TensorTable& table, const PassArgs& args, cudaStream_t stream);
cudaError_t launch_amadamw_update(const TensorTable& table, const PassArgs& args, cudaStream_t stream);
cudaError_t launch_finalize(const FinalizeArgs& args, cudaStream_t stream);

// The persistent step (NOTE [persistent step] in persistent_kernels.cu): pass 1, the finalize and
// pass 2 of an adaptive step over ONE TensorTable, in one cooperative launch.
constexpr int kMaxCacheIters = 8;          // vector iterations per thread its tile cache may keep
struct PersistentPlan {
  int grid = 0;         // blocks; 0: this device cannot run it (no cooperative launch, no room)
  int cache_iters = 0;  // vector iterations per thread kept in shared memory
  int smem_bytes = 0;   // dynamic shared memory per block
};
// cache_iters_wanted < 0: as many as fit one block's shared memory (at most kMaxCacheIters).
cudaError_t plan_persistent(int algorithm, int device, int64_t num_chunks, int cache_iters_wanted,
                            PersistentPlan* plan);
cudaError_t launch_persistent_step(int algorithm, const PersistentPlan& plan, const TensorTable& table,
                                   const PassArgs& pass, const FinalizeArgs& fin, cudaStream_t stream);

}  // namespace amm_cuda
