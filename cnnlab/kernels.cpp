// cnnlab's native CPU kernels, built on first use by cnnlab/kernels.py with the machine's C++
// compiler, each a training-mode block as one step, forward and backward, for channels_last float32
// and bfloat16 tensors (see cnnlab/layers.py for why it pays): batch norm -> ReLU -> 2x2 max-pool
// (-> dropout), the seed presets' block, here first; (2x2 max-pool ->) batch norm -> GELU, the
// airbench presets' blocks, further down.
//
// x is (N, H, W, C) in memory. Forward: one pass for the per-channel mean and variance, one pass
// that normalizes each 2x2 window, takes its maximum, applies the ReLU and the dropout mask; it
// stores per output value the window's argmax and whether a gradient passes the ReLU and the mask
// (flags) and the raw input there (pooled). The dropout mask is a hash of each output value's
// index and a key drawn from torch's generator per call, so seeded runs repeat and no mask tensor
// is drawn or stored. Backward: one pass over the pooled values for the two per-channel sums, one pass
// writing the input gradient a * (g - mean(g) - xhat * mean(g * xhat)), where g is non-zero only
// at each window's argmax. Arithmetic is float32 with double-precision per-channel totals.
#include <algorithm>
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

// mean, invstd, the running statistics, and the affine a, b, from shifted per-channel sums over count values
void bn_statistics(int64_t C, int64_t count, const double *sum, const double *sum2, const float *shift,
                   const float *weight, const float *bias, float *running_mean, float *running_var, float momentum,
                   float eps, float *mean, float *invstd, float *a, float *b) {
    for (int64_t c = 0; c < C; c++) {
        double shifted = sum[c] / count, var = sum2[c] / count - shifted * shifted;
        if (var < 0) var = 0;
        double m = shifted + shift[c];
        mean[c] = float(m);
        invstd[c] = float(1.0 / std::sqrt(var + eps));
        a[c] = weight[c] * invstd[c];
        b[c] = bias[c] - mean[c] * a[c];
        running_mean[c] = (1 - momentum) * running_mean[c] + momentum * float(m);
        running_var[c] = (1 - momentum) * running_var[c] + momentum * float(var * count / (count > 1 ? count - 1 : 1));
    }
}

// the weight and bias gradients from the per-channel sums of g and g * x over count values, and the
// terms of batch norm's input gradient a * g + c2 + c3 * x
void bn_backward_terms(int64_t C, int64_t count, const double *gsum, const double *gxsum, const float *mean,
                       const float *invstd, const float *a, float *grad_weight, float *grad_bias, float *c2,
                       float *c3) {
    for (int64_t c = 0; c < C; c++) {
        grad_bias[c] = float(gsum[c]);
        grad_weight[c] = float(invstd[c] * (gxsum[c] - mean[c] * gsum[c]));
        c3[c] = -a[c] * invstd[c] * grad_weight[c] / count;
        c2[c] = -a[c] * grad_bias[c] / count - c3[c] * mean[c];
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
    std::vector<float> shift(C), a(C), b(C);
    for (int64_t c = 0; c < C; c++) shift[c] = load(x[c]);
    bn_statistics(C, count, sum.data(), sum2.data(), shift.data(), weight, bias, running_mean, running_var, momentum,
                  eps, mean, invstd, a.data(), b.data());
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
    for (int64_t c = 0; c < C; c++) a[c] = weight[c] * invstd[c];
    bn_backward_terms(C, count, gsum.data(), gpsum.data(), mean, invstd, a.data(), grad_weight, grad_bias, c2.data(),
                      c3.data());
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

// ---- (2x2 max-pool ->) batch norm -> GELU: airbench's conv -> pool -> bn -> gelu and conv -> bn -> gelu
//
// Forward: one pass pools each 2x2 window (the first maximum wins, as in PyTorch; a NaN or infinity
// anywhere makes its channel's statistics NaN, so it reaches the loss as PyTorch's would), stores
// the pooled value and which of the 4 positions it came from, and sums the per-channel statistics;
// one pass writes gelu(a * p + b). Without the pooling the statistics are summed over x itself.
// Backward: one pass for the two per-channel sums of g = grad * gelu'(a * p + b), one pass writing
// the input gradient a * g + c2 + c3 * p to the position each window's maximum came from (zeros at
// the three others). GELU is the exact one, x * Phi(x), with erf from Abramowitz and Stegun 7.1.26
// (error under 1.5e-7) and a Cephes exp: plain arithmetic, so the compiler vectorizes the loops.

constexpr float kSqrtHalf = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;

inline float exp_nonpositive(float v) {  // exp(v) for v <= 0; below -87 float's normals run out
    v = v < -87.0f ? -87.0f : v;
    float n = float(int(v * 1.44269504f - 0.5f));  // round to nearest: truncation of a non-positive value
    float r = v - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t bits = (int32_t(n) + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, 4);
    return p * scale;
}

// Phi(z), the standard normal CDF, and exp(-z^2 / 2)
inline float normal_cdf(float z, float &gauss) {
    float u = std::fabs(z) * kSqrtHalf;
    float t = 1.0f / (1.0f + 0.3275911f * u);
    gauss = exp_nonpositive(-u * u);
    float tail = 0.5f * ((((1.061405429f * t - 1.453152027f) * t + 1.421413741f) * t - 0.284496736f) * t +
                         0.254829592f) * t * gauss;  // 0.5 * erfc(|z| / sqrt 2)
    return z < 0.0f ? tail : 1.0f - tail;
}

inline float gelu(float z) {
    float gauss;
    return z * normal_cdf(z, gauss);
}

inline float gelu_slope(float z) {
    float gauss;
    float cdf = normal_cdf(z, gauss);
    return cdf + z * gauss * kInvSqrt2Pi;
}

template <typename T>
void max_pool_row(int64_t C, const T *__restrict__ q0, const T *__restrict__ q1, const T *__restrict__ q2,
                  const T *__restrict__ q3, const T *__restrict__ shift, T *__restrict__ pooled,
                  uint8_t *__restrict__ where, float *__restrict__ s, float *__restrict__ q) {
    for (int64_t c = 0; c < C; c++) {
        float x0 = load(q0[c]), x1 = load(q1[c]), x2 = load(q2[c]), x3 = load(q3[c]);
        bool m1 = x1 > x0, m3 = x3 > x2;  // the first maximum wins, as in PyTorch
        float xa = m1 ? x1 : x0, xb = m3 ? x3 : x2;
        bool mb = xb > xa;
        float p = mb ? xb : xa;
        pooled[c] = store<T>(p);  // exact: p is one of the inputs
        where[c] = uint8_t(mb ? 2 + m3 : m1);
        float v = p - load(shift[c]);
        s[c] += v + (x0 + x1 + x2 + x3) * 0.0f;  // a NaN or infinity in any window poisons its channel
        q[c] += v * v;
    }
}

template <typename T>
void gelu_row(int64_t C, const float *__restrict__ a, const float *__restrict__ b, const T *__restrict__ p,
              T *__restrict__ out) {
    for (int64_t c = 0; c < C; c++) out[c] = store<T>(gelu(a[c] * load(p[c]) + b[c]));
}

template <typename T>
void gelu_grad_sums_row(int64_t C, const float *__restrict__ a, const float *__restrict__ b,
                        const T *__restrict__ p, const T *__restrict__ grad, float *__restrict__ s,
                        float *__restrict__ q) {
    for (int64_t c = 0; c < C; c++) {
        float v = load(p[c]);
        float g = load(grad[c]) * gelu_slope(a[c] * v + b[c]);
        s[c] += g;
        q[c] += g * v;
    }
}

// the batch-norm input gradient of one row: a * g + c2 + c3 * p, g = grad * gelu'(a * p + b)
template <typename T>
void bn_gelu_dx_row(int64_t C, const float *__restrict__ a, const float *__restrict__ b,
                    const float *__restrict__ c2, const float *__restrict__ c3, const T *__restrict__ p,
                    const T *__restrict__ grad, float *__restrict__ dx) {
    for (int64_t c = 0; c < C; c++) {
        float v = load(p[c]);
        float g = load(grad[c]) * gelu_slope(a[c] * v + b[c]);
        dx[c] = a[c] * g + c2[c] + c3[c] * v;
    }
}

template <typename T>
void unpool_row(int64_t C, const float *__restrict__ dp, const uint8_t *__restrict__ where, uint8_t k,
                T *__restrict__ dx) {
    for (int64_t c = 0; c < C; c++) dx[c] = store<T>(where[c] == k ? dp[c] : 0.0f);
}

// x: (N, H, W, C). With pool, p = the 2x2-pooled x, written to pooled with where; else p = x.
template <typename T>
void bn_gelu_forward(const T *x, int64_t N, int64_t H, int64_t W, int64_t C, int pool, const float *weight,
                     const float *bias, float *running_mean, float *running_var, float momentum, float eps, T *out,
                     T *pooled, uint8_t *where, float *mean, float *invstd, int threads) {
    int64_t OH = pool ? H / 2 : H, OW = pool ? W / 2 : W, rows = N * OH * OW;
    std::vector<double> sum(C), sum2(C);
    std::vector<float> shift(C), a(C), b(C);
    for (int64_t c = 0; c < C; c++) shift[c] = load(x[c]);
    if (pool) {
        channel_sums(rows, C, threads, sum.data(), sum2.data(), [&](int64_t r, float *s, float *q) {
            int64_t n = r / (OH * OW), oh = r / OW % OH, ow = r % OW;
            const T *q0 = x + ((n * H + 2 * oh) * W + 2 * ow) * C;
            max_pool_row(C, q0, q0 + C, q0 + W * C, q0 + W * C + C, x, pooled + r * C, where + r * C, s, q);
        });
    } else {
        channel_sums(rows, C, threads, sum.data(), sum2.data(),
                     [&](int64_t r, float *s, float *q) { stats_row(C, x + r * C, x, s, q); });
    }
    bn_statistics(C, rows, sum.data(), sum2.data(), shift.data(), weight, bias, running_mean, running_var, momentum,
                  eps, mean, invstd, a.data(), b.data());
    const T *p = pool ? pooled : x;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) gelu_row(C, a.data(), b.data(), p + r * C, out + r * C);
}

template <typename T>
void bn_gelu_backward(const T *grad, const T *p, const uint8_t *where, int64_t N, int64_t H, int64_t W, int64_t C,
                      int pool, const float *weight, const float *bias, const float *mean, const float *invstd,
                      float *grad_weight, float *grad_bias, T *dx, int threads) {
    int64_t OH = pool ? H / 2 : H, OW = pool ? W / 2 : W, rows = N * OH * OW;
    std::vector<float> a(C), b(C), c2(C), c3(C);
    for (int64_t c = 0; c < C; c++) {
        a[c] = weight[c] * invstd[c];
        b[c] = bias[c] - mean[c] * a[c];
    }
    std::vector<double> gsum(C), gpsum(C);
    channel_sums(rows, C, threads, gsum.data(), gpsum.data(), [&](int64_t r, float *s, float *q) {
        gelu_grad_sums_row(C, a.data(), b.data(), p + r * C, grad + r * C, s, q);
    });
    bn_backward_terms(C, rows, gsum.data(), gpsum.data(), mean, invstd, a.data(), grad_weight, grad_bias, c2.data(),
                      c3.data());
#pragma omp parallel num_threads(threads)
    {
        std::vector<float> dp(C);
#pragma omp for schedule(static)
        for (int64_t nr = 0; nr < N * OH; nr++) {
            int64_t n = nr / OH, oh = nr % OH;
            for (int64_t ow = 0; ow < OW; ow++) {
                int64_t r = nr * OW + ow;
                bn_gelu_dx_row(C, a.data(), b.data(), c2.data(), c3.data(), p + r * C, grad + r * C, dp.data());
                if (!pool)
                    for (int64_t c = 0; c < C; c++) dx[r * C + c] = store<T>(dp[c]);
                else
                    for (uint8_t k = 0; k < 4; k++)
                        unpool_row(C, dp.data(), where + r * C, k,
                                   dx + ((n * H + 2 * oh + k / 2) * W + 2 * ow + k % 2) * C);
            }
            if (!pool) continue;
            if (W % 2)  // an odd last column is outside every window
                for (int64_t k = 0; k < 2; k++)
                    std::fill_n(dx + ((n * H + 2 * oh + k) * W + W - 1) * C, C, store<T>(0.0f));
            if (H % 2 && oh == OH - 1)  // and so is an odd last row
                std::fill_n(dx + (n * H + H - 1) * W * C, W * C, store<T>(0.0f));
        }
    }
}

}  // namespace

extern "C" {

int cnnlab_kernels_version() { return 3; }

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

// pool: 1 to max-pool 2x2 first (pooled and where are then written), 0 for batch norm -> GELU alone
#define CNNLAB_GELU_KERNELS(SUFFIX, T)                                                                        \
    void cnnlab_bn_gelu_forward_##SUFFIX(const T *x, int64_t N, int64_t H, int64_t W, int64_t C, int pool,      \
                                         const float *weight, const float *bias, float *running_mean,           \
                                         float *running_var, float momentum, float eps, T *out, T *pooled,      \
                                         uint8_t *where, float *mean, float *invstd, int threads) {             \
        bn_gelu_forward<T>(x, N, H, W, C, pool, weight, bias, running_mean, running_var, momentum, eps, out,    \
                           pooled, where, mean, invstd, threads);                                              \
    }                                                                                                            \
    void cnnlab_bn_gelu_backward_##SUFFIX(const T *grad, const T *p, const uint8_t *where, int64_t N, int64_t H, \
                                          int64_t W, int64_t C, int pool, const float *weight, const float *bias, \
                                          const float *mean, const float *invstd, float *grad_weight,            \
                                          float *grad_bias, T *dx, int threads) {                                \
        bn_gelu_backward<T>(grad, p, where, N, H, W, C, pool, weight, bias, mean, invstd, grad_weight, grad_bias, \
                            dx, threads);                                                                        \
    }

CNNLAB_GELU_KERNELS(f32, float)
CNNLAB_GELU_KERNELS(bf16, uint16_t)

}  // extern "C"
