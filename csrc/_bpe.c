/*
 * _bpe: the hot loops of bpe.py in C, with the same results as the Python code there.
 *
 *   train_merges(chunks, counts, num_merges) -> [(a, b), ...]
 *       chunks: list of bytes (unique pre-split chunks), counts: how often each occurs.
 *   Encoder(merges)
 *       .encode_chunks(chunks) -> [ids]   chunks: list of bytes, already pre-split
 *       .encode_text(text) -> [ids] | None   pre-splits with SPLIT_PATTERN itself;
 *                                            None if text has lone surrogates
 *   ChunkCounter()
 *       .add(text) -> bool                   pre-split text, count its chunks; False (and
 *                                            nothing counted) if text has lone surrogates
 *       .counts() -> {chunk bytes: count}
 *   split(text) -> [str] | None              the C pre-split alone (for tests)
 *   char_classes() -> bytes                  class of every code point (for tests)
 *   SPLIT_PATTERN                            the pattern the C pre-split implements
 *
 * Texts with lone surrogates cannot be turned into UTF-8, so the pre-split here leaves them
 * to the regex module; everything else the pre-split sees is valid UTF-8.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pythread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "_bpe_tables.h"

#define SPLIT_PATTERN_TEXT \
    "'(?i:[sdmt]|ll|ve|re)|[^\\r\\n\\p{L}\\p{N}]?+\\p{L}+|\\p{N}{1,2}| ?[^\\s\\p{L}\\p{N}]++[\\r\\n]*" \
    "|\\s*[\\r\\n]|\\s+(?!\\S)|\\s+"

/* ------------------------------------------------------------------------------------------
 * Small helpers: growable arrays and hashing. */

/* make room for `need` items of `size` bytes in *buf (capacity *cap); 0 or -1 (no memory) */
static int grow(void **buf, size_t *cap, size_t need, size_t size)
{
    if (need <= *cap)
        return 0;
    size_t cap2 = *cap ? *cap : 16;
    while (cap2 < need)
        cap2 *= 2;
    void *p = realloc(*buf, cap2 * size);
    if (p == NULL)
        return -1;
    *buf = p;
    *cap = cap2;
    return 0;
}

typedef struct {
    int32_t *v;
    size_t n, cap;
} IntVec;

static inline int intvec_push(IntVec *x, int32_t value)
{
    if (x->n == x->cap && grow((void **)&x->v, &x->cap, x->n + 1, sizeof(int32_t)))
        return -1;
    x->v[x->n++] = value;
    return 0;
}

static inline uint64_t mix64(uint64_t h)
{
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdULL;
    h ^= h >> 33;
    h *= 0xc4ceb9fe1a85ec53ULL;
    h ^= h >> 33;
    return h;
}

static uint64_t hash_bytes(const unsigned char *s, size_t n)
{
    uint64_t h = 0x9e3779b97f4a7c15ULL ^ ((uint64_t)n * 0x100000001b3ULL);
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, s, 8);
        h = (h ^ w) * 0x9fb21c651e98df25ULL;
        h ^= h >> 29;
        s += 8;
        n -= 8;
    }
    if (n) {
        uint64_t w = 0;
        memcpy(&w, s, n);
        h = (h ^ w) * 0x9fb21c651e98df25ULL;
    }
    return mix64(h);
}

/* ------------------------------------------------------------------------------------------
 * A hash table from byte strings to a 64-bit value (plus a 32-bit extra). The strings are
 * copied into one arena. Used to count chunks and as the encoder's chunk cache. */

typedef struct {
    uint64_t hash;
    size_t off; /* the key is arena[off : off + len] */
    uint32_t len;
    uint32_t extra;
    int64_t value;
} StrEntry;

typedef struct {
    uint32_t *slots; /* 0: empty, else index of the entry + 1 */
    size_t mask;
    StrEntry *entries;
    size_t n, cap;
    unsigned char *arena;
    size_t arena_len, arena_cap;
} StrTable;

static int strtab_init(StrTable *t)
{
    memset(t, 0, sizeof(*t));
    t->mask = 1023;
    t->slots = calloc(t->mask + 1, sizeof(uint32_t));
    return t->slots ? 0 : -1;
}

static void strtab_free(StrTable *t)
{
    free(t->slots);
    free(t->entries);
    free(t->arena);
    memset(t, 0, sizeof(*t));
}

static int strtab_rehash(StrTable *t)
{
    size_t size = (t->mask + 1) * 2;
    uint32_t *slots = calloc(size, sizeof(uint32_t));
    if (slots == NULL)
        return -1;
    for (size_t i = 0; i < t->n; i++) {
        size_t pos = t->entries[i].hash & (size - 1);
        while (slots[pos])
            pos = (pos + 1) & (size - 1);
        slots[pos] = (uint32_t)(i + 1);
    }
    free(t->slots);
    t->slots = slots;
    t->mask = size - 1;
    return 0;
}

/* index of the entry for s[0:len], or -1 if absent and !add; with add, a missing key is
 * added with value 0 and extra 0. -2: out of memory. */
static Py_ssize_t strtab_lookup(StrTable *t, const unsigned char *s, size_t len, uint64_t h, int add)
{
    size_t pos = h & t->mask;
    for (;;) {
        uint32_t slot = t->slots[pos];
        if (slot == 0)
            break;
        StrEntry *e = &t->entries[slot - 1];
        if (e->hash == h && e->len == len && memcmp(t->arena + e->off, s, len) == 0)
            return slot - 1;
        pos = (pos + 1) & t->mask;
    }
    if (!add)
        return -1;
    if (t->n >= UINT32_MAX - 1 || len > UINT32_MAX)
        return -2;
    if (grow((void **)&t->entries, &t->cap, t->n + 1, sizeof(StrEntry)) ||
        grow((void **)&t->arena, &t->arena_cap, t->arena_len + len, 1))
        return -2;
    memcpy(t->arena + t->arena_len, s, len);
    StrEntry *e = &t->entries[t->n];
    e->hash = h;
    e->off = t->arena_len;
    e->len = (uint32_t)len;
    e->extra = 0;
    e->value = 0;
    t->arena_len += len;
    t->slots[pos] = (uint32_t)(t->n + 1);
    t->n++;
    if (t->n * 2 > t->mask + 1 && strtab_rehash(t))
        return -2;
    return (Py_ssize_t)(t->n - 1);
}

/* ------------------------------------------------------------------------------------------
 * A hash table from a pair of ids (a, b) to an int32 value >= 0. */

#define NO_KEY UINT64_MAX

typedef struct {
    uint64_t *keys;
    int32_t *values;
    size_t mask, n;
} PairMap;

static inline uint64_t pair_key(int32_t a, int32_t b)
{
    return ((uint64_t)(uint32_t)a << 32) | (uint32_t)b;
}

static int pairmap_alloc(PairMap *m, size_t size)
{
    m->keys = malloc(size * sizeof(uint64_t));
    m->values = malloc(size * sizeof(int32_t));
    if (m->keys == NULL || m->values == NULL) {
        free(m->keys);
        free(m->values);
        m->keys = NULL;
        m->values = NULL;
        return -1;
    }
    memset(m->keys, 0xff, size * sizeof(uint64_t)); /* every key NO_KEY */
    m->mask = size - 1;
    m->n = 0;
    return 0;
}

static void pairmap_free(PairMap *m)
{
    free(m->keys);
    free(m->values);
    m->keys = NULL;
    m->values = NULL;
}

static inline int32_t pairmap_get(const PairMap *m, uint64_t key)
{
    size_t pos = mix64(key) & m->mask;
    for (;;) {
        uint64_t k = m->keys[pos];
        if (k == key)
            return m->values[pos];
        if (k == NO_KEY)
            return -1;
        pos = (pos + 1) & m->mask;
    }
}

static int pairmap_grow(PairMap *m)
{
    PairMap bigger;
    if (pairmap_alloc(&bigger, (m->mask + 1) * 2))
        return -1;
    for (size_t i = 0; i <= m->mask; i++) {
        if (m->keys[i] == NO_KEY)
            continue;
        size_t pos = mix64(m->keys[i]) & bigger.mask;
        while (bigger.keys[pos] != NO_KEY)
            pos = (pos + 1) & bigger.mask;
        bigger.keys[pos] = m->keys[i];
        bigger.values[pos] = m->values[i];
    }
    bigger.n = m->n;
    pairmap_free(m);
    *m = bigger;
    return 0;
}

/* the value stored for key; if absent, store `value` and return it. -1: out of memory */
static int32_t pairmap_get_or_put(PairMap *m, uint64_t key, int32_t value, int overwrite)
{
    if ((m->n + 1) * 2 > m->mask + 1 && pairmap_grow(m))
        return -1;
    size_t pos = mix64(key) & m->mask;
    for (;;) {
        uint64_t k = m->keys[pos];
        if (k == key) {
            if (overwrite)
                m->values[pos] = value;
            return m->values[pos];
        }
        if (k == NO_KEY)
            break;
        pos = (pos + 1) & m->mask;
    }
    m->keys[pos] = key;
    m->values[pos] = value;
    m->n++;
    return value;
}

/* ------------------------------------------------------------------------------------------
 * The pre-split: SPLIT_PATTERN by hand, on valid UTF-8. */

enum { OTHER = 0, LETTER = 1, NUMBER = 2, SPACE = 3 };

static inline int class_of(uint32_t cp)
{
    return bpe_class_rows[bpe_block_of[cp >> BPE_CLASS_SHIFT]][cp & ((1u << BPE_CLASS_SHIFT) - 1)];
}

/* the code point that starts at s[i] and its length in bytes */
static inline uint32_t utf8_at(const unsigned char *s, Py_ssize_t i, int *len)
{
    unsigned c = s[i];
    if (c < 0x80) {
        *len = 1;
        return c;
    }
    if (c < 0xE0) {
        *len = 2;
        return ((c & 0x1Fu) << 6) | (s[i + 1] & 0x3Fu);
    }
    if (c < 0xF0) {
        *len = 3;
        return ((c & 0x0Fu) << 12) | ((s[i + 1] & 0x3Fu) << 6) | (s[i + 2] & 0x3Fu);
    }
    *len = 4;
    return ((c & 0x07u) << 18) | ((s[i + 1] & 0x3Fu) << 12) | ((s[i + 2] & 0x3Fu) << 6) |
           (s[i + 3] & 0x3Fu);
}

static inline int class_at(const unsigned char *s, Py_ssize_t i, int *len)
{
    if (s[i] < 0x80) {
        *len = 1;
        return bpe_class_rows[0][s[i]]; /* row 0 is the row of code points 0..127 */
    }
    return class_of(utf8_at(s, i, len));
}

/* the end of the run of letters from s[i] */
static Py_ssize_t letters_end(const unsigned char *s, Py_ssize_t n, Py_ssize_t i)
{
    int len;
    while (i < n && class_at(s, i, &len) == LETTER)
        i += len;
    return i;
}

/* the end of [^\s\p{L}\p{N}]*[\r\n]* from s[i] */
static Py_ssize_t others_end(const unsigned char *s, Py_ssize_t n, Py_ssize_t i)
{
    int len;
    while (i < n && class_at(s, i, &len) == OTHER)
        i += len;
    while (i < n && (s[i] == '\r' || s[i] == '\n'))
        i++;
    return i;
}

/* The end of the chunk that SPLIT_PATTERN matches at s[i], i < n. The alternatives, in the
 * order the regex tries them:
 *   1 '(?i:[sdmt]|ll|ve|re)     2 [^\r\n\p{L}\p{N}]?+\p{L}+     3 \p{N}{1,2}
 *   4  ?[^\s\p{L}\p{N}]++[\r\n]*     5 \s*[\r\n]     6 \s+(?!\S)     7 \s+
 * One of them always matches, and never with an empty match. */
static Py_ssize_t split_next(const unsigned char *s, Py_ssize_t n, Py_ssize_t i)
{
    int len0, len1;
    unsigned c0 = s[i];
    int k0 = class_at(s, i, &len0);
    Py_ssize_t j = i + len0; /* just after the first character */

    if (c0 == '\'' && j < n) { /* 1; case-insensitively, s also matches U+017F (long s) */
        uint32_t c1 = utf8_at(s, j, &len1);
        if (c1 < 0x80)
            c1 |= 0x20; /* ASCII lower case, enough to compare with lower-case letters */
        if (c1 == 's' || c1 == 'd' || c1 == 'm' || c1 == 't' || c1 == 0x17F)
            return j + len1;
        if (j + 1 < n) {
            unsigned c2 = s[j + 1] | 0x20u;
            if ((c1 == 'l' && c2 == 'l') || (c1 == 'v' && c2 == 'e') || (c1 == 'r' && c2 == 'e'))
                return j + 2;
        }
    }
    if (k0 == LETTER) /* 2, without the optional first character */
        return letters_end(s, n, j);
    if (k0 != NUMBER && c0 != '\r' && c0 != '\n' && j < n && class_at(s, j, &len1) == LETTER)
        return letters_end(s, n, j + len1); /* 2, with it */
    if (k0 == NUMBER) { /* 3 */
        if (j < n && class_at(s, j, &len1) == NUMBER)
            return j + len1;
        return j;
    }
    if (k0 == OTHER) /* 4, without the space */
        return others_end(s, n, j);
    if (c0 == ' ' && j < n && class_at(s, j, &len1) == OTHER) /* 4, with it */
        return others_end(s, n, j + len1);

    /* s[i] is whitespace: 5, 6 and 7 all look at the run of whitespace from i */
    Py_ssize_t after_newline = -1, last = i, k = i;
    while (k < n) {
        int len;
        if (class_at(s, k, &len) != SPACE)
            break;
        if (s[k] == '\r' || s[k] == '\n')
            after_newline = k + 1;
        last = k;
        k += len;
    }
    if (after_newline >= 0) /* 5: up to the run's last \r or \n */
        return after_newline;
    if (k == n || last == i) /* 6 at the end of the text, or 7 for a single character */
        return k;
    return last; /* 6: leave the last whitespace character to the chunk that follows */
}

/* UTF-8 of a str, or NULL with no exception set if it has lone surrogates */
static const unsigned char *utf8_or_null(PyObject *text, Py_ssize_t *n)
{
    const char *s = PyUnicode_AsUTF8AndSize(text, n);
    if (s == NULL && PyErr_ExceptionMatches(PyExc_UnicodeEncodeError))
        PyErr_Clear();
    return (const unsigned char *)s;
}

/* ------------------------------------------------------------------------------------------
 * Training */

typedef struct {
    int64_t count; /* total over all words */
    int32_t a, b;
    int32_t *words; /* indices of words that contain the pair, or once did */
    uint32_t nwords, capwords;
    int32_t fresh_in; /* the merge that last created this pair */
} PairInfo;

typedef struct {
    int64_t count; /* the pair's count when pushed; only ever >= its current count */
    int32_t a, b;
} HeapItem;

typedef struct {
    /* words: the unique chunks with at least two ids, each a slice of ids */
    int32_t *ids;
    size_t *off;
    uint32_t *len;
    int64_t *cnt;
    size_t nwords;
    /* every pair seen so far */
    PairMap index; /* (a, b) -> index into pairs */
    PairInfo *pairs;
    size_t npairs, cap_pairs;
    /* max-heap: highest count, then smallest a, then smallest b */
    HeapItem *heap;
    size_t nheap, cap_heap;
    IntVec fresh; /* pairs created by the current merge */
} Trainer;

static inline int heap_before(const HeapItem *x, const HeapItem *y)
{
    if (x->count != y->count)
        return x->count > y->count;
    if (x->a != y->a)
        return x->a < y->a;
    return x->b < y->b;
}

static void heap_sift_down(HeapItem *h, size_t n, size_t i)
{
    HeapItem item = h[i];
    for (;;) {
        size_t child = 2 * i + 1;
        if (child >= n)
            break;
        if (child + 1 < n && heap_before(&h[child + 1], &h[child]))
            child++;
        if (!heap_before(&h[child], &item))
            break;
        h[i] = h[child];
        i = child;
    }
    h[i] = item;
}

static int heap_push(Trainer *t, int64_t count, int32_t a, int32_t b)
{
    if (grow((void **)&t->heap, &t->cap_heap, t->nheap + 1, sizeof(HeapItem)))
        return -1;
    HeapItem item = {count, a, b};
    size_t i = t->nheap++;
    while (i > 0) {
        size_t parent = (i - 1) / 2;
        if (!heap_before(&item, &t->heap[parent]))
            break;
        t->heap[i] = t->heap[parent];
        i = parent;
    }
    t->heap[i] = item;
    return 0;
}

static void heap_pop(Trainer *t)
{
    t->heap[0] = t->heap[--t->nheap];
    if (t->nheap)
        heap_sift_down(t->heap, t->nheap, 0);
}

/* index of pair (a, b), created with count 0 if new; -1: out of memory */
static int32_t pair_index(Trainer *t, int32_t a, int32_t b)
{
    if (t->npairs >= INT32_MAX)
        return -1;
    int32_t p = pairmap_get_or_put(&t->index, pair_key(a, b), (int32_t)t->npairs, 0);
    if (p < 0)
        return -1;
    if ((size_t)p == t->npairs) {
        if (grow((void **)&t->pairs, &t->cap_pairs, t->npairs + 1, sizeof(PairInfo)))
            return -1;
        PairInfo *info = &t->pairs[p];
        memset(info, 0, sizeof(*info));
        info->a = a;
        info->b = b;
        info->fresh_in = -1;
        t->npairs++;
    }
    return p;
}

/* note that word w contains pair p (the last entry is checked, which catches every repeat:
 * a pair only gains words in the merge that creates it, one word after the other) */
static int pair_add_word(PairInfo *info, int32_t w)
{
    if (info->nwords && info->words[info->nwords - 1] == w)
        return 0;
    if (info->nwords == info->capwords) { /* most pairs are in a few words: start small */
        uint32_t cap = info->capwords ? 2 * info->capwords : 2;
        int32_t *words = cap > info->capwords ? realloc(info->words, (size_t)cap * sizeof(int32_t)) : NULL;
        if (words == NULL)
            return -1;
        info->words = words;
        info->capwords = cap;
    }
    info->words[info->nwords++] = w;
    return 0;
}

/* the count of (a, b) in word w changes by delta; pairs that gain are new in this merge */
static int change_pair(Trainer *t, int32_t a, int32_t b, int64_t delta, int32_t w, int32_t merge)
{
    int32_t p = pair_index(t, a, b);
    if (p < 0)
        return -1;
    PairInfo *info = &t->pairs[p];
    info->count += delta;
    if (delta > 0) {
        if (pair_add_word(info, w))
            return -1;
        if (info->fresh_in != merge) {
            info->fresh_in = merge;
            if (intvec_push(&t->fresh, p))
                return -1;
        }
    }
    return 0;
}

/* replace (a, b) by c in word w, left to right, and update the counts of neighbouring pairs.
 * The count of (a, b) itself is not kept up to date here (the caller zeroes it). */
static int merge_word(Trainer *t, int32_t w, int32_t a, int32_t b, int32_t c, int32_t merge)
{
    int32_t *ids = t->ids + t->off[w];
    uint32_t n = t->len[w], i = 0, j = 0;
    int64_t k = t->cnt[w];
    while (i < n) {
        if (i + 1 < n && ids[i] == a && ids[i + 1] == b) {
            if (j > 0) { /* the token before: (x, a) becomes (x, c); x may be an earlier c */
                int32_t x = ids[j - 1];
                if (change_pair(t, x, a, -k, w, merge) || change_pair(t, x, c, k, w, merge))
                    return -1;
            }
            if (i + 2 < n) { /* the token after: (b, y) becomes (c, y) */
                int32_t y = ids[i + 2];
                if (change_pair(t, b, y, -k, w, merge) || change_pair(t, c, y, k, w, merge))
                    return -1;
            }
            ids[j++] = c;
            i += 2;
        } else {
            ids[j++] = ids[i++];
        }
    }
    t->len[w] = j;
    return 0;
}

static void trainer_free(Trainer *t)
{
    free(t->ids);
    free(t->off);
    free(t->len);
    free(t->cnt);
    pairmap_free(&t->index);
    for (size_t p = 0; p < t->npairs; p++)
        free(t->pairs[p].words);
    free(t->pairs);
    free(t->heap);
    free(t->fresh.v);
}

/* count the pairs of all words and fill the heap; -1: out of memory */
static int trainer_start(Trainer *t)
{
    for (size_t w = 0; w < t->nwords; w++) {
        const int32_t *ids = t->ids + t->off[w];
        for (uint32_t i = 0; i + 1 < t->len[w]; i++) {
            int32_t p = pair_index(t, ids[i], ids[i + 1]);
            if (p < 0 || pair_add_word(&t->pairs[p], (int32_t)w))
                return -1;
            t->pairs[p].count += t->cnt[w];
        }
    }
    if (grow((void **)&t->heap, &t->cap_heap, t->npairs + 1, sizeof(HeapItem)))
        return -1;
    for (size_t p = 0; p < t->npairs; p++) {
        if (t->pairs[p].count > 0) {
            HeapItem item = {t->pairs[p].count, t->pairs[p].a, t->pairs[p].b};
            t->heap[t->nheap++] = item;
        }
    }
    for (size_t i = t->nheap / 2; i-- > 0;)
        heap_sift_down(t->heap, t->nheap, i);
    return 0;
}

/* learn up to num_merges merges into out (pairs a, b); returns how many, or -1 */
static Py_ssize_t trainer_run(Trainer *t, Py_ssize_t num_merges, int32_t *out)
{
    Py_ssize_t merges = 0;
    while (merges < num_merges && t->nheap > 0) {
        HeapItem top = t->heap[0];
        int32_t p = pairmap_get(&t->index, pair_key(top.a, top.b));
        int64_t now = t->pairs[p].count;
        if (now != top.count) { /* stale: counts only go down, so push it back with its count */
            if (now > 0) {
                t->heap[0].count = now;
                heap_sift_down(t->heap, t->nheap, 0);
            } else {
                heap_pop(t);
            }
            continue;
        }
        heap_pop(t);
        int32_t c = (int32_t)(256 + merges);
        out[2 * merges] = top.a;
        out[2 * merges + 1] = top.b;
        /* take the word list: merge_word may add pairs and move t->pairs */
        int32_t *words = t->pairs[p].words;
        uint32_t nwords = t->pairs[p].nwords;
        t->pairs[p].words = NULL;
        t->pairs[p].nwords = t->pairs[p].capwords = 0;
        t->fresh.n = 0;
        for (uint32_t i = 0; i < nwords; i++) {
            if (merge_word(t, words[i], top.a, top.b, c, (int32_t)merges)) {
                free(words);
                return -1;
            }
        }
        free(words);
        t->pairs[p].count = 0;
        for (size_t i = 0; i < t->fresh.n; i++) {
            PairInfo *info = &t->pairs[t->fresh.v[i]];
            if (info->count > 0 && heap_push(t, info->count, info->a, info->b))
                return -1;
        }
        merges++;
    }
    return merges;
}

static PyObject *train_merges(PyObject *module, PyObject *args)
{
    PyObject *chunks_arg, *counts_arg;
    Py_ssize_t num_merges;
    if (!PyArg_ParseTuple(args, "OOn:train_merges", &chunks_arg, &counts_arg, &num_merges))
        return NULL;
    /* Tuples, not the caller's lists: reading a count may run Python code (its __index__) that
     * changes a list, and the chunks' lengths are measured once, before the copy below. */
    PyObject *chunks = PySequence_Tuple(chunks_arg);
    if (chunks == NULL)
        return NULL;
    PyObject *counts = PySequence_Tuple(counts_arg);
    if (counts == NULL) {
        Py_DECREF(chunks);
        return NULL;
    }
    Py_ssize_t nchunks = PyTuple_GET_SIZE(chunks);
    Trainer t;
    memset(&t, 0, sizeof(t));
    int32_t *out = NULL;
    PyObject *result = NULL;
    if (PyTuple_GET_SIZE(counts) != nchunks) {
        PyErr_SetString(PyExc_ValueError, "chunks and counts differ in length");
        goto done;
    }
    if (num_merges < 0)
        num_merges = 0;
    if (num_merges > INT32_MAX - 256) {
        PyErr_SetString(PyExc_OverflowError, "num_merges is too large");
        goto done;
    }
    /* copy the chunks with two or more bytes (the others have no pairs) as words of ids */
    size_t total = 0, nwords = 0;
    for (Py_ssize_t i = 0; i < nchunks; i++) {
        PyObject *chunk = PyTuple_GET_ITEM(chunks, i);
        if (!PyBytes_Check(chunk)) {
            PyErr_SetString(PyExc_TypeError, "chunks must be bytes");
            goto done;
        }
        Py_ssize_t len = PyBytes_GET_SIZE(chunk);
        if (len > UINT32_MAX) {
            PyErr_SetString(PyExc_ValueError, "chunk too long");
            goto done;
        }
        if (len >= 2) {
            total += (size_t)len;
            nwords++;
        }
    }
    if (nwords >= INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "too many chunks");
        goto done;
    }
    t.ids = malloc((total ? total : 1) * sizeof(int32_t));
    t.off = malloc((nwords ? nwords : 1) * sizeof(size_t));
    t.len = malloc((nwords ? nwords : 1) * sizeof(uint32_t));
    t.cnt = malloc((nwords ? nwords : 1) * sizeof(int64_t));
    out = malloc((num_merges ? (size_t)num_merges : 1) * 2 * sizeof(int32_t));
    if (!t.ids || !t.off || !t.len || !t.cnt || !out || pairmap_alloc(&t.index, 1 << 16)) {
        PyErr_NoMemory();
        goto done;
    }
    size_t pos = 0;
    for (Py_ssize_t i = 0; i < nchunks; i++) {
        PyObject *chunk = PyTuple_GET_ITEM(chunks, i);
        Py_ssize_t len = PyBytes_GET_SIZE(chunk);
        long long count = PyLong_AsLongLong(PyTuple_GET_ITEM(counts, i));
        if (count == -1 && PyErr_Occurred())
            goto done;
        if (len < 2)
            continue;
        const unsigned char *s = (const unsigned char *)PyBytes_AS_STRING(chunk);
        t.off[t.nwords] = pos;
        t.len[t.nwords] = (uint32_t)len;
        t.cnt[t.nwords] = count;
        t.nwords++;
        for (Py_ssize_t k = 0; k < len; k++)
            t.ids[pos++] = s[k];
    }
    Py_ssize_t made;
    Py_BEGIN_ALLOW_THREADS
    made = trainer_start(&t) ? -1 : trainer_run(&t, num_merges, out);
    Py_END_ALLOW_THREADS
    if (made < 0) {
        PyErr_NoMemory();
        goto done;
    }
    result = PyList_New(made);
    if (result == NULL)
        goto done;
    for (Py_ssize_t m = 0; m < made; m++) {
        PyObject *pair = Py_BuildValue("(ii)", out[2 * m], out[2 * m + 1]);
        if (pair == NULL) {
            Py_CLEAR(result);
            goto done;
        }
        PyList_SET_ITEM(result, m, pair);
    }
done:
    trainer_free(&t);
    free(out);
    Py_DECREF(chunks);
    Py_DECREF(counts);
    return result;
}

/* ------------------------------------------------------------------------------------------
 * Encoder */

/* the chunk cache stops growing at this many chunks or bytes of chunks and of ids (bpe.py bounds its
 * pure-Python cache with the same numbers) */
#define CACHE_MAX_ENTRIES (1 << 20)
#define CACHE_MAX_BYTES (64u << 20)
#define CACHE_MAX_CHUNK 256 /* longer chunks are not cached */

typedef struct {
    PyObject_HEAD
    PairMap ranks; /* (a, b) -> the id of its merge */
    int32_t *merge_a, *merge_b;
    Py_ssize_t nmerges;
    PyObject **id_objects; /* the int objects for ids 0 .. 256 + nmerges - 1 */
    StrTable cache; /* chunk -> ids: value = offset in cache_ids, extra = how many */
    IntVec cache_ids;
    /* scratch for one chunk */
    int32_t *ids, *next, *prev;
    size_t cap_scratch;
    uint64_t *heap; /* rank << 32 | position, a min-heap */
    size_t cap_heap;
    PyThread_type_lock lock; /* the encoder's state is used with the GIL released */
    int ready; /* __init__ finished */
} Encoder;

static inline void min_heap_push(uint64_t *h, size_t *n, uint64_t v)
{
    size_t i = (*n)++;
    while (i > 0) {
        size_t parent = (i - 1) / 2;
        if (h[parent] <= v)
            break;
        h[i] = h[parent];
        i = parent;
    }
    h[i] = v;
}

static inline uint64_t min_heap_pop(uint64_t *h, size_t *n)
{
    uint64_t top = h[0], v = h[--(*n)];
    size_t i = 0;
    for (;;) {
        size_t child = 2 * i + 1;
        if (child >= *n)
            break;
        if (child + 1 < *n && h[child + 1] < h[child])
            child++;
        if (h[child] >= v)
            break;
        h[i] = h[child];
        i = child;
    }
    if (*n)
        h[i] = v;
    return top;
}

/* push the rank of the pair that starts at position i, if it is a merge */
static inline void push_pair_at(Encoder *e, size_t *nheap, int32_t i, int32_t j)
{
    int32_t r = pairmap_get(&e->ranks, pair_key(e->ids[i], e->ids[j]));
    if (r >= 0)
        min_heap_push(e->heap, nheap, ((uint64_t)(uint32_t)r << 32) | (uint32_t)i);
}

/* Encode one chunk: always apply the merge with the lowest rank, leftmost first (the same
 * as bpe.encode_chunk_python, which merges every occurrence of that pair left to right:
 * a merge only creates pairs of higher rank). Appends the ids to out. */
static int encode_bytes(Encoder *e, const unsigned char *s, size_t n, IntVec *out)
{
    if (n > INT32_MAX)
        return -1;
    if (n > e->cap_scratch) {
        size_t cap = n < 64 ? 64 : n;
        int32_t *ids = realloc(e->ids, cap * sizeof(int32_t));
        if (ids)
            e->ids = ids;
        int32_t *next = realloc(e->next, cap * sizeof(int32_t));
        if (next)
            e->next = next;
        int32_t *prev = realloc(e->prev, cap * sizeof(int32_t));
        if (prev)
            e->prev = prev;
        if (!ids || !next || !prev)
            return -1;
        e->cap_scratch = cap;
    }
    /* at most n - 1 initial pairs, plus two per merge (at most n - 1 merges) */
    if (grow((void **)&e->heap, &e->cap_heap, 3 * n + 1, sizeof(uint64_t)))
        return -1;
    int32_t m = (int32_t)n;
    size_t nheap = 0;
    for (int32_t i = 0; i < m; i++) {
        e->ids[i] = s[i];
        e->next[i] = i + 1;
        e->prev[i] = i - 1;
    }
    for (int32_t i = 0; i + 1 < m; i++)
        push_pair_at(e, &nheap, i, i + 1);
    while (nheap) {
        uint64_t top = min_heap_pop(e->heap, &nheap);
        int32_t r = (int32_t)(top >> 32), i = (int32_t)(uint32_t)top;
        int32_t j = e->next[i];
        /* skip entries that went stale: the token at i was merged away or changed */
        if (e->ids[i] < 0 || j >= m || e->ids[i] != e->merge_a[r - 256] || e->ids[j] != e->merge_b[r - 256])
            continue;
        e->ids[i] = r;
        e->ids[j] = -1;
        e->next[i] = e->next[j];
        if (e->next[i] < m)
            e->prev[e->next[i]] = i;
        if (e->prev[i] >= 0)
            push_pair_at(e, &nheap, e->prev[i], i);
        if (e->next[i] < m)
            push_pair_at(e, &nheap, i, e->next[i]);
    }
    for (int32_t i = 0; i < m; i = e->next[i])
        if (intvec_push(out, e->ids[i]))
            return -1;
    return 0;
}

/* encode one chunk through the cache */
static int encode_cached(Encoder *e, const unsigned char *s, size_t n, IntVec *out)
{
    if (n == 0) /* a custom pattern can match empty strings */
        return 0;
    if (n == 1)
        return intvec_push(out, s[0]);
    if (n > CACHE_MAX_CHUNK)
        return encode_bytes(e, s, n, out);
    uint64_t h = hash_bytes(s, n);
    Py_ssize_t idx = strtab_lookup(&e->cache, s, n, h, 0);
    if (idx >= 0) {
        const StrEntry *entry = &e->cache.entries[idx];
        if (grow((void **)&out->v, &out->cap, out->n + entry->extra, sizeof(int32_t)))
            return -1;
        memcpy(out->v + out->n, e->cache_ids.v + entry->value, entry->extra * sizeof(int32_t));
        out->n += entry->extra;
        return 0;
    }
    size_t start = out->n;
    if (encode_bytes(e, s, n, out))
        return -1;
    if (e->cache.n < CACHE_MAX_ENTRIES && e->cache.arena_len < CACHE_MAX_BYTES &&
        e->cache_ids.n * sizeof(int32_t) < CACHE_MAX_BYTES) {
        size_t count = out->n - start;
        if (grow((void **)&e->cache_ids.v, &e->cache_ids.cap, e->cache_ids.n + count, sizeof(int32_t)))
            return -1;
        idx = strtab_lookup(&e->cache, s, n, h, 1);
        if (idx < 0)
            return -1;
        e->cache.entries[idx].value = (int64_t)e->cache_ids.n;
        e->cache.entries[idx].extra = (uint32_t)count;
        memcpy(e->cache_ids.v + e->cache_ids.n, out->v + start, count * sizeof(int32_t));
        e->cache_ids.n += count;
    }
    return 0;
}

/* a list of int objects from ids */
static PyObject *ids_to_list(Encoder *e, const IntVec *ids)
{
    PyObject *list = PyList_New((Py_ssize_t)ids->n);
    if (list == NULL)
        return NULL;
    for (size_t i = 0; i < ids->n; i++) {
        PyObject *obj = e->id_objects[ids->v[i]];
        Py_INCREF(obj);
        PyList_SET_ITEM(list, (Py_ssize_t)i, obj);
    }
    return list;
}

static void Encoder_dealloc(Encoder *e)
{
    pairmap_free(&e->ranks);
    free(e->merge_a);
    free(e->merge_b);
    if (e->id_objects) {
        for (Py_ssize_t i = 0; i < 256 + e->nmerges; i++)
            Py_XDECREF(e->id_objects[i]);
        free(e->id_objects);
    }
    strtab_free(&e->cache);
    free(e->cache_ids.v);
    free(e->ids);
    free(e->next);
    free(e->prev);
    free(e->heap);
    if (e->lock)
        PyThread_free_lock(e->lock);
    Py_TYPE(e)->tp_free((PyObject *)e);
}

static int Encoder_init(Encoder *e, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"merges", NULL};
    PyObject *merges_arg;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O:Encoder", kwlist, &merges_arg))
        return -1;
    if (e->id_objects != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Encoder is already initialized");
        return -1;
    }
    /* a tuple, not the caller's list: reading a pair may run Python code (__iter__, __index__) */
    PyObject *merges = PySequence_Tuple(merges_arg);
    if (merges == NULL)
        return -1;
    Py_ssize_t n = PyTuple_GET_SIZE(merges);
    if (n > INT32_MAX - 256) {
        Py_DECREF(merges);
        PyErr_SetString(PyExc_ValueError, "too many merges");
        return -1;
    }
    e->nmerges = n;
    e->merge_a = malloc((n ? n : 1) * sizeof(int32_t));
    e->merge_b = malloc((n ? n : 1) * sizeof(int32_t));
    e->id_objects = calloc(256 + n, sizeof(PyObject *));
    e->lock = PyThread_allocate_lock();
    size_t size = 1024;
    while (size < 2 * (size_t)n + 2)
        size *= 2;
    if (!e->merge_a || !e->merge_b || !e->id_objects || !e->lock || pairmap_alloc(&e->ranks, size) ||
        strtab_init(&e->cache)) {
        Py_DECREF(merges);
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t k = 0; k < n; k++) {
        int a, b;
        PyObject *pair = PyTuple_GET_ITEM(merges, k);
        PyObject *tuple = PySequence_Tuple(pair);
        if (tuple == NULL || !PyArg_ParseTuple(tuple, "ii", &a, &b)) {
            Py_XDECREF(tuple);
            Py_DECREF(merges);
            return -1;
        }
        Py_DECREF(tuple);
        if (a < 0 || b < 0) {
            Py_DECREF(merges);
            PyErr_SetString(PyExc_ValueError, "merge ids must be >= 0");
            return -1;
        }
        e->merge_a[k] = a;
        e->merge_b[k] = b;
        /* a repeated pair keeps its last id, as the dict in bpe.Tokenizer does */
        if (pairmap_get_or_put(&e->ranks, pair_key(a, b), (int32_t)(256 + k), 1) < 0) {
            Py_DECREF(merges);
            PyErr_NoMemory();
            return -1;
        }
    }
    Py_DECREF(merges);
    for (Py_ssize_t i = 0; i < 256 + n; i++) {
        e->id_objects[i] = PyLong_FromSsize_t(i);
        if (e->id_objects[i] == NULL)
            return -1;
    }
    e->ready = 1;
    return 0;
}

static int encoder_ready(Encoder *e)
{
    if (!e->ready) {
        PyErr_SetString(PyExc_RuntimeError, "Encoder is not initialized");
        return 0;
    }
    return 1;
}

static PyObject *Encoder_encode_chunks(Encoder *e, PyObject *chunks_arg)
{
    if (!encoder_ready(e))
        return NULL;
    /* A tuple, not the caller's list: another thread may change the list while this one waits
     * for the encoder's lock without the GIL. The items are checked once the lock is held. */
    PyObject *chunks = PySequence_Tuple(chunks_arg);
    if (chunks == NULL)
        return NULL;
    IntVec out = {NULL, 0, 0};
    PyObject *result = NULL;
    int failed = 0, not_bytes = 0;
    Py_ssize_t n = PyTuple_GET_SIZE(chunks);
    Py_BEGIN_ALLOW_THREADS
    PyThread_acquire_lock(e->lock, WAIT_LOCK);
    Py_END_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n && !failed && !not_bytes; i++) {
        PyObject *chunk = PyTuple_GET_ITEM(chunks, i);
        not_bytes = !PyBytes_Check(chunk);
        if (!not_bytes)
            failed = encode_cached(e, (const unsigned char *)PyBytes_AS_STRING(chunk),
                                   (size_t)PyBytes_GET_SIZE(chunk), &out);
    }
    PyThread_release_lock(e->lock);
    if (not_bytes)
        PyErr_SetString(PyExc_TypeError, "chunks must be bytes");
    else if (failed)
        PyErr_NoMemory();
    else
        result = ids_to_list(e, &out);
    free(out.v);
    Py_DECREF(chunks);
    return result;
}

static PyObject *Encoder_encode_text(Encoder *e, PyObject *text)
{
    if (!encoder_ready(e))
        return NULL;
    if (!PyUnicode_Check(text)) {
        PyErr_SetString(PyExc_TypeError, "text must be str");
        return NULL;
    }
    Py_ssize_t n;
    const unsigned char *s = utf8_or_null(text, &n);
    if (s == NULL) {
        if (PyErr_Occurred())
            return NULL;
        Py_RETURN_NONE;
    }
    IntVec out = {NULL, 0, 0};
    int failed = 0;
    Py_BEGIN_ALLOW_THREADS
    PyThread_acquire_lock(e->lock, WAIT_LOCK);
    for (Py_ssize_t i = 0; i < n && !failed;) {
        Py_ssize_t end = split_next(s, n, i);
        failed = encode_cached(e, s + i, (size_t)(end - i), &out);
        i = end;
    }
    PyThread_release_lock(e->lock);
    Py_END_ALLOW_THREADS
    PyObject *result = failed ? PyErr_NoMemory() : ids_to_list(e, &out);
    free(out.v);
    return result;
}

static PyMethodDef Encoder_methods[] = {
    {"encode_chunks", (PyCFunction)Encoder_encode_chunks, METH_O,
     "encode_chunks(chunks: list[bytes]) -> list[int]: encode chunks that are already pre-split."},
    {"encode_text", (PyCFunction)Encoder_encode_text, METH_O,
     "encode_text(text: str) -> list[int] | None: pre-split with SPLIT_PATTERN and encode;\n"
     "None if the text has lone surrogates (then pre-split with the regex module)."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject EncoderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "_bpe.Encoder",
    .tp_basicsize = sizeof(Encoder),
    .tp_dealloc = (destructor)Encoder_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Encoder(merges): applies merges (pairs of ids; merge k makes id 256 + k) by rank.",
    .tp_methods = Encoder_methods,
    .tp_init = (initproc)Encoder_init,
    .tp_new = PyType_GenericNew,
};

/* ------------------------------------------------------------------------------------------
 * ChunkCounter */

typedef struct {
    PyObject_HEAD
    StrTable table; /* chunk -> count in value */
    int ready;
    PyThread_type_lock lock;
} ChunkCounter;

static void ChunkCounter_dealloc(ChunkCounter *c)
{
    strtab_free(&c->table);
    if (c->lock)
        PyThread_free_lock(c->lock);
    Py_TYPE(c)->tp_free((PyObject *)c);
}

static int ChunkCounter_init(ChunkCounter *c, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, ":ChunkCounter", kwlist))
        return -1;
    if (c->ready) {
        PyErr_SetString(PyExc_RuntimeError, "ChunkCounter is already initialized");
        return -1;
    }
    c->lock = PyThread_allocate_lock();
    if (c->lock == NULL || strtab_init(&c->table)) {
        PyErr_NoMemory();
        return -1;
    }
    c->ready = 1;
    return 0;
}

static PyObject *ChunkCounter_add(ChunkCounter *c, PyObject *text)
{
    if (!c->ready) {
        PyErr_SetString(PyExc_RuntimeError, "ChunkCounter is not initialized");
        return NULL;
    }
    if (!PyUnicode_Check(text)) {
        PyErr_SetString(PyExc_TypeError, "text must be str");
        return NULL;
    }
    Py_ssize_t n;
    const unsigned char *s = utf8_or_null(text, &n);
    if (s == NULL) {
        if (PyErr_Occurred())
            return NULL;
        Py_RETURN_FALSE;
    }
    int failed = 0;
    Py_BEGIN_ALLOW_THREADS
    PyThread_acquire_lock(c->lock, WAIT_LOCK);
    for (Py_ssize_t i = 0; i < n;) {
        Py_ssize_t end = split_next(s, n, i);
        Py_ssize_t idx = strtab_lookup(&c->table, s + i, (size_t)(end - i), hash_bytes(s + i, (size_t)(end - i)), 1);
        if (idx < 0) {
            failed = 1;
            break;
        }
        c->table.entries[idx].value++;
        i = end;
    }
    PyThread_release_lock(c->lock);
    Py_END_ALLOW_THREADS
    if (failed)
        return PyErr_NoMemory();
    Py_RETURN_TRUE;
}

static PyObject *ChunkCounter_counts(ChunkCounter *c, PyObject *unused)
{
    if (!c->ready) {
        PyErr_SetString(PyExc_RuntimeError, "ChunkCounter is not initialized");
        return NULL;
    }
    PyObject *dict = PyDict_New();
    if (dict == NULL)
        return NULL;
    /* add() grows the table in another thread without the GIL, so read it under the lock. Nothing
     * below runs Python code (bytes keys, int values), so nothing can call add() while it is held. */
    Py_BEGIN_ALLOW_THREADS
    PyThread_acquire_lock(c->lock, WAIT_LOCK);
    Py_END_ALLOW_THREADS
    for (size_t i = 0; i < c->table.n; i++) {
        const StrEntry *e = &c->table.entries[i];
        PyObject *key = PyBytes_FromStringAndSize((const char *)c->table.arena + e->off, e->len);
        PyObject *value = key ? PyLong_FromLongLong(e->value) : NULL;
        if (value == NULL || PyDict_SetItem(dict, key, value)) {
            Py_XDECREF(key);
            Py_XDECREF(value);
            Py_CLEAR(dict);
            break;
        }
        Py_DECREF(key);
        Py_DECREF(value);
    }
    PyThread_release_lock(c->lock);
    return dict;
}

static PyMethodDef ChunkCounter_methods[] = {
    {"add", (PyCFunction)ChunkCounter_add, METH_O,
     "add(text: str) -> bool: pre-split with SPLIT_PATTERN and count the chunks;\n"
     "False (nothing counted) if the text has lone surrogates."},
    {"counts", (PyCFunction)ChunkCounter_counts, METH_NOARGS,
     "counts() -> dict[bytes, int]: every chunk seen so far (UTF-8) and its count."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject ChunkCounterType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "_bpe.ChunkCounter",
    .tp_basicsize = sizeof(ChunkCounter),
    .tp_dealloc = (destructor)ChunkCounter_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "ChunkCounter(): counts the SPLIT_PATTERN chunks of texts.",
    .tp_methods = ChunkCounter_methods,
    .tp_init = (initproc)ChunkCounter_init,
    .tp_new = PyType_GenericNew,
};

/* ------------------------------------------------------------------------------------------
 * Module */

static PyObject *split(PyObject *module, PyObject *text)
{
    if (!PyUnicode_Check(text)) {
        PyErr_SetString(PyExc_TypeError, "text must be str");
        return NULL;
    }
    Py_ssize_t n;
    const unsigned char *s = utf8_or_null(text, &n);
    if (s == NULL) {
        if (PyErr_Occurred())
            return NULL;
        Py_RETURN_NONE;
    }
    PyObject *list = PyList_New(0);
    for (Py_ssize_t i = 0; list && i < n;) {
        Py_ssize_t end = split_next(s, n, i);
        PyObject *chunk = PyUnicode_DecodeUTF8((const char *)s + i, end - i, "strict");
        if (chunk == NULL || PyList_Append(list, chunk))
            Py_CLEAR(list);
        Py_XDECREF(chunk);
        i = end;
    }
    return list;
}

static PyObject *char_classes(PyObject *module, PyObject *unused)
{
    PyObject *out = PyBytes_FromStringAndSize(NULL, 0x110000);
    if (out == NULL)
        return NULL;
    char *p = PyBytes_AS_STRING(out);
    for (uint32_t cp = 0; cp < 0x110000; cp++)
        p[cp] = (char)class_of(cp);
    return out;
}

static PyMethodDef module_methods[] = {
    {"train_merges", train_merges, METH_VARARGS,
     "train_merges(chunks: list[bytes], counts: list[int], num_merges: int) -> list[tuple[int, int]]\n"
     "Most frequent pair first; ties go to the smallest (a, b). Merge k makes id 256 + k."},
    {"split", split, METH_O,
     "split(text: str) -> list[str] | None: the chunks SPLIT_PATTERN finds (None: lone surrogates)."},
    {"char_classes", char_classes, METH_NOARGS,
     "char_classes() -> bytes: for every code point 0 other, 1 letter, 2 number, 3 whitespace."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef bpe_module = {
    PyModuleDef_HEAD_INIT, "_bpe", "C loops for bpe.py (training, pre-split, encoding).", -1,
    module_methods,
};

PyMODINIT_FUNC PyInit__bpe(void)
{
    if (PyType_Ready(&EncoderType) < 0 || PyType_Ready(&ChunkCounterType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&bpe_module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&EncoderType);
    Py_INCREF(&ChunkCounterType);
    if (PyModule_AddObject(m, "Encoder", (PyObject *)&EncoderType) < 0 ||
        PyModule_AddObject(m, "ChunkCounter", (PyObject *)&ChunkCounterType) < 0 ||
        PyModule_AddStringConstant(m, "SPLIT_PATTERN", SPLIT_PATTERN_TEXT) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
