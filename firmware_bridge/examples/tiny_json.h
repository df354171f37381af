/* tiny_json: just enough JSON for an MQTT device to read edge-slm's answers
 * and to write its questions, with no JSON library and no heap.
 *
 * Reading: tj_find() locates one key of the top-level object and returns a
 * span of the raw value; tj_string(), tj_uint() and tj_is_true() turn a span
 * into C values. Only the top level is searched: a key name that appears
 * inside a string or inside a nested object (the answer's "model" and
 * "latency_ms" objects) is never mistaken for the key itself.
 *
 * Writing: tj_escape() turns bytes into a JSON string literal.
 *
 * Nothing here allocates, prints or exits; every function reports failure
 * through its return value, and every loop is bounded by the input length. */
#ifndef TINY_JSON_H
#define TINY_JSON_H

#include <stddef.h>

/* Values nested deeper than this are refused, so a hostile payload of many
 * '[' cannot exhaust the (small, on firmware) stack. edge-slm's answers are
 * two levels deep. */
#define TJ_MAX_DEPTH 16

/* The raw text of one JSON value: [start, end), pointing into the payload. */
typedef struct {
    const char *start;
    const char *end;
} tj_span;

enum {
    TJ_MALFORMED = -1, /* not a JSON object, or broken somewhere in it */
    TJ_MISSING = 0,    /* a well-formed object without that key */
    TJ_FOUND = 1
};

/* Find `key` among the top-level members of the object in json[0, len) and
 * set *value to its raw value. The whole object is checked, so a truncated
 * or broken payload is TJ_MALFORMED even when the key came early. When a key
 * appears twice the last one wins, as in Python's json module. */
int tj_find(const char *json, size_t len, const char *key, tj_span *value);

/* Decode the JSON string literal in `value` into out[0, cap) as UTF-8,
 * NUL-terminated (the text may itself hold NULs from \u0000, hence the
 * length). \uXXXX escapes become UTF-8, surrogate pairs one code point, and
 * a lone surrogate U+FFFD. Returns the length without the NUL, or -1 if the
 * span is not a valid string or the text does not fit. A decoded string is
 * never longer than its literal, so cap = literal length + 1 always fits. */
long tj_string(tj_span value, char *out, size_t cap);

/* 1 and *out set if `value` is a whole number from 0 to ULONG_MAX written
 * as JSON writes integers (no sign, no fraction, no leading zero), else 0. */
int tj_uint(tj_span value, unsigned long *out);

/* 1 if `value` is the literal true. */
int tj_is_true(tj_span value);

/* Write in[0, len) as a JSON string literal (with its quotes) to out[0, cap),
 * NUL-terminated: '"' and '\\' escaped, control characters as \n, \t, ... or
 * \u00XX, every other byte (UTF-8 included) as it is. Returns the literal's
 * length without the NUL, or -1 if cap is too small; 6 * len + 3 always
 * suffices. */
long tj_escape(const char *in, size_t len, char *out, size_t cap);

#endif
