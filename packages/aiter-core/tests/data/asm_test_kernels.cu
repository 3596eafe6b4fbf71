// Test kernels for aiter_core.loader (the asm backend's cubin loader).
// Rebuild the cubin beside this file with:
//   nvcc -gencode=arch=compute_90a,code=sm_90a -cubin -o asm_test_kernels.sm_90a.cubin asm_test_kernels.cu
// The parameter types differ on purpose (float scalar, 32- and 64-bit counts) so that a
// wrongly packed argument shows up as a wrong result.
#include <cstdint>

// out[i] = alpha * x[i] + y[i], i < n (32-bit count)
extern "C" __global__ void scaled_add_f32_i32(const float* __restrict__ x, const float* __restrict__ y,
                                              float* __restrict__ out, float alpha, int32_t n) {
    int32_t i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = alpha * x[i] + y[i];
}

// Same with a 64-bit count and a 64-bit index.
extern "C" __global__ void scaled_add_f32_i64(const float* __restrict__ x, const float* __restrict__ y,
                                              float* __restrict__ out, float alpha, int64_t n) {
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = alpha * x[i] + y[i];
}

// Reverses each chunk of `chunk` floats through dynamic shared memory (chunk * 4 bytes of it),
// so a launch with more than 48 KiB exercises the loader's shared-memory opt-in.
extern "C" __global__ void reverse_chunks_f32(const float* __restrict__ x, float* __restrict__ out,
                                              int32_t chunk, int64_t n) {
    extern __shared__ float buf[];
    int64_t base = (int64_t)blockIdx.x * chunk;
    int32_t len = (int32_t)min((int64_t)chunk, n - base);
    for (int32_t j = threadIdx.x; j < len; j += blockDim.x) buf[j] = x[base + j];
    __syncthreads();
    for (int32_t j = threadIdx.x; j < len; j += blockDim.x) out[base + j] = buf[len - 1 - j];
}
