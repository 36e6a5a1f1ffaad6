// fastloss's own CUDA kernel bodies run on the CPU through the CUDA execution layer (csrc/cuda_emu), checked
// against a long-double reference under several schedules. Today: softmax_topk (csrc/cuda/softmax_topk_kernel.cuh:
// online normaliser, per-thread top-k lists in registers with their rescans, warp shuffles + shared-memory
// arg-best, block all-reduce). Built and
// run by tests/test_cuda_emu.py. Prints "cuda-emu kernels: N passed, 0 failed".
#include "cuda_emu.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

#include "softmax_topk_kernel.cuh"

namespace emu = fastloss::emu;
namespace fc = fastloss::cuda;

static int g_pass = 0, g_fail = 0;

// The documented order: larger value first, NaN first, ties by the smaller index; values exp(x - lse), NaN for
// rows without a finite softmax.
template <typename T>
void reference(const std::vector<T>& row, int k, std::vector<long double>& v, std::vector<int64_t>& idx) {
  const int64_t V = static_cast<int64_t>(row.size());
  std::vector<int64_t> order(static_cast<size_t>(V));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    const bool na = std::isnan(row[a]), nb = std::isnan(row[b]);
    if (na || nb) return na && !nb;
    return row[a] > row[b];
  });
  long double m = -std::numeric_limits<long double>::infinity();
  bool nan = false;
  for (T x : row) {
    nan |= std::isnan(x);
    m = std::max<long double>(m, x);
  }
  long double d = 0;
  for (T x : row) d += std::exp(static_cast<long double>(x) - m);
  const long double lse = m + std::log(d);
  const bool defined = !nan && std::isfinite(static_cast<double>(m));
  v.assign(static_cast<size_t>(k), 0);
  idx.assign(static_cast<size_t>(k), 0);
  for (int q = 0; q < k; ++q) {
    idx[static_cast<size_t>(q)] = order[static_cast<size_t>(q)];
    v[static_cast<size_t>(q)] = defined ? std::exp(static_cast<long double>(row[order[static_cast<size_t>(q)]]) - lse)
                                        : std::numeric_limits<long double>::quiet_NaN();
  }
}

// concentrated: every row's largest values (many tied) sit in thread 0's columns, so thread 0 gives more than
// kTopKCap winners and rescans its share (several times for k >> kTopKCap).
template <typename T>
void check_topk(int rows, int64_t V, int k, uint64_t schedule, uint64_t seed, bool specials,
                bool concentrated = false) {
  std::vector<T> x(static_cast<size_t>(rows * V));
  uint64_t s = seed * 0x9E3779B97F4A7C15ull + 1;
  for (auto& e : x) {
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    e = static_cast<T>(static_cast<double>((s >> 33) % 20000) / 1000.0 - 10.0);  // many exact ties
  }
  if (specials && rows >= 3 && V >= 4) {
    x[static_cast<size_t>(0 * V + V / 2)] = std::numeric_limits<T>::quiet_NaN();
    for (int64_t j = 0; j < V; ++j) x[static_cast<size_t>(1 * V + j)] = -std::numeric_limits<T>::infinity();
    x[static_cast<size_t>(2 * V + 1)] = std::numeric_limits<T>::infinity();
  }
  if (concentrated) {
    constexpr int64_t K = fc::kVecOf<T>;
    for (int r = 0; r < rows; ++r) {
      T* xr = x.data() + r * V;
      const int64_t head = fc::aligned_head(xr, V);  // as the kernel splits the row
      for (int64_t c = head; c + K <= V; ++c) {
        if (((c - head) / K) % fc::kTopKThreads == 0) xr[c] = static_cast<T>(100 + (c * 7 + r) % 5);  // ties
      }
    }
  }
  std::vector<T> out_v(static_cast<size_t>(rows * k), T(-7));
  std::vector<int64_t> out_i(static_cast<size_t>(rows * k), -7);
  emu::set_schedule(schedule);
  emu::launch("softmax_topk_kernel", fc::softmax_topk_kernel<T>, dim3(static_cast<unsigned>(rows)),
              dim3(fc::kTopKThreads), 0, x.data(), static_cast<int64_t>(rows), V, k, out_v.data(), out_i.data());
  const long double tol = std::is_same_v<T, double> ? 1e-13L : 2e-6L;
  for (int r = 0; r < rows; ++r) {
    std::vector<T> row(x.begin() + r * V, x.begin() + (r + 1) * V);
    std::vector<long double> ev;
    std::vector<int64_t> ei;
    reference(row, k, ev, ei);
    bool ok = true;
    for (int q = 0; q < k; ++q) {
      const size_t o = static_cast<size_t>(r * k + q);
      ok &= out_i[o] == ei[static_cast<size_t>(q)];
      const long double got = out_v[o], want = ev[static_cast<size_t>(q)];
      ok &= std::isnan(want) ? std::isnan(static_cast<double>(got)) : std::fabs(got - want) <= tol * (want + 1e-30L);
    }
    if (ok) {
      ++g_pass;
    } else {
      ++g_fail;
      std::printf("FAIL softmax_topk<%s> rows %d V %lld k %d schedule %llu row %d\n",
                  std::is_same_v<T, double> ? "double" : "float", rows, static_cast<long long>(V), k,
                  static_cast<unsigned long long>(schedule), r);
    }
  }
}

int main(int argc, char** argv) {
  // "quick" (the sanitizer build): two schedules, lane order and warp-greedy random.
  const bool quick = argc > 1 && std::string(argv[1]) == "quick";
  const std::vector<uint64_t> schedules = quick ? std::vector<uint64_t>{0, 2} : std::vector<uint64_t>{0, 1, 2, 9};
  for (uint64_t sched : schedules) {
    check_topk<float>(3, 1, 1, sched, 1, false);
    check_topk<float>(3, 7, 5, sched, 2, true);
    check_topk<float>(4, 1000, 32, sched, 3, true);
    check_topk<float>(2, 4099, 128, sched, 4, true);
    check_topk<double>(3, 300, 8, sched, 5, true);
    check_topk<double>(2, 1000, 100, sched, 6, false);
    check_topk<float>(2, 20011, 128, sched, 8, false, true);  // thread 0 rescans: 20 entries per thread
    check_topk<double>(2, 9001, 40, sched, 9, true, true);
  }
  // grid-stride: more rows than blocks is the launcher's business; here one block per row, and V < threads.
  check_topk<float>(5, 200, 20, 3, 7, true);
  std::printf("cuda-emu kernels: %d passed, %d failed\n", g_pass, g_fail);
  return g_fail == 0 ? 0 : 1;
}
