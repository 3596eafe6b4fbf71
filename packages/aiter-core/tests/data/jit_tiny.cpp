// Tiny pybind11-only module for aiter_core.jit tests: no torch headers, so it builds in seconds.
// AITER_TEST_OFFSET lets a test change a compile flag and see the rebuilt module answer differently.
#include <pybind11/pybind11.h>
#include <cstdint>

#ifndef AITER_TEST_OFFSET
#define AITER_TEST_OFFSET 0
#endif

static int64_t add(int64_t a, int64_t b) { return a + b + AITER_TEST_OFFSET; }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("add", &add, "a + b + AITER_TEST_OFFSET");
    m.attr("offset") = AITER_TEST_OFFSET;
}
