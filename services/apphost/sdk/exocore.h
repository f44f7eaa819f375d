/*
 * Exocore guest SDK for C: write an app that runs in the Exocore app host (SPEC.md 5.3, 5.4).
 *
 * An app is a wasm32 module (built with `python -m ziglang cc --target=wasm32-freestanding`, or
 * wasm32-wasi) that links `exocore.c` and defines one function:
 *
 *     void exo_app_start(void);   // called once when the host boots the app
 *
 * From there it logs, reads the time, sends store mutations and queries (protobuf bytes, built
 * with the small encoder below) whose replies arrive in callbacks, and schedules work on timers.
 * Everything runs on the host's calls into the module (single threaded, no blocking): a callback
 * or timer runs during a tick or while the host delivers a message, and must return quickly.
 *
 * The SDK implements the ABI the host expects: the exports `__exocore_init`,
 * `__exocore_app_init`, `__exocore_app_boot`, `__exocore_tick`, `__exocore_in_message`,
 * `__exocore_alloc`, `__exocore_free`, and the imports `__exocore_host_log`,
 * `__exocore_host_now`, `__exocore_host_out_message` (module "exocore").
 *
 * The host limits every call (fuel, wall-clock deadline), the linear memory and the store
 * requests in flight; an app breaking a limit or trapping is stopped and restarted later.
 */
#ifndef EXOCORE_H
#define EXOCORE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- constants of the ABI --------------------------------------------------------------- */

#define EXO_LOG_ERROR 1
#define EXO_LOG_WARN 2
#define EXO_LOG_INFO 3
#define EXO_LOG_DEBUG 4
#define EXO_LOG_TRACE 5

#define EXO_STATUS_OK 0
#define EXO_STATUS_UNHANDLED 1
#define EXO_STATUS_DECODE_ERROR 2

/* exocore.apps.InMessageType / OutMessageType */
#define EXO_IN_STORE_ENTITY_RESULTS 1
#define EXO_IN_STORE_MUTATION_RESULT 2
#define EXO_OUT_STORE_ENTITY_QUERY 1
#define EXO_OUT_STORE_MUTATION_REQUEST 2

#define EXO_NS_PER_MS ((uint64_t)1000000)
#define EXO_NS_PER_S ((uint64_t)1000000000)

/* Capacities of the SDK's fixed tables (override with -D at build time). */
#ifndef EXO_MAX_TIMERS
#define EXO_MAX_TIMERS 64
#endif
#ifndef EXO_MAX_PENDING_REQUESTS
#define EXO_MAX_PENDING_REQUESTS 64
#endif
/* A store request without a reply after this long completes with the error "timeout". */
#ifndef EXO_STORE_TIMEOUT_NS
#define EXO_STORE_TIMEOUT_NS (10 * EXO_NS_PER_S)
#endif

/* ---- the app ------------------------------------------------------------------------------ */

/* Defined by the app: called once when the host boots it (after the SDK is initialized). */
void exo_app_start(void);

/* ---- logging and time ----------------------------------------------------------------- */

void exo_log(int level, const char *message);             /* NUL-terminated UTF-8 */
void exo_log_n(int level, const char *message, size_t len);
#define exo_error(m) exo_log(EXO_LOG_ERROR, (m))
#define exo_warn(m) exo_log(EXO_LOG_WARN, (m))
#define exo_info(m) exo_log(EXO_LOG_INFO, (m))
#define exo_debug(m) exo_log(EXO_LOG_DEBUG, (m))

/* Wall-clock time, nanoseconds since the Unix epoch (from the host). */
uint64_t exo_now(void);

/* ---- memory --------------------------------------------------------------------------- */

/* Allocation from the SDK's allocator (libc malloc on wasm32-wasi); NULL when memory runs out
 * (the host caps it). exo_free(NULL) does nothing. exo_realloc keeps the content. */
void *exo_alloc(size_t size);
void exo_free(void *ptr);
void *exo_realloc(void *ptr, size_t size);
void *exo_memcpy(void *dst, const void *src, size_t len);
void *exo_memset(void *dst, int value, size_t len);
size_t exo_strlen(const char *s);
bool exo_bytes_equal(const void *a, size_t a_len, const void *b, size_t b_len);

/* ---- byte buffers and text -------------------------------------------------------------- */

/* A growable byte buffer; zero-initialize (`exo_buf b = {0};`), exo_buf_free when done. When an
 * allocation fails, `failed` is set and further appends are ignored. */
typedef struct {
    uint8_t *data;
    size_t len;
    size_t cap;
    bool failed;
} exo_buf;

void exo_buf_free(exo_buf *b);
void exo_buf_clear(exo_buf *b); /* len = 0, keeps the memory */
void exo_buf_append(exo_buf *b, const void *data, size_t len);
void exo_buf_str(exo_buf *b, const char *s);
void exo_buf_u64(exo_buf *b, uint64_t value); /* decimal */
void exo_buf_i64(exo_buf *b, int64_t value);
/* Logs the buffer's content as text. */
void exo_log_buf(int level, const exo_buf *b);

/* ---- protobuf encoding ------------------------------------------------------------------ */

#define EXO_PB_VARINT 0
#define EXO_PB_FIXED64 1
#define EXO_PB_LEN 2
#define EXO_PB_FIXED32 5

void exo_pb_varint(exo_buf *b, uint64_t value);
void exo_pb_tag(exo_buf *b, uint32_t field, uint32_t wire_type);
/* uint32/uint64/int32 (non negative)/bool/enum field. */
void exo_pb_uint(exo_buf *b, uint32_t field, uint64_t value);
/* bytes / string / already encoded message field. */
void exo_pb_bytes(exo_buf *b, uint32_t field, const void *data, size_t len);
void exo_pb_string(exo_buf *b, uint32_t field, const char *s);
/* A nested message written in place: `size_t m = exo_pb_begin(b, 3); ...; exo_pb_end(b, m);` */
size_t exo_pb_begin(exo_buf *b, uint32_t field);
void exo_pb_end(exo_buf *b, size_t mark);

/* ---- protobuf decoding ------------------------------------------------------------------ */

typedef struct {
    const uint8_t *p;
    const uint8_t *end;
} exo_pb_reader;

typedef struct {
    uint32_t field;
    uint32_t wire_type;
    uint64_t value;      /* varint, fixed64 and fixed32 values */
    const uint8_t *data; /* length-delimited: the bytes (inside the decoded buffer) */
    size_t len;
} exo_pb_field;

void exo_pb_reader_init(exo_pb_reader *r, const void *data, size_t len);
/* 1: `f` holds the next field; 0: end of the message; -1: malformed. */
int exo_pb_next(exo_pb_reader *r, exo_pb_field *f);

/* ---- tasks and timers ---------------------------------------------------------------------- */

typedef void (*exo_task_fn)(void *ctx);

/* Runs fn(ctx) on the next tick. Returns false when the timer table is full. */
bool exo_spawn(exo_task_fn fn, void *ctx);
/* Runs fn(ctx) on the first tick at or after now + delay_ns (the SDK asks the host for that
 * tick). Returns false when the timer table is full. */
bool exo_sleep(uint64_t delay_ns, exo_task_fn fn, void *ctx);
bool exo_at(uint64_t time_ns, exo_task_fn fn, void *ctx);

/* ---- store ------------------------------------------------------------------------------ */

typedef struct {
    uint32_t rendez_vous_id;
    /* Encoded exocore.store.EntityResults (query) or MutationResult (mutation); valid during the
     * callback only. */
    const uint8_t *data;
    size_t len;
    /* NULL on success, else what went wrong (store error, "timeout", "cancelled"). */
    const char *error;
    size_t error_len;
} exo_store_reply;

typedef void (*exo_store_cb)(void *ctx, const exo_store_reply *reply);

/* Sends an encoded exocore.store.MutationRequest / EntityQuery; `cb` gets the reply. Returns the
 * rendez-vous id, or 0 when it could not be sent (request table full, host refused it). */
uint32_t exo_store_mutate(const void *request, size_t len, exo_store_cb cb, void *ctx);
uint32_t exo_store_query(const void *query, size_t len, exo_store_cb cb, void *ctx);
/* Store requests awaiting their reply. */
size_t exo_store_pending(void);

/* Builders for the common requests, appended to a buffer holding a MutationRequest/EntityQuery. */
void exo_mutation_delete_entity(exo_buf *request, const char *entity_id);
/* Puts trait `trait_id` of entity `entity_id`: `message` is the encoded trait message of type
 * `type_name` (e.g. "exocore.test.TestMessage"). */
void exo_mutation_put_trait(exo_buf *request, const char *entity_id, const char *trait_id, const char *type_name,
                            const void *message, size_t message_len);
void exo_query_ids(exo_buf *query, const char *id);
void exo_query_trait(exo_buf *query, const char *trait_name);
void exo_query_all(exo_buf *query);
void exo_query_paging(exo_buf *query, uint32_t count);

/* Number of entities in an encoded EntityResults; -1 if malformed. */
int64_t exo_results_count(const uint8_t *data, size_t len);
/* The encoded `next_page` Paging of an EntityResults (NULL when there is none). */
const uint8_t *exo_results_next_page(const uint8_t *data, size_t len, size_t *page_len);

/* ---- low level ---------------------------------------------------------------------------- */

/* Sends an OutMessage; returns the host's MessageStatus. */
uint32_t exo_send_out_message(uint32_t type, uint32_t rendez_vous_id, const void *data, size_t len);

#ifdef __cplusplus
}
#endif

#endif /* EXOCORE_H */
