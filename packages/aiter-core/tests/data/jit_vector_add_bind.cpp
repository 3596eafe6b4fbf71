// pybind11 half of the tiny JIT test module: binds the launchers in jit_vector_add.cu.
#include <pybind11/pybind11.h>
#include <cstdint>
#include <stdexcept>
#include <string>

int aiter_test_vector_add(uintptr_t x, uintptr_t y, uintptr_t out, int64_t n, uintptr_t stream);
int aiter_test_arch_probe(uintptr_t out, uintptr_t stream);
const char* aiter_test_error_string(int code);

static void check(int code, const char* what) {
    if (code != 0) throw std::runtime_error(std::string(what) + ": " + aiter_test_error_string(code));
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("vector_add",
          [](uintptr_t x, uintptr_t y, uintptr_t out, int64_t n, uintptr_t stream) {
              check(aiter_test_vector_add(x, y, out, n, stream), "vector_add launch");
          },
          "out[i] = x[i] + y[i] for float32 device pointers, on the given stream");
    m.def("arch_probe",
          [](uintptr_t out, uintptr_t stream) { check(aiter_test_arch_probe(out, stream), "arch_probe launch"); },
          "writes (__CUDA_ARCH__, sm_90a features enabled) into two int32 on the device");
}
