// Self-test of the CUDA execution layer (csrc/cuda_emu): small kernels written as CUDA C++, run on the CPU under
// every schedule, checked against what CUDA defines; and kernels with the classic bugs (a missing __syncthreads, a
// warp reduction that skips an exchange, a shuffle of width 16 where 32 is needed, an off-by-one row tail, a shared
// slot indexed by lane instead of warp, a barrier not every thread reaches), which the layer must catch: a wrong
// result under some schedule, or an error. Built and run by tests/test_cuda_emu.py (also under ASan + UBSan).
// Prints "cuda-emu selftest: N passed, 0 failed" and exits 0, or names the failures and exits 1.
#include "cuda_emu.h"

#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

namespace emu = fastloss::emu;

static int g_pass = 0, g_fail = 0;
#define CHECK(cond, ...)                                  \
  do {                                                    \
    if (cond) {                                           \
      ++g_pass;                                           \
    } else {                                              \
      ++g_fail;                                           \
      std::printf("FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
      std::printf(__VA_ARGS__);                           \
      std::printf("\n");                                  \
    }                                                     \
  } while (0)

constexpr unsigned kFull = 0xffffffffu;
constexpr uint64_t kSchedules[] = {0, 1, 2, 3, 4, 5, 17};

// ------------------------------------------------------------------------------------------------ kernels
template <int kWidth>
__device__ float warp_sum(float v) {
  for (int off = kWidth / 2; off > 0; off /= 2) v += __shfl_xor_sync(kFull, v, off, kWidth);
  return v;
}

// Row sums, one block per row: warp reduction, per-warp partials in shared memory, then warp 0 folds them.
// Variant selects a planted bug (0 = correct).
template <int kVariant>
__global__ void row_sum(const float* x, long long V, float* out) {
  FL_SHARED(float, part, [32]);
  const float* xr = x + static_cast<long long>(blockIdx.x) * V;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
  float v = 0.f;
  const long long end = kVariant == 4 ? V - 1 : V;  // 4: off-by-one row tail
  for (long long j = threadIdx.x; j < end; j += blockDim.x) v += xr[j];
  if (kVariant == 2) {  // 2: skips the first exchange (off = 16)
    for (int off = 8; off > 0; off /= 2) v += __shfl_xor_sync(kFull, v, off, 32);
  } else if (kVariant == 3) {
    v = warp_sum<16>(v);  // 3: width 16 where 32 is needed
  } else {
    v = warp_sum<32>(v);
  }
  if (lane == 0) part[kVariant == 5 ? lane : warp] = v;  // 5: slot indexed by lane instead of warp
  if (kVariant != 1) __syncthreads();                    // 1: missing barrier
  if (warp == 0) {
    float s = lane < nwarps ? part[lane] : 0.f;
    s = warp_sum<32>(s);
    if (lane == 0) out[blockIdx.x] = s;
  }
}

// Several rounds through the same shared slots (as a block arg-best does): without the leading barrier, a warp that
// runs ahead rewrites its slot while slower warps still read the previous round's.
template <bool kLeadingBarrier>
__global__ void rounds(const float* x, int nrounds, float* out) {
  FL_SHARED(float, part, [32]);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
  float acc = 0.f;
  for (int q = 0; q < nrounds; ++q) {
    float v = warp_sum<32>(x[q * blockDim.x + threadIdx.x]);
    if (kLeadingBarrier) __syncthreads();
    if (lane == 0) part[warp] = v;
    __syncthreads();
    for (int w = 0; w < nwarps; ++w) acc += part[w];
  }
  out[threadIdx.x] = acc;
}

__global__ void barrier_in_branch(int* out) {
  if (threadIdx.x < 16) __syncthreads();
  out[threadIdx.x] = 1;
}

__global__ void early_return(int* out, int n) {
  if (static_cast<int>(threadIdx.x) >= n) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}

__global__ void shuffles(const int* in, int* up, int* down, int* idx, int* xr8, int* any, int* all, unsigned* ballot,
                         int* orr, int* cnt) {
  const int t = threadIdx.x, v = in[t];
  up[t] = __shfl_up_sync(kFull, v, 3, 16);
  down[t] = __shfl_down_sync(kFull, v, 5, 8);
  idx[t] = __shfl_sync(kFull, v, 7, 16);
  xr8[t] = __shfl_xor_sync(kFull, v, 9, 8);  // 9 = 8 + 1: reaches the next group of 8 for even groups
  any[t] = __any_sync(kFull, t == 37);
  all[t] = __all_sync(kFull, v >= 0);
  ballot[t] = __ballot_sync(kFull, t % 3 == 0);
  orr[t] = __syncthreads_or(t == 63);
  cnt[t] = __syncthreads_count(t % 4 == 0);
}

__global__ void partial_mask_exit(int* out) {
  if (threadIdx.x == 5) return;  // lane 5 is in the mask but never arrives
  out[threadIdx.x] = __shfl_xor_sync(kFull, static_cast<int>(threadIdx.x), 1);
}

__global__ void outside_mask(int* out) {
  out[threadIdx.x] = __shfl_sync(0x0000ffffu, static_cast<int>(threadIdx.x), 20);  // lanes 16.. call too
}

__global__ void asserts(const int* t, int n) {
  const int i = t[threadIdx.x];
  CUDA_KERNEL_ASSERT(i >= 0 && i < n);
}

__global__ void read_before_write(float* out) {
  FL_SHARED(float, slot, [64]);
  out[blockIdx.x * 64 + threadIdx.x] = slot[threadIdx.x];  // never written: poison, in every block
  __syncthreads();
  slot[threadIdx.x] = 1.f;
}

__global__ void indices(int* out) {
  const int b = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  const int t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  out[b * blockDim.x * blockDim.y * blockDim.z + t] = b * 1000 + t;
}

// ------------------------------------------------------------------------------------------------ tests
template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const emu::Error& e) {
    return e.what();
  }
  return "";
}

template <int kVariant>
std::vector<float> run_row_sum(const std::vector<float>& x, int rows, long long V, int threads) {
  std::vector<float> out(static_cast<size_t>(rows), -1.f);
  emu::launch("row_sum", row_sum<kVariant>, dim3(rows), dim3(threads), 0, x.data(), V, out.data());
  return out;
}

bool close_all(const std::vector<float>& a, const std::vector<double>& b) {
  for (size_t i = 0; i < a.size(); ++i) {
    if (!(std::fabs(a[i] - b[i]) <= 1e-4 * (1 + std::fabs(b[i])))) return false;
  }
  return true;
}

template <int kVariant>
bool caught(const std::vector<float>& x, const std::vector<double>& want, int rows, long long V, int threads) {
  for (uint64_t s : kSchedules) {
    emu::set_schedule(s);
    if (!close_all(run_row_sum<kVariant>(x, rows, V, threads), want)) return true;
  }
  return false;
}

int main() {
  // row sums: the correct kernel under every schedule; each planted bug caught under some schedule.
  const int rows = 3;
  const long long V = 1000;  // not a multiple of the block
  std::vector<float> x(static_cast<size_t>(rows * V));
  for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>((i * 7919) % 101) / 17.f - 2.f;
  std::vector<double> want(rows, 0.0);
  for (int r = 0; r < rows; ++r)
    for (long long j = 0; j < V; ++j) want[static_cast<size_t>(r)] += x[static_cast<size_t>(r * V + j)];
  for (int threads : {32, 128, 256}) {
    for (uint64_t s : kSchedules) {
      emu::set_schedule(s);
      CHECK(close_all(run_row_sum<0>(x, rows, V, threads), want), "threads %d schedule %llu", threads,
            static_cast<unsigned long long>(s));
    }
    if (threads > 32) {  // with one warp there is no shared-memory hand-off to break
      CHECK(caught<1>(x, want, rows, V, threads), "missing __syncthreads not caught (threads %d)", threads);
      CHECK(caught<5>(x, want, rows, V, threads), "slot by lane instead of warp not caught (threads %d)", threads);
    }
    CHECK(caught<2>(x, want, rows, V, threads), "skipped first exchange not caught (threads %d)", threads);
    CHECK(caught<3>(x, want, rows, V, threads), "width 16 for 32 not caught (threads %d)", threads);
    CHECK(caught<4>(x, want, rows, V, threads), "row tail off by one not caught (threads %d)", threads);
  }
  // The missing barrier is caught by the schedule, not by luck: in lane order warp 0 reads the partials before the
  // later warps have run to their writes (reverse order happens to hide it: the random schedules and lane order
  // are what expose it).
  emu::set_schedule(0);
  CHECK(!close_all(run_row_sum<1>(x, rows, V, 256), want), "lane order must expose the missing barrier");
  emu::set_schedule(2);
  CHECK(!close_all(run_row_sum<1>(x, rows, V, 256), want), "a random schedule must expose the missing barrier");

  // Shared slots reused across rounds: caught without the leading barrier (by the warp-greedy schedule), exact
  // with it under every schedule.
  {
    const int threads = 128, nr = 4;
    std::vector<float> xr(static_cast<size_t>(threads * nr)), o(static_cast<size_t>(threads));
    double total = 0;
    for (size_t i = 0; i < xr.size(); ++i) total += (xr[i] = static_cast<float>(i % 13) - 6.f + 0.25f * (i / threads));
    bool ok_with = true, caught_without = false;
    for (uint64_t s : kSchedules) {
      emu::set_schedule(s);
      emu::launch("rounds", rounds<true>, dim3(1), dim3(threads), 0, xr.data(), nr, o.data());
      for (float v : o) ok_with &= std::fabs(v - total) <= 1e-3;
      emu::launch("rounds", rounds<false>, dim3(1), dim3(threads), 0, xr.data(), nr, o.data());
      for (float v : o) caught_without |= !(std::fabs(v - total) <= 1e-3);
    }
    CHECK(ok_with, "rounds with the leading barrier must be exact");
    CHECK(caught_without, "slot rewritten before the other warps read it: not caught");
  }

  // Deadlocks are errors, not hangs.
  std::vector<int> out(64, 0);
  std::string e = error_of([&] { emu::launch("barrier_in_branch", barrier_in_branch, dim3(1), dim3(64), 0, out.data()); });
  CHECK(e.find("deadlock") != std::string::npos, "barrier in a branch: '%s'", e.c_str());
  e = error_of([&] { emu::launch("early_return", early_return, dim3(2), dim3(64), 0, out.data(), 40); });
  CHECK(e.find("deadlock") != std::string::npos && e.find("have exited") != std::string::npos, "early return: '%s'",
        e.c_str());
  e = error_of([&] { emu::launch("early_return", early_return, dim3(2), dim3(64), 0, out.data(), 64); });
  CHECK(e.empty(), "no early return must pass: '%s'", e.c_str());
  e = error_of([&] { emu::launch("partial_mask_exit", partial_mask_exit, dim3(1), dim3(32), 0, out.data()); });
  CHECK(e.find("deadlock") != std::string::npos, "lane in mask exits: '%s'", e.c_str());
  e = error_of([&] { emu::launch("outside_mask", outside_mask, dim3(1), dim3(32), 0, out.data()); });
  CHECK(e.find("mask excludes it") != std::string::npos || e.find("not in the shuffle's mask") != std::string::npos,
        "lane outside mask: '%s'", e.c_str());
  e = error_of([&] { emu::launch("partial_warp", partial_mask_exit, dim3(1), dim3(20), 0, out.data()); });
  CHECK(e.find("does not have") != std::string::npos, "full mask on a 20-thread block: '%s'", e.c_str());

  // Shuffle and vote semantics as CUDA defines them (segments of `width` lanes; out of segment -> own value).
  {
    const int n = 64;
    std::vector<int> in(n), up(n), down(n), idx(n), xr8(n), any(n), all(n), orr(n), cnt(n);
    std::vector<unsigned> ballot(n);
    for (int i = 0; i < n; ++i) in[i] = 100 + i;
    for (uint64_t s : kSchedules) {
      emu::set_schedule(s);
      emu::launch("shuffles", shuffles, dim3(1), dim3(n), 0, in.data(), up.data(), down.data(), idx.data(),
                  xr8.data(), any.data(), all.data(), ballot.data(), orr.data(), cnt.data());
      bool ok = true;
      for (int t = 0; t < n; ++t) {
        const int lane = t % 32, w0 = t - lane;
        const int seg16 = (lane / 16) * 16, seg8 = (lane / 8) * 8;
        const int e_up = lane - 3 >= seg16 ? in[w0 + lane - 3] : in[t];
        const int e_down = lane + 5 < seg8 + 8 ? in[w0 + lane + 5] : in[t];
        const int e_idx = in[w0 + seg16 + 7];
        const int sx = lane ^ 9;
        const int e_xr8 = sx < seg8 + 8 ? in[w0 + sx] : in[t];
        unsigned e_ballot = 0;
        for (int l = 0; l < 32; ++l) e_ballot |= ((w0 + l) % 3 == 0 ? 1u : 0u) << l;
        ok &= up[t] == e_up && down[t] == e_down && idx[t] == e_idx && xr8[t] == e_xr8;
        ok &= any[t] == (w0 == 32) && all[t] == 1 && ballot[t] == e_ballot && orr[t] == 1 && cnt[t] == 16;
      }
      CHECK(ok, "shuffle / vote semantics, schedule %llu", static_cast<unsigned long long>(s));
    }
  }

  // CUDA_KERNEL_ASSERT reports, naming the condition and the thread.
  {
    std::vector<int> t = {0, 1, 2, 7};
    std::vector<int> tt(32, 0);
    e = error_of([&] { emu::launch("asserts", asserts, dim3(1), dim3(32), 0, tt.data(), 5); });
    CHECK(e.empty(), "in-range targets: '%s'", e.c_str());
    tt[13] = 9;
    e = error_of([&] { emu::launch("asserts", asserts, dim3(1), dim3(32), 0, tt.data(), 5); });
    CHECK(e.find("CUDA_KERNEL_ASSERT failed: i >= 0 && i < n") != std::string::npos, "assert: '%s'", e.c_str());
  }

  // Shared memory poisoned before every block: a read before a write sees NaN, not the previous block's 1.0.
  {
    std::vector<float> o(3 * 64, 0.f);
    emu::set_schedule(0);
    emu::launch("read_before_write", read_before_write, dim3(3), dim3(64), 0, o.data());
    bool all_nan = true;
    for (float v : o) all_nan &= std::isnan(v);
    CHECK(all_nan, "shared memory must be poisoned before each block");
  }

  // 3-D grids and blocks.
  {
    std::vector<int> o(2 * 3 * 2 * 4 * 2 * 3, -1);
    emu::launch("indices", indices, dim3(2, 3, 2), dim3(4, 2, 3), 0, o.data());
    bool ok = true;
    for (int b = 0; b < 12; ++b)
      for (int t = 0; t < 24; ++t) ok &= o[static_cast<size_t>(b * 24 + t)] == b * 1000 + t;
    CHECK(ok, "3-D indices");
    e = error_of([&] { emu::launch("indices", indices, dim3(1), dim3(2048), 0, o.data()); });
    CHECK(e.find("invalid block size") != std::string::npos, "block of 2048: '%s'", e.c_str());
  }

  const auto counts = emu::launch_counts();
  CHECK(counts.count("row_sum") && counts.at("row_sum") > 0 && counts.count("indices"), "launch counts");

  std::printf("cuda-emu selftest: %d passed, %d failed\n", g_pass, g_fail);
  return g_fail == 0 ? 0 : 1;
}
