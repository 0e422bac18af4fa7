// csrc/cuda's kernels on tensors of more than 2^31 and 2^32 elements, through the CUDA-on-CPU simulator
// (tests/cuda_sim): each case runs pass 1 and pass 2 on the last chunks of a huge tensor, where element
// indices, byte offsets and RLLC's memory rows (a * numel + i) pass 2^31 or 2^32, and on a small tensor
// holding the same values. The slots and every list must be the same bits: an index kept in 32 bits
// anywhere on the way reads or writes other elements, or crashes. Built and run by
// tests/test_huge_tensors.py against the simulator's library; prints one line per case,
// "<case> same|DIFFER|ERROR <detail>", or "skip <reason>" where the huge mappings cannot be made.
//
// NOTE [lazy huge tensors]: a huge list is an anonymous MAP_NORESERVE mapping, so only the pages of the
// chunks walked are ever touched: a 2^32-element float32 list costs the few MB of its last chunks. The
// tensor table is the planner's own (plan_launches), narrowed to those chunks by starting tensor 0 at a
// negative block: with block_begin[0] = -c0, block b walks chunk c0 + b (locate_chunk in
// multi_tensor.cuh), with the begin, end and slot it has in the whole table.
#include <sys/mman.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "cuda/launchers.h"
#include "cuda/rllc_launchers.h"
#include "cuda/tensor_plan.h"

using namespace amm_cuda;

namespace {

constexpr int64_t k2to31 = int64_t{1} << 31;
constexpr int64_t k2to32 = int64_t{1} << 32;

struct Skip {
  std::string reason;
};

void* lazy_zeros(int64_t bytes) {
  void* p = mmap(nullptr, static_cast<size_t>(bytes), PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) throw Skip{"mmap of " + std::to_string(bytes) + " bytes failed (no overcommit?)"};
  return p;
}

int elem_bytes(DType d) { return d == kFloat32 ? 4 : 2; }

// A value that depends only on (element index, list), in [-0.5, 0.5): the same at a huge tensor's
// element i and at the small tensor's element i - base.
float value_at(int64_t i, int list) {
  uint64_t z = static_cast<uint64_t>(i + 1) * 0x9E3779B97F4A7C15ull ^ (static_cast<uint64_t>(list) * 0xD1B54A32D192ED03ull);
  z = (z ^ (z >> 31)) * 0xBF58476D1CE4E5B9ull;
  z ^= z >> 29;
  return static_cast<float>((z >> 40) & 0xFFFFFF) / 16777216.0f - 0.5f;
}

void store(void* p, DType d, int64_t at, float v) {
  if (d == kFloat32) {
    static_cast<float*>(p)[at] = v;
    return;
  }
  uint32_t u;
  std::memcpy(&u, &v, 4);
  u += 0x7fffu + ((u >> 16) & 1u);  // bfloat16, rounded to nearest even
  static_cast<uint16_t*>(p)[at] = static_cast<uint16_t>(u >> 16);
}

// Whether element `at` of a list no longer holds `initial` (the update wrote it).
bool changed(const void* p, DType d, int64_t at, float initial) {
  uint32_t fresh = 0;
  store(&fresh, d, 0, initial);
  return std::memcmp(static_cast<const char*>(p) + at * elem_bytes(d), &fresh, static_cast<size_t>(elem_bytes(d))) != 0;
}

bool same_bytes(const void* a, int64_t a_at, const void* b, int64_t b_at, int64_t n, DType d) {
  const int e = elem_bytes(d);
  return std::memcmp(static_cast<const char*>(a) + a_at * e, static_cast<const char*>(b) + b_at * e,
                     static_cast<size_t>(n * e)) == 0;
}

// The walked part of a tensor of `numel` elements: chunks from first_chunk to its last.
struct Window {
  int64_t numel, chunk, first_chunk;
  int64_t base() const { return first_chunk * chunk; }
  int64_t tail() const { return numel - base(); }
  int64_t blocks() const { return chunks_of(numel, chunk) - first_chunk; }
};

// The first walked chunk: the one before the chunk that holds element `boundary`.
Window window_across(int64_t numel, int64_t chunk, int64_t boundary) { return {numel, chunk, boundary / chunk - 1}; }

// The planner's table for one tensor, narrowed to the window's chunks (NOTE [lazy huge tensors]).
TensorTable narrowed_table(const TensorDesc& desc, int64_t chunk, int64_t skip_chunks, int64_t blocks) {
  const LaunchPlan plan = plan_launches({desc}, /*one_block_per_tensor=*/false, chunk);
  TensorTable t = plan.tables.at(0);
  t.block_begin[0] = static_cast<int32_t>(-skip_chunks);
  t.block_begin[1] = static_cast<int32_t>(t.block_begin[1] - skip_chunks);
  t.num_blocks = t.block_begin[1];
  if (t.num_blocks != blocks) throw std::runtime_error("the narrowed table has " + std::to_string(t.num_blocks) + " blocks");
  return t;
}

// One AM-SGD (lists x, g, d) or AM-AdamW (x, g, d, v) step's two passes over a tensor whose lists are
// `lists`, walking `skip` chunks in; returns the slots.
std::vector<float> am_passes(bool amadamw, DType dtype, void* const* lists, int64_t numel, int64_t chunk, int64_t skip,
                             int64_t blocks) {
  TensorDesc desc;
  desc.numel = numel;
  desc.weight_decay = 0.01;
  for (int l = 0; l < (amadamw ? 4 : 3); ++l) {
    desc.ptr[l] = lists[l];
    desc.dtype[l] = dtype;
  }
  const TensorTable table = narrowed_table(desc, chunk, skip, blocks);
  const int n_sums = amadamw ? 4 : 3;
  std::vector<float> slots(static_cast<size_t>(blocks * n_sums), -1.f);
  float lr = 0.01f, step = 3.f, beta_prod = 0.5f;
  TensorMeta meta{};
  ScopeScratch scratch{0.7f, 0.f, 0.6f, 0.05f};  // beta, not a first step, bias corrections
  PassArgs a{};
  a.lr = &lr;
  a.step = &step;
  a.beta_prod = &beta_prod;
  a.slots = slots.data();
  a.meta = &meta;
  a.scratch = &scratch;
  a.lam = 0.1f;
  a.beta_max = 0.9f;
  a.beta_max_d = 0.9;
  a.beta2_d = 0.999;
  a.beta2 = 0.999f;
  a.eps = 1e-8f;
  const cudaError_t sums = amadamw ? launch_amadamw_sums(table, a, nullptr) : launch_amsgd_sums(table, a, nullptr);
  const cudaError_t update = amadamw ? launch_amadamw_update(table, a, nullptr) : launch_amsgd_update(table, a, nullptr);
  if (sums != cudaSuccess || update != cudaSuccess) throw std::runtime_error("a launch failed");
  return slots;
}

std::string am_case(bool amadamw, DType dtype, int64_t numel, int64_t chunk, int64_t boundary) {
  const Window w = window_across(numel, chunk, boundary);
  const int n_lists = amadamw ? 4 : 3;
  void* huge[4] = {};
  void* small[4] = {};
  for (int l = 0; l < n_lists; ++l) {
    huge[l] = lazy_zeros(numel * elem_bytes(dtype));
    small[l] = lazy_zeros(w.tail() * elem_bytes(dtype));
    for (int64_t i = w.base(); i < numel; ++i) {
      const float v = l == kV ? value_at(i, l) * value_at(i, l) : value_at(i, l);  // exp_avg_sq >= 0
      store(huge[l], dtype, i, v);
      store(small[l], dtype, i - w.base(), v);
    }
  }
  const std::vector<float> slots_huge = am_passes(amadamw, dtype, huge, numel, chunk, w.first_chunk, w.blocks());
  const std::vector<float> slots_small = am_passes(amadamw, dtype, small, w.tail(), chunk, 0, w.blocks());
  bool lists_same = true;
  for (int l = 0; l < n_lists; ++l) lists_same = lists_same && same_bytes(huge[l], w.base(), small[l], 0, w.tail(), dtype);
  const bool slots_same = std::memcmp(slots_huge.data(), slots_small.data(), slots_huge.size() * sizeof(float)) == 0;
  const bool ran = slots_huge[0] != -1.f && changed(huge[kX], dtype, numel - 1, value_at(numel - 1, kX));
  char detail[160];
  std::snprintf(detail, sizeof detail, "elements %lld..%lld, %lld blocks", static_cast<long long>(w.base()),
                static_cast<long long>(numel - 1), static_cast<long long>(w.blocks()));
  return std::string(slots_same && lists_same && ran ? "same " : "DIFFER ") + detail +
         (slots_same ? "" : " (slots)") + (lists_same ? "" : " (lists)");
}

// One RLLC step's two passes (lists x, g and the k memory rows of `numel` each); returns the slots.
std::vector<double> rllc_passes(int k, DType dtype, void* x, void* g, void* memory, int64_t numel, int64_t skip,
                                int64_t blocks) {
  TensorDesc desc;
  desc.numel = numel;
  desc.ptr[kX] = x;
  desc.ptr[kG] = g;
  desc.ptr[kD] = memory;
  desc.dtype[kX] = desc.dtype[kG] = desc.dtype[kD] = dtype;
  const TensorTable table = narrowed_table(desc, kChunkSize, skip, blocks);  // rllc_ops_cuda.cpp's chunk
  std::vector<double> slots(static_cast<size_t>(blocks * amm::rllc_n_sums(k)), -1.0);
  float lr = 0.01f, step = 2.f;
  float law[amm::kRllcMaxK] = {1.f, 0.5f, 0.25f, 0.1f};
  TensorMeta meta{};
  RllcArgs a{};
  a.k = k;
  a.num_tensors = 1;
  a.lr = &lr;
  a.step = &step;
  a.law = law;
  a.slots = slots.data();
  a.meta = &meta;
  for (int i = 0; i < k; ++i) {
    a.b[i] = i == 0 ? 1.f : 0.f;
    a.U[i * k + i] = 0.9f - 0.1f * static_cast<float>(i);
  }
  if (launch_rllc_sums(table, a, nullptr) != cudaSuccess || launch_rllc_update(table, a, nullptr) != cudaSuccess) {
    throw std::runtime_error("a launch failed");
  }
  return slots;
}

std::string rllc_case(int k, DType dtype, int64_t numel) {
  const Window w = window_across(numel, kChunkSize, k2to31);
  void* huge[3] = {lazy_zeros(numel * elem_bytes(dtype)), lazy_zeros(numel * elem_bytes(dtype)),
                   lazy_zeros(k * numel * elem_bytes(dtype))};
  void* small[3] = {lazy_zeros(w.tail() * elem_bytes(dtype)), lazy_zeros(w.tail() * elem_bytes(dtype)),
                    lazy_zeros(k * w.tail() * elem_bytes(dtype))};
  for (int64_t i = w.base(); i < numel; ++i) {
    const int64_t j = i - w.base();
    for (int l = 0; l < 2; ++l) {
      store(huge[l], dtype, i, value_at(i, l));
      store(small[l], dtype, j, value_at(i, l));
    }
    for (int r = 0; r < k; ++r) {  // memory row r of the huge tensor starts at element r * numel
      store(huge[2], dtype, r * numel + i, value_at(i, 2 + r));
      store(small[2], dtype, r * w.tail() + j, value_at(i, 2 + r));
    }
  }
  const std::vector<double> slots_huge = rllc_passes(k, dtype, huge[0], huge[1], huge[2], numel, w.first_chunk, w.blocks());
  const std::vector<double> slots_small = rllc_passes(k, dtype, small[0], small[1], small[2], w.tail(), 0, w.blocks());
  bool lists_same = same_bytes(huge[0], w.base(), small[0], 0, w.tail(), dtype);
  for (int r = 0; r < k; ++r) {
    lists_same = lists_same && same_bytes(huge[2], r * numel + w.base(), small[2], r * w.tail(), w.tail(), dtype);
  }
  const bool slots_same = std::memcmp(slots_huge.data(), slots_small.data(), slots_huge.size() * sizeof(double)) == 0;
  const bool ran = slots_huge[0] != -1.0 && changed(huge[0], dtype, numel - 1, value_at(numel - 1, 0));
  char detail[160];
  std::snprintf(detail, sizeof detail, "k=%d, memory rows up to element %lld, %lld blocks", k,
                static_cast<long long>(k * numel - 1), static_cast<long long>(w.blocks()));
  return std::string(slots_same && lists_same && ran ? "same " : "DIFFER ") + detail +
         (slots_same ? "" : " (slots)") + (lists_same ? "" : " (lists)");
}

}  // namespace

int main() {
  setvbuf(stdout, nullptr, _IONBF, 0);
  struct Case {
    const char* name;
    std::string (*run)();
  };
  const Case cases[] = {
      {"amsgd_bf16_past_2to31", [] { return am_case(false, kBFloat16, k2to31 + 3 * 12288 + 777, 12288, k2to31); }},
      {"amadamw_bf16_past_2to31", [] { return am_case(true, kBFloat16, k2to31 + kChunkSize + 4099, kChunkSize, k2to31); }},
      {"amadamw_f32_past_2to32", [] { return am_case(true, kFloat32, k2to32 + 3 * 4096 + 8, 4096, k2to32); }},
      {"rllc_bf16_k2_vector_rows", [] { return rllc_case(2, kBFloat16, k2to31 + kChunkSize + 4096); }},
      {"rllc_f32_k3_scalar_rows", [] { return rllc_case(3, kFloat32, k2to31 + kChunkSize + 4099); }},
  };
  for (const Case& c : cases) {
    try {
      std::printf("%s %s\n", c.name, c.run().c_str());
    } catch (const Skip& s) {
      std::printf("skip %s\n", s.reason.c_str());
      return 0;
    } catch (const std::exception& e) {
      std::printf("%s ERROR %s\n", c.name, e.what());
    }
  }
  return 0;
}
