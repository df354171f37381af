/* ask: put one question to edge-slm over MQTT 3.1.1, as a device's firmware
 * would, and print the answer.
 *
 *   ask -h HOST -p PORT -d DEVICE_ID [-u USER -P PASSWORD] [-s] [-t TIMEOUT_S] "question"
 *
 * The protocol (firmware_bridge/PROTOCOL.md), as seen from a device:
 *   1. subscribe (QoS 1) to edge-slm/v1/<device>/answer, before asking, so
 *      no answer can arrive unseen;
 *   2. publish {"id": ..., "question": ..., "stream": ...} at QoS 1 to
 *      edge-slm/v1/<device>/ask; the broker's PUBACK means it has the question;
 *   3. read answers, keeping only those whose "id" is ours: with "stream",
 *      chunks {"id", "seq", "text"} (QoS 0, best effort), then always exactly
 *      one final {"id", "final": true, "status", "text", ...} (QoS 1), whose
 *      "text" is the whole answer.
 *
 * Exit status: 0 when the final's status is "ok"; 1 for any other status
 * (busy, expired, bad_request, ...: the service answered, with a reason);
 * 2 when there was no answer (timeout, connection error, bad arguments).
 *
 * Single-threaded on purpose: mosquitto_loop() runs the network and calls
 * our callbacks on this thread, as a firmware main loop would, so the state
 * below needs no locks. Every wait is bounded by one deadline. */
#define _POSIX_C_SOURCE 200809L /* getopt, clock_gettime, getpid under -std=c11 */

#include <errno.h>
#include <mosquitto.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "tiny_json.h"

/* From firmware_bridge/protocol.py: the topic root and the length limits
 * the service checks (it refuses longer ids and device ids). */
#define ROOT "edge-slm/v1"
#define MAX_DEVICE_ID 64
#define MAX_ID 64

/* The largest answer text we read. Fixed, as firmware would size it: the
 * service bounds an answer by max_tokens (4096 at most, 256 by default),
 * which in practice stays well below this. */
#define MAX_ANSWER (64 * 1024)

#define KEEPALIVE_S 30
#define EXIT_ANSWERED 0
#define EXIT_REFUSED 1
#define EXIT_NO_ANSWER 2

enum phase { CONNECTING, SUBSCRIBING, ASKED, DONE };

struct ask {
    const char *host;
    int port;
    char ask_topic[sizeof ROOT + MAX_DEVICE_ID + 8];
    char answer_topic[sizeof ROOT + MAX_DEVICE_ID + 8];
    char id[2 * 8 + 1];       /* 16 hex digits */
    char *payload;            /* the question as JSON, built once */
    size_t payload_len;
    enum phase phase;
    int sub_mid, pub_mid;     /* to match the broker's SUBACK and PUBACK */
    int acknowledged;         /* the broker has our question */
    unsigned long next_seq;   /* the chunk we expect next */
    size_t shown;             /* bytes of chunk text printed so far */
    int gap;                  /* a chunk went missing (QoS 0) */
    int exit_code;
    char failure[256];        /* why there is no answer; printed once */
    char text[MAX_ANSWER];    /* one decoded "text", reused per message */
};

/* Record the first reason we must give up; later ones are consequences. */
static void fail(struct ask *a, const char *fmt, ...)
{
    if (a->phase == DONE) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(a->failure, sizeof a->failure, fmt, ap);
    va_end(ap);
    a->phase = DONE;
    a->exit_code = EXIT_NO_ANSWER;
}

/* libmosquitto's own text for an error code; MOSQ_ERR_ERRNO means errno has it. */
static const char *mosq_error(int rc)
{
    return rc == MOSQ_ERR_ERRNO ? strerror(errno) : mosquitto_strerror(rc);
}

static double now_s(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

/* Letters, digits, '_', '.', '-', starting with a letter or digit: the
 * service's rule (protocol.valid_device_id). It also keeps MQTT's '/', '+'
 * and '#' out of the topics we build from it. */
static int valid_device_id(const char *d)
{
    size_t n = strlen(d);
    if (n == 0 || n > MAX_DEVICE_ID) return 0;
    for (size_t i = 0; i < n; i++) {
        char c = d[i];
        int alnum = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9');
        if (!alnum && (i == 0 || (c != '_' && c != '.' && c != '-'))) return 0;
    }
    return 1;
}

/* A fresh id for the question. The service treats a question with a
 * (device, id) it has seen within its dedup window (10 minutes by default)
 * as a repeat and sends the stored answer again, so ids must not repeat
 * across reboots: random, not a counter that restarts at 0. */
static void new_id(char out[17])
{
    unsigned char b[8];
    FILE *f = fopen("/dev/urandom", "rb");
    size_t got = f ? fread(b, 1, sizeof b, f) : 0;
    if (f) fclose(f);
    if (got != sizeof b) {
        /* No entropy source (some RTOS): time and pid still differ per run. */
        unsigned long long x = (unsigned long long)time(NULL) * 1000003u ^ (unsigned long long)getpid();
        x ^= (unsigned long long)(now_s() * 1e9);
        for (int i = 0; i < 8; i++) b[i] = (unsigned char)(x >> (8 * i));
    }
    for (int i = 0; i < 8; i++) snprintf(out + 2 * i, 3, "%02x", b[i]);
}

/* {"id":"...","question":<escaped>,"stream":true|false} */
static int build_payload(struct ask *a, const char *question, int stream)
{
    size_t qlen = strlen(question);
    size_t cap = 6 * qlen + 3 + sizeof a->id + 64; /* the worst-case escape, plus the envelope */
    char *literal = malloc(6 * qlen + 3);
    a->payload = malloc(cap);
    if (!literal || !a->payload) {
        free(literal);
        return 0;
    }
    long n = tj_escape(question, qlen, literal, 6 * qlen + 3);
    int m = n < 0 ? -1 : snprintf(a->payload, cap, "{\"id\":\"%s\",\"question\":%s,\"stream\":%s}",
                                  a->id, literal, stream ? "true" : "false");
    free(literal);
    if (m < 0 || (size_t)m >= cap) return 0;
    a->payload_len = (size_t)m;
    return 1;
}

/* ---- callbacks: run inside mosquitto_loop(), on this thread ---- */

static void on_connect(struct mosquitto *mosq, void *obj, int rc)
{
    struct ask *a = obj;
    if (rc != 0) { /* the CONNACK's return code: bad credentials, not authorised, ... */
        fail(a, "the broker at %s:%d refused the connection: %s", a->host, a->port,
             mosquitto_connack_string(rc));
        return;
    }
    rc = mosquitto_subscribe(mosq, &a->sub_mid, a->answer_topic, 1);
    if (rc != MOSQ_ERR_SUCCESS) {
        fail(a, "cannot subscribe to %s: %s", a->answer_topic, mosq_error(rc));
        return;
    }
    a->phase = SUBSCRIBING;
}

static void on_subscribe(struct mosquitto *mosq, void *obj, int mid, int qos_count, const int *granted)
{
    struct ask *a = obj;
    if (mid != a->sub_mid || a->phase != SUBSCRIBING) return;
    /* 0x80 in a SUBACK is a refusal by an ACL checked at subscribe time.
     * (Mosquitto 2.0 grants it and then delivers nothing: a timeout.) */
    if (qos_count < 1 || granted[0] < 0 || granted[0] > 2) {
        fail(a, "the broker refused the subscription to %s", a->answer_topic);
        return;
    }
    int rc = mosquitto_publish(mosq, &a->pub_mid, a->ask_topic, (int)a->payload_len, a->payload, 1, false);
    if (rc != MOSQ_ERR_SUCCESS) {
        fail(a, "cannot publish to %s: %s", a->ask_topic, mosq_error(rc));
        return;
    }
    a->phase = ASKED;
}

static void on_publish(struct mosquitto *mosq, void *obj, int mid)
{
    struct ask *a = obj;
    (void)mosq;
    if (mid == a->pub_mid) a->acknowledged = 1;
}

/* A connection that failed or dropped, from the loop or from on_disconnect. */
static void broker_gone(struct ask *a, int rc)
{
    fail(a, "%s the broker at %s:%d: %s", a->phase == CONNECTING ? "cannot reach" : "lost", a->host,
         a->port, rc == 0 ? "disconnected" : mosq_error(rc));
}

static void on_disconnect(struct mosquitto *mosq, void *obj, int rc)
{
    (void)mosq;
    broker_gone(obj, rc);
}

static void write_out(const char *s, size_t n)
{
    fwrite(s, 1, n, stdout);
    fflush(stdout); /* chunks are for watching the answer grow */
}

static void on_final(struct ask *a, const char *json, size_t len, size_t text_len)
{
    char status[32] = "";
    tj_span v;
    if (tj_find(json, len, "status", &v) == TJ_FOUND)
        tj_string(v, status, sizeof status); /* unreadable: stays "", which is not "ok" */

    /* The final's text is the whole answer. After chunks, print what they
     * did not already show; if one was lost, the whole text again. */
    if (a->shown == 0) {
        write_out(a->text, text_len);
    } else if (!a->gap && a->shown <= text_len) {
        write_out(a->text + a->shown, text_len - a->shown);
    } else {
        fprintf(stderr, "ask: a streamed chunk was lost; the whole answer follows\n");
        write_out("\n", 1);
        write_out(a->text, text_len);
    }
    write_out("\n", 1);

    a->phase = DONE;
    if (strcmp(status, "ok") == 0) {
        a->exit_code = EXIT_ANSWERED;
        return;
    }
    a->exit_code = EXIT_REFUSED;
    /* Error finals say why in "error"; busy ones also when to try again. */
    long n = tj_find(json, len, "error", &v) == TJ_FOUND ? tj_string(v, a->text, sizeof a->text) : -1;
    fprintf(stderr, "status: %s%s%s", status[0] ? status : "(unreadable)", n > 0 ? ": " : "",
            n > 0 ? a->text : "");
    if (tj_find(json, len, "retry_after_s", &v) == TJ_FOUND)
        fprintf(stderr, " (retry after %.*s s)", (int)(v.end - v.start), v.start);
    fputc('\n', stderr);
}

static void on_message(struct mosquitto *mosq, void *obj, const struct mosquitto_message *msg)
{
    struct ask *a = obj;
    const char *json = msg->payload;
    size_t len = msg->payloadlen > 0 ? (size_t)msg->payloadlen : 0;
    char id[4 * MAX_ID + 1]; /* decoded UTF-8: up to 4 bytes a character */
    tj_span v, f;
    (void)mosq;

    if (a->phase != ASKED) return;
    /* Other questions from this device share the topic: skip what is not
     * ours, and what we cannot read (it cannot be shown to be ours). */
    if (tj_find(json, len, "id", &v) != TJ_FOUND) return;
    int final = tj_find(json, len, "final", &f) == TJ_FOUND && tj_is_true(f);
    /* "id": null is a refusal of a question whose id the service could not
     * read (too large, not JSON): with one question in flight, ours. */
    int unread = v.end - v.start == 4 && memcmp(v.start, "null", 4) == 0;
    if (!(final && unread)) {
        long id_len = tj_string(v, id, sizeof id);
        if (id_len < 0 || (size_t)id_len != strlen(a->id) || memcmp(id, a->id, (size_t)id_len) != 0)
            return;
    }

    long text_len = 0;
    if (tj_find(json, len, "text", &v) == TJ_FOUND) {
        text_len = tj_string(v, a->text, sizeof a->text);
        if (text_len < 0) {
            fail(a, "an answer's text is not a JSON string or is longer than %d bytes", MAX_ANSWER);
            return;
        }
    }
    if (final) {
        on_final(a, json, len, (size_t)text_len);
        return;
    }
    unsigned long seq;
    if (tj_find(json, len, "seq", &v) != TJ_FOUND || !tj_uint(v, &seq)) return;
    if (seq < a->next_seq) return; /* seen it already */
    if (seq > a->next_seq) a->gap = 1;
    write_out(a->text, (size_t)text_len);
    a->shown += (size_t)text_len;
    a->next_seq = seq + 1;
}

/* ---- main ---- */

static void usage(void)
{
    fprintf(stderr, "usage: ask -h HOST -p PORT -d DEVICE_ID [-u USER -P PASSWORD] [-s] [-t TIMEOUT_S] "
                    "\"question\"\n");
}

/* Why we are still waiting, for the timeout's one line. */
static const char *waiting_for(const struct ask *a)
{
    switch (a->phase) {
    case CONNECTING: return "no connection to the broker";
    case SUBSCRIBING: return "the broker did not confirm the subscription";
    default: return a->acknowledged ? "no final answer (is edge-slm serve running?)"
                                    : "the broker did not acknowledge the question";
    }
}

int main(int argc, char **argv)
{
    static struct ask a; /* static: the answer buffer is too large for some stacks */
    const char *device = NULL, *user = NULL, *password = NULL;
    double timeout = 60.0;
    int stream = 0, opt;
    char *end;

    a.host = "127.0.0.1";
    a.port = 1883;
    while ((opt = getopt(argc, argv, "h:p:d:u:P:st:")) != -1) {
        switch (opt) {
        case 'h': a.host = optarg; break;
        case 'p': {
            long port = strtol(optarg, &end, 10);
            if (*optarg == '\0' || *end != '\0' || port < 1 || port > 65535) {
                fprintf(stderr, "ask: port %s is not a number from 1 to 65535\n", optarg);
                return EXIT_NO_ANSWER;
            }
            a.port = (int)port;
            break;
        }
        case 'd': device = optarg; break;
        case 'u': user = optarg; break;
        case 'P': password = optarg; break;
        case 's': stream = 1; break;
        case 't':
            timeout = strtod(optarg, &end);
            if (*optarg == '\0' || *end != '\0' || !(timeout > 0 && timeout <= 86400)) {
                fprintf(stderr, "ask: timeout %s is not a number of seconds from 0 to 86400\n", optarg);
                return EXIT_NO_ANSWER;
            }
            break;
        default: usage(); return EXIT_NO_ANSWER;
        }
    }
    if (optind != argc - 1 || !device) {
        usage();
        return EXIT_NO_ANSWER;
    }
    if (!valid_device_id(device)) {
        fprintf(stderr, "ask: device id %s: letters, digits, '_', '.', '-' (at most %d), "
                        "starting with a letter or digit\n", device, MAX_DEVICE_ID);
        return EXIT_NO_ANSWER;
    }
    if (password && !user) {
        fprintf(stderr, "ask: -P needs -u\n");
        return EXIT_NO_ANSWER;
    }
    snprintf(a.ask_topic, sizeof a.ask_topic, ROOT "/%s/ask", device);
    snprintf(a.answer_topic, sizeof a.answer_topic, ROOT "/%s/answer", device);
    new_id(a.id);
    if (!build_payload(&a, argv[optind], stream)) {
        fprintf(stderr, "ask: out of memory for a question of %zu bytes\n", strlen(argv[optind]));
        return EXIT_NO_ANSWER;
    }

    int rc = mosquitto_lib_init();
    if (rc != MOSQ_ERR_SUCCESS) {
        fprintf(stderr, "ask: libmosquitto: %s\n", mosq_error(rc));
        free(a.payload);
        return EXIT_NO_ANSWER;
    }
    /* A clean session: this program asks once and leaves, so the broker
     * need keep nothing for it. (Firmware that must get answers across a
     * reconnect keeps a fixed client id and clean_session false.) With no
     * client id, libmosquitto makes a random one. */
    struct mosquitto *mosq = mosquitto_new(NULL, true, &a);
    if (!mosq) {
        fprintf(stderr, "ask: cannot create an MQTT client: %s\n", strerror(errno));
        mosquitto_lib_cleanup();
        free(a.payload);
        return EXIT_NO_ANSWER;
    }
    mosquitto_connect_callback_set(mosq, on_connect);
    mosquitto_subscribe_callback_set(mosq, on_subscribe);
    mosquitto_publish_callback_set(mosq, on_publish);
    mosquitto_message_callback_set(mosq, on_message);
    mosquitto_disconnect_callback_set(mosq, on_disconnect);

    double deadline = now_s() + timeout;
    rc = mosquitto_int_option(mosq, MOSQ_OPT_PROTOCOL_VERSION, MQTT_PROTOCOL_V311);
    if (rc == MOSQ_ERR_SUCCESS) {
        /* The PUBACK of each chunk and the next question go out at once,
         * not after the broker's delayed ACK of the last packet (Nagle). */
        rc = mosquitto_int_option(mosq, MOSQ_OPT_TCP_NODELAY, 1);
    }
    if (rc != MOSQ_ERR_SUCCESS) {
        fail(&a, "cannot set MQTT 3.1.1 without Nagle's delay: %s", mosq_error(rc));
    } else if (user && (rc = mosquitto_username_pw_set(mosq, user, password)) != MOSQ_ERR_SUCCESS) {
        fail(&a, "cannot set the user name: %s", mosq_error(rc));
    } else {
        /* _async: the TCP connect does not block (a blocking one can take
         * minutes to fail), so the deadline below bounds it too. The name
         * lookup still blocks; give an address where that matters. */
        rc = mosquitto_connect_async(mosq, a.host, a.port, KEEPALIVE_S);
        if (rc != MOSQ_ERR_SUCCESS) broker_gone(&a, rc);
    }

    while (a.phase != DONE) {
        double left = deadline - now_s();
        if (left <= 0) {
            fail(&a, "%s within %g s", waiting_for(&a), timeout);
            break;
        }
        /* Wait at most 100 ms at a time, never past the deadline. */
        int wait_ms = left < 0.1 ? (int)(left * 1000) + 1 : 100;
        rc = mosquitto_loop(mosq, wait_ms, 1);
        if (rc != MOSQ_ERR_SUCCESS) broker_gone(&a, rc);
    }
    if (a.failure[0]) fprintf(stderr, "ask: %s\n", a.failure);

    /* Leave politely; a failure here changes nothing for the answer we have. */
    if (mosquitto_disconnect(mosq) == MOSQ_ERR_SUCCESS)
        mosquitto_loop(mosq, 100, 1);
    mosquitto_destroy(mosq);
    mosquitto_lib_cleanup();
    free(a.payload);
    return a.exit_code;
}
