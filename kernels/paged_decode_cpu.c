/* Decode attention straight from the paged KV pool, for CPU workers (float32 queries; a float32 pool, or a
 * quantised one of fp8 e4m3 / int8 codes with a float32 scale per row and KV head, see kernels/kv_quant.py).
 *
 * The torch path gathers every sequence's K/V out of the pool into a padded copy for each layer and step, then
 * runs a batched attention over it: the copy is written and read again, and short contexts are padded to the
 * longest of their group. Here each (sequence, KV head) pair walks its own block table once, reading every K and
 * V row exactly once, with an online softmax; the query heads of a GQA group share each row while it is in cache.
 *
 * Layout as in kernels/attention_reference.py: k_cache / v_cache are
 * [num_blocks, block_size, num_kv_heads, head_dim]; sequence i's query is row rows[i] of q [T, num_heads, head_dim]
 * (rows q_row_stride floats apart, heads packed) and its output goes to the same row of out (contiguous).
 * Built by kernels/native_build.py with the compiler's OpenMP, which resolves to the libgomp torch has loaded, so
 * it shares torch's thread pool instead of starting a second one.
 *
 * A quantised pool is dequantised a block at a time into scratch (code -> value through a 256-entry table, times
 * the row's scale, exactly as the torch reference computes it), and the float code below runs on that copy: the
 * pool is still read once, at a quarter of the bytes.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float dot(const float *a, const float *b, int64_t n) {
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t d = 0; d < n; ++d) sum += a[d] * b[d];
    return sum;
}

/* The layer's pool: float32 K/V, or codes with their scales [num_blocks, block_size, num_kv_heads]. */
typedef struct {
    const float *k, *v;
    const uint8_t *k_codes, *v_codes;
    const float *k_scales, *v_scales;
    const float *code_values; /* 256 entries: what each code byte stands for before scaling */
} kv_pool;

/* float32 value of an e4m3fn byte: 1 sign, 4 exponent (bias 7), 3 mantissa bits; no infinities, S.1111.111 NaN. */
static float e4m3_value(uint8_t bits) {
    const int exponent = (bits >> 3) & 0xF, mantissa = bits & 7;
    float magnitude;
    if (exponent == 15 && mantissa == 7)
        magnitude = NAN;
    else if (exponent == 0)
        magnitude = ldexpf((float)mantissa, -9); /* subnormal: mantissa / 8 * 2^-6 */
    else
        magnitude = ldexpf((float)(8 + mantissa), exponent - 10); /* (1 + mantissa / 8) * 2^(exponent - 7) */
    return bits & 0x80 ? -magnitude : magnitude;
}

/* Rows [lo, hi) of one block, KV heads [head, head + heads), as floats: dst [block_size, heads, head_dim]. */
static void dequantize_rows(const uint8_t *codes, const float *scales, const float *code_values, int64_t block_id,
                            int64_t lo, int64_t hi, int64_t head, int64_t heads, int64_t num_kv_heads,
                            int64_t head_dim, int64_t block_size, float *dst) {
    for (int64_t j = lo; j < hi; ++j)
        for (int64_t h = 0; h < heads; ++h) {
            const int64_t row = (block_id * block_size + j) * num_kv_heads + head + h;
            const uint8_t *src = codes + row * head_dim;
            const float scale = scales[row];
            float *out = dst + (j * heads + h) * head_dim;
            for (int64_t d = 0; d < head_dim; ++d) out[d] = code_values[src[d]] * scale;
        }
}

/* One sequence, KV heads [head, head + heads): their query heads (`group` per KV head, `nq` in all, packed in q
 * and out) over keys [first_key, seq_len). Walks the block table a block at a time (scores for the block, one
 * max/rescale, then its values), so the per-token work is a dot product and an axpy per query head with no index
 * arithmetic beyond a pointer step; with all heads of a sequence in one call each block is read front to back. */
static void attend_one(const float *q, const kv_pool *pool, const int64_t *table,
                       int64_t seq_len, int64_t first_key, int64_t head, int64_t heads, int64_t group,
                       int64_t num_kv_heads, int64_t head_dim, int64_t block_size, float scale, float *out,
                       float *scratch) {
    const int64_t nq = heads * group;
    /* scratch: acc [nq, head_dim], scores [nq, block_size], max [nq], sum [nq], then for a quantised pool the
     * block's K and V as floats [block_size, heads, head_dim] each */
    float *acc = scratch;
    float *scores = acc + nq * head_dim;
    float *run_max = scores + nq * block_size;
    float *run_sum = run_max + nq;
    float *k_block = run_sum + nq;
    float *v_block = k_block + block_size * heads * head_dim;
    /* between consecutive tokens of a block: in the pool, or in the dequantised copy */
    const int64_t row_stride = pool->k != NULL ? num_kv_heads * head_dim : heads * head_dim;
    memset(acc, 0, sizeof(float) * nq * head_dim);
    for (int64_t g = 0; g < nq; ++g) {
        run_max[g] = -INFINITY;
        run_sum[g] = 0.0f;
    }
    for (int64_t block = first_key / block_size; block * block_size < seq_len; ++block) {
        const int64_t base = block * block_size;
        const int64_t lo = first_key > base ? first_key - base : 0;
        const int64_t hi = seq_len - base < block_size ? seq_len - base : block_size;
        const float *k = k_block, *v = v_block;
        if (pool->k != NULL) {
            const int64_t slot = table[block] * block_size * row_stride + head * head_dim;
            k = pool->k + slot;
            v = pool->v + slot;
        } else {
            dequantize_rows(pool->k_codes, pool->k_scales, pool->code_values, table[block], lo, hi, head, heads,
                            num_kv_heads, head_dim, block_size, k_block);
            dequantize_rows(pool->v_codes, pool->v_scales, pool->code_values, table[block], lo, hi, head, heads,
                            num_kv_heads, head_dim, block_size, v_block);
        }
        for (int64_t j = lo; j < hi; ++j)
            for (int64_t g = 0; g < nq; ++g)
                scores[g * block_size + j] = dot(q + g * head_dim, k + j * row_stride + g / group * head_dim, head_dim) * scale;
        for (int64_t g = 0; g < nq; ++g) {
            float *s = scores + g * block_size;
            float block_max = run_max[g];
            for (int64_t j = lo; j < hi; ++j) block_max = s[j] > block_max ? s[j] : block_max;
            const float correction = expf(run_max[g] - block_max); /* exp(-inf) = 0 on the first block */
            float block_sum = 0.0f;
#pragma omp simd reduction(+ : block_sum)
            for (int64_t j = lo; j < hi; ++j) {
                s[j] = expf(s[j] - block_max);
                block_sum += s[j];
            }
            run_sum[g] = run_sum[g] * correction + block_sum;
            run_max[g] = block_max;
            float *a = acc + g * head_dim;
#pragma omp simd
            for (int64_t d = 0; d < head_dim; ++d) a[d] *= correction;
        }
        for (int64_t j = lo; j < hi; ++j) {
            for (int64_t g = 0; g < nq; ++g) {
                const float p = scores[g * block_size + j];
                const float *v_row = v + j * row_stride + g / group * head_dim;
                float *a = acc + g * head_dim;
#pragma omp simd
                for (int64_t d = 0; d < head_dim; ++d) a[d] += p * v_row[d];
            }
        }
    }
    for (int64_t g = 0; g < nq; ++g) {
        const float inv = run_sum[g] > 0.0f ? 1.0f / run_sum[g] : 0.0f; /* no keys (seq_len 0): 0, as the reference */
        for (int64_t d = 0; d < head_dim; ++d) out[g * head_dim + d] = acc[g * head_dim + d] * inv;
    }
}

/* window: a query sees keys less than `window` positions behind it (0: no window). Returns 0, or -1 when the
 * scratch memory could not be allocated (the caller then falls back to the torch path). */
static int paged_decode(const float *q, int64_t q_row_stride, const kv_pool *pool, const int64_t *rows,
                        const int64_t *block_tables, int64_t table_stride, const int64_t *seq_lens, int64_t num_seqs,
                        int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t block_size, float scale,
                        int64_t window, int num_threads, float *out) {
    const int64_t group = num_heads / num_kv_heads;
    /* A work item is a sequence with all its KV heads (each block read front to back), or one KV head of it when
     * there are too few sequences to keep the threads busy. */
    const int64_t heads = num_seqs >= 4 * num_threads ? num_kv_heads : 1;
    const int64_t items_per_seq = num_kv_heads / heads;
    const int64_t dequantized = pool->k != NULL ? 0 : 2 * block_size * heads * head_dim;
    const int64_t scratch_floats = heads * group * (head_dim + block_size + 2) + dequantized;
    int failed = 0;
#pragma omp parallel num_threads(num_threads)
    {
        float *scratch = malloc(sizeof(float) * scratch_floats);
        if (scratch == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t work = 0; work < num_seqs * items_per_seq; ++work) {
            if (scratch == NULL) continue;
            const int64_t i = work / items_per_seq, head = work % items_per_seq * heads;
            const int64_t seq_len = seq_lens[i];
            const int64_t first_key = window > 0 && seq_len > window ? seq_len - window : 0;
            const int64_t head_offset = head * group * head_dim;
            attend_one(q + rows[i] * q_row_stride + head_offset, pool, block_tables + i * table_stride,
                       seq_len, first_key, head, heads, group, num_kv_heads, head_dim, block_size, scale,
                       out + rows[i] * num_heads * head_dim + head_offset, scratch);
        }
        free(scratch);
    }
    return failed ? -1 : 0;
}

int paged_decode_attention_f32(const float *q, int64_t q_row_stride, const float *k_cache, const float *v_cache,
                               const int64_t *rows,
                               const int64_t *block_tables, int64_t table_stride, const int64_t *seq_lens,
                               int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                               int64_t block_size, float scale, int64_t window, int num_threads, float *out) {
    const kv_pool pool = {k_cache, v_cache, NULL, NULL, NULL, NULL, NULL};
    return paged_decode(q, q_row_stride, &pool, rows, block_tables, table_stride, seq_lens, num_seqs, num_heads,
                        num_kv_heads, head_dim, block_size, scale, window, num_threads, out);
}

/* The same over a quantised pool: code_kind 0 for fp8 e4m3fn codes, 1 for int8; scales as the pool's rows. */
int paged_decode_attention_q8(const float *q, int64_t q_row_stride, const uint8_t *k_codes, const uint8_t *v_codes,
                              const float *k_scales, const float *v_scales, int code_kind, const int64_t *rows,
                              const int64_t *block_tables, int64_t table_stride, const int64_t *seq_lens,
                              int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                              int64_t block_size, float scale, int64_t window, int num_threads, float *out) {
    float code_values[256];
    for (int c = 0; c < 256; ++c) code_values[c] = code_kind == 0 ? e4m3_value((uint8_t)c) : (float)(int8_t)c;
    const kv_pool pool = {NULL, NULL, k_codes, v_codes, k_scales, v_scales, code_values};
    return paged_decode(q, q_row_stride, &pool, rows, block_tables, table_stride, seq_lens, num_seqs, num_heads,
                        num_kv_heads, head_dim, block_size, scale, window, num_threads, out);
}
