/*
 * Benchmark guest for `make bench-apphost`: keeps CHAINS store queries in flight, sending the
 * next one from the reply callback, so the host measures message round trips (host -> guest
 * in-message -> guest -> host out-message) and the queries/s an app can push through the store.
 */
#include "exocore.h"

#define CHAINS 8

static uint64_t replies;
static exo_buf query;

static void send_query(void);

static void on_reply(void *ctx, const exo_store_reply *reply) {
    (void)ctx;
    (void)reply;
    replies++;
    send_query();
}

static void send_query(void) {
    if (!exo_store_query(query.data, query.len, on_reply, 0)) exo_error("bench: query not sent");
}

void exo_app_start(void) {
    exo_query_all(&query);
    exo_query_paging(&query, 1);
    for (int i = 0; i < CHAINS; i++) send_query();
    exo_info("bench started");
}
