// cnnlab's native CPU kernels, built on first use by cnnlab/kernels.py with the machine's C++
// compiler: training-mode batch norm -> ReLU -> 2x2 max-pool (-> dropout) as one step, forward
// and backward, for channels_last float32 and bfloat16 tensors (see cnnlab/layers.py for why it pays).
//
// x is (N, H, W, C) in memory. Forward: one pass for the per-channel mean and variance, one pass
// that normalizes each 2x2 window, takes its maximum, applies the ReLU and the dropout mask; it
// stores per output value the window's argmax and whether a gradient passes the ReLU and the mask
// (flags) and the raw input there (pooled). The dropout mask is a hash of each output value's
// index and a key drawn from torch's generator per call, so seeded runs repeat and no mask tensor
// is drawn or stored. Backward: one pass over the pooled values for the two per-channel sums, one pass
// writing the input gradient a * (g - mean(g) - xhat * mean(g * xhat)), where g is non-zero only
// at each window's argmax. Arithmetic is float32 with double-precision per-channel totals.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

inline float load(float v) { return v; }
inline float load(uint16_t v) {  // bfloat16 -> float32: the top half of the float's bits
    uint32_t u = uint32_t(v) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

template <typename T> T store(float f);
template <> inline float store<float>(float f) { return f; }
template <> inline uint16_t store<uint16_t>(float f) {  // round to nearest even, NaN kept NaN
    uint32_t u;
    std::memcpy(&u, &f, 4);
    uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return uint16_t((u & 0x7fffffffu) > 0x7f800000u ? 0x7fc0u : rounded);
}

int thread_id() {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

int team_size() {
#ifdef _OPENMP
    return omp_get_num_threads();
#else
    return 1;
#endif
}

constexpr int64_t kFlush = 256;  // rows summed in float32 before adding to the double totals

inline uint32_t mix(uint32_t h) {  // a 32-bit integer hash with low bias (Chris Wellons' lowbias32)
    h ^= h >> 16;
    h *= 0x7feb352du;
    h ^= h >> 15;
    h *= 0x846ca68bu;
    h ^= h >> 16;
    return h;
}

struct Dropout {
    uint32_t key0, key1, threshold;  // a value is dropped when its hash is below threshold
    float scale;                     // 1 / (1 - p)
};

// The pointers of one pixel's C channels never alias: restrict lets the compiler vectorize.
template <typename T>
void stats_row(int64_t C, const T *__restrict__ row, const T *__restrict__ shift, float *__restrict__ s,
               float *__restrict__ q) {
    for (int64_t c = 0; c < C; c++) {
        float v = load(row[c]) - load(shift[c]);
        s[c] += v;
        q[c] += v * v;
    }
}

template <typename T, bool Drop>
void pool_row(int64_t C, const float *__restrict__ a, const float *__restrict__ b, const T *__restrict__ q0,
              const T *__restrict__ q1, const T *__restrict__ q2, const T *__restrict__ q3, T *__restrict__ out,
              uint8_t *__restrict__ flags, T *__restrict__ pooled, uint32_t index, Dropout drop) {
    for (int64_t c = 0; c < C; c++) {
        T x0 = q0[c], x1 = q1[c], x2 = q2[c], x3 = q3[c];
        float y0 = a[c] * load(x0) + b[c], y1 = a[c] * load(x1) + b[c];
        float y2 = a[c] * load(x2) + b[c], y3 = a[c] * load(x3) + b[c];
        // the first maximum wins, as in PyTorch's max-pooling; a NaN or infinity in x makes its
        // channel's mean NaN, so every y of that channel is NaN and the ReLU passes it on
        int m1 = y1 > y0, m3 = y3 > y2;
        float ya = m1 ? y1 : y0, yb = m3 ? y3 : y2;
        int mb = yb > ya;
        float y = mb ? yb : ya;
        int pass = !(y <= 0.0f);  // the ReLU keeps positives and NaN
        if (Drop) {
            pass &= mix(mix((index + uint32_t(c)) ^ drop.key0) + drop.key1) >= drop.threshold;
            y *= drop.scale;
        }
        out[c] = store<T>(pass ? y : 0.0f);
        flags[c] = uint8_t((mb ? 2 + m3 : m1) | (pass << 2));
        T xa = m1 ? x1 : x0, xb = m3 ? x3 : x2;
        pooled[c] = mb ? xb : xa;
    }
}

template <typename T>
void grad_sums_row(int64_t C, const T *__restrict__ grad, const uint8_t *__restrict__ flags,
                   const T *__restrict__ pooled, float scale, float *__restrict__ s, float *__restrict__ q) {
    for (int64_t c = 0; c < C; c++) {
        float g = (flags[c] & 4) ? scale * load(grad[c]) : 0.0f;
        s[c] += g;
        q[c] += g * load(pooled[c]);
    }
}

template <typename T>
void dx_row(int64_t C, const float *__restrict__ a, const float *__restrict__ c2, const float *__restrict__ c3,
            const T *__restrict__ x, const T *__restrict__ grad, const uint8_t *__restrict__ flags, uint8_t here,
            float scale, T *__restrict__ dx) {
    for (int64_t c = 0; c < C; c++) {
        float dense = c2[c] + c3[c] * load(x[c]);
        dx[c] = store<T>(flags[c] == here ? dense + scale * a[c] * load(grad[c]) : dense);
    }
}

template <typename T>
void dense_row(int64_t C, const float *__restrict__ c2, const float *__restrict__ c3, const T *__restrict__ x,
               T *__restrict__ dx) {
    for (int64_t c = 0; c < C; c++) dx[c] = store<T>(c2[c] + c3[c] * load(x[c]));
}

// Per-channel sums of `rows` rows of C values, split over the threads; each thread adds float32
// partial sums of kFlush rows into double totals, combined in thread order (repeatable).
template <typename Row>
void channel_sums(int64_t rows, int64_t C, int threads, double *sum, double *sum2, Row row) {
    std::vector<double> totals(size_t(threads) * 2 * C, 0.0);
#pragma omp parallel num_threads(threads)
    {
        int t = thread_id(), team = team_size();
        int64_t lo = rows * t / team, hi = rows * (t + 1) / team;
        std::vector<float> part(2 * C, 0.0f);
        double *ds = totals.data() + size_t(t) * 2 * C, *dq = ds + C;
        for (int64_t r = lo; r < hi; r++) {
            row(r, part.data(), part.data() + C);
            if ((r - lo) % kFlush == kFlush - 1 || r == hi - 1) {
                for (int64_t c = 0; c < C; c++) {
                    ds[c] += part[c];
                    dq[c] += part[C + c];
                    part[c] = part[C + c] = 0.0f;
                }
            }
        }
    }
    for (int64_t c = 0; c < C; c++) {
        sum[c] = sum2[c] = 0.0;
        for (int t = 0; t < threads; t++) {
            sum[c] += totals[size_t(t) * 2 * C + c];
            sum2[c] += totals[size_t(t) * 2 * C + C + c];
        }
    }
}

template <typename T>
void forward(const T *x, int64_t N, int64_t H, int64_t W, int64_t C, const float *weight, const float *bias,
             float *running_mean, float *running_var, float momentum, float eps, Dropout drop, T *out,
             uint8_t *flags, T *pooled, float *mean, float *invstd, int threads) {
    int64_t count = N * H * W, OH = H / 2, OW = W / 2;
    std::vector<double> sum(C), sum2(C);
    channel_sums(count, C, threads, sum.data(), sum2.data(),
                 [&](int64_t r, float *s, float *q) { stats_row(C, x + r * C, x, s, q); });
    std::vector<float> a(C), b(C);
    for (int64_t c = 0; c < C; c++) {
        double shifted = sum[c] / count, var = sum2[c] / count - shifted * shifted;
        if (var < 0) var = 0;
        double m = shifted + load(x[c]);
        mean[c] = float(m);
        invstd[c] = float(1.0 / std::sqrt(var + eps));
        a[c] = weight[c] * invstd[c];
        b[c] = bias[c] - mean[c] * a[c];
        running_mean[c] = (1 - momentum) * running_mean[c] + momentum * float(m);
        running_var[c] = (1 - momentum) * running_var[c] + momentum * float(var * count / (count - 1));
    }
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t nr = 0; nr < N * OH; nr++) {
        int64_t n = nr / OH, oh = nr % OH;
        for (int64_t ow = 0; ow < OW; ow++) {
            const T *q0 = x + ((n * H + 2 * oh) * W + 2 * ow) * C;
            int64_t o = (nr * OW + ow) * C;
            if (drop.threshold > 0)
                pool_row<T, true>(C, a.data(), b.data(), q0, q0 + C, q0 + W * C, q0 + W * C + C, out + o, flags + o,
                                  pooled + o, uint32_t(o), drop);
            else
                pool_row<T, false>(C, a.data(), b.data(), q0, q0 + C, q0 + W * C, q0 + W * C + C, out + o, flags + o,
                                   pooled + o, uint32_t(o), drop);
        }
    }
}

template <typename T>
void backward(const T *x, const T *grad, const uint8_t *flags, const T *pooled, int64_t N, int64_t H, int64_t W,
              int64_t C, const float *weight, const float *mean, const float *invstd, float scale, float *grad_weight,
              float *grad_bias, T *dx, int threads) {
    int64_t count = N * H * W, OH = H / 2, OW = W / 2;
    std::vector<double> gsum(C), gpsum(C);
    channel_sums(N * OH * OW, C, threads, gsum.data(), gpsum.data(), [&](int64_t r, float *s, float *q) {
        grad_sums_row(C, grad + r * C, flags + r * C, pooled + r * C, scale, s, q);
    });
    std::vector<float> a(C), c2(C), c3(C);
    for (int64_t c = 0; c < C; c++) {
        a[c] = weight[c] * invstd[c];
        grad_bias[c] = float(gsum[c]);
        grad_weight[c] = float(invstd[c] * (gpsum[c] - mean[c] * gsum[c]));
        c3[c] = -a[c] * invstd[c] * grad_weight[c] / count;
        c2[c] = -a[c] * grad_bias[c] / count - c3[c] * mean[c];
    }
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t nh = 0; nh < N * H; nh++) {
        int64_t n = nh / H, h = nh % H;
        for (int64_t w = 0; w < W; w++) {
            int64_t i = (nh * W + w) * C;
            if (h / 2 < OH && w / 2 < OW) {  // an odd last row or column is outside every window
                int64_t o = ((n * OH + h / 2) * OW + w / 2) * C;
                uint8_t here = uint8_t(4 | ((h & 1) * 2 + (w & 1)));
                dx_row(C, a.data(), c2.data(), c3.data(), x + i, grad + o, flags + o, here, scale, dx + i);
            } else {
                dense_row(C, c2.data(), c3.data(), x + i, dx + i);
            }
        }
    }
}

}  // namespace

extern "C" {

int cnnlab_kernels_version() { return 2; }

// key0, key1: the dropout mask's key; threshold: p * 2^32 (0: no dropout); scale: 1 / (1 - p)
#define CNNLAB_KERNELS(SUFFIX, T)                                                                             \
    void cnnlab_bn_relu_pool2_forward_##SUFFIX(const T *x, int64_t N, int64_t H, int64_t W, int64_t C,          \
                                               const float *weight, const float *bias, float *running_mean,     \
                                               float *running_var, float momentum, float eps, uint32_t key0,    \
                                               uint32_t key1, uint32_t threshold, float scale, T *out,          \
                                               uint8_t *flags, T *pooled, float *mean, float *invstd,           \
                                               int threads) {                                                    \
        forward<T>(x, N, H, W, C, weight, bias, running_mean, running_var, momentum, eps,                     \
                   Dropout{key0, key1, threshold, scale}, out, flags, pooled, mean, invstd, threads);          \
    }                                                                                                            \
    void cnnlab_bn_relu_pool2_backward_##SUFFIX(const T *x, const T *grad, const uint8_t *flags, const T *pooled, \
                                                int64_t N, int64_t H, int64_t W, int64_t C, const float *weight, \
                                                const float *mean, const float *invstd, float scale,             \
                                                float *grad_weight, float *grad_bias, T *dx, int threads) {      \
        backward<T>(x, grad, flags, pooled, N, H, W, C, weight, mean, invstd, scale, grad_weight, grad_bias, dx, \
                    threads);                                                                                    \
    }

CNNLAB_KERNELS(f32, float)
CNNLAB_KERNELS(bf16, uint16_t)

}  // extern "C"
