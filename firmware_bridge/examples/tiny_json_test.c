/* Checks of tiny_json on fixed strings: escapes, \u escapes and surrogate
 * pairs, keys that also appear inside strings and nested objects, and the
 * broken payloads a reader must refuse. `make check` builds and runs it;
 * tests/test_c_client.py runs it too. */
#include "tiny_json.h"

#include <stdio.h>
#include <string.h>

static int checks, failures;

#define CHECK(cond)                                                    \
    do {                                                               \
        checks++;                                                      \
        if (!(cond)) {                                                 \
            failures++;                                                \
            fprintf(stderr, "FAIL line %d: %s\n", __LINE__, #cond);    \
        }                                                              \
    } while (0)

/* The decoded string value of `key` in `json`, or NULL if it has none.
 * *len is its length (it may hold NULs). */
static const char *string_of(const char *json, const char *key, long *len)
{
    static char buf[512];
    tj_span v;
    if (tj_find(json, strlen(json), key, &v) != TJ_FOUND) return NULL;
    *len = tj_string(v, buf, sizeof buf);
    return *len < 0 ? NULL : buf;
}

static int string_is(const char *json, const char *key, const char *want, long want_len)
{
    long len;
    const char *got = string_of(json, key, &len);
    return got && len == want_len && memcmp(got, want, (size_t)want_len) == 0;
}

#define STRING_IS(json, key, want) string_is(json, key, want, (long)sizeof(want) - 1)

static int find(const char *json, const char *key)
{
    tj_span v;
    return tj_find(json, strlen(json), key, &v);
}

static void test_escapes(void)
{
    CHECK(STRING_IS("{\"text\":\"plain\"}", "text", "plain"));
    CHECK(STRING_IS("{\"text\":\"\"}", "text", ""));
    CHECK(STRING_IS("{\"text\":\"say \\\"hi\\\" \\\\ now\"}", "text", "say \"hi\" \\ now"));
    CHECK(STRING_IS("{\"text\":\"\\/\\b\\f\\n\\r\\t\"}", "text", "/\b\f\n\r\t"));
    CHECK(STRING_IS("{\"text\":\"caf\\u00e9\"}", "text", "caf\xc3\xa9"));
    CHECK(STRING_IS("{\"text\":\"\\u00E9\\u20ac\\u0041\"}", "text", "\xc3\xa9\xe2\x82\xac" "A"));
    CHECK(STRING_IS("{\"text\":\"a\\u0000b\"}", "text", "a\0b"));
    /* Raw UTF-8, as edge-slm sends it (ensure_ascii off). */
    CHECK(STRING_IS("{\"text\":\"Druck 5 bar \xe2\x80\x93 pr\xc3\xbc" "fen\"}", "text",
                    "Druck 5 bar \xe2\x80\x93 pr\xc3\xbc" "fen"));
}

static void test_surrogates(void)
{
    CHECK(STRING_IS("{\"text\":\"\\ud83d\\ude00\"}", "text", "\xf0\x9f\x98\x80"));
    CHECK(STRING_IS("{\"text\":\"x\\uD83D\\uDE00y\"}", "text", "x\xf0\x9f\x98\x80y"));
    /* Lone halves, and a high one followed by something that is not a low one. */
    CHECK(STRING_IS("{\"text\":\"\\ud83dx\"}", "text", "\xef\xbf\xbdx"));
    CHECK(STRING_IS("{\"text\":\"\\ude00\"}", "text", "\xef\xbf\xbd"));
    CHECK(STRING_IS("{\"text\":\"\\ud83d\\u0041\"}", "text", "\xef\xbf\xbd" "A"));
    CHECK(STRING_IS("{\"text\":\"\\ud83d\\ud83d\\ude00\"}", "text", "\xef\xbf\xbd\xf0\x9f\x98\x80"));
    CHECK(STRING_IS("{\"text\":\"\\ud83d\"}", "text", "\xef\xbf\xbd"));
}

static void test_top_level_only(void)
{
    /* edge-slm's final answer has nested objects; a key inside them, or a
     * key's name inside a string, is not the top-level key. */
    const char *final =
        "{\"id\":\"q1\",\"final\":true,\"status\":\"ok\",\"text\":\"Druck pr\xc3\xbc" "fen\","
        "\"finish_reason\":\"stop\",\"prompt_tokens\":30,\"answer_tokens\":5,"
        "\"latency_ms\":{\"queued\":1,\"first_token\":null,\"total\":9},"
        "\"model\":{\"name\":\"SmolLM2\",\"sha256\":\"ab\"}}";
    CHECK(STRING_IS(final, "id", "q1"));
    CHECK(STRING_IS(final, "status", "ok"));
    CHECK(find(final, "name") == TJ_MISSING);
    CHECK(find(final, "seq") == TJ_MISSING);

    const char *tricky =
        "{\"model\":{\"id\":\"inner\",\"status\":\"bad\",\"final\":true},"
        "\"note\":\"\\\"id\\\": \\\"fake\\\", \\\"final\\\": true\","
        "\"list\":[{\"id\":\"in-list\"},\"id\"],"
        "\"id\":\"outer\",\"final\":false}";
    tj_span v;
    CHECK(STRING_IS(tricky, "id", "outer"));
    CHECK(find(tricky, "status") == TJ_MISSING);
    CHECK(tj_find(tricky, strlen(tricky), "final", &v) == TJ_FOUND && !tj_is_true(v));

    /* Whitespace anywhere JSON allows it; numbers; the last duplicate wins. */
    const char *spaced = " \n{ \"seq\" :\t12 , \"final\" : true ,\"id\":\"a\", \"id\" : \"b\" }\r\n";
    unsigned long seq = 0;
    CHECK(tj_find(spaced, strlen(spaced), "seq", &v) == TJ_FOUND && tj_uint(v, &seq) && seq == 12);
    CHECK(tj_find(spaced, strlen(spaced), "final", &v) == TJ_FOUND && tj_is_true(v));
    CHECK(STRING_IS(spaced, "id", "b"));
    CHECK(STRING_IS("{\"\\u0069d\":\"escaped key\"}", "id", "escaped key"));
    CHECK(find("{}", "id") == TJ_MISSING);
    CHECK(find("{\"a\":[],\"b\":{},\"c\":-1.5e+3,\"d\":0,\"e\":null}", "id") == TJ_MISSING);
}

static void test_numbers(void)
{
    tj_span v;
    unsigned long n = 99;
    CHECK(tj_find("{\"seq\":0}", 9, "seq", &v) == TJ_FOUND && tj_uint(v, &n) && n == 0);
    CHECK(tj_find("{\"seq\":-1}", 10, "seq", &v) == TJ_FOUND && !tj_uint(v, &n));
    CHECK(tj_find("{\"seq\":1.5}", 11, "seq", &v) == TJ_FOUND && !tj_uint(v, &n));
    CHECK(tj_find("{\"seq\":\"3\"}", 11, "seq", &v) == TJ_FOUND && !tj_uint(v, &n));
    const char *big = "{\"seq\":999999999999999999999999}";
    CHECK(tj_find(big, strlen(big), "seq", &v) == TJ_FOUND && !tj_uint(v, &n));
}

/* {"a":[[...]]} nested `depth` levels deep (the object is the first); its length. */
static size_t nested(char *out, int depth)
{
    size_t n = 0;
    memcpy(out, "{\"a\":", 5);
    n += 5;
    for (int i = 1; i < depth; i++) out[n++] = '[';
    for (int i = 1; i < depth; i++) out[n++] = ']';
    out[n++] = '}';
    return n;
}

static void test_malformed(void)
{
    static const char *broken[] = {
        "", "   ", "[1,2]", "\"id\"", "null",
        "{\"id\":\"a\"",            /* truncated */
        "{\"id\":\"a}",             /* unterminated string */
        "{\"id\":\"a\x01\"}",       /* raw control character */
        "{\"id\":\"\\q\"}",         /* unknown escape */
        "{\"id\":\"\\u12\"}",       /* short \u */
        "{\"id\":\"\\u12g4\"}",
        "{\"id\":\"a\"} x",         /* trailing garbage */
        "{\"id\" \"a\"}",           /* no colon */
        "{\"id\":\"a\",}",          /* trailing comma */
        "{\"id\":\"a\" \"b\":1}",   /* no comma */
        "{id:\"a\"}",               /* unquoted key */
        "{\"a\":01}", "{\"a\":1.}", "{\"a\":-}", "{\"a\":1e}", "{\"a\":tru}", "{\"a\":nul}",
        "{\"a\":[1,]}", "{\"a\":{\"b\"}}", "{\"a\":[}",
    };
    for (size_t i = 0; i < sizeof broken / sizeof broken[0]; i++) {
        tj_span v;
        int r = tj_find(broken[i], strlen(broken[i]), "id", &v);
        checks++;
        if (r != TJ_MALFORMED) {
            failures++;
            fprintf(stderr, "FAIL: %s was not refused (got %d)\n", broken[i], r);
        }
    }
    /* A NUL inside the payload is not the end of it: the length is. */
    tj_span v;
    CHECK(tj_find("{\"id\":\"a\"}\0junk", 15, "id", &v) == TJ_MALFORMED);

    /* Nesting: TJ_MAX_DEPTH levels pass, one more does not. */
    char deep[2 * TJ_MAX_DEPTH + 8];
    CHECK(tj_find(deep, nested(deep, TJ_MAX_DEPTH), "a", &v) == TJ_FOUND);
    CHECK(tj_find(deep, nested(deep, TJ_MAX_DEPTH + 1), "a", &v) == TJ_MALFORMED);

    /* tj_string on spans that are not one string literal, or too small a buffer. */
    char out[8];
    CHECK(tj_string((tj_span){"12", "12" + 2}, out, sizeof out) == -1);
    CHECK(tj_string((tj_span){"\"a\"b\"", "\"a\"b\"" + 5}, out, sizeof out) == -1);
    CHECK(tj_string((tj_span){"\"\\\"", "\"\\\"" + 3}, out, sizeof out) == -1);
    CHECK(tj_string((tj_span){"\"abcdefgh\"", "\"abcdefgh\"" + 10}, out, sizeof out) == -1);
    CHECK(tj_string((tj_span){"\"abcdefg\"", "\"abcdefg\"" + 9}, out, sizeof out) == 7);
    CHECK(tj_string((tj_span){"\"\\u20ac\\u20ac\\u20ac\"", "\"\\u20ac\\u20ac\\u20ac\"" + 20}, out,
                    sizeof out) == -1);
}

static void test_escape_writer(void)
{
    char out[256];
    const char in[] = "say \"hi\" \\ \n\t\x01\x1f\x7f pr\xc3\xbc" "fen";
    const char want[] = "\"say \\\"hi\\\" \\\\ \\n\\t\\u0001\\u001f\x7f pr\xc3\xbc" "fen\"";
    long n = tj_escape(in, sizeof in - 1, out, sizeof out);
    CHECK(n == (long)sizeof want - 1 && strcmp(out, want) == 0);
    CHECK(tj_escape("", 0, out, 3) == 2 && strcmp(out, "\"\"") == 0);
    CHECK(tj_escape("ab", 2, out, 4) == -1);
    CHECK(tj_escape("\x01", 1, out, 6 + 3) == 8);
    CHECK(tj_escape("\x01", 1, out, 6 + 2) == -1);

    /* Every byte value survives the round trip through writer and reader. */
    char all[256], lit[6 * 256 + 3], json[6 * 256 + 16], back[512];
    for (int i = 0; i < 256; i++) all[i] = (char)i;
    long k = tj_escape(all, sizeof all, lit, sizeof lit);
    CHECK(k > 0);
    int m = snprintf(json, sizeof json, "{\"q\":%s}", lit);
    tj_span v;
    CHECK(m > 0 && tj_find(json, (size_t)m, "q", &v) == TJ_FOUND);
    CHECK(tj_string(v, back, sizeof back) == 256 && memcmp(back, all, 256) == 0);
}

int main(void)
{
    test_escapes();
    test_surrogates();
    test_top_level_only();
    test_numbers();
    test_malformed();
    test_escape_writer();
    printf("tiny_json: %d checks, %d failed\n", checks, failures);
    return failures ? 1 : 0;
}
