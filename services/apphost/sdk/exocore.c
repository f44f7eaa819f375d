/*
 * Exocore guest SDK for C: the ABI glue and helpers declared in exocore.h.
 *
 * Memory: on wasm32-freestanding the SDK owns the heap (from __heap_base up, growing the linear
 * memory with memory.grow): blocks are powers of two from 16 bytes, each with an 8-byte header
 * holding its size class, recycled through one free list per class. On wasm32-wasi libc's
 * malloc is used instead, so apps can use libc freely.
 */
#include "exocore.h"

#ifdef __wasi__
#include <stdlib.h>
#include <string.h>
#endif

#define EXO_IMPORT(name) __attribute__((import_module("exocore"), import_name(name)))
#define EXO_EXPORT(name) __attribute__((export_name(name)))

EXO_IMPORT("__exocore_host_log") void __exocore_host_log(int32_t level, const char *ptr, int32_t len);
EXO_IMPORT("__exocore_host_now") int64_t __exocore_host_now(void);
EXO_IMPORT("__exocore_host_out_message") int32_t __exocore_host_out_message(const uint8_t *ptr, int32_t len);

/* ---- memory helpers ------------------------------------------------------------------------ */

void *exo_memcpy(void *dst, const void *src, size_t len) {
#if defined(__wasm_bulk_memory__) || defined(__wasi__)
    return __builtin_memcpy(dst, src, len);
#else
    volatile uint8_t *d = (volatile uint8_t *)dst;
    const uint8_t *s = (const uint8_t *)src;
    while (len--) *d++ = *s++;
    return dst;
#endif
}

static void *exo_memmove(void *dst, const void *src, size_t len) {
#if defined(__wasm_bulk_memory__) || defined(__wasi__)
    return __builtin_memmove(dst, src, len);
#else
    volatile uint8_t *d = (volatile uint8_t *)dst;
    const uint8_t *s = (const uint8_t *)src;
    if (d < s) {
        while (len--) *d++ = *s++;
    } else {
        while (len--) d[len] = s[len];
    }
    return dst;
#endif
}

void *exo_memset(void *dst, int value, size_t len) {
#if defined(__wasm_bulk_memory__) || defined(__wasi__)
    return __builtin_memset(dst, value, len);
#else
    volatile uint8_t *d = (volatile uint8_t *)dst;
    while (len--) *d++ = (uint8_t)value;
    return dst;
#endif
}

#ifndef __wasi__
/* The compiler may emit calls to these for struct copies and initializers. */
void *memcpy(void *dst, const void *src, size_t len) { return exo_memcpy(dst, src, len); }
void *memmove(void *dst, const void *src, size_t len) { return exo_memmove(dst, src, len); }
void *memset(void *dst, int value, size_t len) { return exo_memset(dst, value, len); }
#endif

size_t exo_strlen(const char *s) {
    size_t n = 0;
    if (!s) return 0;
    while (s[n]) n++;
    return n;
}

bool exo_bytes_equal(const void *a, size_t a_len, const void *b, size_t b_len) {
    if (a_len != b_len) return false;
    const uint8_t *x = (const uint8_t *)a, *y = (const uint8_t *)b;
    for (size_t i = 0; i < a_len; i++) {
        if (x[i] != y[i]) return false;
    }
    return true;
}

/* ---- allocator --------------------------------------------------------------------------- */

#ifdef __wasi__

void *exo_alloc(size_t size) { return malloc(size ? size : 1); }
void exo_free(void *ptr) { free(ptr); }
void *exo_realloc(void *ptr, size_t size) { return realloc(ptr, size ? size : 1); }

#else

#define EXO_HEADER 8u
#define EXO_MIN_CLASS 4u  /* 16 bytes */
#define EXO_MAX_CLASS 31u /* 2 GiB */
#define EXO_PAGE 65536u
#define EXO_MAGIC 0xE0C0A11Cu

extern unsigned char __heap_base;

typedef struct exo_free_block {
    struct exo_free_block *next;
} exo_free_block;

static exo_free_block *exo_free_lists[EXO_MAX_CLASS + 1];
static uintptr_t exo_heap_top;
static uintptr_t exo_heap_end;

static uint32_t exo_class_of(size_t total) {
    uint32_t c = EXO_MIN_CLASS;
    while (c < EXO_MAX_CLASS && ((size_t)1 << c) < total) c++;
    return c;
}

static void *exo_bump(size_t size) {
    if (exo_heap_top == 0) {
        exo_heap_top = ((uintptr_t)&__heap_base + 15u) & ~(uintptr_t)15u;
        exo_heap_end = (uintptr_t)__builtin_wasm_memory_size(0) * EXO_PAGE;
    }
    uintptr_t start = exo_heap_top;
    if (size > (uintptr_t)0xFFFFFFFFu - start) return 0;
    uintptr_t end = start + size;
    if (end > exo_heap_end) {
        uintptr_t missing = end - exo_heap_end;
        uintptr_t pages = (missing + EXO_PAGE - 1) / EXO_PAGE;
        if (__builtin_wasm_memory_grow(0, pages) == (size_t)-1) return 0;
        exo_heap_end += pages * EXO_PAGE;
    }
    exo_heap_top = end;
    return (void *)start;
}

void *exo_alloc(size_t size) {
    if (size > ((size_t)1 << EXO_MAX_CLASS) - EXO_HEADER) return 0;
    uint32_t c = exo_class_of(size + EXO_HEADER);
    uint8_t *block;
    if (exo_free_lists[c]) {
        block = (uint8_t *)exo_free_lists[c];
        exo_free_lists[c] = exo_free_lists[c]->next;
    } else {
        block = (uint8_t *)exo_bump((size_t)1 << c);
        if (!block) return 0;
    }
    ((uint32_t *)block)[0] = c;
    ((uint32_t *)block)[1] = EXO_MAGIC;
    return block + EXO_HEADER;
}

static uint32_t exo_block_class(void *ptr) {
    uint32_t *header = (uint32_t *)((uint8_t *)ptr - EXO_HEADER);
    if (header[1] != EXO_MAGIC || header[0] < EXO_MIN_CLASS || header[0] > EXO_MAX_CLASS) {
        __builtin_trap(); /* double free or a pointer the allocator did not return */
    }
    return header[0];
}

void exo_free(void *ptr) {
    if (!ptr) return;
    uint32_t c = exo_block_class(ptr);
    uint32_t *header = (uint32_t *)((uint8_t *)ptr - EXO_HEADER);
    header[1] = 0; /* marks it free: a second exo_free traps */
    /* A free block links to the next one through its header's first word. */
    exo_free_block *block = (exo_free_block *)header;
    block->next = exo_free_lists[c];
    exo_free_lists[c] = block;
}

void *exo_realloc(void *ptr, size_t size) {
    if (!ptr) return exo_alloc(size);
    uint32_t c = exo_block_class(ptr);
    size_t usable = ((size_t)1 << c) - EXO_HEADER;
    if (size <= usable) return ptr;
    void *bigger = exo_alloc(size);
    if (!bigger) return 0;
    exo_memcpy(bigger, ptr, usable);
    exo_free(ptr);
    return bigger;
}

#endif

/* ---- logging and time ------------------------------------------------------------------- */

void exo_log_n(int level, const char *message, size_t len) { __exocore_host_log(level, message, (int32_t)len); }

void exo_log(int level, const char *message) { exo_log_n(level, message, exo_strlen(message)); }

uint64_t exo_now(void) { return (uint64_t)__exocore_host_now(); }

/* ---- buffers ------------------------------------------------------------------------------- */

static bool exo_buf_reserve(exo_buf *b, size_t extra) {
    if (b->failed) return false;
    if (b->len + extra <= b->cap) return true;
    size_t cap = b->cap ? b->cap : 64;
    while (cap < b->len + extra) cap *= 2;
    uint8_t *data = (uint8_t *)exo_realloc(b->data, cap);
    if (!data) {
        b->failed = true;
        return false;
    }
    b->data = data;
    b->cap = cap;
    return true;
}

void exo_buf_free(exo_buf *b) {
    exo_free(b->data);
    b->data = 0;
    b->len = b->cap = 0;
    b->failed = false;
}

void exo_buf_clear(exo_buf *b) {
    b->len = 0;
    b->failed = false;
}

void exo_buf_append(exo_buf *b, const void *data, size_t len) {
    if (!len || !exo_buf_reserve(b, len)) return;
    exo_memcpy(b->data + b->len, data, len);
    b->len += len;
}

void exo_buf_str(exo_buf *b, const char *s) { exo_buf_append(b, s, exo_strlen(s)); }

void exo_buf_u64(exo_buf *b, uint64_t value) {
    char digits[20];
    size_t n = 0;
    do {
        digits[n++] = (char)('0' + value % 10);
        value /= 10;
    } while (value);
    char out[20];
    for (size_t i = 0; i < n; i++) out[i] = digits[n - 1 - i];
    exo_buf_append(b, out, n);
}

void exo_buf_i64(exo_buf *b, int64_t value) {
    if (value < 0) {
        exo_buf_append(b, "-", 1);
        exo_buf_u64(b, (uint64_t)0 - (uint64_t)value);
    } else {
        exo_buf_u64(b, (uint64_t)value);
    }
}

void exo_log_buf(int level, const exo_buf *b) { exo_log_n(level, (const char *)b->data, b->len); }

/* ---- protobuf ---------------------------------------------------------------------------- */

void exo_pb_varint(exo_buf *b, uint64_t value) {
    uint8_t out[10];
    size_t n = 0;
    while (value >= 0x80) {
        out[n++] = (uint8_t)(value | 0x80);
        value >>= 7;
    }
    out[n++] = (uint8_t)value;
    exo_buf_append(b, out, n);
}

void exo_pb_tag(exo_buf *b, uint32_t field, uint32_t wire_type) {
    exo_pb_varint(b, ((uint64_t)field << 3) | wire_type);
}

void exo_pb_uint(exo_buf *b, uint32_t field, uint64_t value) {
    exo_pb_tag(b, field, EXO_PB_VARINT);
    exo_pb_varint(b, value);
}

void exo_pb_bytes(exo_buf *b, uint32_t field, const void *data, size_t len) {
    exo_pb_tag(b, field, EXO_PB_LEN);
    exo_pb_varint(b, len);
    exo_buf_append(b, data, len);
}

void exo_pb_string(exo_buf *b, uint32_t field, const char *s) { exo_pb_bytes(b, field, s, exo_strlen(s)); }

size_t exo_pb_begin(exo_buf *b, uint32_t field) {
    exo_pb_tag(b, field, EXO_PB_LEN);
    return b->len; /* the content starts here; its length is inserted by exo_pb_end */
}

void exo_pb_end(exo_buf *b, size_t mark) {
    if (b->failed || mark > b->len) return;
    size_t len = b->len - mark;
    uint8_t prefix[10];
    size_t n = 0;
    uint64_t v = len;
    while (v >= 0x80) {
        prefix[n++] = (uint8_t)(v | 0x80);
        v >>= 7;
    }
    prefix[n++] = (uint8_t)v;
    if (!exo_buf_reserve(b, n)) return;
    exo_memmove(b->data + mark + n, b->data + mark, len);
    exo_memcpy(b->data + mark, prefix, n);
    b->len += n;
}

void exo_pb_reader_init(exo_pb_reader *r, const void *data, size_t len) {
    r->p = (const uint8_t *)data;
    r->end = r->p + len;
}

static int exo_pb_read_varint(exo_pb_reader *r, uint64_t *out) {
    uint64_t value = 0;
    for (uint32_t shift = 0; shift < 64; shift += 7) {
        if (r->p >= r->end) return -1;
        uint8_t byte = *r->p++;
        value |= (uint64_t)(byte & 0x7F) << shift;
        if (!(byte & 0x80)) {
            *out = value;
            return 1;
        }
    }
    return -1;
}

int exo_pb_next(exo_pb_reader *r, exo_pb_field *f) {
    if (r->p >= r->end) return 0;
    uint64_t key;
    if (exo_pb_read_varint(r, &key) < 0) return -1;
    f->field = (uint32_t)(key >> 3);
    f->wire_type = (uint32_t)(key & 7);
    f->value = 0;
    f->data = 0;
    f->len = 0;
    if (f->field == 0) return -1;
    switch (f->wire_type) {
    case EXO_PB_VARINT:
        return exo_pb_read_varint(r, &f->value) < 0 ? -1 : 1;
    case EXO_PB_FIXED64:
        if (r->end - r->p < 8) return -1;
        for (int i = 7; i >= 0; i--) f->value = (f->value << 8) | r->p[i];
        r->p += 8;
        return 1;
    case EXO_PB_FIXED32:
        if (r->end - r->p < 4) return -1;
        for (int i = 3; i >= 0; i--) f->value = (f->value << 8) | r->p[i];
        r->p += 4;
        return 1;
    case EXO_PB_LEN: {
        uint64_t len;
        if (exo_pb_read_varint(r, &len) < 0 || len > (uint64_t)(r->end - r->p)) return -1;
        f->data = r->p;
        f->len = (size_t)len;
        r->p += len;
        return 1;
    }
    default:
        return -1;
    }
}

/* ---- timers ---------------------------------------------------------------------------------- */

typedef struct {
    bool used;
    uint64_t at;
    exo_task_fn fn;
    void *ctx;
} exo_timer;

static exo_timer exo_timers[EXO_MAX_TIMERS];

bool exo_at(uint64_t time_ns, exo_task_fn fn, void *ctx) {
    for (size_t i = 0; i < EXO_MAX_TIMERS; i++) {
        if (!exo_timers[i].used) {
            exo_timers[i].used = true;
            exo_timers[i].at = time_ns;
            exo_timers[i].fn = fn;
            exo_timers[i].ctx = ctx;
            return true;
        }
    }
    return false;
}

bool exo_spawn(exo_task_fn fn, void *ctx) { return exo_at(0, fn, ctx); }

bool exo_sleep(uint64_t delay_ns, exo_task_fn fn, void *ctx) { return exo_at(exo_now() + delay_ns, fn, ctx); }

/* ---- store requests ------------------------------------------------------------------------ */

typedef struct {
    bool used;
    uint32_t rendez_vous_id;
    uint64_t deadline;
    exo_store_cb cb;
    void *ctx;
} exo_pending;

static exo_pending exo_pendings[EXO_MAX_PENDING_REQUESTS];
static uint32_t exo_next_rendez_vous_id = 1;
static exo_buf exo_out_buffer;

uint32_t exo_send_out_message(uint32_t type, uint32_t rendez_vous_id, const void *data, size_t len) {
    exo_buf_clear(&exo_out_buffer);
    exo_pb_uint(&exo_out_buffer, 1, type);
    exo_pb_uint(&exo_out_buffer, 2, rendez_vous_id);
    exo_pb_bytes(&exo_out_buffer, 3, data, len);
    if (exo_out_buffer.failed) return EXO_STATUS_DECODE_ERROR;
    return (uint32_t)__exocore_host_out_message(exo_out_buffer.data, (int32_t)exo_out_buffer.len);
}

static uint32_t exo_store_send(uint32_t type, const void *data, size_t len, exo_store_cb cb, void *ctx) {
    exo_pending *slot = 0;
    for (size_t i = 0; i < EXO_MAX_PENDING_REQUESTS; i++) {
        if (!exo_pendings[i].used) {
            slot = &exo_pendings[i];
            break;
        }
    }
    if (!slot) return 0;
    uint32_t id = exo_next_rendez_vous_id++;
    if (exo_next_rendez_vous_id == 0) exo_next_rendez_vous_id = 1;
    if (exo_send_out_message(type, id, data, len) != EXO_STATUS_OK) return 0;
    slot->used = true;
    slot->rendez_vous_id = id;
    slot->deadline = exo_now() + EXO_STORE_TIMEOUT_NS;
    slot->cb = cb;
    slot->ctx = ctx;
    return id;
}

uint32_t exo_store_mutate(const void *request, size_t len, exo_store_cb cb, void *ctx) {
    return exo_store_send(EXO_OUT_STORE_MUTATION_REQUEST, request, len, cb, ctx);
}

uint32_t exo_store_query(const void *query, size_t len, exo_store_cb cb, void *ctx) {
    return exo_store_send(EXO_OUT_STORE_ENTITY_QUERY, query, len, cb, ctx);
}

size_t exo_store_pending(void) {
    size_t n = 0;
    for (size_t i = 0; i < EXO_MAX_PENDING_REQUESTS; i++) n += exo_pendings[i].used;
    return n;
}

static void exo_complete(exo_pending *slot, const exo_store_reply *reply) {
    exo_store_cb cb = slot->cb;
    void *ctx = slot->ctx;
    slot->used = false; /* free before the callback: it may send the next request */
    if (cb) cb(ctx, reply);
}

void exo_mutation_delete_entity(exo_buf *request, const char *entity_id) {
    size_t m = exo_pb_begin(request, 1); /* MutationRequest.mutations */
    exo_pb_string(request, 1, entity_id); /* EntityMutation.entity_id */
    exo_pb_end(request, exo_pb_begin(request, 4)); /* delete_entity {} */
    exo_pb_end(request, m);
}

void exo_mutation_put_trait(exo_buf *request, const char *entity_id, const char *trait_id, const char *type_name,
                            const void *message, size_t message_len) {
    size_t m = exo_pb_begin(request, 1);    /* mutations */
    exo_pb_string(request, 1, entity_id);   /* entity_id */
    size_t put = exo_pb_begin(request, 2);  /* put_trait */
    size_t trait = exo_pb_begin(request, 1); /* trait */
    exo_pb_string(request, 1, trait_id);    /* Trait.id */
    size_t any = exo_pb_begin(request, 2);  /* Trait.message (google.protobuf.Any) */
    exo_pb_tag(request, 1, EXO_PB_LEN);     /* Any.type_url */
    static const char prefix[] = "type.googleapis.com/";
    size_t name_len = exo_strlen(type_name);
    exo_pb_varint(request, sizeof(prefix) - 1 + name_len);
    exo_buf_append(request, prefix, sizeof(prefix) - 1);
    exo_buf_append(request, type_name, name_len);
    exo_pb_bytes(request, 2, message, message_len); /* Any.value */
    exo_pb_end(request, any);
    exo_pb_end(request, trait);
    exo_pb_end(request, put);
    exo_pb_end(request, m);
}

void exo_query_ids(exo_buf *query, const char *id) {
    size_t m = exo_pb_begin(query, 3); /* EntityQuery.ids */
    exo_pb_string(query, 1, id);
    exo_pb_end(query, m);
}

void exo_query_trait(exo_buf *query, const char *trait_name) {
    size_t m = exo_pb_begin(query, 2); /* EntityQuery.trait */
    exo_pb_string(query, 1, trait_name);
    exo_pb_end(query, m);
}

void exo_query_all(exo_buf *query) { exo_pb_end(query, exo_pb_begin(query, 11)); }

void exo_query_paging(exo_buf *query, uint32_t count) {
    size_t m = exo_pb_begin(query, 5); /* EntityQuery.paging */
    exo_pb_uint(query, 3, count);      /* Paging.count */
    exo_pb_end(query, m);
}

int64_t exo_results_count(const uint8_t *data, size_t len) {
    exo_pb_reader r;
    exo_pb_field f;
    int64_t count = 0;
    int status;
    exo_pb_reader_init(&r, data, len);
    while ((status = exo_pb_next(&r, &f)) == 1) {
        if (f.field == 1 && f.wire_type == EXO_PB_LEN) count++;
    }
    return status < 0 ? -1 : count;
}

const uint8_t *exo_results_next_page(const uint8_t *data, size_t len, size_t *page_len) {
    exo_pb_reader r;
    exo_pb_field f;
    const uint8_t *page = 0;
    exo_pb_reader_init(&r, data, len);
    while (exo_pb_next(&r, &f) == 1) {
        if (f.field == 5 && f.wire_type == EXO_PB_LEN) {
            page = f.data;
            *page_len = f.len;
        }
    }
    return page;
}

/* ---- exports: the host's entry points --------------------------------------------------- */

static uint64_t exo_next_deadline(void) {
    uint64_t next = 0;
    for (size_t i = 0; i < EXO_MAX_TIMERS; i++) {
        if (exo_timers[i].used && (next == 0 || exo_timers[i].at < next)) next = exo_timers[i].at ? exo_timers[i].at : 1;
    }
    for (size_t i = 0; i < EXO_MAX_PENDING_REQUESTS; i++) {
        if (exo_pendings[i].used && (next == 0 || exo_pendings[i].deadline < next)) next = exo_pendings[i].deadline;
    }
    return next;
}

EXO_EXPORT("__exocore_init") void __exocore_init(void) {}

EXO_EXPORT("__exocore_app_init") void __exocore_app_init(void) {}

EXO_EXPORT("__exocore_app_boot") void __exocore_app_boot(void) { exo_app_start(); }

EXO_EXPORT("__exocore_tick") int64_t __exocore_tick(void) {
    uint64_t now = exo_now();
    /* Timers due now; ones they add run on a later tick. */
    exo_task_fn fns[EXO_MAX_TIMERS];
    void *ctxs[EXO_MAX_TIMERS];
    size_t due = 0;
    for (size_t i = 0; i < EXO_MAX_TIMERS; i++) {
        if (exo_timers[i].used && exo_timers[i].at <= now) {
            fns[due] = exo_timers[i].fn;
            ctxs[due] = exo_timers[i].ctx;
            due++;
            exo_timers[i].used = false;
        }
    }
    for (size_t i = 0; i < due; i++) fns[i](ctxs[i]);
    /* Store requests past their deadline. */
    for (size_t i = 0; i < EXO_MAX_PENDING_REQUESTS; i++) {
        if (exo_pendings[i].used && exo_pendings[i].deadline <= now) {
            exo_store_reply reply = {exo_pendings[i].rendez_vous_id, 0, 0, "timeout", 7};
            exo_complete(&exo_pendings[i], &reply);
        }
    }
    return (int64_t)exo_next_deadline();
}

EXO_EXPORT("__exocore_in_message") int32_t __exocore_in_message(const uint8_t *ptr, int32_t len) {
    exo_pb_reader r;
    exo_pb_field f;
    int status;
    uint32_t rendez_vous_id = 0;
    exo_store_reply reply = {0, 0, 0, 0, 0};
    exo_pb_reader_init(&r, ptr, (size_t)len);
    while ((status = exo_pb_next(&r, &f)) == 1) {
        if (f.field == 2 && f.wire_type == EXO_PB_VARINT) {
            rendez_vous_id = (uint32_t)f.value;
        } else if (f.field == 3 && f.wire_type == EXO_PB_LEN) {
            reply.data = f.data;
            reply.len = f.len;
        } else if (f.field == 4 && f.wire_type == EXO_PB_LEN && f.len > 0) {
            reply.error = (const char *)f.data;
            reply.error_len = f.len;
        }
    }
    if (status < 0) return EXO_STATUS_DECODE_ERROR;
    reply.rendez_vous_id = rendez_vous_id;
    if (!reply.data) reply.data = (const uint8_t *)"";
    for (size_t i = 0; i < EXO_MAX_PENDING_REQUESTS; i++) {
        if (exo_pendings[i].used && exo_pendings[i].rendez_vous_id == rendez_vous_id) {
            exo_complete(&exo_pendings[i], &reply);
            return EXO_STATUS_OK;
        }
    }
    return EXO_STATUS_UNHANDLED; /* expired, or not ours */
}

EXO_EXPORT("__exocore_alloc") uint8_t *__exocore_alloc(int32_t size) {
    return (uint8_t *)exo_alloc(size > 0 ? (size_t)size : 1);
}

EXO_EXPORT("__exocore_free") void __exocore_free(uint8_t *ptr, int32_t size) {
    (void)size;
    exo_free(ptr);
}
