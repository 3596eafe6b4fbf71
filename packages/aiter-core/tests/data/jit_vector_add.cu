// CUDA half of the tiny JIT test module (GPU tests of aiter_core.jit). Torch-agnostic on purpose:
// raw device pointers and a raw stream handle, so it compiles in seconds without torch headers.
#include <cuda_runtime.h>
#include <cstdint>

__global__ void vector_add_kernel(const float* __restrict__ x, const float* __restrict__ y,
                                  float* __restrict__ out, int64_t n) {
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = x[i] + y[i];
}

// Writes __CUDA_ARCH__ and whether the sm_90a feature set was enabled, so a test can check the
// -gencode the builder chose.
__global__ void arch_probe_kernel(int32_t* out) {
#ifdef __CUDA_ARCH__
    out[0] = __CUDA_ARCH__;
#endif
#ifdef __CUDA_ARCH_FEAT_SM90_ALL
    out[1] = 1;
#else
    out[1] = 0;
#endif
}

int aiter_test_vector_add(uintptr_t x, uintptr_t y, uintptr_t out, int64_t n, uintptr_t stream) {
    if (n <= 0) return 0;
    const int threads = 256;
    const int64_t blocks = (n + threads - 1) / threads;
    vector_add_kernel<<<(unsigned)blocks, threads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
        reinterpret_cast<const float*>(x), reinterpret_cast<const float*>(y), reinterpret_cast<float*>(out), n);
    return (int)cudaGetLastError();
}

int aiter_test_arch_probe(uintptr_t out, uintptr_t stream) {
    arch_probe_kernel<<<1, 1, 0, reinterpret_cast<cudaStream_t>(stream)>>>(reinterpret_cast<int32_t*>(out));
    return (int)cudaGetLastError();
}

const char* aiter_test_error_string(int code) { return cudaGetErrorString((cudaError_t)code); }
