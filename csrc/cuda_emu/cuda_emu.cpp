// The scheduler behind csrc/cuda_emu/cuda_emu.h: one fiber per CUDA thread, run block by block on the calling OS
// thread, resumed in the order the schedule gives, released from barriers and warp ops only when every thread that
// must arrive has arrived.
#include "cuda_emu.h"

#include <ucontext.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <exception>
#include <memory>
#include <mutex>
#include <numeric>
#include <set>
#include <sstream>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#define FL_EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define FL_EMU_ASAN 1
#endif
#endif
#ifdef FL_EMU_ASAN
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

// Context switches. On x86-64 a few instructions of our own (callee-saved registers, the SSE / x87 control words and
// the stack pointer): swapcontext also saves the signal mask, a system call at every switch, which made it most of
// the emulator's time. Elsewhere ucontext.
// (Not with a CET shadow stack, which this switch does not maintain: ucontext does.)
#if defined(__x86_64__) && !defined(FASTLOSS_EMU_UCONTEXT) && !(defined(__CET__) && (__CET__ & 2))
#define FL_EMU_FAST_SWITCH 1
// fl_emu_switch(&save_sp, load_sp): pushes the callee-saved state on the current stack, stores the stack pointer in
// *save_sp, switches to load_sp and pops the state saved there (by an earlier switch, or by fast_init).
extern "C" void fl_emu_switch(void** save_sp, void* load_sp);
asm(R"(
  .pushsection .text
  .p2align 4
  .hidden fl_emu_switch
  .globl fl_emu_switch
  .type fl_emu_switch, @function
fl_emu_switch:
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
  .size fl_emu_switch, .-fl_emu_switch
  .popsection
)");
#endif

namespace fastloss {
namespace emu {
namespace {

using detail::BarrierKind;
using detail::Op;
using detail::WarpOp;

#ifdef FL_EMU_ASAN
constexpr size_t kStack = 512 * 1024;
#else
constexpr size_t kStack = 128 * 1024;
#endif

enum class State { Runnable, Waiting, Done };

struct Fiber {
#ifdef FL_EMU_FAST_SWITCH
  void* sp = nullptr;
#else
  ucontext_t ctx;
#endif
  ThreadState ts;
  State state = State::Runnable;
  Op op = Op::None;
  BarrierKind bkind = BarrierKind::Plain;
  WarpOp wop = WarpOp::Sync;
  unsigned mask = 0;
  uint64_t value = 0;
  int arg = 0;
  int width = 32;
  uint64_t result = 0;
  char* stack = nullptr;
};

struct Runtime {
  std::vector<Fiber> fibers;
  std::vector<std::unique_ptr<char[]>> stacks;
#ifdef FL_EMU_FAST_SWITCH
  void* sched_sp = nullptr;
#else
  ucontext_t sched;
#endif
  Fiber* cur = nullptr;
  const std::function<void()>* body = nullptr;
  const char* kernel = "";
  dim3 grid, block;
  uint3 bidx;
  std::exception_ptr error;
  std::vector<std::pair<void*, size_t>> shared;
  bool in_kernel = false;
  uint64_t seed = 0;  // schedule of the launch in progress
#ifdef FL_EMU_ASAN
  void* fake_stack = nullptr;
  const void* sched_bottom = nullptr;  // the OS thread's stack, learnt when the first fiber starts
  size_t sched_size = 0;
#endif
};

thread_local Runtime* t_rt = nullptr;

Runtime& rt() {
  if (t_rt == nullptr) t_rt = new Runtime();  // one per OS thread, kept for its lifetime (stacks are reused)
  return *t_rt;
}

std::mutex g_mutex;
std::map<std::string, uint64_t>& counts() {
  static std::map<std::string, uint64_t> c;
  return c;
}

uint64_t g_seed = ~uint64_t(0);  // unset

uint64_t splitmix(uint64_t& s) {
  uint64_t z = (s += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

std::string where(const Runtime& r, const Fiber* f) {
  std::ostringstream os;
  os << "kernel " << r.kernel << ", block (" << r.bidx.x << "," << r.bidx.y << "," << r.bidx.z << ")";
  if (f != nullptr) os << ", thread (" << f->ts.tid.x << "," << f->ts.tid.y << "," << f->ts.tid.z << ")";
  return os.str();
}

void switch_to(Runtime& r, Fiber& f) {
  r.cur = &f;
#ifdef FL_EMU_ASAN
  __sanitizer_start_switch_fiber(&r.fake_stack, f.stack, kStack);
#endif
#ifdef FL_EMU_FAST_SWITCH
  fl_emu_switch(&r.sched_sp, f.sp);
#else
  swapcontext(&r.sched, &f.ctx);
#endif
#ifdef FL_EMU_ASAN
  __sanitizer_finish_switch_fiber(r.fake_stack, nullptr, nullptr);
#endif
  r.cur = nullptr;
}

// From a fiber back to the scheduler; returns when the scheduler resumes it.
void yield_to_scheduler(Runtime& r, Fiber& f) {
#ifdef FL_EMU_ASAN
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, r.sched_bottom, r.sched_size);  // to the scheduler's (OS thread's) stack
#endif
#ifdef FL_EMU_FAST_SWITCH
  fl_emu_switch(&f.sp, r.sched_sp);
#else
  swapcontext(&f.ctx, &r.sched);
#endif
#ifdef FL_EMU_ASAN
  __sanitizer_finish_switch_fiber(fake, &r.sched_bottom, &r.sched_size);
#endif
}

void fiber_entry() {
  Runtime& r = rt();
  Fiber& f = *r.cur;
#ifdef FL_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &r.sched_bottom, &r.sched_size);
#endif
  try {
    (*r.body)();
  } catch (...) {
    if (!r.error) r.error = std::current_exception();
  }
  f.state = State::Done;
  f.op = Op::None;
#ifdef FL_EMU_ASAN
  __sanitizer_start_switch_fiber(nullptr, r.sched_bottom, r.sched_size);  // finished: its fake stack can go
#endif
#ifdef FL_EMU_FAST_SWITCH
  void* dead = nullptr;  // this fiber is never resumed
  fl_emu_switch(&dead, r.sched_sp);
  std::abort();
#else
  setcontext(&r.sched);
#endif
}

#ifdef FL_EMU_FAST_SWITCH
// A fresh fiber's stack, laid out as fl_emu_switch leaves a suspended one: control words, six zeroed registers, and
// fiber_entry as the return address, at a 16-byte boundary so fiber_entry starts with the ABI's stack alignment
// (rsp = 8 mod 16); above it a null return address ends backtraces.
void fast_init(Fiber& f, void (*entry)()) {
#ifdef FL_EMU_ASAN
  // The stack of an earlier fiber: frames that never returned (fiber_entry never does) left their redzones poisoned.
  __asan_unpoison_memory_region(f.stack, kStack);
#endif
  auto top = reinterpret_cast<uintptr_t>(f.stack + kStack) & ~uintptr_t(15);
  void** sp = reinterpret_cast<void**>(top);
  *--sp = nullptr;                                    // fiber_entry's own return address: none
  *--sp = reinterpret_cast<void*>(entry);             // at top - 16
  for (int i = 0; i < 6; ++i) *--sp = nullptr;        // rbp rbx r12 r13 r14 r15
  // The launching thread's MXCSR and x87 control word (rounding, flush-to-zero as torch.set_flush_denormal set them),
  // as getcontext would have captured them.
  uint32_t mxcsr = 0;
  uint16_t fpucw = 0;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpucw));
  *--sp = reinterpret_cast<void*>(uintptr_t(fpucw) << 32 | mxcsr);
  f.sp = sp;
}
#endif

Fiber& self(const char* what) {
  Runtime& r = rt();
  if (!r.in_kernel || r.cur == nullptr) throw Error(std::string(what) + " called outside a kernel launched by the emulator");
  return *r.cur;
}

bool pow2_width(int w) { return w >= 1 && w <= kWarp && (w & (w - 1)) == 0; }

// Resolve the warp ops the fibers wait at; returns whether any fiber was released. Throws on a mask or
// divergence error.
bool resolve_warps(Runtime& r, int only_warp = -1) {
  const int n = static_cast<int>(r.fibers.size());
  bool released = false;
  for (int w0 = 0; w0 < n; w0 += kWarp) {
    if (only_warp >= 0 && w0 != only_warp * kWarp) continue;
    const int lanes = std::min(kWarp, n - w0);
    Fiber* lane[kWarp];
    for (int l = 0; l < lanes; ++l) lane[l] = &r.fibers[w0 + l];
    for (int l = 0; l < lanes; ++l) {
      Fiber& f = *lane[l];
      if (f.state != State::Waiting || f.op != Op::Warp) continue;
      const unsigned mask = f.mask;
      if (lanes < kWarp && (mask >> lanes) != 0u) {
        detail::fail("warp op with mask 0x" + [&] { std::ostringstream o; o << std::hex << mask; return o.str(); }() +
                     " names lanes this block does not have (" + std::to_string(lanes) + " lanes in the warp); " +
                     where(r, &f));
      }
      if (((mask >> l) & 1u) == 0u) {
        detail::fail("lane " + std::to_string(l) + " calls a warp op whose mask excludes it; " + where(r, &f));
      }
      if (!pow2_width(f.width)) detail::fail("shuffle width " + std::to_string(f.width) + " is not a power of two <= 32; " + where(r, &f));
      // Has every lane of the mask arrived at the same op?
      bool all = true;
      for (int m = 0; m < lanes; ++m) {
        if (((mask >> m) & 1u) == 0u) continue;
        Fiber& g = *lane[m];
        if (g.state == State::Waiting && g.op == Op::Warp) {
          if (g.mask != mask || g.wop != f.wop || g.width != f.width) {
            detail::fail("divergent warp ops: lanes " + std::to_string(l) + " and " + std::to_string(m) +
                         " wait at different shuffles / votes (op, mask or width differ); " + where(r, &f));
          }
        } else {
          all = false;  // still running (cannot happen after a full pass), at a barrier, or exited
        }
      }
      if (!all) continue;
      // Perform the op for the whole group.
      uint64_t vote = 0;
      int count = 0;
      for (int m = 0; m < lanes; ++m) {
        if (((mask >> m) & 1u) == 0u) continue;
        vote |= (lane[m]->value != 0 ? 1ull : 0ull) << m;
        ++count;
      }
      for (int m = 0; m < lanes; ++m) {
        if (((mask >> m) & 1u) == 0u) continue;
        Fiber& g = *lane[m];
        const int wd = g.width;
        const int seg = (m / wd) * wd;
        int src = m;
        switch (g.wop) {
          case WarpOp::Sync: break;
          case WarpOp::ShflIdx: src = seg + (((g.arg % wd) + wd) % wd); break;
          case WarpOp::ShflXor: src = m ^ g.arg; if (src >= seg + wd) src = m; break;
          case WarpOp::ShflUp: src = m - g.arg; if (src < seg) src = m; break;
          case WarpOp::ShflDown: src = m + g.arg; if (src >= seg + wd) src = m; break;
          default: break;
        }
        switch (g.wop) {
          case WarpOp::Any: g.result = vote != 0; break;
          case WarpOp::All: g.result = static_cast<uint64_t>(__builtin_popcountll(vote) == count); break;
          case WarpOp::Ballot: g.result = vote; break;
          case WarpOp::Sync: g.result = 0; break;
          default:
            if (src < 0 || src >= lanes || ((mask >> src) & 1u) == 0u) {
              detail::fail("lane " + std::to_string(m) + " reads lane " + std::to_string(src) +
                           ", which is not in the shuffle's mask; " + where(r, &g));
            }
            g.result = lane[src]->value;
        }
        g.state = State::Runnable;
        g.op = Op::None;
      }
      released = true;
    }
  }
  return released;
}

// Release the block barrier if every thread waits at one; throws when it can never be released.
bool resolve_barrier(Runtime& r) {
  int done = 0, at_barrier = 0, at_warp = 0;
  const Fiber* example = nullptr;
  const Fiber* warp_example = nullptr;
  for (const Fiber& f : r.fibers) {
    if (f.state == State::Done) ++done;
    else if (f.op == Op::Barrier) { ++at_barrier; example = &f; }
    else if (f.op == Op::Warp) { ++at_warp; warp_example = &f; }
  }
  const int n = static_cast<int>(r.fibers.size());
  if (done == n) return false;
  if (at_barrier == n) {
    const BarrierKind kind = r.fibers[0].bkind;
    int64_t any = 0, all = 1, cnt = 0;
    for (const Fiber& f : r.fibers) {
      if (f.bkind != kind) detail::fail("threads wait at different kinds of __syncthreads*; " + where(r, &f));
      any |= f.value != 0;
      all &= f.value != 0;
      cnt += f.value != 0;
    }
    const int64_t res = kind == BarrierKind::Or ? any : kind == BarrierKind::And ? all : kind == BarrierKind::Count ? cnt : 0;
    for (Fiber& f : r.fibers) {
      f.result = static_cast<uint64_t>(res);
      f.state = State::Runnable;
      f.op = Op::None;
    }
    return true;
  }
  std::ostringstream os;
  os << "deadlock: " << at_barrier << " of " << n << " threads wait at __syncthreads, " << at_warp
     << " at a warp op that can never complete, " << done << " have exited";
  if (example != nullptr) os << " (e.g. barrier: " << where(r, example) << ")";
  if (warp_example != nullptr) os << " (e.g. warp op: " << where(r, warp_example) << ")";
  detail::fail(os.str());
}

std::vector<int> order_for(uint64_t seed, uint64_t& state, int n) {
  std::vector<int> o(static_cast<size_t>(n));
  std::iota(o.begin(), o.end(), 0);
  if (seed == 1) std::reverse(o.begin(), o.end());
  else if (seed >= 2) {
    for (int i = n - 1; i > 0; --i) std::swap(o[static_cast<size_t>(i)], o[static_cast<size_t>(splitmix(state) % static_cast<uint64_t>(i + 1))]);
  }
  return o;
}

void run_block(Runtime& r) {
  const int n = static_cast<int>(r.block.x * r.block.y * r.block.z);
  if (static_cast<int>(r.stacks.size()) < n) {
    for (int i = static_cast<int>(r.stacks.size()); i < n; ++i) r.stacks.emplace_back(new char[kStack]);
  }
  r.fibers.assign(static_cast<size_t>(n), Fiber{});
  for (int i = 0; i < n; ++i) {
    Fiber& f = r.fibers[static_cast<size_t>(i)];
    f.ts.linear = i;
    f.ts.tid.x = static_cast<unsigned>(i) % r.block.x;
    f.ts.tid.y = (static_cast<unsigned>(i) / r.block.x) % r.block.y;
    f.ts.tid.z = static_cast<unsigned>(i) / (r.block.x * r.block.y);
    f.stack = r.stacks[static_cast<size_t>(i)].get();
#ifdef FL_EMU_FAST_SWITCH
    fast_init(f, fiber_entry);
#else
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack;
    f.ctx.uc_stack.ss_size = kStack;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_entry, 0);
#endif
  }
  for (auto& [p, size] : r.shared) std::memset(p, kPoison, size);
  const uint64_t seed = r.seed;
  uint64_t state = seed * 0x9E3779B97F4A7C15ull ^ (uint64_t(r.bidx.x) << 32) ^ (uint64_t(r.bidx.y) << 16) ^ r.bidx.z;
  const int nwarps = (n + kWarp - 1) / kWarp;
  const bool warp_greedy = seed >= 2 && seed % 2 == 0;
  for (;;) {
    if (warp_greedy) {
      // Warps in random order, each run as far as it can go (its shuffles released as soon as its lanes arrive)
      // before the next starts: one warp runs ahead of the others up to the next block barrier, which exposes
      // shared slots rewritten while other warps still read them.
      for (int w : order_for(seed, state, nwarps)) {
        bool ran = true;
        while (ran) {
          ran = false;
          const int lo = w * kWarp, hi = std::min(n, lo + kWarp);
          for (int i : order_for(seed, state, hi - lo)) {
            Fiber& f = r.fibers[static_cast<size_t>(lo + i)];
            if (f.state != State::Runnable) continue;
            switch_to(r, f);
            if (r.error) std::rethrow_exception(r.error);
            ran = true;
          }
          if (resolve_warps(r, w)) ran = true;
        }
      }
    } else {
      // Breadth first: every runnable thread to its next synchronisation point, in lane order (seed 0), reverse
      // (1) or a fresh random permutation per round (odd seeds >= 3).
      for (int i : order_for(seed, state, n)) {
        Fiber& f = r.fibers[static_cast<size_t>(i)];
        if (f.state != State::Runnable) continue;
        switch_to(r, f);
        if (r.error) std::rethrow_exception(r.error);
      }
    }
    if (resolve_warps(r)) continue;
    if (!resolve_barrier(r)) break;
  }
}

}  // namespace

ThreadState& current_thread() { return self("threadIdx").ts; }
const uint3& block_idx() { return rt().bidx; }
const dim3& block_dim() { return rt().block; }
const dim3& grid_dim() { return rt().grid; }

void set_schedule(uint64_t seed) { g_seed = seed; }
uint64_t schedule() {
  if (g_seed == ~uint64_t(0)) {
    const char* env = std::getenv("FASTLOSS_EMU_SCHEDULE");
    if (env != nullptr && std::string(env) == "mix") g_seed = kMix;
    else g_seed = (env != nullptr && *env != '\0') ? std::strtoull(env, nullptr, 10) : 0;
  }
  return g_seed;
}

namespace {
uint64_t g_launch_serial = 0;  // launches so far (under g_mutex), for the mixed schedule
std::set<std::string>& compiled() {
  static std::set<std::string> c;
  return c;
}
}  // namespace

namespace {
std::atomic<int64_t> g_max_grid{0};  // 0: not read yet
}  // namespace

int64_t max_grid_x() {
  int64_t n = g_max_grid.load(std::memory_order_relaxed);
  if (n == 0) {
    const char* env = std::getenv("FASTLOSS_EMU_MAX_GRID");
    const long long v = env != nullptr ? std::atoll(env) : 0;
    n = v > 0 && v < 2147483647 ? v : 2147483647;
    g_max_grid.store(n, std::memory_order_relaxed);
  }
  return n;
}
void set_max_grid_x(int64_t n) { g_max_grid.store(n > 0 && n < 2147483647 ? n : 2147483647); }

const char* register_kernel(const char* signature) {
  // GCC: "... [with auto Kernel = fastloss::cuda::{anonymous}::warp_forward_kernel<float, 8, 1>]"; clang:
  // "... [Kernel = &fastloss::cuda::(anonymous namespace)::warp_forward_kernel<float, 8, 1>]".
  std::string s(signature);
  const size_t eq = s.find("Kernel = ");
  std::string name = eq == std::string::npos ? s : s.substr(eq + 9);
  const size_t end = name.find_first_of(";]");
  if (end != std::string::npos) name.resize(end);
  if (!name.empty() && name[0] == '&') name.erase(0, 1);
  // Drop the namespaces of the kernel itself (before its template arguments).
  const size_t lt = name.find('<');
  const size_t colon = name.rfind("::", lt);
  if (colon != std::string::npos) name.erase(0, colon + 2);
  // ... and of enumerators among its template arguments (fastloss::cuda::{anonymous}::Mode::Backward -> Mode::...).
  for (const char* ns : {"fastloss::cuda::{anonymous}::", "fastloss::cuda::(anonymous namespace)::",
                         "fastloss::cuda::<unnamed>::", "fastloss::cuda::"}) {
    for (size_t at; (at = name.find(ns)) != std::string::npos;) name.erase(at, std::strlen(ns));
  }
  std::lock_guard<std::mutex> lock(g_mutex);
  return compiled().insert(name).first->c_str();
}

std::vector<std::string> compiled_kernels() {
  std::lock_guard<std::mutex> lock(g_mutex);
  return {compiled().begin(), compiled().end()};
}

namespace {
std::atomic<uint64_t> g_read{0}, g_written{0};
}  // namespace

void add_traffic(uint64_t read, uint64_t written) {
  g_read.fetch_add(read, std::memory_order_relaxed);
  g_written.fetch_add(written, std::memory_order_relaxed);
}
void traffic(uint64_t* read, uint64_t* written) {
  *read = g_read.load(std::memory_order_relaxed);
  *written = g_written.load(std::memory_order_relaxed);
}
void reset_traffic() {
  g_read.store(0);
  g_written.store(0);
}

std::map<std::string, uint64_t> launch_counts() {
  std::lock_guard<std::mutex> lock(g_mutex);
  return counts();
}
namespace detail {

[[noreturn]] void fail(const std::string& what) { throw Error("cuda-emu: " + what); }

int64_t barrier(BarrierKind kind, int pred) {
  Fiber& f = self("__syncthreads");
  f.state = State::Waiting;
  f.op = Op::Barrier;
  f.bkind = kind;
  f.value = static_cast<uint64_t>(pred);
  yield_to_scheduler(rt(), f);
  return static_cast<int64_t>(f.result);
}

uint64_t warp_op(WarpOp op, unsigned mask, uint64_t value, int arg, int width) {
  Fiber& f = self("a warp shuffle / vote");
  f.state = State::Waiting;
  f.op = Op::Warp;
  f.wop = op;
  f.mask = mask;
  f.value = value;
  f.arg = arg;
  f.width = width;
  yield_to_scheduler(rt(), f);
  return f.result;
}

SharedRegistration::SharedRegistration(void* p, size_t n) {
  std::memset(p, kPoison, n);
  rt().shared.emplace_back(p, n);
}

void run_grid(const char* name, dim3 grid, dim3 block, const std::function<void()>& body) {
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (threads == 0 || threads > 1024 || block.z > 64) {
    fail(std::string("invalid block size for kernel ") + name + ": " + std::to_string(block.x) + "x" +
         std::to_string(block.y) + "x" + std::to_string(block.z) + " (CUDA allows 1..1024 threads, z <= 64)");
  }
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535) {
    fail(std::string("invalid grid size for kernel ") + name);
  }
  uint64_t serial = 0;
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    ++counts()[name];
    serial = g_launch_serial++;
  }
  Runtime& r = rt();
  if (r.in_kernel) fail("nested kernel launch from inside a kernel");
  r.seed = schedule();
  if (r.seed == kMix) {
    // reverse, random rounds (odd >= 3), warp-greedy (even >= 2), each with a seed of its own
    const uint64_t k = serial % 3, s = 2 * (serial / 3) + 4;
    r.seed = k == 0 ? 1 : k == 1 ? s + 1 : s;
  }
  r.body = &body;
  r.kernel = name;
  r.grid = grid;
  r.block = block;
  r.error = nullptr;
  r.in_kernel = true;
  try {
    for (unsigned z = 0; z < grid.z; ++z)
      for (unsigned y = 0; y < grid.y; ++y)
        for (unsigned x = 0; x < grid.x; ++x) {
          r.bidx.x = x;
          r.bidx.y = y;
          r.bidx.z = z;
          run_block(r);
        }
  } catch (...) {
    r.in_kernel = false;
    r.fibers.clear();
    throw;
  }
  r.in_kernel = false;
  r.fibers.clear();
}

}  // namespace detail
}  // namespace emu
}  // namespace fastloss
