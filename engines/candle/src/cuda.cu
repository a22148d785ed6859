// The candle engine's forward pass on an NVIDIA GPU: compiled at run time by NVRTC for the card's
// architecture (see cuda.rs), so no CUDA toolkit is needed to build usine. No header is included:
// the half-precision conversion and the integer dot products are one PTX instruction each.
//
// Activations are rows of f32 (a row a token). Matrices are the graph's Q8_0 and Q4_0 layouts as the
// CPU kernels read them (kernel.rs): rows in groups of 4, each group's blocks interleaved (block 0
// of its four rows, then block 1, ...), an f16 scale per row and block, 32 quants per block (Q4_0:
// 16 bytes, low nibbles values 0..16, high nibbles 16..32, offset by 8; Q8_0 stored flipped by 0x80
// where the graph was written for the VNNI kernels).

typedef unsigned char u8;
typedef signed char i8;
typedef unsigned short u16;
typedef unsigned long long u64;

__device__ __forceinline__ float half_to_float(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ int dp4a(int a, int b, int c) {
    int d;
    asm("dp4a.s32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

__device__ __forceinline__ int warp_sum_int(int v) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
}

// The sum (or, `largest`, the maximum) of `v` over the block (at most 1024 threads), in every thread.
__device__ float block_reduce(float v, bool largest) {
    __shared__ float partial[32];
    __shared__ float total;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = largest ? warp_max(v) : warp_sum(v);
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    if (warp == 0) {
        float none = largest ? -3.402823466e38f : 0.0f;
        float w = lane < (int)((blockDim.x + 31) >> 5) ? partial[lane] : none;
        w = largest ? warp_max(w) : warp_sum(w);
        if (lane == 0) total = w;
    }
    __syncthreads();
    float result = total;
    __syncthreads();
    return result;
}

// out[r] = x[rows[r]] / sqrt(mean(x[rows[r]]²) + eps) × weight: a block a row (`rows` null: row r).
extern "C" __global__ void rms_norm(const float* x, const int* rows, const float* weight, float* out, int dim,
                                    float eps) {
    int source = rows ? rows[blockIdx.x] : blockIdx.x;
    const float* row = x + (size_t)source * dim;
    float* o = out + (size_t)blockIdx.x * dim;
    float sum = 0.0f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) sum += row[i] * row[i];
    sum = block_reduce(sum, false);
    float inverse = 1.0f / sqrtf(sum / (float)dim + eps);
    for (int i = threadIdx.x; i < dim; i += blockDim.x) o[i] = row[i] * inverse * weight[i];
}

// Each block of 32 values of x quantized as the CPU quantizes it (kernel.rs, `Quantized::new`): scale
// = largest magnitude / 127, quants rounded half away from zero; and each block's sum of quants. A
// warp a block.
extern "C" __global__ void quantize(const float* x, i8* quants, float* scales, int* sums, int blocks) {
    int block = (int)((blockIdx.x * blockDim.x + threadIdx.x) >> 5);
    int lane = threadIdx.x & 31;
    if (block >= blocks) return;
    float v = x[(size_t)block * 32 + lane];
    float largest = warp_max(fabsf(v));
    float scale = largest / 127.0f;
    float inverse = scale > 0.0f ? 1.0f / scale : 0.0f;
    float scaled = __fmul_rn(v, inverse);  // rounded before the add, as the CPU's (no fused multiply-add)
    int q = (int)(scaled + copysignf(0.5f, scaled));
    quants[(size_t)block * 32 + lane] = (i8)q;
    int sum = warp_sum_int(q);
    if (lane == 0) {
        scales[block] = scale;
        sums[block] = sum;
    }
}

// y[s][row] for NB vectors s of quantized x (`blocks` blocks a row): a warp a group of 4 rows, its
// lane l taking row l % 4 of blocks l / 4, l / 4 + 8, ...: the warp reads the group's bytes in order.
template <int NB, bool Q4>
__device__ void matmul(const u16* scales, const u8* quants, int flip, int rows, int blocks, const i8* xq,
                       const float* xd, const int* xs, float* y, int y_stride) {
    int group = (int)((blockIdx.x * blockDim.x + threadIdx.x) >> 5);
    int lane = threadIdx.x & 31;
    if (group * 4 >= rows) return;
    int row = lane & 3, sub = lane >> 2;
    const int bytes = Q4 ? 16 : 32;
    const u16* group_scales = scales + (size_t)group * blocks * 4;
    const u8* group_quants = quants + (size_t)group * blocks * 4 * bytes;
    float acc[NB];
#pragma unroll
    for (int s = 0; s < NB; s++) acc[s] = 0.0f;
    for (int b = sub; b < blocks; b += 8) {
        float weight_scale = half_to_float(group_scales[b * 4 + row]);
        const int4* w4 = (const int4*)(group_quants + ((size_t)b * 4 + row) * bytes);
        int w[8];
        if (Q4) {
            int4 raw = w4[0];
            int r[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
            for (int k = 0; k < 4; k++) {
                w[k] = r[k] & 0x0F0F0F0F;
                w[k + 4] = (r[k] >> 4) & 0x0F0F0F0F;
            }
        } else {
            int4 a = w4[0], c = w4[1];
            w[0] = a.x ^ flip; w[1] = a.y ^ flip; w[2] = a.z ^ flip; w[3] = a.w ^ flip;
            w[4] = c.x ^ flip; w[5] = c.y ^ flip; w[6] = c.z ^ flip; w[7] = c.w ^ flip;
        }
#pragma unroll
        for (int s = 0; s < NB; s++) {
            const int4* x4 = (const int4*)(xq + ((size_t)s * blocks + b) * 32);
            int4 xa = x4[0], xb = x4[1];
            int dot = dp4a(w[0], xa.x, 0);
            dot = dp4a(w[1], xa.y, dot);
            dot = dp4a(w[2], xa.z, dot);
            dot = dp4a(w[3], xa.w, dot);
            dot = dp4a(w[4], xb.x, dot);
            dot = dp4a(w[5], xb.y, dot);
            dot = dp4a(w[6], xb.z, dot);
            dot = dp4a(w[7], xb.w, dot);
            if (Q4) dot -= 8 * xs[(size_t)s * blocks + b];
            acc[s] += weight_scale * xd[(size_t)s * blocks + b] * (float)dot;
        }
    }
#pragma unroll
    for (int s = 0; s < NB; s++) {
        float v = acc[s];
        v += __shfl_xor_sync(0xffffffffu, v, 4);
        v += __shfl_xor_sync(0xffffffffu, v, 8);
        v += __shfl_xor_sync(0xffffffffu, v, 16);
        acc[s] = v;
    }
    int out = group * 4 + row;
    if (sub == 0 && out < rows) {
#pragma unroll
        for (int s = 0; s < NB; s++) y[(size_t)s * y_stride + out] = acc[s];
    }
}

#define MATMUL(NAME, NB, Q4)                                                                            \
    extern "C" __global__ void NAME(const u16* scales, const u8* quants, int flip, int rows, int blocks,  \
                                    const i8* xq, const float* xd, const int* xs, float* y, int y_stride) { \
        matmul<NB, Q4>(scales, quants, flip, rows, blocks, xq, xd, xs, y, y_stride);                    \
    }
MATMUL(matmul_q8_1, 1, false)
MATMUL(matmul_q8_2, 2, false)
MATMUL(matmul_q8_4, 4, false)
MATMUL(matmul_q8_8, 8, false)
MATMUL(matmul_q4_1, 1, true)
MATMUL(matmul_q4_2, 2, true)
MATMUL(matmul_q4_4, 4, true)
MATMUL(matmul_q4_8, 8, true)

// x[t][i] += y[t][i % width] for n values (a residual: width n; a bias: width of a row).
extern "C" __global__ void add(float* x, const float* y, int n, int width) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] += y[i % width];
}

// out[t][i] = silu(gate_up[t][i]) × gate_up[t][ffn + i].
extern "C" __global__ void silu_mul(const float* gate_up, float* out, int tokens, int ffn) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= tokens * ffn) return;
    int t = i / ffn, j = i % ffn;
    float gate = gate_up[(size_t)t * 2 * ffn + j], up = gate_up[(size_t)t * 2 * ffn + ffn + j];
    out[i] = gate / (1.0f + expf(-gate)) * up;
}

// A block a token: its query and key heads in `qkv` rotated by the token's angles (pairs 2i, 2i+1,
// or i, i + half), then its key and value heads written into its sequence's cache at its position.
// Caches: per layer and key-value head, `capacity` rows of `head_dim`.
extern "C" __global__ void rope_store(float* qkv, int qkv_dim, const float* cos, const float* sin, int heads,
                                      int kv_heads, int head_dim, int halves, const u64* keys, const u64* values,
                                      const int* capacity, const int* position, int layer) {
    int t = blockIdx.x;
    int half = head_dim / 2;
    float* row = qkv + (size_t)t * qkv_dim;
    const float* c = cos + (size_t)t * half;
    const float* s = sin + (size_t)t * half;
    int pairs = (heads + kv_heads) * half;
    for (int p = threadIdx.x; p < pairs; p += blockDim.x) {
        int head = p / half, i = p % half;
        float* h = row + head * head_dim;
        int a = halves ? i : 2 * i, b = halves ? i + half : 2 * i + 1;
        float x = h[a], y = h[b];
        h[a] = x * c[i] - y * s[i];
        h[b] = x * s[i] + y * c[i];
    }
    __syncthreads();
    int kv_dim = kv_heads * head_dim;
    size_t at = (size_t)position[t] * head_dim;
    size_t per_head = (size_t)capacity[t] * head_dim;
    float* key_cache = (float*)keys[t] + (size_t)layer * kv_heads * per_head;
    float* value_cache = (float*)values[t] + (size_t)layer * kv_heads * per_head;
    for (int i = threadIdx.x; i < kv_dim; i += blockDim.x) {
        int head = i / head_dim, d = i % head_dim;
        key_cache[head * per_head + at + d] = row[heads * head_dim + i];
        value_cache[head * per_head + at + d] = row[heads * head_dim + kv_dim + i];
    }
}

// A block a token and query head: its scores against the keys of positions 0..=position (a warp a
// position at a time), their softmax, and the weighted sum of the values. Scores go to `scratch`
// (`stride` floats a block).
extern "C" __global__ void attention(const float* qkv, int qkv_dim, float* out, const u64* keys, const u64* values,
                                     const int* capacity, const int* position, int layer, int heads, int kv_heads,
                                     int head_dim, float scale, float* scratch, int stride) {
    int t = blockIdx.x / heads, head = blockIdx.x % heads;
    int kv_head = head / (heads / kv_heads);
    int known = position[t] + 1;
    size_t per_head = (size_t)capacity[t] * head_dim;
    const float* k = (const float*)keys[t] + ((size_t)layer * kv_heads + kv_head) * per_head;
    const float* v = (const float*)values[t] + ((size_t)layer * kv_heads + kv_head) * per_head;
    const float* q = qkv + (size_t)t * qkv_dim + head * head_dim;
    float* scores = scratch + (size_t)blockIdx.x * stride;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    for (int p = warp; p < known; p += warps) {
        float dot = 0.0f;
        for (int d = lane; d < head_dim; d += 32) dot += q[d] * k[(size_t)p * head_dim + d];
        dot = warp_sum(dot);
        if (lane == 0) scores[p] = dot * scale;
    }
    __syncthreads();
    float largest = -3.402823466e38f;
    for (int p = threadIdx.x; p < known; p += blockDim.x) largest = fmaxf(largest, scores[p]);
    largest = block_reduce(largest, true);
    float sum = 0.0f;
    for (int p = threadIdx.x; p < known; p += blockDim.x) {
        float e = expf(scores[p] - largest);
        scores[p] = e;
        sum += e;
    }
    sum = block_reduce(sum, false);
    float inverse = 1.0f / sum;
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float acc = 0.0f;
        for (int p = 0; p < known; p++) acc += scores[p] * v[(size_t)p * head_dim + d];
        out[(size_t)t * heads * head_dim + head * head_dim + d] = acc * inverse;
    }
}
