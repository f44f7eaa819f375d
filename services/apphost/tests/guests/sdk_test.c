/*
 * Unit tests of the C SDK, run as a guest by test_sdk.py: each check logs "ok: ..." or
 * "FAIL: ...", and "sdk tests done" ends the run. Built with -DEXO_STORE_TIMEOUT_NS=50ms so a
 * store request without a reply times out quickly.
 */
#include "exocore.h"
#ifdef __wasi__
#include <stdio.h>
#endif

static void check(bool ok, const char *what) {
    exo_buf line = {0};
    exo_buf_str(&line, ok ? "ok: " : "FAIL: ");
    exo_buf_str(&line, what);
    exo_log_buf(ok ? EXO_LOG_INFO : EXO_LOG_ERROR, &line);
    exo_buf_free(&line);
}

static void test_allocator(void) {
    uint8_t *a = exo_alloc(10);
    uint8_t *b = exo_alloc(10);
    check(a && b && a != b, "alloc gives distinct blocks");
    check(((uintptr_t)a & 7) == 0 && ((uintptr_t)b & 7) == 0, "blocks are 8-byte aligned");
    exo_free(a);
    uint8_t *c = exo_alloc(12);
#ifndef __wasi__
    check(c == a, "a freed block of the same class is reused");
#endif
    uint8_t *big = exo_alloc(300000);
    check(big != 0, "a large block grows the memory");
    exo_memset(big, 0xAB, 300000);
    check(big[0] == 0xAB && big[299999] == 0xAB, "the large block is writable");
    char *r = exo_alloc(4);
    exo_memcpy(r, "abc", 4);
    r = exo_realloc(r, 1000);
    check(r && exo_bytes_equal(r, 4, "abc", 4), "realloc keeps the content");
    exo_free(b);
    exo_free(c);
    exo_free(big);
    exo_free(r);
    exo_free(0);
}

static void test_buffers(void) {
    exo_buf b = {0};
    exo_buf_str(&b, "n=");
    exo_buf_u64(&b, 18446744073709551615ull);
    exo_buf_str(&b, " i=");
    exo_buf_i64(&b, -42);
    exo_buf_str(&b, " z=");
    exo_buf_u64(&b, 0);
    static const char expected[] = "n=18446744073709551615 i=-42 z=0";
    check(exo_bytes_equal(b.data, b.len, expected, sizeof(expected) - 1), "numbers in text");
    exo_buf_free(&b);
}

static void test_protobuf(void) {
    exo_buf b = {0};
    exo_pb_uint(&b, 1, 300);
    size_t m = exo_pb_begin(&b, 2);
    for (int i = 0; i < 20; i++) exo_pb_string(&b, 1, "0123456789"); /* 240 bytes: a 2-byte length */
    exo_pb_end(&b, m);
    exo_pb_uint(&b, 3, 0xFFFFFFFFFFFFFFFFull);
    exo_pb_reader r;
    exo_pb_field f;
    exo_pb_reader_init(&r, b.data, b.len);
    bool ok = exo_pb_next(&r, &f) == 1 && f.field == 1 && f.wire_type == EXO_PB_VARINT && f.value == 300;
    ok = ok && exo_pb_next(&r, &f) == 1 && f.field == 2 && f.wire_type == EXO_PB_LEN && f.len == 240;
    exo_pb_reader inner;
    exo_pb_field g;
    exo_pb_reader_init(&inner, f.data, f.len);
    int strings = 0;
    while (exo_pb_next(&inner, &g) == 1) strings += g.field == 1 && g.len == 10;
    ok = ok && strings == 20;
    ok = ok && exo_pb_next(&r, &f) == 1 && f.field == 3 && f.value == 0xFFFFFFFFFFFFFFFFull;
    ok = ok && exo_pb_next(&r, &f) == 0;
    check(ok, "protobuf round trip (varints, nested message with a 2-byte length)");
    exo_pb_reader_init(&r, b.data, b.len - 1);
    int status;
    while ((status = exo_pb_next(&r, &f)) == 1) {
    }
    check(status == -1, "a truncated message is malformed");
    exo_buf_free(&b);
}

static int order[8];
static int order_len;
static void record(void *ctx) { order[order_len++] = (int)(uintptr_t)ctx; }

static void on_timeout(void *ctx, const exo_store_reply *reply) {
    (void)ctx;
    check(reply->error && exo_bytes_equal(reply->error, reply->error_len, "timeout", 7), "an unanswered request times out");
    check(exo_store_pending() == 0, "the timed out request is no longer pending");
}

static void finish(void *ctx) {
    (void)ctx;
    check(order_len == 4 && order[0] == 1 && order[1] == 2 && order[2] == 3 && order[3] == 4,
          "spawned tasks run first, in order; timers in time order");
#ifdef __wasi__
    printf("hello from libc\n");
    fflush(stdout);
#endif
    exo_info("sdk tests done");
}

void exo_app_start(void) {
    test_allocator();
    test_buffers();
    test_protobuf();
    exo_sleep(40 * EXO_NS_PER_MS, record, (void *)4);
    exo_sleep(20 * EXO_NS_PER_MS, record, (void *)3);
    exo_spawn(record, (void *)1);
    exo_spawn(record, (void *)2);
    exo_buf q = {0};
    exo_query_all(&q);
    check(exo_store_query(q.data, q.len, on_timeout, 0) != 0, "a query is sent");
    check(exo_store_pending() == 1, "the query is pending");
    exo_buf_free(&q);
    exo_sleep(150 * EXO_NS_PER_MS, finish, 0);
}
