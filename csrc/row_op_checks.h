// Argument checks and per-row buffers shared by the op layers of the row-loss ops over [N, V] logits with one
// int64 index per row (csrc/policy_ops.cpp, csrc/spherical_ops.cpp).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>

namespace fastloss {

inline void check_logits(const at::Tensor& x, const char* op, const char* name) {
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf, op, ": `", name,
              "` must be a floating-point tensor (float32, float64, bfloat16 or float16), got ", st);
  TORCH_CHECK(x.dim() == 2, op, ": the op expects `", name, "` of shape [N, V], got ", x.sizes(),
              " (the Python functions flatten the leading dimensions for you)");
  TORCH_CHECK(x.size(1) > 0 || x.size(0) == 0, op, ": `", name, "` has an empty vocabulary (V = 0)");
}

// int64 [n] on `device`, each in [0, V) or ignore_index; on the CPU every entry is checked (CUDA kernels assert on
// the device).
inline at::Tensor check_indices(const at::Tensor& idx, int64_t n, int64_t V, const c10::Device& device, const char* op,
                                const char* name, std::optional<int64_t> ignore_index) {
  TORCH_CHECK(idx.scalar_type() == at::kLong, op, ": `", name, "` must be int64 (torch.long), got ",
              idx.scalar_type());
  TORCH_CHECK(idx.dim() == 1 && idx.size(0) == n, op, ": `", name, "` must have shape [N] = [", n, "], got ",
              idx.sizes());
  TORCH_CHECK(idx.device() == device, op, ": `", name, "` is on ", idx.device(), " but the logits are on ", device);
  at::Tensor c = idx.contiguous();
  if (c.is_cpu()) {
    const int64_t* t = c.const_data_ptr<int64_t>();
    for (int64_t i = 0; i < c.numel(); ++i) {
      if (ignore_index && t[i] == *ignore_index) continue;
      TORCH_CHECK_INDEX(t[i] >= 0 && t[i] < V, op, ": `", name, "` value ", t[i], " at position ", i,
                        " is out of bounds for a vocabulary of ", V,
                        ignore_index ? " (and is not ignore_index=" + std::to_string(*ignore_index) + ")" : "");
    }
  }
  return c;
}

// The same for one index per row of [N, V] logits.
inline at::Tensor check_indices(const at::Tensor& idx, const at::Tensor& logits, const char* op, const char* name,
                                std::optional<int64_t> ignore_index) {
  return check_indices(idx, logits.size(0), logits.size(1), logits.device(), op, name, ignore_index);
}

inline at::Tensor new_rows(const at::Tensor& like, int64_t n) {
  return at::empty({n}, like.options().dtype(at::kDouble));
}

// An optional per-row incoming gradient as contiguous float64 [N] (undefined when absent).
inline at::Tensor as_rows(const std::optional<at::Tensor>& t, const at::Tensor& logits, const char* op,
                          const char* name) {
  if (!t || !t->defined()) return at::Tensor();
  const int64_t n = logits.size(0);
  TORCH_CHECK(t->numel() == n, op, ": `", name, "` must have one value per row (", n, "), got ", t->sizes());
  TORCH_CHECK(t->device() == logits.device(), op, ": `", name, "` is on ", t->device(), " but the logits are on ",
              logits.device());
  return t->to(at::kDouble).contiguous().view({n});
}

}  // namespace fastloss
