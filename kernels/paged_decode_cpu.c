/* Decode attention straight from the paged KV pool, for CPU workers (float32).
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
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float dot(const float *a, const float *b, int64_t n) {
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t d = 0; d < n; ++d) sum += a[d] * b[d];
    return sum;
}

/* One sequence, KV heads [head, head + heads): their query heads (`group` per KV head, `nq` in all, packed in q
 * and out) over keys [first_key, seq_len). Walks the block table a block at a time (scores for the block, one
 * max/rescale, then its values), so the per-token work is a dot product and an axpy per query head with no index
 * arithmetic beyond a pointer step; with all heads of a sequence in one call each block is read front to back. */
static void attend_one(const float *q, const float *k_cache, const float *v_cache, const int64_t *table,
                       int64_t seq_len, int64_t first_key, int64_t head, int64_t heads, int64_t group,
                       int64_t num_kv_heads, int64_t head_dim, int64_t block_size, float scale, float *out,
                       float *scratch) {
    const int64_t nq = heads * group;
    /* scratch: acc [nq, head_dim], scores [nq, block_size], max [nq], sum [nq] */
    float *acc = scratch;
    float *scores = acc + nq * head_dim;
    float *run_max = scores + nq * block_size;
    float *run_sum = run_max + nq;
    const int64_t row_stride = num_kv_heads * head_dim; /* between consecutive tokens of a block */
    memset(acc, 0, sizeof(float) * nq * head_dim);
    for (int64_t g = 0; g < nq; ++g) {
        run_max[g] = -INFINITY;
        run_sum[g] = 0.0f;
    }
    for (int64_t block = first_key / block_size; block * block_size < seq_len; ++block) {
        const int64_t base = block * block_size;
        const int64_t lo = first_key > base ? first_key - base : 0;
        const int64_t hi = seq_len - base < block_size ? seq_len - base : block_size;
        const int64_t slot = table[block] * block_size * row_stride + head * head_dim;
        const float *k = k_cache + slot, *v = v_cache + slot;
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
int paged_decode_attention_f32(const float *q, int64_t q_row_stride, const float *k_cache, const float *v_cache,
                               const int64_t *rows,
                               const int64_t *block_tables, int64_t table_stride, const int64_t *seq_lens,
                               int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                               int64_t block_size, float scale, int64_t window, int num_threads, float *out) {
    const int64_t group = num_heads / num_kv_heads;
    /* A work item is a sequence with all its KV heads (each block read front to back), or one KV head of it when
     * there are too few sequences to keep the threads busy. */
    const int64_t heads = num_seqs >= 4 * num_threads ? num_kv_heads : 1;
    const int64_t items_per_seq = num_kv_heads / heads;
    const int64_t scratch_floats = heads * group * (head_dim + block_size + 2);
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
            attend_one(q + rows[i] * q_row_stride + head_offset, k_cache, v_cache, block_tables + i * table_stride,
                       seq_len, first_key, head, heads, group, num_kv_heads, head_dim, block_size, scale,
                       out + rows[i] * num_heads * head_dim + head_offset, scratch);
        }
        free(scratch);
    }
    return failed ? -1 : 0;
}
