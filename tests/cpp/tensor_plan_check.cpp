// Exercises csrc/cuda/tensor_plan.h on the host (g++ alone: no torch, no CUDA): tests/test_tensor_plan.py
// builds it and reads what it prints, one "name value" per line.
#include <cstdio>
#include <stdexcept>
#include <vector>

#include "cuda/tensor_plan.h"

using amm_cuda::TensorDesc;

static TensorDesc desc(int64_t numel, int32_t group, int32_t scope) {
  TensorDesc d;
  d.numel = numel;
  d.group = group;
  d.scope = scope;
  return d;
}

static const char* throws(const std::vector<TensorDesc>& descs, int64_t chunk_size = amm_cuda::kChunkSize,
                          int64_t table_tensors = amm_cuda::kMaxTensors) {
  try {
    amm_cuda::plan_launches(descs, false, chunk_size, table_tensors);
  } catch (const std::invalid_argument&) {
    return "yes";
  }
  return "no";
}

int main() {
  // the tensor scope of a large model: one scope per tensor, every tensor its scope's leader
  std::vector<TensorDesc> many;
  for (int32_t i = 0; i < 20000; ++i) many.push_back(desc(7, i % 3, i));
  const amm_cuda::LaunchPlan plan = amm_cuda::plan_launches(many, false);
  int64_t leaders = 0, tensors = 0;
  for (const auto& table : plan.tables) {
    tensors += table.num_tensors;
    for (int t = 0; t < table.num_tensors; ++t) leaders += (table.tensors[t].flags & amm_cuda::kScopeLeader) != 0;
  }
  std::printf("many_tensors %lld\nmany_leaders %lld\nmany_blocks %lld\n", static_cast<long long>(tensors),
              static_cast<long long>(leaders), static_cast<long long>(plan.total_blocks));
  // a scope whose tensors are not next to each other breaks the StepBatch contract
  std::printf("split_scope_throws %s\n", throws({desc(5, 0, 0), desc(5, 0, 1), desc(5, 0, 0)}));
  std::printf("contiguous_scopes_throw %s\n", throws({desc(5, 0, 0), desc(5, 0, 0), desc(5, 0, 1)}));
  // one tensor needing more blocks than a grid holds (numbers only: nothing is allocated)
  const int64_t too_many = (int64_t{INT32_MAX} + 1) * amm_cuda::kChunkSize;
  std::printf("huge_tensor_throws %s\n", throws({desc(too_many, 0, 0)}));
  std::printf("largest_tensor_throws %s\n", throws({desc(int64_t{INT32_MAX} * amm_cuda::kChunkSize, 0, 0)}));
  // a smaller chunk size (NOTE [chunk size]): more blocks per tensor, recorded in every table
  const amm_cuda::LaunchPlan small = amm_cuda::plan_launches({desc(3 * 4096 + 5, 0, 0), desc(4096, 0, 0), desc(0, 0, 0)},
                                                             false, 4096);
  std::printf("chunk_4096_blocks %lld\nchunk_4096_table %d\n", static_cast<long long>(small.total_blocks),
              small.tables[0].chunk_size);
  std::printf("default_chunk_table %d\n", plan.tables[0].chunk_size);
  std::printf("chunk_5000_throws %s\nchunk_0_throws %s\nchunk_131072_throws %s\n", throws({desc(5, 0, 0)}, 5000),
              throws({desc(5, 0, 0)}, 0), throws({desc(5, 0, 0)}, 131072));
  // NOTE [one launch per pass]: a table holds kMaxTensors tensors, fewer where capped
  std::vector<TensorDesc> five_tables;
  for (int32_t i = 0; i < 4 * amm_cuda::kMaxTensors + 1; ++i) five_tables.push_back(desc(3, 0, 0));
  const amm_cuda::LaunchPlan full = amm_cuda::plan_launches(five_tables, false);
  const amm_cuda::LaunchPlan capped = amm_cuda::plan_launches(five_tables, false, amm_cuda::kChunkSize, 128);
  std::printf("max_tensors %d\nfull_tables %zu\nfull_last_tensors %d\nfull_last_slot_base %lld\n", amm_cuda::kMaxTensors,
              full.tables.size(), full.tables.back().num_tensors, static_cast<long long>(full.tables.back().slot_base));
  std::printf("capped_tables %zu\ncapped_first_tensors %d\n", capped.tables.size(), capped.tables[0].num_tensors);
  std::printf("table_0_throws %s\ntable_over_max_throws %s\ntable_1_throws %s\n",
              throws({desc(5, 0, 0)}, amm_cuda::kChunkSize, 0),
              throws({desc(5, 0, 0)}, amm_cuda::kChunkSize, amm_cuda::kMaxTensors + 1),
              throws({desc(5, 0, 0), desc(5, 0, 0)}, amm_cuda::kChunkSize, 1));
  return 0;
}
