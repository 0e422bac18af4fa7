// Host-side planning of the multi-tensor launches: per-tensor descriptions -> TensorTables.
// Plain C++17 (no torch, no CUDA device code), so it can be checked and tested with g++ alone
// (tests/test_tensor_plan.py).
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda/launchers.h"

namespace amm_cuda {

struct TensorDesc {
  void* ptr[kMaxLists] = {nullptr, nullptr, nullptr, nullptr};
  DType dtype[kMaxLists] = {kFloat32, kFloat32, kFloat32, kFloat32};
  int64_t numel = 0;
  int32_t group = 0;
  int32_t scope = 0;
  double weight_decay = 0.0;
};

struct LaunchPlan {
  std::vector<TensorTable> tables;
  int64_t total_blocks = 0;  // == number of slots of pass 1
};

inline int64_t chunks_of(int64_t numel, int64_t chunk_size = kChunkSize) {
  return numel <= 0 ? 1 : (numel + chunk_size - 1) / chunk_size;
}

// one_block_per_tensor: the launch only writes TensorMeta (adaptive=False), one block per tensor.
// chunk_size: elements per chunk, a multiple of kChunkQuantum up to kChunkSize.
// table_tensors: the most tensors a table takes, 1 to kMaxTensors (NOTE [one launch per pass]).
// Throws std::invalid_argument when a scope's tensors are not contiguous (the StepBatch contract), when
// one tensor needs more blocks than a grid holds (2^31 - 1 chunks: about 1.4e14 elements at the default
// chunk size), or for a chunk size or table size outside those ranges.
inline LaunchPlan plan_launches(const std::vector<TensorDesc>& descs, bool one_block_per_tensor,
                                int64_t chunk_size = kChunkSize, int64_t table_tensors = kMaxTensors) {
  if (chunk_size < kChunkQuantum || chunk_size > kChunkSize || chunk_size % kChunkQuantum != 0) {
    throw std::invalid_argument("amm_kernels: a chunk size must be a multiple of " + std::to_string(kChunkQuantum) +
                                " up to " + std::to_string(kChunkSize) + ", got " + std::to_string(chunk_size));
  }
  if (table_tensors < 1 || table_tensors > kMaxTensors) {
    throw std::invalid_argument("amm_kernels: a table holds 1 to " + std::to_string(kMaxTensors) + " tensors, got " +
                                std::to_string(table_tensors));
  }
  LaunchPlan plan;
  const int64_t n = static_cast<int64_t>(descs.size());
  // Scope runs and group leaders, in list order.
  std::vector<int32_t> scope_end(n, 0);
  std::vector<uint32_t> flags(n, 0);
  std::vector<char> scope_seen, group_seen;  // by index: O(tensors) per step, not O(tensors^2)
  for (int64_t i = n - 1; i >= 0; --i) {
    const bool run_ends_here = i == n - 1 || descs[i + 1].scope != descs[i].scope;
    scope_end[i] = run_ends_here ? static_cast<int32_t>(i + 1) : scope_end[i + 1];
  }
  for (int64_t i = 0; i < n; ++i) {
    const TensorDesc& d = descs[i];
    if (d.group < 0 || d.scope < 0) throw std::invalid_argument("amm_kernels: negative group or scope index");
    if (i == 0 || descs[i - 1].scope != d.scope) {
      if (static_cast<size_t>(d.scope) >= scope_seen.size()) scope_seen.resize(d.scope + 1, 0);
      if (scope_seen[d.scope]) {
        throw std::invalid_argument("amm_kernels: the tensors of scope " + std::to_string(d.scope) +
                                    " are not contiguous in the lists");
      }
      scope_seen[d.scope] = 1;
      flags[i] |= kScopeLeader;
    }
    if (static_cast<size_t>(d.group) >= group_seen.size()) group_seen.resize(d.group + 1, 0);
    if (!group_seen[d.group]) {
      group_seen[d.group] = 1;
      flags[i] |= kGroupLeader;
    }
    bool aligned = true;
    for (int l = 0; l < kMaxLists; ++l) {
      if (d.ptr[l] != nullptr && reinterpret_cast<uintptr_t>(d.ptr[l]) % 16 != 0) aligned = false;
    }
    if (aligned) flags[i] |= kAligned;
  }

  TensorTable* table = nullptr;
  int64_t blocks_in_table = 0;
  for (int64_t i = 0; i < n; ++i) {
    const TensorDesc& d = descs[i];
    const int64_t chunks = one_block_per_tensor ? 1 : chunks_of(d.numel, chunk_size);
    if (chunks > INT32_MAX) {
      throw std::invalid_argument("amm_kernels: a tensor of " + std::to_string(d.numel) +
                                  " elements needs more blocks than one launch's grid holds");
    }
    if (table == nullptr || table->num_tensors == table_tensors || blocks_in_table + chunks > INT32_MAX) {
      plan.tables.emplace_back();
      table = &plan.tables.back();
      *table = TensorTable{};
      table->slot_base = plan.total_blocks;
      table->chunk_size = static_cast<int32_t>(chunk_size);
      blocks_in_table = 0;
    }
    TensorEntry& e = table->tensors[table->num_tensors];
    e = TensorEntry{};
    uint32_t packed = 0;
    for (int l = 0; l < kMaxLists; ++l) {
      e.ptr[l] = d.ptr[l];
      packed = pack_dtype(packed, l, d.dtype[l]);
    }
    e.numel = d.numel;
    e.index = static_cast<int32_t>(i);
    e.group = d.group;
    e.scope = d.scope;
    e.scope_end = scope_end[i];
    e.weight_decay = d.weight_decay;
    e.dtypes = packed;
    e.flags = flags[i];
    table->block_begin[table->num_tensors] = static_cast<int32_t>(blocks_in_table);
    blocks_in_table += chunks;
    table->num_tensors += 1;
    table->block_begin[table->num_tensors] = static_cast<int32_t>(blocks_in_table);
    table->num_blocks = static_cast<int32_t>(blocks_in_table);
    plan.total_blocks += chunks;
  }
  return plan;
}

}  // namespace amm_cuda
