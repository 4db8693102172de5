// Torch binding of the lowbit CPU kernels: ISA selection at run time, activation quantization, threading.
//
// Built by lowbit/kernels/fast.py with torch.utils.cpp_extension.load. Threads: torch's intra-op count
// (torch.set_num_threads), run on lowbit's own work-claiming pool (work_pool.h says why not OpenMP).
// The weight layout is prepared in Python (fast.py: prepare); see lowbit_kernels.h.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <string>
#include <vector>

#include "lowbit_kernels.h"
#include "work_pool.h"

namespace {

using lowbit::KernelTable;

bool cpu_supports(const std::string& isa) {
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
  __builtin_cpu_init();
  if (isa == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (isa == "avx512vnni") {
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512vnni");
  }
#endif
  return isa == "scalar";
}

// Kernel tables this build has and this CPU can run, best last.
std::vector<const KernelTable*> usable_tables() {
  std::vector<const KernelTable*> out{lowbit::scalar_kernels()};
  // Check the CPU before asking for a table: never touch wide code on a CPU without it.
  if (cpu_supports("avx2") && lowbit::avx2_kernels() != nullptr) out.push_back(lowbit::avx2_kernels());
  if (cpu_supports("avx512vnni") && lowbit::avx512vnni_kernels() != nullptr) {
    out.push_back(lowbit::avx512vnni_kernels());
  }
  return out;
}

const KernelTable*& current_table() {
  static const KernelTable* table = usable_tables().back();
  return table;
}

std::vector<std::string> available_isas() {
  std::vector<std::string> names;
  for (const KernelTable* t : usable_tables()) names.emplace_back(t->name);
  return names;
}

std::string get_isa() { return current_table()->name; }

void set_isa(const std::string& name) {
  for (const KernelTable* t : usable_tables()) {
    if (name == t->name) {
      current_table() = t;
      return;
    }
  }
  TORCH_CHECK(false, "lowbit kernels: ISA '", name, "' is not available on this CPU/build; available: ",
              c10::Join(", ", available_isas()));
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// y [M, N] = x [M, K] . W^T (+ bias), W given as prepared tiles (see lowbit_kernels.h).
torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& scales,
                     const torch::Tensor& zs, const c10::optional<torch::Tensor>& bias, int64_t cb, bool full_byte,
                     int64_t N, int64_t K, int64_t gb) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.is_contiguous(),
              "lowbit linear: x must be a contiguous float32 [M, K] tensor");
  TORCH_CHECK(x.size(1) == K, "lowbit linear: x has ", x.size(1), " columns, the weight expects K=", K);
  TORCH_CHECK(cb == 1 || cb == 2 || cb == 4 || cb == 8, "lowbit linear: container bits must be 1/2/4/8");
  const int64_t M = x.size(0);
  const int64_t KB = ceil_div(K, lowbit::kBlock);
  const int64_t T = ceil_div(N, lowbit::kTileRows);
  const int64_t G = scales.size(1);
  TORCH_CHECK(w.scalar_type() == torch::kUInt8 && w.is_contiguous() && w.numel() == T * KB * lowbit::kBlock * cb,
              "lowbit linear: packed tiles do not match N/K/bits");
  TORCH_CHECK(scales.scalar_type() == torch::kFloat && scales.is_contiguous() && scales.dim() == 3 &&
                  scales.size(0) == T && scales.size(2) == lowbit::kTileRows,
              "lowbit linear: scales must be float32 [T, G, 8]");
  TORCH_CHECK(zs.scalar_type() == torch::kFloat && zs.is_contiguous() && zs.sizes() == scales.sizes(),
              "lowbit linear: zs must match scales");
  TORCH_CHECK(gb >= 1 && gb * (G - 1) < KB && gb * G >= KB, "lowbit linear: group blocks do not tile K");
  const float* biasp = nullptr;
  torch::Tensor bias_c;
  if (bias.has_value() && bias->defined()) {
    bias_c = bias->to(torch::kFloat).contiguous();
    TORCH_CHECK(bias_c.numel() == N, "lowbit linear: bias must have N elements");
    biasp = bias_c.data_ptr<float>();
  }

  auto y = torch::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const KernelTable* kt = current_table();

  auto xq = torch::empty({M, KB * lowbit::kBlock}, x.options().dtype(torch::kChar));
  auto a = torch::empty({M, KB}, x.options());
  auto isum = torch::empty({M, KB}, x.options().dtype(torch::kInt));
  auto gsum = torch::empty({M, G}, x.options());
  const float* xp = x.data_ptr<float>();
  int8_t* xqp = xq.data_ptr<int8_t>();
  float* ap = a.data_ptr<float>();
  int32_t* isp = isum.data_ptr<int32_t>();
  float* gsp = gsum.data_ptr<float>();
  const int threads = at::get_num_threads();
  const int64_t row_grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(K, 1));
  lowbit::parallel_chunks(M, row_grain, threads, [&](int64_t m0, int64_t m1) {
    kt->quantize(xp, K, K, KB, m0, m1, xqp, ap, isp);
    // Per-group sums of the dequantized activations, for the zero-point term.
    for (int64_t m = m0; m < m1; ++m) {
      for (int64_t g = 0; g < G; ++g) {
        float s = 0.0f;
        for (int64_t kb = g * gb; kb < std::min(KB, (g + 1) * gb); ++kb) {
          s += ap[m * KB + kb] * static_cast<float>(isp[m * KB + kb]);
        }
        gsp[m * G + g] = s;
      }
    }
  });

  const lowbit::Tiles tiles{w.data_ptr<uint8_t>(), scales.data_ptr<float>(), zs.data_ptr<float>(),
                            static_cast<int>(cb), full_byte, N, T, KB, G, gb};
  const lowbit::Acts acts{xqp, ap, isp, gsp, M, KB, G};
  float* yp = y.data_ptr<float>();
  // Work is split in units of two tiles (16 outputs), claimed in chunks: about 16 chunks per thread for
  // balance (a late or preempted thread only delays its own chunk), each worth >= ~2^16 MACs.
  const int64_t units = ceil_div(T, 2);
  const int64_t unit_macs = 2 * lowbit::kTileRows * KB * lowbit::kBlock * M;
  const int64_t min_grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(unit_macs, 1));
  const int64_t grain = std::max(min_grain, units / (16 * std::max(threads, 1)));
  if (M <= lowbit::kSmallMaxM) {
    lowbit::parallel_chunks(units, grain, threads, [&](int64_t u0, int64_t u1) {
      kt->gemm_small(tiles, acts, biasp, yp, 2 * u0, std::min(T, 2 * u1));
    });
  } else {
    lowbit::parallel_chunks(units, grain, threads, [&](int64_t u0, int64_t u1) {
      // Room for two unpacked tiles (8 rows x KB blocks x 32 bytes each); per thread, reused across calls.
      thread_local std::vector<uint8_t> scratch;
      const size_t need = static_cast<size_t>(2 * KB * lowbit::kBlock * 8 + 64);
      if (scratch.size() < need) scratch.resize(need);
      kt->gemm_large(tiles, acts, biasp, yp, 2 * u0, std::min(T, 2 * u1), scratch.data());
    });
  }
  return y;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lowbit packed low-bit linear kernels (CPU)";
  m.def("linear", &linear, "y = x . W^T (+ bias) for prepared low-bit tiles", py::arg("x"), py::arg("w"),
        py::arg("scales"), py::arg("zs"), py::arg("bias"), py::arg("cb"), py::arg("full_byte"), py::arg("N"),
        py::arg("K"), py::arg("gb"));
  m.def("available_isas", &available_isas, "kernel ISAs usable on this CPU, best last");
  m.def("get_isa", &get_isa, "the ISA the kernels currently use");
  m.def("set_isa", &set_isa, "force an ISA (for tests and benchmarks)");
}
