// The kernels._C module: collects the bindings that each csrc/<op>.cpp registered.
#include "common.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "C++ CPU kernels of the kernels library (no libtorch; tensors cross as addresses)";
  m.def("isa", [] { return kernels::isa_name(kernels::current_isa()); },
        "The SIMD instruction set the kernels use on this CPU: avx512, avx2 or portable.");
  m.def("supported_isa", [] { return kernels::isa_name(kernels::supported_isa()); },
        "The best SIMD instruction set this CPU supports: what isa() gives unless set_isa lowered it.");
  m.def(
      "set_isa",
      [](const std::string& name) {
        for (auto isa : {kernels::Isa::portable, kernels::Isa::avx2, kernels::Isa::avx512}) {
          if (name != kernels::isa_name(isa)) continue;
          if (isa > kernels::supported_isa())
            throw std::invalid_argument(std::string("kernels._C.set_isa: this CPU does not support ") + name);
          kernels::active_isa().store(isa);
          return;
        }
        throw std::invalid_argument("kernels._C.set_isa: unknown instruction set " + name +
                                    " (avx512, avx2 or portable)");
      },
      "Run the kernels' variant for this instruction set (at most what the CPU supports); for tests.");
  kernels::HostTeam::watch_forks();
  m.def("openmp_team", [] { return kernels::HostTeam::library(); },
        "The OpenMP runtime (loaded by PyTorch) whose team runs the kernels called from Python, or '' when "
        "there is none (then, and inside mlp_step, they run on the extension's own thread pool).");
  m.def(
      "set_openmp_team", [](bool on) { kernels::HostTeam::enabled().store(on); },
      "Whether kernels called from Python run on PyTorch's OpenMP team (default True) or on the extension's own "
      "thread pool; for tests and benchmarks.");
  for (auto& add_bindings : kernels::registry()) add_bindings(m);
}
