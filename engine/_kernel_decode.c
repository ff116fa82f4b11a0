/* micrograd._kernel.decode_graph: the protobuf wire bytes of a
 * micrograd.v1.Graph straight into tape columns.
 *
 *   message Node  { Op op = 1; repeated uint32 args = 2; double value = 3; string name = 4; }
 *   message Graph { repeated Node nodes = 1; }
 *
 * Two passes over the bytes with the GIL released: the first counts the
 * nodes (and checks the Graph's own framing), the second fills the columns.
 * Args are accepted packed or unpacked; unknown fields of any wire type,
 * groups included, are skipped; for singular fields the last one wins, as
 * protobuf parsers do. Only the few names become Python objects.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include "_ops_list.h"

PyObject *mg_decode_graph(PyObject *module, PyObject *arg);

enum { WT_VARINT = 0, WT_I64 = 1, WT_LEN = 2, WT_SGROUP = 3, WT_EGROUP = 4, WT_I32 = 5 };

#define MAX_GROUP_DEPTH 100

typedef struct {
    Py_ssize_t node;
    char reason[160];
} DecodeError;

typedef struct {
    Py_ssize_t node;
    Py_ssize_t offset;
    Py_ssize_t length;
} NameRef;

typedef struct {
    NameRef *items;
    Py_ssize_t count, capacity;
} NameList;

static int fail(DecodeError *err, Py_ssize_t node, const char *fmt, ...)
{
    va_list ap;
    err->node = node;
    va_start(ap, fmt);
    vsnprintf(err->reason, sizeof(err->reason), fmt, ap);
    va_end(ap);
    return -1;
}

/* A base-128 varint of at most 10 bytes: 0, or -1 truncated, -2 too long. */
static inline int read_varint(const uint8_t **pp, const uint8_t *end, uint64_t *out)
{
    const uint8_t *p = *pp;
    if (p < end && *p < 0x80) {
        *out = *p;
        *pp = p + 1;
        return 0;
    }
    uint64_t value = 0;
    *out = 0;
    for (int shift = 0; shift < 70; shift += 7) {
        if (p >= end)
            return -1;
        uint8_t byte = *p++;
        value |= (uint64_t)(byte & 0x7f) << shift;
        if (byte < 0x80) {
            *out = value;
            *pp = p;
            return 0;
        }
    }
    return -2;
}

static int varint_or_fail(const uint8_t **pp, const uint8_t *end, uint64_t *out,
                          DecodeError *err, Py_ssize_t node, const char *what)
{
    int rc = read_varint(pp, end, out);
    if (rc == -1)
        return fail(err, node, "truncated varint in %s", what);
    if (rc == -2)
        return fail(err, node, "malformed varint (more than 10 bytes) in %s", what);
    return 0;
}

/* A field key: field number and wire type. */
static int read_tag(const uint8_t **pp, const uint8_t *end, uint32_t *field, int *wt,
                    DecodeError *err, Py_ssize_t node, const char *where)
{
    uint64_t tag;
    *field = 0;
    *wt = 0;
    if (varint_or_fail(pp, end, &tag, err, node, where) < 0)
        return -1;
    if (tag > UINT32_MAX || (tag >> 3) == 0)
        return fail(err, node, "invalid field key %llu in %s", (unsigned long long)tag, where);
    *field = (uint32_t)(tag >> 3);
    *wt = (int)(tag & 7);
    if (*wt > WT_I32)
        return fail(err, node, "invalid wire type %d (field %u) in %s", *wt, *field, where);
    return 0;
}

/* The payload of a length-delimited field: [*start, *start + len). */
static int read_len(const uint8_t **pp, const uint8_t *end, const uint8_t **start, Py_ssize_t *len,
                    DecodeError *err, Py_ssize_t node, const char *what)
{
    uint64_t n;
    if (varint_or_fail(pp, end, &n, err, node, what) < 0)
        return -1;
    if (n > (uint64_t)(end - *pp))
        return fail(err, node, "truncated %s: length %llu but %zd bytes left", what,
                    (unsigned long long)n, (Py_ssize_t)(end - *pp));
    *start = *pp;
    *len = (Py_ssize_t)n;
    *pp += n;
    return 0;
}

/* Skip one field whose key was already read, groups included (iteratively:
 * a stack of open group numbers, as deep as protobuf's own limit). */
static int skip_field(const uint8_t **pp, const uint8_t *end, uint32_t field, int wt,
                      DecodeError *err, Py_ssize_t node, const char *where)
{
    uint32_t open[MAX_GROUP_DEPTH];
    int depth = 0;
    for (;;) {
        const uint8_t *start;
        Py_ssize_t len;
        uint64_t ignored;
        switch (wt) {
        case WT_VARINT:
            if (varint_or_fail(pp, end, &ignored, err, node, where) < 0)
                return -1;
            break;
        case WT_I64:
        case WT_I32: {
            Py_ssize_t size = wt == WT_I64 ? 8 : 4;
            if (end - *pp < size)
                return fail(err, node, "truncated %zd-byte field %u in %s", size, field, where);
            *pp += size;
            break;
        }
        case WT_LEN:
            if (read_len(pp, end, &start, &len, err, node, where) < 0)
                return -1;
            break;
        case WT_SGROUP:
            if (depth == MAX_GROUP_DEPTH)
                return fail(err, node, "groups nested more than %d deep in %s", MAX_GROUP_DEPTH,
                            where);
            open[depth++] = field;
            break;
        case WT_EGROUP:
            if (depth == 0 || open[depth - 1] != field)
                return fail(err, node, "end-group for field %u without its start in %s", field,
                            where);
            depth--;
            break;
        default:
            return fail(err, node, "invalid wire type %d (field %u) in %s", wt, field, where);
        }
        if (depth == 0)
            return 0;
        if (*pp >= end)
            return fail(err, node, "truncated group (field %u) in %s", open[depth - 1], where);
        if (read_tag(pp, end, &field, &wt, err, node, where) < 0)
            return -1;
    }
}

/* Pass 1: the number of nodes, checking the Graph's framing on the way. */
static Py_ssize_t count_nodes(const uint8_t *p, const uint8_t *end, DecodeError *err)
{
    Py_ssize_t n = 0;
    while (p < end) {
        uint32_t field;
        int wt;
        if (read_tag(&p, end, &field, &wt, err, n, "the graph") < 0)
            return -1;
        if (field == 1) {
            const uint8_t *start;
            Py_ssize_t len;
            if (wt != WT_LEN)
                return fail(err, n, "nodes must be length-delimited (wire type 2), got wire type %d",
                            wt);
            if (read_len(&p, end, &start, &len, err, n, "node") < 0)
                return -1;
            n++;
        } else if (skip_field(&p, end, field, wt, err, n, "the graph") < 0) {
            return -1;
        }
    }
    return n;
}

typedef struct {
    uint8_t *code;
    int32_t *a;
    int32_t *b;
    int32_t *z; /* third arguments */
    double *c;
    int any_third; /* whether some node has a third argument */
} OutColumns;

#define MAX_ARGS 3

static int add_arg(uint64_t value, int32_t args[MAX_ARGS], int *count, DecodeError *err,
                   Py_ssize_t node)
{
    if (*count == MAX_ARGS)
        return fail(err, node, "more than 3 args (no op takes more than three arguments)");
    if (value > INT32_MAX)
        return fail(err, node, "argument %d is %llu, which is not a node index", *count,
                    (unsigned long long)value);
    args[(*count)++] = (int32_t)value;
    return 0;
}

static int add_name(NameList *names, Py_ssize_t node, Py_ssize_t offset, Py_ssize_t length,
                    DecodeError *err)
{
    if (names->count == names->capacity) {
        Py_ssize_t capacity = names->capacity ? 2 * names->capacity : 16;
        NameRef *items = PyMem_RawRealloc(names->items, (size_t)capacity * sizeof(NameRef));
        if (items == NULL)
            return fail(err, node, "out of memory for names");
        names->items = items;
        names->capacity = capacity;
    }
    names->items[names->count++] = (NameRef){node, offset, length};
    return 0;
}

/* One Node message in [p, end) into row `node` of the columns. */
static int decode_node(const uint8_t *p, const uint8_t *end, const uint8_t *base, Py_ssize_t node,
                       OutColumns *out, NameList *names, DecodeError *err)
{
    uint64_t op = 0;
    int32_t args[MAX_ARGS] = {-1, -1, -1};
    int count = 0;
    double value = 0.0;
    const uint8_t *name = NULL;
    Py_ssize_t name_len = 0;
    while (p < end) {
        uint32_t field;
        int wt;
        if (read_tag(&p, end, &field, &wt, err, node, "the node") < 0)
            return -1;
        switch (field) {
        case 1:
            if (wt != WT_VARINT)
                return fail(err, node, "op must be a varint (wire type 0), got wire type %d", wt);
            if (varint_or_fail(&p, end, &op, err, node, "op") < 0)
                return -1;
            break;
        case 2:
            if (wt == WT_VARINT) {
                uint64_t v;
                if (varint_or_fail(&p, end, &v, err, node, "args") < 0 ||
                    add_arg(v, args, &count, err, node) < 0)
                    return -1;
            } else if (wt == WT_LEN) {
                const uint8_t *q, *qend;
                Py_ssize_t len;
                if (read_len(&p, end, &q, &len, err, node, "packed args") < 0)
                    return -1;
                for (qend = q + len; q < qend;) {
                    uint64_t v;
                    if (varint_or_fail(&q, qend, &v, err, node, "packed args") < 0 ||
                        add_arg(v, args, &count, err, node) < 0)
                        return -1;
                }
            } else {
                return fail(err, node, "args must be varints or packed (wire type 0 or 2), got "
                            "wire type %d", wt);
            }
            break;
        case 3: {
            if (wt != WT_I64)
                return fail(err, node, "value must be a double (wire type 1), got wire type %d", wt);
            if (end - p < 8)
                return fail(err, node, "truncated double in value");
            uint64_t bits = 0;
            for (int k = 7; k >= 0; k--)
                bits = (bits << 8) | p[k];
            memcpy(&value, &bits, sizeof value);
            p += 8;
            break;
        }
        case 4:
            if (wt != WT_LEN)
                return fail(err, node, "name must be a string (wire type 2), got wire type %d", wt);
            if (read_len(&p, end, &name, &name_len, err, node, "name") < 0)
                return -1;
            break;
        default:
            if (skip_field(&p, end, field, wt, err, node, "the node") < 0)
                return -1;
        }
    }
    if (op > 255) {
        long long shown = (long long)(int64_t)op;
        /* The words of micrograd.ops.unknown_op (0 and 1..255 are checked with the table). */
        return fail(err, node, "unknown op %lld; known ops are 1..%d", shown, MG_MAX_CODE);
    }
    out->code[node] = (uint8_t)op;
    out->a[node] = args[0];
    out->b[node] = args[1];
    out->z[node] = args[2];
    out->any_third |= args[2] != -1;
    out->c[node] = value;
    if (name_len > 0 && add_name(names, node, name - base, name_len, err) < 0)
        return -1;
    return 0;
}

/* Pass 2: every node into the columns. The framing was checked by pass 1. */
static int decode_nodes(const uint8_t *base, const uint8_t *end, OutColumns *out, NameList *names,
                        DecodeError *err)
{
    const uint8_t *p = base;
    Py_ssize_t node = 0;
    while (p < end) {
        uint32_t field;
        int wt;
        if (read_tag(&p, end, &field, &wt, err, node, "the graph") < 0)
            return -1;
        if (field == 1) {
            const uint8_t *start;
            Py_ssize_t len;
            if (read_len(&p, end, &start, &len, err, node, "node") < 0 ||
                decode_node(start, start + len, base, node, out, names, err) < 0)
                return -1;
            node++;
        } else if (skip_field(&p, end, field, wt, err, node, "the graph") < 0) {
            return -1;
        }
    }
    return 0;
}

static void raise_decode_error(const DecodeError *err)
{
    PyObject *args = Py_BuildValue("(ns)", err->node, err->reason);
    if (args != NULL) {
        PyErr_SetObject(PyExc_ValueError, args);
        Py_DECREF(args);
    }
}

/* (node, name) pairs; a name that is not UTF-8 is an error of its node. */
static PyObject *build_names(const uint8_t *base, const NameList *names)
{
    PyObject *list = PyList_New(names->count);
    if (list == NULL)
        return NULL;
    for (Py_ssize_t k = 0; k < names->count; k++) {
        const NameRef *ref = &names->items[k];
        PyObject *text = PyUnicode_DecodeUTF8((const char *)base + ref->offset, ref->length, "strict");
        if (text == NULL) {
            DecodeError err;
            PyErr_Clear();
            fail(&err, ref->node, "name is not valid UTF-8");
            raise_decode_error(&err);
            Py_DECREF(list);
            return NULL;
        }
        PyObject *pair = Py_BuildValue("(nN)", ref->node, text);
        if (pair == NULL) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, k, pair);
    }
    return list;
}

PyObject *mg_decode_graph(PyObject *module, PyObject *arg)
{
    (void)module;
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0) {
        if (PyErr_ExceptionMatches(PyExc_TypeError)) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError, "decode_graph needs a bytes-like object, not %.100s",
                         Py_TYPE(arg)->tp_name);
        }
        return NULL;
    }
    const uint8_t *base = (const uint8_t *)view.buf;
    const uint8_t *end = base + view.len;
    DecodeError err = {0, {0}};
    NameList names = {NULL, 0, 0};
    PyObject *cols[5] = {NULL, NULL, NULL, NULL, NULL};
    PyObject *result = NULL;
    Py_ssize_t n;

    Py_BEGIN_ALLOW_THREADS
    n = count_nodes(base, end, &err);
    Py_END_ALLOW_THREADS
    if (n < 0) {
        raise_decode_error(&err);
        goto done;
    }
    const Py_ssize_t sizes[5] = {1, 4, 4, 4, 8};
    for (int k = 0; k < 5; k++) {
        if (n > PY_SSIZE_T_MAX / sizes[k]) {
            PyErr_NoMemory();
            goto done;
        }
        cols[k] = PyByteArray_FromStringAndSize(NULL, n * sizes[k]);
        if (cols[k] == NULL)
            goto done;
    }
    OutColumns out = {
        (uint8_t *)PyByteArray_AS_STRING(cols[0]),
        (int32_t *)(void *)PyByteArray_AS_STRING(cols[1]),
        (int32_t *)(void *)PyByteArray_AS_STRING(cols[2]),
        (int32_t *)(void *)PyByteArray_AS_STRING(cols[3]),
        (double *)(void *)PyByteArray_AS_STRING(cols[4]),
        0,
    };
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = decode_nodes(base, end, &out, &names, &err);
    Py_END_ALLOW_THREADS
    if (rc < 0) {
        raise_decode_error(&err);
        goto done;
    }
    PyObject *name_list = build_names(base, &names);
    if (name_list == NULL)
        goto done;
    result = Py_BuildValue("(nOOOOON)", n, cols[0], cols[1], cols[2],
                           out.any_third ? cols[3] : Py_None, cols[4], name_list);
done:
    for (int k = 0; k < 5; k++)
        Py_XDECREF(cols[k]);
    PyMem_RawFree(names.items);
    PyBuffer_Release(&view);
    return result;
}
