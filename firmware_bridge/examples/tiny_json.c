/* tiny_json: see tiny_json.h. A validating scanner, not a parser: it walks
 * the payload once per lookup and builds nothing, which is all a device
 * reading a handful of keys needs. */
#include "tiny_json.h"

#include <limits.h>
#include <string.h>

static const char *skip_ws(const char *p, const char *end)
{
    while (p < end && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r'))
        p++;
    return p;
}

static int hex_digit(char c)
{
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* The 16-bit value of the four hex digits at p (p + 4 <= end), or -1. */
static long hex4(const char *p, const char *end)
{
    long v = 0;
    if (end - p < 4) return -1;
    for (int i = 0; i < 4; i++) {
        int d = hex_digit(p[i]);
        if (d < 0) return -1;
        v = v * 16 + d;
    }
    return v;
}

/* memchr, not strchr: strchr would also "find" the terminating NUL. */
static int one_of(char c, const char *set)
{
    return memchr(set, c, strlen(set)) != NULL;
}

/* p is on an opening quote; returns just past the closing one, or NULL. */
static const char *skip_string(const char *p, const char *end)
{
    if (p >= end || *p != '"') return NULL;
    for (p++; p < end; p++) {
        unsigned char c = (unsigned char)*p;
        if (c == '"') return p + 1;
        if (c < 0x20) return NULL; /* JSON forbids raw control characters in strings */
        if (c != '\\') continue;
        if (++p >= end) return NULL;
        if (*p == 'u') {
            if (hex4(p + 1, end) < 0) return NULL;
            p += 4;
        } else if (!one_of(*p, "\"\\/bfnrt")) {
            return NULL;
        }
    }
    return NULL; /* unterminated */
}

static const char *skip_digits(const char *p, const char *end)
{
    while (p < end && *p >= '0' && *p <= '9') p++;
    return p;
}

/* -? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)? */
static const char *skip_number(const char *p, const char *end)
{
    const char *q;
    if (p < end && *p == '-') p++;
    if (p < end && *p == '0') {
        p++;
    } else {
        q = skip_digits(p, end);
        if (q == p) return NULL;
        p = q;
    }
    if (p < end && *p == '.') {
        q = skip_digits(p + 1, end);
        if (q == p + 1) return NULL;
        p = q;
    }
    if (p < end && (*p == 'e' || *p == 'E')) {
        p++;
        if (p < end && (*p == '+' || *p == '-')) p++;
        q = skip_digits(p, end);
        if (q == p) return NULL;
        p = q;
    }
    return p;
}

static const char *skip_literal(const char *p, const char *end, const char *word)
{
    size_t n = strlen(word);
    if ((size_t)(end - p) < n || memcmp(p, word, n) != 0) return NULL;
    return p + n;
}

static const char *skip_value(const char *p, const char *end, int depth);

/* The members of an object or the elements of an array, p just past the
 * opening bracket; returns just past the closing one, or NULL. */
static const char *skip_container(const char *p, const char *end, int depth, char close)
{
    p = skip_ws(p, end);
    if (p < end && *p == close) return p + 1;
    for (;;) {
        if (close == '}') {
            p = skip_string(p, end);
            if (!p) return NULL;
            p = skip_ws(p, end);
            if (p >= end || *p != ':') return NULL;
            p = skip_ws(p + 1, end);
        }
        p = skip_value(p, end, depth + 1);
        if (!p) return NULL;
        p = skip_ws(p, end);
        if (p >= end) return NULL;
        if (*p == close) return p + 1;
        if (*p != ',') return NULL;
        p = skip_ws(p + 1, end); /* a trailing comma then fails on the next value */
    }
}

static const char *skip_value(const char *p, const char *end, int depth)
{
    if (depth > TJ_MAX_DEPTH || p >= end) return NULL;
    switch (*p) {
    case '"': return skip_string(p, end);
    case '{': return skip_container(p + 1, end, depth, '}');
    case '[': return skip_container(p + 1, end, depth, ']');
    case 't': return skip_literal(p, end, "true");
    case 'f': return skip_literal(p, end, "false");
    case 'n': return skip_literal(p, end, "null");
    default: return skip_number(p, end);
    }
}

/* Whether the key literal [start, end) decodes to `key`. Keys are compared
 * decoded, so "\u0069d" is "id", as any JSON reader would say. */
static int key_equals(const char *start, const char *end, const char *key)
{
    char decoded[64];
    size_t n = strlen(key);
    tj_span span = {start, end};
    long got = tj_string(span, decoded, sizeof decoded);
    /* got < 0 here only means "longer than any key we look for": the
     * literal was already checked by skip_string. */
    return got >= 0 && (size_t)got == n && memcmp(decoded, key, n) == 0;
}

int tj_find(const char *json, size_t len, const char *key, tj_span *value)
{
    const char *end = json + len;
    const char *p = skip_ws(json, end);
    int found = TJ_MISSING;

    if (p >= end || *p != '{') return TJ_MALFORMED;
    p = skip_ws(p + 1, end);
    if (p < end && *p == '}') {
        p++;
    } else {
        for (;;) {
            const char *key_start = p;
            p = skip_string(p, end);
            if (!p) return TJ_MALFORMED;
            const char *key_end = p;
            p = skip_ws(p, end);
            if (p >= end || *p != ':') return TJ_MALFORMED;
            const char *value_start = skip_ws(p + 1, end);
            p = skip_value(value_start, end, 2);
            if (!p) return TJ_MALFORMED;
            if (key_equals(key_start, key_end, key)) {
                value->start = value_start;
                value->end = p;
                found = TJ_FOUND;
            }
            p = skip_ws(p, end);
            if (p < end && *p == '}') {
                p++;
                break;
            }
            if (p >= end || *p != ',') return TJ_MALFORMED;
            p = skip_ws(p + 1, end);
        }
    }
    return skip_ws(p, end) == end ? found : TJ_MALFORMED;
}

/* Append code point cp as UTF-8 to out[*n], keeping room for the NUL. */
static int put_utf8(unsigned long cp, char *out, size_t cap, size_t *n)
{
    unsigned char b[4];
    size_t k;
    if (cp < 0x80) {
        b[0] = (unsigned char)cp;
        k = 1;
    } else if (cp < 0x800) {
        b[0] = (unsigned char)(0xC0 | (cp >> 6));
        b[1] = (unsigned char)(0x80 | (cp & 0x3F));
        k = 2;
    } else if (cp < 0x10000) {
        b[0] = (unsigned char)(0xE0 | (cp >> 12));
        b[1] = (unsigned char)(0x80 | ((cp >> 6) & 0x3F));
        b[2] = (unsigned char)(0x80 | (cp & 0x3F));
        k = 3;
    } else {
        b[0] = (unsigned char)(0xF0 | (cp >> 18));
        b[1] = (unsigned char)(0x80 | ((cp >> 12) & 0x3F));
        b[2] = (unsigned char)(0x80 | ((cp >> 6) & 0x3F));
        b[3] = (unsigned char)(0x80 | (cp & 0x3F));
        k = 4;
    }
    if (cap - *n < k + 1) return 0;
    memcpy(out + *n, b, k);
    *n += k;
    return 1;
}

long tj_string(tj_span value, char *out, size_t cap)
{
    const char *p = value.start, *end = value.end;
    size_t n = 0;

    if (cap == 0 || end - p < 2 || *p != '"' || end[-1] != '"') return -1;
    end--; /* the closing quote */
    for (p++; p < end; p++) {
        unsigned char c = (unsigned char)*p;
        unsigned long cp;
        if (c == '"' || c < 0x20) return -1; /* an unescaped quote: the span is not one literal */
        if (c != '\\') {
            /* Bytes of UTF-8 pass through as they are: the broker delivers
             * what edge-slm sent, which is UTF-8. */
            if (cap - n < 2) return -1;
            out[n++] = (char)c;
            continue;
        }
        if (++p >= end) return -1;
        switch (*p) {
        case '"': cp = '"'; break;
        case '\\': cp = '\\'; break;
        case '/': cp = '/'; break;
        case 'b': cp = '\b'; break;
        case 'f': cp = '\f'; break;
        case 'n': cp = '\n'; break;
        case 'r': cp = '\r'; break;
        case 't': cp = '\t'; break;
        case 'u': {
            long u = hex4(p + 1, end);
            if (u < 0) return -1;
            p += 4;
            cp = (unsigned long)u;
            if (cp >= 0xD800 && cp <= 0xDBFF) {
                /* A high surrogate counts only with a low one right after
                 * it: together they are one code point above U+FFFF. */
                long low = (end - p >= 7 && p[1] == '\\' && p[2] == 'u') ? hex4(p + 3, end) : -1;
                if (low >= 0xDC00 && low <= 0xDFFF) {
                    cp = 0x10000 + ((cp - 0xD800) << 10) + ((unsigned long)low - 0xDC00);
                    p += 6;
                } else {
                    cp = 0xFFFD; /* a lone surrogate is no character; say so visibly */
                }
            } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
                cp = 0xFFFD;
            }
            break;
        }
        default: return -1;
        }
        if (!put_utf8(cp, out, cap, &n)) return -1;
    }
    out[n] = '\0';
    return (long)n;
}

int tj_uint(tj_span value, unsigned long *out)
{
    const char *p = value.start;
    unsigned long v = 0;
    if (p >= value.end || (*p == '0' && value.end - p > 1)) return 0;
    for (; p < value.end; p++) {
        if (*p < '0' || *p > '9') return 0;
        unsigned d = (unsigned)(*p - '0');
        if (v > (ULONG_MAX - d) / 10) return 0;
        v = v * 10 + d;
    }
    *out = v;
    return 1;
}

int tj_is_true(tj_span value)
{
    return value.end - value.start == 4 && memcmp(value.start, "true", 4) == 0;
}

long tj_escape(const char *in, size_t len, char *out, size_t cap)
{
    static const char hex[] = "0123456789abcdef";
    size_t n = 0;
    char esc[7];

    if (cap < 3) return -1;
    out[n++] = '"';
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)in[i];
        size_t k = 2;
        esc[0] = '\\';
        switch (c) {
        case '"': esc[1] = '"'; break;
        case '\\': esc[1] = '\\'; break;
        case '\b': esc[1] = 'b'; break;
        case '\f': esc[1] = 'f'; break;
        case '\n': esc[1] = 'n'; break;
        case '\r': esc[1] = 'r'; break;
        case '\t': esc[1] = 't'; break;
        default:
            if (c < 0x20) {
                memcpy(esc + 1, "u00", 3);
                esc[4] = hex[c >> 4];
                esc[5] = hex[c & 0xF];
                k = 6;
            } else {
                esc[0] = (char)c;
                k = 1;
            }
        }
        if (cap - n < k + 2) return -1; /* room for this, the closing quote and the NUL */
        memcpy(out + n, esc, k);
        n += k;
    }
    out[n++] = '"';
    out[n] = '\0';
    return (long)n;
}
