/*
 * The example app (SPEC.md 5.5), in C on the Exocore guest SDK.
 *
 * On start it logs "application initialized" and spawns a task that logs "task starting" and
 * "before sleep <ns>", sleeps 100 ms, logs "after sleep <ns>", deletes entity `entity1`
 * ("mutation success" / "mutation error"), queries entity `test` by id ("query success" /
 * "query error") and logs "task done".
 *
 * Then it keeps a counter: every COUNTER_INTERVAL it counts the entities having a trait of type
 * exocore.test.TestMessage (all pages of a boolean query that excludes the counter itself) and,
 * when the count changed, writes it into entity `example-counter` as a TestMessage trait
 * (`uint1` = the count, `string1` = a description).
 */
#include "exocore.h"

#define COUNTED_TRAIT "exocore.test.TestMessage"
#define COUNTER_ENTITY "example-counter"
#define COUNTER_INTERVAL (2 * EXO_NS_PER_S)
#define COUNT_PAGE 200

static uint64_t counted;      /* entities seen so far in the current count */
static int64_t last_written = -1;

static void task(void *ctx);
static void after_sleep(void *ctx);
static void on_mutation(void *ctx, const exo_store_reply *reply);
static void on_query(void *ctx, const exo_store_reply *reply);
static void count_start(void *ctx);
static void count_query(const uint8_t *page, size_t page_len);
static void on_count(void *ctx, const exo_store_reply *reply);
static void on_counter_written(void *ctx, const exo_store_reply *reply);

static void log_with_number(int level, const char *text, uint64_t number) {
    exo_buf line = {0};
    exo_buf_str(&line, text);
    exo_buf_u64(&line, number);
    exo_log_buf(level, &line);
    exo_buf_free(&line);
}

static void log_error_reply(const char *what, const exo_store_reply *reply) {
    exo_buf line = {0};
    exo_buf_str(&line, what);
    exo_buf_str(&line, ": ");
    exo_buf_append(&line, reply->error, reply->error_len);
    exo_log_buf(EXO_LOG_ERROR, &line);
    exo_buf_free(&line);
}

void exo_app_start(void) {
    exo_info("application initialized");
    exo_spawn(task, 0);
}

static void task(void *ctx) {
    (void)ctx;
    exo_info("task starting");
    log_with_number(EXO_LOG_INFO, "before sleep ", exo_now());
    exo_sleep(100 * EXO_NS_PER_MS, after_sleep, 0);
}

static void after_sleep(void *ctx) {
    (void)ctx;
    log_with_number(EXO_LOG_INFO, "after sleep ", exo_now());
    exo_buf request = {0};
    exo_mutation_delete_entity(&request, "entity1");
    if (!exo_store_mutate(request.data, request.len, on_mutation, 0)) {
        exo_store_reply failed = {0, 0, 0, "not sent", 8};
        on_mutation(0, &failed);
    }
    exo_buf_free(&request);
}

static void on_mutation(void *ctx, const exo_store_reply *reply) {
    (void)ctx;
    if (reply->error) {
        log_error_reply("mutation error", reply);
    } else {
        exo_info("mutation success");
    }
    exo_buf query = {0};
    exo_query_ids(&query, "test");
    if (!exo_store_query(query.data, query.len, on_query, 0)) {
        exo_store_reply failed = {0, 0, 0, "not sent", 8};
        on_query(0, &failed);
    }
    exo_buf_free(&query);
}

static void on_query(void *ctx, const exo_store_reply *reply) {
    (void)ctx;
    if (reply->error) {
        log_error_reply("query error", reply);
    } else {
        exo_info("query success");
    }
    exo_info("task done");
    exo_spawn(count_start, 0);
}

/* ---- the counter --------------------------------------------------------------------------- */

static void count_start(void *ctx) {
    (void)ctx;
    counted = 0;
    count_query(0, 0);
}

static void count_later(void) {
    if (!exo_sleep(COUNTER_INTERVAL, count_start, 0)) exo_error("counter: no timer left");
}

/* boolean { MUST trait(COUNTED_TRAIT), MUST_NOT ids(COUNTER_ENTITY) } with paging `page`. */
static void count_query(const uint8_t *page, size_t page_len) {
    exo_buf q = {0};
    size_t boolean = exo_pb_begin(&q, 14); /* EntityQuery.boolean */
    size_t must = exo_pb_begin(&q, 1);     /* BooleanPredicate.queries */
    exo_pb_uint(&q, 1, 1);                 /* occur = MUST */
    size_t trait = exo_pb_begin(&q, 3);    /* SubQuery.trait */
    exo_pb_string(&q, 1, COUNTED_TRAIT);
    exo_pb_end(&q, trait);
    exo_pb_end(&q, must);
    size_t must_not = exo_pb_begin(&q, 1);
    exo_pb_uint(&q, 1, 2);              /* occur = MUST_NOT */
    size_t ids = exo_pb_begin(&q, 4);   /* SubQuery.ids */
    exo_pb_string(&q, 1, COUNTER_ENTITY);
    exo_pb_end(&q, ids);
    exo_pb_end(&q, must_not);
    exo_pb_end(&q, boolean);
    size_t projection = exo_pb_begin(&q, 7); /* projections: skip every trait, ids are enough */
    exo_pb_uint(&q, 2, 1);
    exo_pb_end(&q, projection);
    if (page) {
        exo_pb_bytes(&q, 5, page, page_len); /* the previous results' next_page */
    } else {
        exo_query_paging(&q, COUNT_PAGE);
    }
    if (!exo_store_query(q.data, q.len, on_count, 0)) {
        exo_warn("counter: query not sent");
        count_later();
    }
    exo_buf_free(&q);
}

static void on_count(void *ctx, const exo_store_reply *reply) {
    (void)ctx;
    if (reply->error) {
        log_error_reply("counter: query error", reply);
        count_later();
        return;
    }
    int64_t n = exo_results_count(reply->data, reply->len);
    if (n < 0) {
        exo_error("counter: malformed results");
        count_later();
        return;
    }
    counted += (uint64_t)n;
    size_t page_len = 0;
    const uint8_t *next = exo_results_next_page(reply->data, reply->len, &page_len);
    if (next && n > 0) {
        count_query(next, page_len);
        return;
    }
    if ((int64_t)counted == last_written) {
        count_later();
        return;
    }
    /* TestMessage { string1 = 1: description, uint1 = 10: count } */
    exo_buf message = {0};
    exo_pb_string(&message, 1, "entities with a " COUNTED_TRAIT " trait");
    exo_pb_uint(&message, 10, counted);
    exo_buf request = {0};
    exo_mutation_put_trait(&request, COUNTER_ENTITY, "count", COUNTED_TRAIT, message.data, message.len);
    if (!exo_store_mutate(request.data, request.len, on_counter_written, (void *)(uintptr_t)counted)) {
        exo_warn("counter: mutation not sent");
        count_later();
    }
    exo_buf_free(&message);
    exo_buf_free(&request);
}

static void on_counter_written(void *ctx, const exo_store_reply *reply) {
    uint64_t value = (uint64_t)(uintptr_t)ctx;
    if (reply->error) {
        log_error_reply("counter: mutation error", reply);
    } else {
        last_written = (int64_t)value;
        log_with_number(EXO_LOG_INFO, "counter: " COUNTER_ENTITY " = ", value);
    }
    count_later();
}
