// The kernels._C module: collects the bindings that each csrc/<op>.cpp registered.
#include "common.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "C++ CPU kernels of the kernels library (no libtorch; tensors cross as addresses)";
  m.def("isa", [] { return kernels::isa_name(kernels::detected_isa()); },
        "The SIMD instruction set the kernels use on this CPU: avx512, avx2 or portable.");
  for (auto& add_bindings : kernels::registry()) add_bindings(m);
}
