// The fiber scheduler and runtime calls behind amm_cuda_sim.h (NOTE [CUDA on the CPU] there).
// x86-64 System V only (the context switch is a few lines of assembly); build.py checks the machine.
#include "amm_cuda_sim.h"

#include <sys/mman.h>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

#include <algorithm>
#include <cstdlib>
#include <deque>
#include <iterator>
#include <memory>
#include <mutex>
#include <set>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

// Saves the callee-saved registers, MXCSR and the x87 control word on the current stack, stores the
// stack pointer in *from, and resumes the context whose stack pointer is `to`.
extern "C" void amm_sim_switch(void** from, void* to);
asm(R"(
    .text
    .globl amm_sim_switch
    .type amm_sim_switch, @function
amm_sim_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size amm_sim_switch, .-amm_sim_switch
    .section .note.GNU-stack,"",@progbits
    .text
)");

namespace amm_sim {

ThreadState* g_thread = nullptr;
int64_t g_loaded_bytes = 0, g_stored_bytes = 0;

namespace {

constexpr size_t kStackBytes = 256 * 1024;  // a TensorTable argument alone is 29 KB per thread
constexpr size_t kGuardBytes = 4096;
constexpr size_t kCanaryBytes = 1024;  // a red zone after every shared buffer
constexpr unsigned char kCanary = 0xA5;

struct Stack {
  char* base = nullptr;  // the guard page; the usable stack is above it
  Stack() {
    void* p = mmap(nullptr, kStackBytes + kGuardBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                   -1, 0);
    if (p == MAP_FAILED) throw std::runtime_error("cuda_sim: cannot map a fiber stack");
    base = static_cast<char*>(p);
    mprotect(base, kGuardBytes, PROT_NONE);  // an overflow faults instead of corrupting a neighbour
  }
  ~Stack() { munmap(base, kStackBytes + kGuardBytes); }
  char* top() const { return base + kGuardBytes + kStackBytes; }
};

struct Barrier {
  int arrived = 0;
  std::vector<int> waiters;  // fiber indices, in arrival order
};

enum class Wait { kNone, kBlock, kWarp, kGrid };

struct Block;

struct Fiber {
  void* sp = nullptr;
  ThreadState state{};
  Block* block = nullptr;
  bool done = false;
  int index = 0;  // in Grid::fibers
  Wait wait = Wait::kNone;
  char* stack_bottom = nullptr;  // NOTE [AddressSanitizer]
};

struct SharedBuffer {
  std::unique_ptr<unsigned char[]> data;
  size_t bytes = 0;
  size_t offset = 0;  // to the aligned start
};

struct Block {
  std::vector<Fiber*> threads;
  int live = 0;
  Barrier barrier;
  std::vector<Barrier> warp_barrier;
  std::vector<int> warp_live;
  std::vector<uint64_t> exchange;  // one 8-byte word per thread, for the shuffles
  std::unordered_map<const void*, SharedBuffer> statics;
  SharedBuffer dynamic;
  size_t static_bytes = 0;
};

// NOTE [schedules]: which runnable thread runs next. Every order is one a GPU may produce (between
// barriers, warps and blocks run independently), and a race-free kernel gives the same bits under
// all of them; tests/test_cuda_sim.py checks that. They differ in what a race looks like:
//   ascending   (default) the lowest-numbered runnable thread: warp 0 / block 0 run ahead to their
//               next barrier, so a thread that reads what higher-numbered threads write before a
//               barrier that is missing reads unwritten (NaN) shared memory or stale global memory;
//   descending  the highest-numbered first: the last warp / block runs ahead;
//   round_robin every runnable thread in turn: warps advance in lockstep.
// AMM_SIM_SCHEDULE picks one, read at every launch.
enum class Policy { kAscending, kDescending, kRoundRobin };

Policy policy_from_env() {
  const char* v = std::getenv("AMM_SIM_SCHEDULE");
  if (v == nullptr || *v == '\0' || std::strcmp(v, "ascending") == 0) return Policy::kAscending;
  if (std::strcmp(v, "descending") == 0) return Policy::kDescending;
  if (std::strcmp(v, "round_robin") == 0) return Policy::kRoundRobin;
  throw std::invalid_argument(std::string("cuda_sim: AMM_SIM_SCHEDULE must be ascending, descending or round_robin, got '") +
                              v + "'");
}

// AMM_SIM_COOP_SMS: the SMs a cooperative launch may fill (default: all kSms the device reports). Fewer
// stands for an MPS client given part of the GPU: the device still reports every SM, and a grid sized
// from that report is refused with cudaErrorCooperativeLaunchTooLarge.
int cooperative_sms() {
  const char* v = std::getenv("AMM_SIM_COOP_SMS");
  if (v == nullptr || *v == '\0') return kSms;
  const int n = std::atoi(v);
  if (n < 1 || n > kSms) throw std::invalid_argument("cuda_sim: AMM_SIM_COOP_SMS must be 1.." + std::to_string(kSms));
  return n;
}

// AMM_SIM_CAPTURING=1: every stream is being captured (NOTE [CUDA on the CPU]). A launch that fails
// while capturing invalidates the capture until the variable is unset.
bool capturing() {
  const char* v = std::getenv("AMM_SIM_CAPTURING");
  return v != nullptr && std::strcmp(v, "1") == 0;
}
bool g_capture_invalidated = false;

// The runnable fibers, in the policy's order.
class ReadyQueue {
 public:
  explicit ReadyQueue(Policy p) : policy_(p) {}
  void push(int i) {
    if (policy_ == Policy::kRoundRobin) fifo_.push_back(i);
    else ordered_.insert(i);
  }
  bool empty() const { return policy_ == Policy::kRoundRobin ? fifo_.empty() : ordered_.empty(); }
  int pop() {
    int i;
    if (policy_ == Policy::kRoundRobin) {
      i = fifo_.front();
      fifo_.pop_front();
    } else if (policy_ == Policy::kAscending) {
      i = *ordered_.begin();
      ordered_.erase(ordered_.begin());
    } else {
      i = *ordered_.rbegin();
      ordered_.erase(std::prev(ordered_.end()));
    }
    return i;
  }
  void clear() {
    fifo_.clear();
    ordered_.clear();
  }

 private:
  Policy policy_;
  std::deque<int> fifo_;
  std::set<int> ordered_;
};

struct Grid {
  explicit Grid(Policy p) : ready(p) {}
  ReadyQueue ready;
  std::vector<std::unique_ptr<Block>> blocks;
  std::vector<Fiber> fibers;
  Barrier barrier;
  int live = 0;
  bool cooperative = false;
  const std::function<void()>* body = nullptr;
  std::string fault;
};

std::vector<std::unique_ptr<Stack>> g_stacks;  // reused by every launch
Grid* g_grid = nullptr;
Fiber* g_fiber = nullptr;
void* g_scheduler_sp = nullptr;
cudaError_t g_last_error = cudaSuccess;
std::recursive_mutex g_mutex;  // one launch at a time
std::unordered_map<const void*, KernelInfo>* g_kernels = nullptr;

// The barrier completes when every live thread of its scope has arrived (threads that exited do
// not count, as for __syncthreads on current GPUs); its waiters become runnable.
void try_release(Barrier& b, int live) {
  if (b.arrived > 0 && b.arrived >= live) {
    b.arrived = 0;
    for (int i : b.waiters) {
      g_grid->fibers[i].wait = Wait::kNone;
      g_grid->ready.push(i);
    }
    b.waiters.clear();
  }
}

// NOTE [AddressSanitizer]: build.py can compile the simulator with -fsanitize=address (the tests
// run it that way in a subprocess, to find reads and writes outside a tensor). ASan must be told
// about every stack switch, and a reused fiber stack must be unpoisoned; without ASan these are no-ops.
#if defined(__SANITIZE_ADDRESS__)
const void* g_scheduler_stack = nullptr;  // the OS thread's stack, learnt at a fiber's first resume
size_t g_scheduler_stack_size = 0;
void asan_resumed_in_fiber() { __sanitizer_finish_switch_fiber(nullptr, &g_scheduler_stack, &g_scheduler_stack_size); }
void asan_leave_fiber() { __sanitizer_start_switch_fiber(nullptr, g_scheduler_stack, g_scheduler_stack_size); }
void asan_back_in_scheduler() { __sanitizer_finish_switch_fiber(nullptr, nullptr, nullptr); }
void asan_enter_fiber(const Fiber& f) { __sanitizer_start_switch_fiber(nullptr, f.stack_bottom, kStackBytes); }
#else
void asan_enter_fiber(const Fiber&) {}
void asan_resumed_in_fiber() {}
void asan_leave_fiber() {}
void asan_back_in_scheduler() {}
#endif

void yield_to_scheduler() {
  asan_leave_fiber();
  amm_sim_switch(&g_fiber->sp, g_scheduler_sp);
  asan_resumed_in_fiber();
}

[[noreturn]] void fiber_main() {
  asan_resumed_in_fiber();
  Fiber* self = g_fiber;
  try {
    (*g_grid->body)();
  } catch (const std::exception& e) {
    if (g_grid->fault.empty()) g_grid->fault = e.what();
  } catch (...) {
    if (g_grid->fault.empty()) g_grid->fault = "unknown exception in a kernel";
  }
  self->done = true;
  Block* b = self->block;
  b->live -= 1;
  b->warp_live[self->state.thread_idx.x / 32] -= 1;
  g_grid->live -= 1;
  try_release(b->barrier, b->live);  // the threads still at a barrier no longer wait for this one
  if (g_grid->cooperative) try_release(g_grid->barrier, g_grid->live);
  for (;;) yield_to_scheduler();  // never resumed once done
}

void prepare(Fiber& f, char* stack_top) {
#if defined(__SANITIZE_ADDRESS__)
  // A stack left by an earlier launch (or a fault) may still carry poisoned redzones.
  __asan_unpoison_memory_region(stack_top - kStackBytes, kStackBytes);
  f.stack_bottom = stack_top - kStackBytes;
#endif
  // The frame amm_sim_switch pops: MXCSR + x87 control word, r15..r12, rbx, rbp, then `ret` into
  // fiber_main with the stack aligned as after a call.
  uint64_t* sp = reinterpret_cast<uint64_t*>(stack_top) - 9;
  uint32_t control[2] = {0, 0};
  asm volatile("stmxcsr %0" : "=m"(control[0]));
  asm volatile("fnstcw %0" : "=m"(*reinterpret_cast<uint16_t*>(&control[1])));
  std::memcpy(&sp[0], control, 8);
  for (int i = 1; i <= 6; ++i) sp[i] = 0;
  sp[7] = reinterpret_cast<uint64_t>(&fiber_main);
  sp[8] = 0;
  f.sp = sp;
}

SharedBuffer make_buffer(size_t bytes, size_t align) {
  SharedBuffer buf;
  buf.bytes = bytes;
  buf.data.reset(new unsigned char[bytes + align + kCanaryBytes]);
  const uintptr_t raw = reinterpret_cast<uintptr_t>(buf.data.get());
  buf.offset = (align - raw % align) % align;
  std::memset(buf.data.get() + buf.offset, 0xFF, bytes);  // uninitialised shared memory reads as NaN
  std::memset(buf.data.get() + buf.offset + bytes, kCanary, kCanaryBytes);
  return buf;
}

bool canary_intact(const SharedBuffer& buf) {
  const unsigned char* c = buf.data.get() + buf.offset + buf.bytes;
  for (size_t i = 0; i < kCanaryBytes; ++i)
    if (c[i] != kCanary) return false;
  return true;
}

void arrive(Barrier& b, Wait kind, int live) {
  Fiber* self = g_fiber;
  b.arrived += 1;
  if (b.arrived >= live) {  // the last to arrive goes on at once
    self->wait = Wait::kNone;
    try_release(b, live);
    return;
  }
  self->wait = kind;
  b.waiters.push_back(self->index);
  yield_to_scheduler();  // resumed only once released
}

std::string describe_deadlock(const Grid& g) {
  int at_block = 0, at_warp = 0, at_grid = 0, exited = 0;
  for (const Fiber& f : g.fibers) {
    if (f.done) ++exited;
    else if (f.wait == Wait::kBlock) ++at_block;
    else if (f.wait == Wait::kWarp) ++at_warp;
    else if (f.wait == Wait::kGrid) ++at_grid;
  }
  return "cuda_sim: deadlock (a barrier that not every thread reaches): " + std::to_string(at_block) +
         " threads wait at __syncthreads, " + std::to_string(at_warp) + " at a warp shuffle, " +
         std::to_string(at_grid) + " at grid.sync, " + std::to_string(exited) + " have exited";
}

// Runs fibers [first, first + n) to completion (or to the first fault).
void schedule(Grid& g, size_t first, size_t n) {
  g.ready.clear();
  for (size_t i = first; i < first + n; ++i) g.ready.push(static_cast<int>(i));
  size_t finished = 0;
  while (!g.ready.empty()) {
    Fiber& f = g.fibers[g.ready.pop()];
    g_fiber = &f;
    g_thread = &f.state;
    asan_enter_fiber(f);
    amm_sim_switch(&g_scheduler_sp, f.sp);
    asan_back_in_scheduler();
    if (!g.fault.empty()) return;
    if (f.done) ++finished;
  }
  if (finished < n) g.fault = describe_deadlock(g);
}

}  // namespace

KernelInfo& kernel_info(const void* func) {
  std::lock_guard<std::recursive_mutex> lock(g_mutex);
  if (g_kernels == nullptr) g_kernels = new std::unordered_map<const void*, KernelInfo>();
  return (*g_kernels)[func];
}

void set_last_error(cudaError_t err) {
  if (err != cudaSuccess) g_last_error = err;
}

cudaError_t launch_grid(const void* func, dim3 grid_dim, dim3 block_dim, size_t dynamic_shared, bool cooperative,
                        size_t param_bytes, const std::function<void()>& body);

cudaError_t run_grid(const void* func, dim3 grid_dim, dim3 block_dim, size_t dynamic_shared, bool cooperative,
                     size_t param_bytes, const std::function<void()>& body) {
  std::lock_guard<std::recursive_mutex> lock(g_mutex);
  if (!capturing()) {
    g_capture_invalidated = false;
    return launch_grid(func, grid_dim, block_dim, dynamic_shared, cooperative, param_bytes, body);
  }
  if (g_capture_invalidated) return cudaErrorStreamCaptureInvalidated;
  const cudaError_t err = launch_grid(func, grid_dim, block_dim, dynamic_shared, cooperative, param_bytes, body);
  if (err != cudaSuccess) g_capture_invalidated = true;
  return err;
}

cudaError_t launch_grid(const void* func, dim3 grid_dim, dim3 block_dim, size_t dynamic_shared, bool cooperative,
                        size_t param_bytes, const std::function<void()>& body) {
  if (g_grid != nullptr) throw std::runtime_error("cuda_sim: a kernel launched a kernel");
  const uint64_t threads = uint64_t{block_dim.x} * block_dim.y * block_dim.z;
  const uint64_t blocks = uint64_t{grid_dim.x} * grid_dim.y * grid_dim.z;
  if (threads == 0 || threads > 1024 || blocks == 0 || grid_dim.x > 0x7fffffffu || grid_dim.y > 65535 ||
      grid_dim.z > 65535 || block_dim.z > 64) {
    return cudaErrorInvalidConfiguration;
  }
  if (block_dim.y != 1 || block_dim.z != 1 || grid_dim.y != 1 || grid_dim.z != 1) {
    throw std::runtime_error("cuda_sim: only 1-D grids and blocks are simulated");
  }
  if (param_bytes > static_cast<size_t>(kMaxParamBytes)) return cudaErrorInvalidValue;
  if (dynamic_shared > static_cast<size_t>(kernel_info(func).max_dynamic_shared)) return cudaErrorInvalidValue;
  if (cooperative) {
    int per_sm = 0;
    amm_sim_occupancy(&per_sm, func, static_cast<int>(threads), dynamic_shared);
    if (blocks > static_cast<uint64_t>(per_sm) * cooperative_sms()) return cudaErrorCooperativeLaunchTooLarge;
  }

  const size_t per_launch = cooperative ? blocks * threads : threads;  // fibers alive at once
  while (g_stacks.size() < per_launch) g_stacks.push_back(std::make_unique<Stack>());

  Grid g(policy_from_env());
  g.cooperative = cooperative;
  g.body = &body;
  g_grid = &g;
  struct Reset {
    ~Reset() { g_grid = nullptr; g_fiber = nullptr; g_thread = nullptr; }
  } reset;

  const int n_warps = static_cast<int>((threads + 31) / 32);
  auto make_block = [&](unsigned b, size_t fiber_base) {
    auto block = std::make_unique<Block>();
    block->live = static_cast<int>(threads);
    block->warp_barrier.resize(n_warps);
    block->warp_live.resize(n_warps);
    for (int w = 0; w < n_warps; ++w) block->warp_live[w] = std::min<int>(32, static_cast<int>(threads) - 32 * w);
    block->exchange.assign(threads, 0);
    block->dynamic = make_buffer(dynamic_shared, 16);
    for (unsigned t = 0; t < threads; ++t) {
      Fiber& f = g.fibers[fiber_base + t];
      f = Fiber{};
      f.index = static_cast<int>(fiber_base + t);
      f.block = block.get();
      f.state.thread_idx = uint3{t, 0, 0};
      f.state.block_idx = uint3{b, 0, 0};
      f.state.block_dim = block_dim;
      f.state.grid_dim = grid_dim;
      prepare(f, g_stacks[fiber_base + t]->top());
      block->threads.push_back(&f);
    }
    return block;
  };
  auto check_block = [&](const Block& block) {
    if (!g.fault.empty()) return;
    if (!canary_intact(block.dynamic)) g.fault = "cuda_sim: a kernel wrote past its dynamic shared memory";
    for (const auto& kv : block.statics)
      if (!canary_intact(kv.second)) g.fault = "cuda_sim: a kernel wrote past a __shared__ array";
    if (block.static_bytes > static_cast<size_t>(kStaticSharedReserve))
      g.fault = "cuda_sim: the kernel's static shared memory exceeds the simulator's kStaticSharedReserve";
  };

  if (cooperative) {
    g.fibers.resize(blocks * threads);
    g.live = static_cast<int>(blocks * threads);
    for (unsigned b = 0; b < blocks; ++b) g.blocks.push_back(make_block(b, b * threads));
    schedule(g, 0, g.fibers.size());
    for (const auto& block : g.blocks) check_block(*block);
  } else {
    g.fibers.resize(threads);
    for (unsigned b = 0; b < blocks && g.fault.empty(); ++b) {
      g.blocks.clear();
      g.live = static_cast<int>(threads);
      g.blocks.push_back(make_block(b, 0));
      schedule(g, 0, threads);
      check_block(*g.blocks[0]);
    }
  }
  if (!g.fault.empty()) throw std::runtime_error(g.fault);
  return cudaSuccess;
}

void sync_block() {
  Block* b = g_fiber->block;
  // A block barrier may complete only once the threads that exited meanwhile are discounted.
  arrive(b->barrier, Wait::kBlock, b->live);
}

void sync_grid() {
  if (!g_grid->cooperative) throw std::runtime_error("cuda_sim: grid.sync() in a launch that is not cooperative");
  arrive(g_grid->barrier, Wait::kGrid, g_grid->live);
}

void shfl_down(void* value, size_t bytes, unsigned mask, unsigned delta, int width) {
  Block* b = g_fiber->block;
  const unsigned t = g_fiber->state.thread_idx.x, lane = t % 32, warp = t / 32;
  if (mask != 0xffffffffu || width != 32) throw std::runtime_error("cuda_sim: only full-warp shuffles are simulated");
  if (b->warp_live[warp] != 32 || b->threads.size() < 32 * (warp + 1)) {
    throw std::runtime_error("cuda_sim: a full-mask shuffle in a warp with exited or missing lanes");
  }
  std::memcpy(&b->exchange[t], value, bytes);
  arrive(b->warp_barrier[warp], Wait::kWarp, 32);
  if (lane + delta < 32) std::memcpy(value, &b->exchange[t + delta], bytes);
  arrive(b->warp_barrier[warp], Wait::kWarp, 32);  // nobody overwrites a word before every lane read it
}

void* block_shared(const void* key, size_t bytes, size_t align) {
  Block* b = g_fiber->block;
  auto it = b->statics.find(key);
  if (it == b->statics.end()) {
    it = b->statics.emplace(key, make_buffer(bytes, align)).first;
    b->static_bytes += bytes;
  }
  return it->second.data.get() + it->second.offset;
}

void* dynamic_shared() {
  Block* b = g_fiber->block;
  return b->dynamic.data.get() + b->dynamic.offset;
}

}  // namespace amm_sim

cudaError_t amm_sim_occupancy(int* blocks, const void* func, int block_size, size_t dynamic_shared) {
  using namespace amm_sim;
  (void)func;
  if (block_size <= 0 || block_size > 1024) return cudaErrorInvalidValue;
  const size_t per_block = dynamic_shared + kStaticSharedReserve + 1024;  // 1 KB per block reserved by the driver
  const int by_shared = static_cast<int>(kSharedPerSm / per_block);
  const int by_threads = kMaxThreadsPerSm / block_size;
  *blocks = std::max(0, std::min({by_shared, by_threads, 32}));
  return cudaSuccess;
}

cudaError_t cudaGetLastError() {
  const cudaError_t e = amm_sim::g_last_error;
  amm_sim::g_last_error = cudaSuccess;
  return e;
}

cudaError_t cudaPeekAtLastError() { return amm_sim::g_last_error; }

const char* cudaGetErrorString(cudaError_t err) {
  switch (err) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorInvalidDeviceFunction: return "invalid device function";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
    case cudaErrorCooperativeLaunchTooLarge: return "too many blocks in cooperative launch";
    case cudaErrorStreamCaptureInvalidated: return "operation failed due to a previous error during capture";
  }
  return "unknown error";
}

cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaStreamIsCapturing(cudaStream_t, cudaStreamCaptureStatus* status) {
  std::lock_guard<std::recursive_mutex> lock(amm_sim::g_mutex);
  *status = !amm_sim::capturing()              ? cudaStreamCaptureStatusNone
            : amm_sim::g_capture_invalidated ? cudaStreamCaptureStatusInvalidated
                                             : cudaStreamCaptureStatusActive;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  using namespace amm_sim;
  if (device != 0) return cudaErrorInvalidDevice;
  switch (attr) {
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = kSharedDefault; return cudaSuccess;
    case cudaDevAttrMultiProcessorCount: *value = kSms; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor: *value = kSharedPerSm; return cudaSuccess;
    case cudaDevAttrCooperativeLaunch: *value = 1; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = kSharedOptin; return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}

cudaError_t cudaLaunchCooperativeKernel(const void* func, dim3 grid, dim3 block, void** args, size_t shared,
                                        cudaStream_t) {
  amm_sim::KernelInfo& info = amm_sim::kernel_info(func);
  if (!info.invoke_packed) {
    throw std::runtime_error("cuda_sim: cooperative launch of a kernel the simulator has not seen through a typed "
                             "runtime call (cudaFuncGetAttributes, cudaFuncSetAttribute or the occupancy query)");
  }
  const std::function<void(void**)> invoke = info.invoke_packed;
  return amm_sim::run_grid(func, grid, block, shared, true, 0, [&] { invoke(args); });
}
