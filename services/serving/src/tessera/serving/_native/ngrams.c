/* N-gram lookup for the serving featurizers: UTF-32 n-grams of a batch of documents
 * looked up in an open-addressing table of a vocabulary, counted per document (CSR out).
 * Built by tessera.serving.native with gcc at run time; called through ctypes (GIL released). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    const uint32_t *chars;   /* all terms, concatenated (UTF-32) */
    const int64_t *offsets;  /* term i = chars[offsets[i] : offsets[i+1]] */
    int64_t n_terms;
    int64_t mask;            /* slots - 1 (a power of two) */
    int32_t *slots;          /* term index or -1 */
    uint32_t *hashes;        /* high half of the hash of the term in each slot (the low bits chose the slot) */
} table_t;

static inline uint64_t hash32(const uint32_t *s, int64_t n) {
    uint64_t h = 1469598103934665603ULL;
    for (int64_t i = 0; i < n; i++) { h ^= s[i]; h *= 1099511628211ULL; h ^= h >> 29; }
    return h ? h : 1;
}

void *table_build(const uint32_t *chars, const int64_t *offsets, int64_t n_terms) {
    table_t *t = (table_t *)calloc(1, sizeof(table_t));
    if (!t) return NULL;
    int64_t size = 16;
    while (size < 2 * n_terms + 16) size <<= 1;
    t->chars = chars; t->offsets = offsets; t->n_terms = n_terms; t->mask = size - 1;
    t->slots = (int32_t *)malloc(sizeof(int32_t) * size);
    t->hashes = (uint32_t *)calloc(size, sizeof(uint32_t));
    if (!t->slots || !t->hashes) { free(t->slots); free(t->hashes); free(t); return NULL; }
    memset(t->slots, 0xff, sizeof(int32_t) * size);
    for (int64_t i = 0; i < n_terms; i++) {
        const uint32_t *s = chars + offsets[i];
        int64_t n = offsets[i + 1] - offsets[i];
        uint64_t h = hash32(s, n);
        int64_t j = (int64_t)(h & t->mask);
        while (t->slots[j] >= 0) j = (j + 1) & t->mask;
        t->slots[j] = (int32_t)i; t->hashes[j] = (uint32_t)(h >> 32);
    }
    return t;
}

int64_t table_bytes(void *tp) { table_t *t = (table_t *)tp; return (t->mask + 1) * (int64_t)(sizeof(int32_t) + sizeof(uint32_t)); }

void table_free(void *tp) {
    table_t *t = (table_t *)tp;
    if (!t) return;
    free(t->slots); free(t->hashes); free(t);
}

static inline int32_t lookup(const table_t *t, const uint32_t *s, int64_t n) {
    uint64_t h = hash32(s, n);
    uint32_t hi = (uint32_t)(h >> 32);
    int64_t j = (int64_t)(h & t->mask);
    for (;;) {
        int32_t k = t->slots[j];
        if (k < 0) return -1;
        if (t->hashes[j] == hi) {
            int64_t o = t->offsets[k], m = t->offsets[k + 1] - o;
            if (m == n && memcmp(t->chars + o, s, sizeof(uint32_t) * n) == 0) return k;
        }
        j = (j + 1) & t->mask;
    }
}

/* Count one found term: mark[] remembers the document in which a term was last seen
 * and pos[] where its count lives, so the output needs no sort. */
static inline void hit(int32_t k, int32_t doc, int32_t *mark, int32_t *pos, int32_t *indices,
                       double *counts, int64_t *nnz) {
    if (mark[k] != doc) { mark[k] = doc; pos[k] = (int32_t)*nnz; indices[*nnz] = k; counts[*nnz] = 1.0; (*nnz)++; }
    else counts[pos[k]] += 1.0;
}

/* Character n-grams (n_min..n_max) of each document buf[doc_off[d]:doc_off[d+1]].
 * indptr has n_docs+1 entries; indices/counts hold at most cap entries.
 * mark/pos: scratch of n_terms entries each, mark initialised to -1 by the caller; doc_base + n_docs and cap
 * stay below 2^31 (the caller splits larger batches).
 * Returns nnz, or -1 if cap was too small. */
int64_t char_ngrams(void *tp, const uint32_t *buf, const int64_t *doc_off, int64_t n_docs, int64_t n_min,
                    int64_t n_max, int64_t *indptr, int32_t *indices, double *counts, int64_t cap,
                    int32_t *mark, int32_t *pos, int64_t doc_base) {
    const table_t *t = (const table_t *)tp;
    int64_t nnz = 0;
    indptr[0] = 0;
    for (int64_t d = 0; d < n_docs; d++) {
        const uint32_t *s = buf + doc_off[d];
        int64_t len = doc_off[d + 1] - doc_off[d];
        for (int64_t n = n_min; n <= n_max; n++) {
            for (int64_t i = 0; i + n <= len; i++) {
                int32_t k = lookup(t, s + i, n);
                if (k >= 0) { if (nnz >= cap) return -1; hit(k, (int32_t)(doc_base + d), mark, pos, indices, counts, &nnz); }
            }
        }
        indptr[d + 1] = nnz;
    }
    return nnz;
}

/* Word n-grams: the tokens of document d are tok_start/tok_end[tok_off[d] : tok_off[d+1]],
 * positions in buf where they are joined by single spaces, so tokens i..j form the
 * contiguous span buf[tok_start[i] : tok_end[j]]. */
int64_t word_ngrams(void *tp, const uint32_t *buf, const int64_t *tok_start, const int64_t *tok_end,
                    const int64_t *tok_off, int64_t n_docs, int64_t n_min, int64_t n_max, int64_t *indptr,
                    int32_t *indices, double *counts, int64_t cap, int32_t *mark, int32_t *pos, int64_t doc_base) {
    const table_t *t = (const table_t *)tp;
    int64_t nnz = 0;
    indptr[0] = 0;
    for (int64_t d = 0; d < n_docs; d++) {
        int64_t a = tok_off[d], b = tok_off[d + 1];
        for (int64_t n = n_min; n <= n_max; n++) {
            for (int64_t i = a; i + n <= b; i++) {
                int64_t st = tok_start[i], en = tok_end[i + n - 1];
                int32_t k = lookup(t, buf + st, en - st);
                if (k >= 0) { if (nnz >= cap) return -1; hit(k, (int32_t)(doc_base + d), mark, pos, indices, counts, &nnz); }
            }
        }
        indptr[d + 1] = nnz;
    }
    return nnz;
}
