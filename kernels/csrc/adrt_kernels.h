/* C ABI of the autodiffusion-rt native kernels.
 *
 * Two shared libraries export the same functions: libadrt_kernels_cuda (device
 * pointers, asynchronous on a CUDA stream) and libadrt_kernels_cpu (host
 * pointers, synchronous; the CUDA kernel's twin, so its arithmetic can be
 * tested on machines without a GPU). A plain C ABI so ctypes, TensorRT plugins
 * or any runtime can call them without linking torch.
 *
 * The update is that of autodiffusion_rt.diffusion.samplers.step_update:
 *   x0     = x0_from_x * x + x0_from_eps * eps
 *   x_prev = c_x * x + c_eps * eps + c_prev_x0 * prev_x0 + c_noise * noise
 * computed in float32 whatever the storage dtype, terms added in this order.
 * A term whose coefficient is 0 is left out and its pointer may be NULL.
 */
#ifndef ADRT_KERNELS_H
#define ADRT_KERNELS_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define ADRT_API __declspec(dllexport)
#else
#define ADRT_API __attribute__((visibility("default")))
#endif

/* Storage dtype of every tensor of one call. */
enum {
  ADRT_FLOAT32 = 0,
  ADRT_FLOAT16 = 1,
  ADRT_BFLOAT16 = 2
};

/* Device a library's pointers live on (adrt_library_device()). */
enum {
  ADRT_DEVICE_CPU = 0,
  ADRT_DEVICE_CUDA = 1
};

/* Return codes: 0 success; negative, a bad argument; positive, a cudaError_t. */
enum {
  ADRT_OK = 0,
  ADRT_ERR_BAD_DTYPE = -1,
  ADRT_ERR_BAD_SIZE = -2,
  ADRT_ERR_NULL_POINTER = -3,      /* x, eps, x_prev or x0 is NULL (with n > 0) */
  ADRT_ERR_MISSING_PREV_X0 = -4,   /* c_prev_x0 != 0 but prev_x0 is NULL */
  ADRT_ERR_MISSING_NOISE = -5      /* c_noise != 0 but noise is NULL */
};

/* One sampler step over n contiguous elements. Outputs must not alias inputs.
 * stream: a cudaStream_t for the CUDA library (NULL = default stream); ignored
 * by the CPU library. The CUDA call returns after the launch, not the work. */
ADRT_API int adrt_fused_step_update(
    int dtype, int64_t n,
    const void* x, const void* eps, const void* prev_x0, const void* noise,
    void* x_prev, void* x0,
    float x0_from_x, float x0_from_eps,
    float c_x, float c_eps, float c_prev_x0, float c_noise,
    void* stream);

/* ADRT_DEVICE_CPU or ADRT_DEVICE_CUDA: where this library expects its pointers. */
ADRT_API int adrt_library_device(void);

#ifdef __cplusplus
}
#endif

#endif /* ADRT_KERNELS_H */
