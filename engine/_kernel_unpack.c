/* micrograd._kernel.unpack_columns: a PackedGraph's byte columns into tape
 * columns, validated in the same single pass.
 *
 *   ops    one byte per node: the op code
 *   args   little-endian uint32, arity(op) of them per node, in node order
 *   values little-endian float64, one per node whose op uses a value
 *
 * The op table is not repeated here: the caller passes, per op code, the
 * arity (255 for "not an op") and whether the op uses a value, both read
 * from micrograd.ops. The checks are those of micrograd.codec.unpack and
 * Tape.from_arrays: every op known, the argument and value counts exact,
 * every argument an earlier node. The GIL is released for the pass.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <stdio.h>
#include <string.h>

PyObject *mg_unpack_columns(PyObject *module, PyObject *args);

#define NOT_AN_OP 255

typedef struct {
    Py_ssize_t node; /* -1: the graph as a whole */
    char field[48];
    char reason[200];
} UnpackError;

typedef struct {
    const uint8_t *ops;
    const uint8_t *args;   /* uint32 LE, possibly unaligned */
    const uint8_t *values; /* float64 LE, possibly unaligned */
    Py_ssize_t n, n_args, n_values;
    const uint8_t *arity;
    const uint8_t *uses_value;
    Py_ssize_t n_codes;
} Packed;

static inline uint32_t load_u32(const uint8_t *p)
{
    uint32_t x;
    memcpy(&x, p, sizeof x);
    return x;
}

static inline double load_f64(const uint8_t *p)
{
    double x;
    memcpy(&x, p, sizeof x);
    return x;
}

/* Total arity and value count, for the message when a column's length is off. */
static void count_needs(const Packed *pk, Py_ssize_t *args, Py_ssize_t *values)
{
    *args = *values = 0;
    for (Py_ssize_t i = 0; i < pk->n; i++) {
        const uint8_t k = pk->ops[i];
        if (k < pk->n_codes && pk->arity[k] != NOT_AN_OP) {
            *args += pk->arity[k];
            *values += pk->uses_value[k] != 0;
        }
    }
}

static int length_error(const Packed *pk, UnpackError *err, int which)
{
    Py_ssize_t need_args, need_values;
    count_needs(pk, &need_args, &need_values);
    err->node = -1;
    if (which == 0) {
        snprintf(err->field, sizeof err->field, "args");
        snprintf(err->reason, sizeof err->reason,
                 "args holds %zd indices but the ops need %zd (their arities)", pk->n_args,
                 need_args);
    } else {
        snprintf(err->field, sizeof err->field, "values");
        snprintf(err->reason, sizeof err->reason,
                 "values holds %zd numbers but %zd nodes use one (input, const and pow nodes, "
                 "in order)",
                 pk->n_values, need_values);
    }
    return -1;
}

static int unpack(const Packed *pk, int32_t *a0, int32_t *a1, int32_t *a2, double *c,
                  int *any_third, UnpackError *err)
{
    Py_ssize_t pos = 0, vpos = 0;
    for (Py_ssize_t i = 0; i < pk->n; i++) {
        const uint8_t k = pk->ops[i];
        const uint8_t ar = k < pk->n_codes ? pk->arity[k] : NOT_AN_OP;
        if (ar == NOT_AN_OP || ar > 3) {
            err->node = i;
            snprintf(err->field, sizeof err->field, "ops[%zd]", i);
            /* The words of micrograd.ops.unknown_op. */
            snprintf(err->reason, sizeof err->reason, "unknown op %u%s; known ops are 1..%zd",
                     (unsigned)k, k == 0 ? " (OP_UNSPECIFIED, the unset value)" : "",
                     pk->n_codes - 1);
            return -1;
        }
        if (pos + ar > pk->n_args)
            return length_error(pk, err, 0);
        int32_t slots[3] = {-1, -1, -1};
        for (int s = 0; s < ar; s++) {
            const uint32_t ref = load_u32(pk->args + 4 * (pos + s));
            if ((Py_ssize_t)ref >= i) {
                err->node = i;
                snprintf(err->field, sizeof err->field, "nodes[%zd].args[%d]", i, s);
                snprintf(err->reason, sizeof err->reason,
                         "argument %d refers to node %lu, which does not come before node %zd "
                         "(nodes may only refer to earlier nodes)",
                         s, (unsigned long)ref, i);
                return -1;
            }
            slots[s] = (int32_t)ref;
        }
        pos += ar;
        a0[i] = slots[0];
        a1[i] = slots[1];
        a2[i] = slots[2];
        *any_third |= slots[2] != -1;
        if (pk->uses_value[k]) {
            if (vpos >= pk->n_values)
                return length_error(pk, err, 1);
            c[i] = load_f64(pk->values + 8 * vpos++);
        } else {
            c[i] = 0.0;
        }
    }
    if (pos != pk->n_args)
        return length_error(pk, err, 0);
    if (vpos != pk->n_values)
        return length_error(pk, err, 1);
    return 0;
}

PyObject *mg_unpack_columns(PyObject *module, PyObject *args)
{
    (void)module;
    Py_buffer ops, arg, val, arity, uses;
    if (!PyArg_ParseTuple(args, "y*y*y*y*y*:unpack_columns", &ops, &arg, &val, &arity, &uses))
        return NULL;
    PyObject *cols[4] = {NULL, NULL, NULL, NULL};
    PyObject *result = NULL;
    if (arg.len % 4 || val.len % 8 || arity.len != uses.len || arity.len == 0 ||
        arity.len > 256) {
        PyErr_SetString(PyExc_ValueError,
                        "unpack_columns: args must be whole uint32s, values whole float64s, and "
                        "the arity and uses_value tables of equal length (1..256)");
        goto done;
    }
    const Py_ssize_t n = ops.len;
    const Py_ssize_t sizes[4] = {4, 4, 4, 8};
    for (int k = 0; k < 4; k++) {
        cols[k] = PyByteArray_FromStringAndSize(NULL, n * sizes[k]);
        if (cols[k] == NULL)
            goto done;
    }
    Packed pk = {
        (const uint8_t *)ops.buf, (const uint8_t *)arg.buf, (const uint8_t *)val.buf,
        n, arg.len / 4, val.len / 8,
        (const uint8_t *)arity.buf, (const uint8_t *)uses.buf, arity.len,
    };
    UnpackError err = {0, {0}, {0}};
    int rc, any_third = 0;
    Py_BEGIN_ALLOW_THREADS
    rc = unpack(&pk, (int32_t *)(void *)PyByteArray_AS_STRING(cols[0]),
                (int32_t *)(void *)PyByteArray_AS_STRING(cols[1]),
                (int32_t *)(void *)PyByteArray_AS_STRING(cols[2]),
                (double *)(void *)PyByteArray_AS_STRING(cols[3]), &any_third, &err);
    Py_END_ALLOW_THREADS
    if (rc < 0) {
        PyObject *detail = Py_BuildValue("(nss)", err.node, err.field, err.reason);
        if (detail != NULL) {
            PyErr_SetObject(PyExc_ValueError, detail);
            Py_DECREF(detail);
        }
        goto done;
    }
    result = Py_BuildValue("(OOOO)", cols[0], cols[1], any_third ? cols[2] : Py_None, cols[3]);
done:
    for (int k = 0; k < 4; k++)
        Py_XDECREF(cols[k]);
    PyBuffer_Release(&ops);
    PyBuffer_Release(&arg);
    PyBuffer_Release(&val);
    PyBuffer_Release(&arity);
    PyBuffer_Release(&uses);
    return result;
}
