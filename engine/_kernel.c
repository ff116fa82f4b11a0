/* micrograd._kernel: the native tape kernel.
 *
 * Forward and reverse sweeps over a tape's columns (code uint8, arg0/arg1
 * int32, const float64) and its values/grads, one binding (n,) or a batch
 * (n, B) laid out node-major so that the loop over B is contiguous. The
 * GIL is released for the sweeps. Semantics are those of micrograd.ops
 * and PythonKernel: IEEE 754 via libm, no -ffast-math, no FMA contraction.
 *
 * Each op is written once below as a pair of inline functions, its forward
 * value and its local partials side by side; the sweeps are generated from
 * MG_OPS. The wire decoder lives in _kernel_decode.c.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#if defined(__x86_64__) || defined(_M_X64) || (defined(__i386__) && defined(__SSE2__))
#include <xmmintrin.h>
#define MG_HAVE_FLUSH 1
#else
#define MG_HAVE_FLUSH 0
#endif

#if defined(__GNUC__)
#define MG_NOINLINE __attribute__((noinline))
#define MG_LIKELY(x) __builtin_expect(!!(x), 1)
#define MG_UNLIKELY(x) __builtin_expect(!!(x), 0)
#else
#define MG_NOINLINE
#define MG_LIKELY(x) (x)
#define MG_UNLIKELY(x) (x)
#endif

PyObject *mg_decode_graph(PyObject *module, PyObject *arg); /* _kernel_decode.c */
PyObject *mg_unpack_columns(PyObject *module, PyObject *args); /* _kernel_unpack.c */
PyObject *mg_value_columns(PyObject *module, PyObject *args); /* _kernel_pack.c */
PyObject *mg_pack_value(PyObject *module, PyObject *args);
PyObject *mg_assign_values(PyObject *module, PyObject *args);
PyObject *mg_value_backward(PyObject *module, PyObject *args);
PyObject *mg_new_node(PyObject *module, PyObject *type);

/* ---- the ops ------------------------------------------------------------ */
/* Each op's math (value, partials, second derivatives) is in _ops_math.h;
 * MG_OPS(X), the list of every op as X(wire code, name, arity), is
 * generated from micrograd.ops into _ops_list.h. The sweeps below are built
 * from that list, per arity. */
#include "_ops_list.h"
#include "_ops_math.h"

/* ---- the tape as the sweeps see it ------------------------------------- */

typedef struct {
    const uint8_t *code;
    const int32_t *a;
    const int32_t *b;
    const int32_t *z; /* third arguments; NULL when the tape has no ternary node */
    const double *c;
    Py_ssize_t n;
} Columns;

/* Indices are re-checked inside the loops (a cheap, well-predicted compare)
 * so that no tape, however malformed or concurrently modified, can make a
 * sweep read or write outside its arrays. An argument must be an earlier
 * node: (size_t)a < i rejects negatives and forward references at once. */
#define ARG_OK1 ((size_t)ai < (size_t)i)
#define ARG_OK2 ((size_t)ai < (size_t)i && (size_t)bi < (size_t)i)
#define ARG_OK3 (ARG_OK2 && (size_t)zi < (size_t)i)
/* The third argument of node i: -1 (never valid) when the tape has none. */
#define THIRD(t, i) ((t)->z != NULL ? (Py_ssize_t)(t)->z[i] : (Py_ssize_t)-1)

/* A sweep returns -1, or the index of the first node it could not evaluate,
 * or MG_STOPPED when told to stop part-way. */
#define MG_STOPPED (-2)

/* When a sweep must stop early: a flag another thread may set (a byte of a
 * Python buffer), and/or a CLOCK_MONOTONIC time (time.monotonic() on Linux;
 * 0 for none). Sweeps look at it every `block` nodes, so a cancelled or
 * timed-out call lets go of its thread within microseconds, not at the end
 * of a million-node sweep. A NULL Stop is never looked at. */
typedef struct {
    const volatile uint8_t *flag;
    double expires;
    Py_ssize_t block;
} Stop;

static MG_NOINLINE int stop_due(const Stop *s)
{
    if (s->flag != NULL && *s->flag)
        return 1;
    if (s->expires > 0.0) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        if ((double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec >= s->expires)
            return 1;
    }
    return 0;
}

/* The next node at which an upward (forward) sweep looks at `s`: n if never. */
static inline Py_ssize_t check_up(const Stop *s, Py_ssize_t i, Py_ssize_t n)
{
    return (s == NULL || n - i <= s->block) ? n : i + s->block;
}

/* The next node at which a downward (reverse) sweep looks at `s`: -1 if never. */
static inline Py_ssize_t check_down(const Stop *s, Py_ssize_t i)
{
    return (s == NULL || i - s->block < -1) ? -1 : i - s->block;
}

/* At the top of a loop over nodes: stop if due at this block boundary. */
#define STOP_POINT_UP                                                \
    if (MG_UNLIKELY(i == lim)) {                                     \
        if (stop_due(stop))                                          \
            return MG_STOPPED;                                       \
        lim = check_up(stop, i, n);                                  \
    }
#define STOP_POINT_DOWN                                              \
    if (MG_UNLIKELY(i == lim)) {                                     \
        if (stop_due(stop))                                          \
            return MG_STOPPED;                                       \
        lim = check_down(stop, i);                                   \
    }

/* ---- one binding -------------------------------------------------------- */

/* Arity + 1 of every op code (0: not an op), for checks outside the loops. */
static const uint8_t ARITY_PLUS_1[256] = {
#define ARITY_ENTRY(code_, name, ar) [code_] = ar + 1,
    MG_OPS(ARITY_ENTRY)
#undef ARITY_ENTRY
};

/* Whether node i's arguments are all earlier nodes (an unknown op is not). */
static int node_ok(const Columns *t, Py_ssize_t i)
{
    const Py_ssize_t ai = t->a[i], bi = t->b[i], zi = THIRD(t, i);
    switch (ARITY_PLUS_1[t->code[i]]) {
    case 1: return 1;
    case 2: return ARG_OK1;
    case 3: return ARG_OK2;
    case 4: return ARG_OK3;
    default: return 0;
    }
}

#if defined(__GNUC__) && !defined(MG_PORTABLE_SWITCH)
#define MG_THREADED 1
#else
#define MG_THREADED 0
#endif

#if MG_THREADED
#pragma GCC diagnostic ignored "-Woverride-init"
/* Threaded code (GNU C computed goto): every handler dispatches the next node
 * itself, so the branch predictor sees op pairs. Arguments one or two nodes
 * back, the common case in sums and chains, are taken from registers rather
 * than reloaded from memory just after their store (store-to-load
 * forwarding is slow and would sit on the critical path of a chain). The
 * two registers are named by the parity of the node that wrote them, and the
 * handlers come in an even and an odd copy, so no register moves are needed:
 * at node i, P holds v[i-2] and is overwritten with v[i], Q holds v[i-1]. */
#define NEAR_ARG(dst, idx, prev1, prev2)                             \
    if (idx == i - 1)                                                \
        dst = prev1;                                                 \
    else if (idx == i - 2)                                           \
        dst = prev2;                                                 \
    else if (MG_LIKELY((size_t)idx < (size_t)i))                     \
        dst = v[idx];                                                \
    else                                                             \
        return i;
#define FWD1_0(name, P, Q) P = v[i];
#define FWD1_1(name, P, Q)                                           \
    {                                                                \
        const Py_ssize_t ai = A[i];                                  \
        double x;                                                    \
        NEAR_ARG(x, ai, Q, P)                                        \
        P = name##_f(x, 0.0, C[i]);                                  \
        v[i] = P;                                                    \
    }
#define FWD1_2(name, P, Q)                                           \
    {                                                                \
        const Py_ssize_t ai = A[i], bi = B[i];                       \
        double x, y;                                                 \
        NEAR_ARG(x, ai, Q, P)                                        \
        NEAR_ARG(y, bi, Q, P)                                        \
        P = name##_f(x, y, C[i]);                                    \
        v[i] = P;                                                    \
    }
/* Ternary nodes are not swept here: a tape with a third-argument column goes
 * to the batch sweeps with rows of one (see kernel_forward), so that these
 * register-hungry loops never need the column. */
#define FWD1_3(name, P, Q) return i;
#define FWD1_EVEN_LABEL(code_, name, arity) [code_] = &&even_##name,
#define FWD1_ODD_LABEL(code_, name, arity) [code_] = &&odd_##name,
#define FWD1_HANDLERS(code_, name, arity)                            \
    even_##name:                                                     \
    FWD1_##arity(name, r_even, r_odd)                                \
    FWD1_NEXT(odd)                                                   \
    odd_##name:                                                      \
    FWD1_##arity(name, r_odd, r_even)                                \
    FWD1_NEXT(even)
/* Step to the next node (a block boundary: the end, or a look at `stop`). */
#define FWD1_NEXT(table)                                             \
    if (MG_UNLIKELY(++i == lim)) {                                   \
        if (i == n)                                                  \
            return -1;                                               \
        if (stop_due(stop))                                          \
            return MG_STOPPED;                                       \
        lim = check_up(stop, i, n);                                  \
    }                                                                \
    goto *table[code[i]];

static MG_NOINLINE Py_ssize_t forward_one(const Columns *t, double *restrict v, const Stop *stop)
{
    static const void *const even[256] = {[0 ... 255] = &&unknown, MG_OPS(FWD1_EVEN_LABEL)};
    static const void *const odd[256] = {[0 ... 255] = &&unknown, MG_OPS(FWD1_ODD_LABEL)};
    const uint8_t *code = t->code;
    const int32_t *A = t->a, *B = t->b;
    const double *C = t->c;
    const Py_ssize_t n = t->n;
    double r_even = 0.0, r_odd = 0.0;
    Py_ssize_t i, lim = check_up(stop, 0, n);
    /* Nodes 0 and 1 have no (or only one) real predecessor in the registers. */
    for (i = 0; i < n && i < 2; i++)
        if (!node_ok(t, i))
            return i;
    if (n == 0)
        return -1;
    i = 0;
    goto *even[code[0]];
    MG_OPS(FWD1_HANDLERS)
unknown:
    return i;
}

#else /* portable: a switch per node */

#define FWD1_0(name)
#define FWD1_1(name)                                   \
    if (MG_UNLIKELY(!ARG_OK1)) return i;               \
    v[i] = name##_f(v[ai], 0.0, C[i]);
#define FWD1_2(name)                                   \
    if (MG_UNLIKELY(!ARG_OK2)) return i;               \
    v[i] = name##_f(v[ai], v[bi], C[i]);
#define FWD1_3(name)                                   \
    {                                                  \
        const Py_ssize_t zi = THIRD(t, i);             \
        if (MG_UNLIKELY(!ARG_OK3)) return i;           \
        v[i] = name##_f(v[ai], v[bi], v[zi]);          \
    }
#define FWD1_CASE(code_, name, arity) \
    case code_: { FWD1_##arity(name) } break;

static MG_NOINLINE Py_ssize_t forward_one(const Columns *t, double *restrict v, const Stop *stop)
{
    const uint8_t *code = t->code;
    const int32_t *A = t->a, *B = t->b;
    const double *C = t->c;
    const Py_ssize_t n = t->n;
    Py_ssize_t lim = check_up(stop, 0, n);
    for (Py_ssize_t i = 0; i < n; i++) {
        STOP_POINT_UP
        const Py_ssize_t ai = A[i], bi = B[i];
        (void)ai; (void)bi;
        switch (code[i]) {
            MG_OPS(FWD1_CASE)
        default:
            return i;
        }
    }
    return -1;
}
#endif

/* Reverse sweep from `out`; only nodes marked in `reached` (zeroed, length
 * out + 1) pass gradient on, so a node outside the output's graph never
 * touches a gradient even where its local derivative is infinite. */
#ifndef MG_THREADED_BACKWARD
#define MG_THREADED_BACKWARD MG_THREADED
#endif
#if MG_THREADED_BACKWARD
/* As in the forward sweep, the gradients of nodes i, i-1 and i-2 live in
 * registers G0, G1, G2 while node i is swept (a sum or a chain adds into the
 * gradient of the node just before, which is read one or two nodes later);
 * g[i] is stored when the sweep leaves node i, and farther arguments are
 * updated in memory. The additions happen in the same order either way. */
#define GRAD_ADD(idx, c)                                             \
    if (idx == i - 1)                                                \
        G1 += c;                                                     \
    else if (idx == i - 2)                                           \
        G2 += c;                                                     \
    else                                                             \
        g[idx] += c;
#define BWD1_0(name)
#define BWD1_1(name)                                                 \
    {                                                                \
        const Py_ssize_t ai = A[i];                                  \
        if (MG_UNLIKELY(!ARG_OK1))                                   \
            return i;                                                \
        double dx, dy;                                               \
        name##_d(v[ai], 0.0, C[i], v[i], &dx, &dy);                  \
        (void)dy;                                                    \
        GRAD_ADD(ai, dx * G0)                                        \
        reached[ai] = 1;                                             \
    }
#define BWD1_2(name)                                                 \
    {                                                                \
        const Py_ssize_t ai = A[i], bi = B[i];                       \
        if (MG_UNLIKELY(!ARG_OK2))                                   \
            return i;                                                \
        double dx, dy;                                               \
        name##_d(v[ai], v[bi], C[i], v[i], &dx, &dy);                \
        GRAD_ADD(ai, dx * G0)                                        \
        GRAD_ADD(bi, dy * G0)                                        \
        reached[ai] = 1;                                             \
        reached[bi] = 1;                                             \
    }
#define BWD1_3(name) return i; /* ternary tapes take the batch sweeps, as forward */
#define BWD1_LABEL(code_, name, arity) [code_] = &&grad_##name,
/* Leave node i: store its gradient, slide the window down to the next
 * reached node and dispatch it. */
#define BWD1_NEXT                                                    \
    g[i] = G0;                                                       \
    for (;;) {                                                       \
        if (MG_UNLIKELY(--i == lim)) {                               \
            if (i < 0)                                               \
                return -1;                                           \
            if (stop_due(stop))                                      \
                return MG_STOPPED;                                   \
            lim = check_down(stop, i);                               \
        }                                                            \
        G0 = G1;                                                     \
        G1 = G2;                                                     \
        G2 = i >= 2 ? g[i - 2] : 0.0;                                \
        if (reached[i])                                              \
            break;                                                   \
    }                                                                \
    goto *labels[code[i]];
#define BWD1_HANDLER(code_, name, arity)                             \
    grad_##name:                                                     \
    BWD1_##arity(name)                                               \
    BWD1_NEXT

static MG_NOINLINE Py_ssize_t backward_one(const Columns *t, const double *v, double *restrict g,
                                           uint8_t *restrict reached, Py_ssize_t out,
                                           const Stop *stop, int seeded)
{
    static const void *const labels[256] = {[0 ... 255] = &&unknown, MG_OPS(BWD1_LABEL)};
    const uint8_t *code = t->code;
    const int32_t *A = t->a, *B = t->b;
    const double *C = t->c;
    Py_ssize_t i = out, lim = check_down(stop, out);
    double G0 = seeded ? g[out] : 1.0, G1 = out >= 1 ? g[out - 1] : 0.0,
           G2 = out >= 2 ? g[out - 2] : 0.0;
    reached[out] = 1;
    goto *labels[code[i]];
    MG_OPS(BWD1_HANDLER)
unknown:
    return i;
}

#else /* portable: a switch per node */

#define BWD1_0(name)
#define BWD1_1(name)                                   \
    if (MG_UNLIKELY(!ARG_OK1)) return i;               \
    {                                                  \
        double dx, dy;                                 \
        name##_d(v[ai], 0.0, C[i], v[i], &dx, &dy);    \
        (void)dy;                                      \
        g[ai] += dx * gi;                              \
        reached[ai] = 1;                               \
    }
#define BWD1_2(name)                                   \
    if (MG_UNLIKELY(!ARG_OK2)) return i;               \
    {                                                  \
        double dx, dy;                                 \
        name##_d(v[ai], v[bi], C[i], v[i], &dx, &dy);  \
        g[ai] += dx * gi;                              \
        g[bi] += dy * gi;                              \
        reached[ai] = 1;                               \
        reached[bi] = 1;                               \
    }
#define BWD1_3(name)                                           \
    {                                                          \
        const Py_ssize_t zi = THIRD(t, i);                     \
        if (MG_UNLIKELY(!ARG_OK3)) return i;                   \
        double dx, dy, dz;                                     \
        name##_d(v[ai], v[bi], v[zi], v[i], &dx, &dy, &dz);    \
        g[ai] += dx * gi;                                      \
        g[bi] += dy * gi;                                      \
        g[zi] += dz * gi;                                      \
        reached[ai] = 1;                                       \
        reached[bi] = 1;                                       \
        reached[zi] = 1;                                       \
    }
#define BWD1_CASE(code_, name, arity) \
    case code_: { BWD1_##arity(name) } break;

static MG_NOINLINE Py_ssize_t backward_one(const Columns *t, const double *v, double *restrict g,
                                           uint8_t *restrict reached, Py_ssize_t out,
                                           const Stop *stop, int seeded)
{
    const uint8_t *code = t->code;
    const int32_t *A = t->a, *B = t->b;
    const double *C = t->c;
    Py_ssize_t lim = check_down(stop, out);
    if (!seeded)
        g[out] = 1.0;
    reached[out] = 1;
    for (Py_ssize_t i = out; i >= 0; i--) {
        STOP_POINT_DOWN
        if (!reached[i])
            continue;
        const Py_ssize_t ai = A[i], bi = B[i];
        const double gi = g[i];
        (void)ai; (void)bi; (void)gi;
        switch (code[i]) {
            MG_OPS(BWD1_CASE)
        default:
            return i;
        }
    }
    return -1;
}
#endif

/* ---- a batch: rows of B contiguous values ------------------------------- */

/* One op over one row; `restrict` tells the compiler rows never overlap
 * (arguments are earlier nodes), so add/sub/mul/div/neg vectorise. */
#define ROW_FWD(code_, name, arity)                                                      \
    static inline void name##_row_f(double *restrict o, const double *restrict x,        \
                                    const double *restrict y, double c, Py_ssize_t m)   \
    {                                                                                    \
        for (Py_ssize_t j = 0; j < m; j++)                                               \
            o[j] = name##_f(x[j], (arity) == 2 ? y[j] : 0.0, c);                         \
    }                                                                                    \
    static inline void name##_row_d(double *restrict gx, double *restrict gy,            \
                                    const double *restrict x, const double *restrict y,  \
                                    const double *restrict o, const double *restrict go, \
                                    double c, Py_ssize_t m)                              \
    {                                                                                    \
        for (Py_ssize_t j = 0; j < m; j++) {                                             \
            double dx, dy;                                                               \
            name##_d(x[j], (arity) == 2 ? y[j] : 0.0, c, o[j], &dx, &dy);                \
            gx[j] += dx * go[j];                                                         \
            if ((arity) == 2)                                                            \
                gy[j] += dy * go[j];                                                     \
        }                                                                                \
    }
#define ROW_FWD_IF_NOT_LEAF(code_, name, arity) ROW_FWD_##arity(code_, name, arity)
#define ROW_FWD_0(code_, name, arity)
#define ROW_FWD_1(code_, name, arity) ROW_FWD(code_, name, arity)
#define ROW_FWD_2(code_, name, arity) ROW_FWD(code_, name, arity)
/* Ternary rows: arguments may be one node twice (where(c, x, x)), so the
 * gradient rows are not restrict; each element's three additions happen in
 * argument order, as in the one-binding sweep. */
#define ROW_FWD_3(code_, name, arity)                                                    \
    static inline void name##_row_f(double *restrict o, const double *x, const double *y, \
                                    const double *z, Py_ssize_t m)                       \
    {                                                                                    \
        for (Py_ssize_t j = 0; j < m; j++)                                               \
            o[j] = name##_f(x[j], y[j], z[j]);                                           \
    }                                                                                    \
    static inline void name##_row_d(double *gx, double *gy, double *gz, const double *x, \
                                    const double *y, const double *z, const double *o,   \
                                    const double *go, Py_ssize_t m)                      \
    {                                                                                    \
        for (Py_ssize_t j = 0; j < m; j++) {                                             \
            double dx, dy, dz;                                                           \
            const double gj = go[j];                                                     \
            name##_d(x[j], y[j], z[j], o[j], &dx, &dy, &dz);                             \
            gx[j] += dx * gj;                                                            \
            gy[j] += dy * gj;                                                            \
            gz[j] += dz * gj;                                                            \
        }                                                                                \
    }
MG_OPS(ROW_FWD_IF_NOT_LEAF)

#define FWDB_0(name)
#define FWDB_1(name)                                                        \
    if (MG_UNLIKELY(!ARG_OK1)) return i;                                    \
    name##_row_f(v + i * m, v + ai * m, NULL, C[i], m);
#define FWDB_2(name)                                                        \
    if (MG_UNLIKELY(!ARG_OK2)) return i;                                    \
    name##_row_f(v + i * m, v + ai * m, v + bi * m, C[i], m);
#define FWDB_3(name)                                                        \
    {                                                                       \
        const Py_ssize_t zi = THIRD(t, i);                                  \
        if (MG_UNLIKELY(!ARG_OK3)) return i;                                \
        name##_row_f(v + i * m, v + ai * m, v + bi * m, v + zi * m, m);     \
    }
#define FWDB_CASE(code_, name, arity) \
    case code_: { FWDB_##arity(name) } break;

static MG_NOINLINE Py_ssize_t forward_batch(const Columns *t, double *v, Py_ssize_t m,
                                            const Stop *stop)
{
    const uint8_t *code = t->code;
    const int32_t *A = t->a, *B = t->b;
    const double *C = t->c;
    const Py_ssize_t n = t->n;
    Py_ssize_t lim = check_up(stop, 0, n);
    for (Py_ssize_t i = 0; i < n; i++) {
        STOP_POINT_UP
        const Py_ssize_t ai = A[i], bi = B[i];
        (void)ai; (void)bi;
        switch (code[i]) {
            MG_OPS(FWDB_CASE)
        default:
            return i;
        }
    }
    return -1;
}

/* When both arguments are the same node (x * x) the two accumulations go to
 * one row, one after the other, exactly as in the one-binding sweep. */
#define BWDB_0(name)
#define BWDB_1(name)                                                                  \
    if (MG_UNLIKELY(!ARG_OK1)) return i;                                              \
    name##_row_d(g + ai * m, NULL, v + ai * m, NULL, v + i * m, g + i * m, C[i], m);  \
    reached[ai] = 1;
#define BWDB_2(name)                                                                  \
    if (MG_UNLIKELY(!ARG_OK2)) return i;                                              \
    if (ai == bi) {                                                                   \
        memset(scratch, 0, (size_t)m * sizeof(double));                               \
        name##_row_d(g + ai * m, scratch, v + ai * m, v + bi * m, v + i * m,          \
                     g + i * m, C[i], m);                                             \
        for (Py_ssize_t j = 0; j < m; j++)                                            \
            g[ai * m + j] += scratch[j];                                              \
    } else {                                                                          \
        name##_row_d(g + ai * m, g + bi * m, v + ai * m, v + bi * m, v + i * m,       \
                     g + i * m, C[i], m);                                             \
    }                                                                                 \
    reached[ai] = 1;                                                                  \
    reached[bi] = 1;
#define BWDB_3(name)                                                                  \
    {                                                                                 \
        const Py_ssize_t zi = THIRD(t, i);                                            \
        if (MG_UNLIKELY(!ARG_OK3)) return i;                                          \
        name##_row_d(g + ai * m, g + bi * m, g + zi * m, v + ai * m, v + bi * m,      \
                     v + zi * m, v + i * m, g + i * m, m);                            \
        reached[ai] = 1;                                                              \
        reached[bi] = 1;                                                              \
        reached[zi] = 1;                                                              \
    }
#define BWDB_CASE(code_, name, arity) \
    case code_: { BWDB_##arity(name) } break;

static MG_NOINLINE Py_ssize_t backward_batch(const Columns *t, const double *v, double *g,
                                             uint8_t *restrict reached, Py_ssize_t out,
                                             Py_ssize_t m, double *scratch, const Stop *stop,
                                             int seeded)
{
    const uint8_t *code = t->code;
    const int32_t *A = t->a, *B = t->b;
    const double *C = t->c;
    Py_ssize_t lim = check_down(stop, out);
    for (Py_ssize_t j = 0; j < m && !seeded; j++)
        g[out * m + j] = 1.0;
    reached[out] = 1;
    for (Py_ssize_t i = out; i >= 0; i--) {
        STOP_POINT_DOWN
        if (!reached[i])
            continue;
        const Py_ssize_t ai = A[i], bi = B[i];
        (void)ai; (void)bi;
        switch (code[i]) {
            MG_OPS(BWDB_CASE)
        default:
            return i;
        }
    }
    return -1;
}

/* ---- several outputs, second order ---------------------------------------- */

/* Seeded reverse sweeps: every row up to `out` holding a nonzero cotangent
 * (in any of its m columns) starts as reached. */
static void mark_seeds(const double *g, uint8_t *reached, Py_ssize_t out, Py_ssize_t m)
{
    for (Py_ssize_t i = 0; i <= out; i++)
        for (Py_ssize_t j = 0; j < m; j++)
            if (g[i * m + j] != 0.0) {
                reached[i] = 1;
                break;
            }
}

#include "_kernel_hvp.h"

/* ---- denormals ----------------------------------------------------------- */

/* MXCSR bits: FTZ (flush results that would be subnormal to zero, bit 15)
 * and DAZ (treat subnormal operands as zero, bit 6). The register is per
 * thread; it is set only around a sweep and restored right after. */
#define MG_MXCSR_FTZ_DAZ 0x8040u

static unsigned int flush_enter(int on)
{
#if MG_HAVE_FLUSH
    unsigned int saved = _mm_getcsr();
    if (on)
        _mm_setcsr(saved | MG_MXCSR_FTZ_DAZ);
    return saved;
#else
    (void)on; /* no portable equivalent here: subnormals are kept */
    return 0;
#endif
}

static void flush_leave(int on, unsigned int saved)
{
#if MG_HAVE_FLUSH
    if (on)
        _mm_setcsr(saved);
#else
    (void)on; (void)saved;
#endif
}

/* ---- buffers ------------------------------------------------------------- */

/* Whether a struct-module format string describes one native item of type
 * `want` ('B', 'i' or 'd') and the given size. */
static int format_is(const char *fmt, char want, Py_ssize_t itemsize, Py_ssize_t size)
{
    if (fmt == NULL)
        fmt = "B";
    if (*fmt == '@' || *fmt == '=')
        fmt++;
#if PY_LITTLE_ENDIAN
    else if (*fmt == '<')
        fmt++;
#else
    else if (*fmt == '>' || *fmt == '!')
        fmt++;
#endif
    if (fmt[0] == '\0' || fmt[1] != '\0' || itemsize != size)
        return 0;
    if (want == 'i')
        return fmt[0] == 'i' || (fmt[0] == 'l' && size == 4);
    if (want == 'q')
        return fmt[0] == 'q' || (fmt[0] == 'l' && size == 8);
    return fmt[0] == want;
}

static const char *dtype_name(char want)
{
    return want == 'B' ? "uint8" : want == 'i' ? "int32" : want == 'q' ? "int64" : "float64";
}

/* Acquire `obj` as a C-contiguous, aligned array of `want` items with 1 or
 * `max_ndim` dimensions; errors name the argument. */
static int get_array(PyObject *obj, const char *what, char want, Py_ssize_t size, int writable,
                     int max_ndim, Py_buffer *view)
{
    if (!PyObject_CheckBuffer(obj)) {
        PyErr_Format(PyExc_TypeError, "%s must be a %s numpy array, not %.100s", what,
                     dtype_name(want), Py_TYPE(obj)->tp_name);
        return -1;
    }
    if (PyObject_GetBuffer(obj, view, PyBUF_RECORDS_RO) < 0)
        return -1;
    if (!format_is(view->format, want, view->itemsize, size)) {
        PyErr_Format(PyExc_TypeError, "%s must have dtype %s (native byte order), got format '%s'",
                     what, dtype_name(want), view->format ? view->format : "B");
        goto fail;
    }
    if (view->ndim < 1 || view->ndim > max_ndim) {
        if (max_ndim == 1)
            PyErr_Format(PyExc_ValueError, "%s must be one-dimensional, got %d dimensions", what,
                         view->ndim);
        else
            PyErr_Format(PyExc_ValueError, "%s must have shape (n,) or (n, B), got %d dimensions",
                         what, view->ndim);
        goto fail;
    }
    if (!PyBuffer_IsContiguous(view, 'C')) {
        PyErr_Format(PyExc_ValueError, "%s must be C-contiguous", what);
        goto fail;
    }
    if (((uintptr_t)view->buf) % (uintptr_t)size != 0) {
        PyErr_Format(PyExc_ValueError, "%s must be aligned to %zd bytes", what, size);
        goto fail;
    }
    if (writable && view->readonly) {
        PyErr_Format(PyExc_ValueError, "%s must be writable", what);
        goto fail;
    }
    return 0;
fail:
    PyBuffer_Release(view);
    return -1;
}

/* The tape columns, all of one length n; the third arguments (arg2) are
 * optional (None: the tape has no ternary node). */
typedef struct {
    Py_buffer code, a, b, c, z;
    int held, has_z;
    Columns cols;
} TapeBuffers;

static void release_tape(TapeBuffers *tb)
{
    Py_buffer *views[4] = {&tb->code, &tb->a, &tb->b, &tb->c};
    for (int k = 0; k < tb->held; k++)
        PyBuffer_Release(views[k]);
    tb->held = 0;
    if (tb->has_z)
        PyBuffer_Release(&tb->z);
    tb->has_z = 0;
}

static int get_tape(PyObject *code, PyObject *a, PyObject *b, PyObject *z, PyObject *c,
                    TapeBuffers *tb)
{
    tb->held = 0;
    tb->has_z = 0;
    if (get_array(code, "code", 'B', 1, 0, 1, &tb->code) < 0)
        return -1;
    tb->held = 1;
    if (get_array(a, "arg0", 'i', 4, 0, 1, &tb->a) < 0)
        goto fail;
    tb->held = 2;
    if (get_array(b, "arg1", 'i', 4, 0, 1, &tb->b) < 0)
        goto fail;
    tb->held = 3;
    if (get_array(c, "const", 'd', 8, 0, 1, &tb->c) < 0)
        goto fail;
    tb->held = 4;
    Py_ssize_t n = tb->code.shape[0];
    if (tb->a.shape[0] != n || tb->b.shape[0] != n || tb->c.shape[0] != n) {
        PyErr_Format(PyExc_ValueError,
                     "code, arg0, arg1 and const must have the same length, got %zd, %zd, %zd "
                     "and %zd", n, tb->a.shape[0], tb->b.shape[0], tb->c.shape[0]);
        goto fail;
    }
    tb->cols.z = NULL;
    if (z != NULL && z != Py_None) {
        if (get_array(z, "arg2", 'i', 4, 0, 1, &tb->z) < 0)
            goto fail;
        tb->has_z = 1;
        if (tb->z.shape[0] != n) {
            PyErr_Format(PyExc_ValueError, "arg2 has %zd entries but the tape has %zd nodes",
                         tb->z.shape[0], n);
            goto fail;
        }
        tb->cols.z = (const int32_t *)tb->z.buf;
    }
    tb->cols.code = (const uint8_t *)tb->code.buf;
    tb->cols.a = (const int32_t *)tb->a.buf;
    tb->cols.b = (const int32_t *)tb->b.buf;
    tb->cols.c = (const double *)tb->c.buf;
    tb->cols.n = n;
    return 0;
fail:
    release_tape(tb);
    return -1;
}

/* Shape (n, B) of a values or grads buffer: B is 0 for one binding (n,). */
static int get_rows(PyObject *obj, const char *what, Py_ssize_t n, Py_buffer *view, Py_ssize_t *m)
{
    if (get_array(obj, what, 'd', 8, 1, 2, view) < 0)
        return -1;
    if (view->shape[0] != n) {
        PyErr_Format(PyExc_ValueError, "%s has %zd rows but the tape has %zd nodes", what,
                     view->shape[0], n);
        PyBuffer_Release(view);
        return -1;
    }
    *m = view->ndim == 2 ? view->shape[1] : 0;
    return 0;
}

/* Raise ValueError for the node a sweep stopped at, saying what is wrong. */
static void raise_bad_node(const Columns *t, Py_ssize_t i)
{
    unsigned k = t->code[i];
    if (ARITY_PLUS_1[k] == 0) {
        /* The words of micrograd.ops.unknown_op. */
        PyErr_Format(PyExc_ValueError, "node %zd: unknown op %u%s; known ops are 1..%d", i, k,
                     k == 0 ? " (OP_UNSPECIFIED, the unset value)" : "", MG_MAX_CODE);
        return;
    }
    Py_ssize_t args[3] = {t->a[i], t->b[i], THIRD(t, i)};
    for (int s = 0; s < ARITY_PLUS_1[k] - 1; s++) {
        if (args[s] < 0 || args[s] >= i) {
            PyErr_Format(PyExc_ValueError,
                         "node %zd: argument %d is %zd, which is not an earlier node", i, s, args[s]);
            return;
        }
    }
    PyErr_Format(PyExc_ValueError, "node %zd: the tape changed during the sweep", i);
}

/* ---- for _kernel_pack.c -------------------------------------------------- */

/* The one-binding reverse sweep over plain columns (Value.backward's). */
Py_ssize_t mg_backward_columns(const uint8_t *code, const int32_t *a, const int32_t *b,
                               const double *c, Py_ssize_t n, const double *v, double *g,
                               uint8_t *reached, Py_ssize_t out)
{
    Columns t = {code, a, b, NULL, c, n};
    return backward_one(&t, v, g, reached, out, NULL, 0);
}

/* The arity of an op these sweeps implement, -1 for any other code. */
int mg_native_arity(unsigned code)
{
    return code < 256 ? (int)ARITY_PLUS_1[code] - 1 : -1;
}

/* Cells (node x binding) a sweep evaluates between two looks at its Stop. */
#define MG_STOP_CELLS 16384

/* The Stop of a sweep from its `stop` (None, or a buffer whose first byte is
 * the flag) and `expires` arguments; *use is 0 when neither is given. The
 * flag's buffer is held in `view` (release with release_stop). */
static int get_stop(PyObject *flag, double expires, Py_ssize_t m, Stop *s, Py_buffer *view,
                    int *use)
{
    s->flag = NULL;
    s->expires = expires > 0.0 && isfinite(expires) ? expires : 0.0;
    s->block = MG_STOP_CELLS / (m > 1 ? m : 1);
    if (s->block < 1)
        s->block = 1;
    view->obj = NULL;
    if (flag != NULL && flag != Py_None) {
        if (PyObject_GetBuffer(flag, view, PyBUF_SIMPLE) < 0)
            return -1;
        if (view->len < 1) {
            PyBuffer_Release(view);
            view->obj = NULL;
            PyErr_SetString(PyExc_ValueError, "stop must be a buffer of at least one byte");
            return -1;
        }
        s->flag = (const volatile uint8_t *)view->buf;
    }
    *use = s->flag != NULL || s->expires > 0.0;
    return 0;
}

static void release_stop(Py_buffer *view)
{
    if (view->obj != NULL)
        PyBuffer_Release(view);
}

/* ---- a compiled one-binding program (compile_program, run_program) ------ */

/* The arrays of a call that returns selected columns: bindings (B, k) float64, selection
 * (s,) int64 nodes of a tape of n, values_out and grads_out (B, s) float64 (grads_out may be
 * None). Checked and held by get_selected, let go by release_selected. */
typedef struct {
    Py_buffer bindings, selection, values, grads;
    int held; /* how many of the four views are held */
    Py_ssize_t rows, s;
} Selected;

static void release_selected(Selected *io)
{
    Py_buffer *views[4] = {&io->bindings, &io->selection, &io->values, &io->grads};
    for (int j = 0; j < io->held; j++)
        PyBuffer_Release(views[j]);
    io->held = 0;
}

static int get_selected(PyObject *bindings, PyObject *selection, PyObject *values_out,
                        PyObject *grads_out, Py_ssize_t k, Py_ssize_t n, Selected *io)
{
    const int grads = grads_out != Py_None;
    io->held = 0;
    if (get_array(bindings, "bindings", 'd', 8, 0, 2, &io->bindings) < 0)
        goto fail;
    io->held = 1;
    if (get_array(selection, "selection", 'q', 8, 0, 1, &io->selection) < 0)
        goto fail;
    io->held = 2;
    if (get_array(values_out, "values_out", 'd', 8, 1, 2, &io->values) < 0)
        goto fail;
    io->held = 3;
    if (grads) {
        if (get_array(grads_out, "grads_out", 'd', 8, 1, 2, &io->grads) < 0)
            goto fail;
        io->held = 4;
    }
    const Py_buffer *bv = &io->bindings, *vo = &io->values, *go = &io->grads;
    const Py_ssize_t s = io->selection.shape[0];
    const Py_ssize_t rows = bv->ndim == 2 ? bv->shape[0] : 0;
    if (bv->ndim != 2 || bv->shape[1] != k) {
        PyErr_Format(PyExc_ValueError, "bindings must have shape (B, %zd)", k);
        goto fail;
    }
    if (vo->ndim != 2 || vo->shape[0] != rows || vo->shape[1] != s ||
        (grads && (go->ndim != 2 || go->shape[0] != rows || go->shape[1] != s))) {
        PyErr_Format(PyExc_ValueError, "values_out and grads_out must have shape (%zd, %zd)", rows,
                     s);
        goto fail;
    }
    const int64_t *sel = (const int64_t *)io->selection.buf;
    for (Py_ssize_t j = 0; j < s; j++)
        if (sel[j] < 0 || sel[j] >= n) {
            PyErr_Format(PyExc_ValueError, "selection[%zd] is %lld, not a node of %zd", j,
                         (long long)sel[j], n);
            goto fail;
        }
    io->rows = rows;
    io->s = s;
    return 0;
fail:
    release_selected(io);
    return -1;
}

/* What each op's partials read (bit 0 x, bit 1 y, bit 2 the node's value). */
static const uint8_t PARTIALS_READ[256] = {
#define READS_ENTRY(code_, mask) [code_] = mask,
    MG_OPS_READS(READS_ENTRY)
#undef READS_ENTRY
};

#include "_kernel_prog.h"

/* ---- tiles: a batch a few bindings at a time, keeping only the selection -- */

/* A batch is swept a tile of MG_TILE or MG_TILE_WIDE bindings at a time:
 * every value and gradient of those bindings sit next to each other in a
 * row (v[slot * width + j]), so one dispatch per node serves a whole tile
 * and the loop over j has a constant trip count the compiler unrolls and
 * vectorises. Rows are slots reused once their node is done with (see
 * FStep), so a tile stays in the caches instead of the (nodes x bindings)
 * arrays of a whole batch, and only the selected nodes are copied out.
 * Each binding gets the same operations in the same order as the
 * one-binding sweeps, so the numbers are bit-identical. */
#ifndef MG_TILE
#define MG_TILE 8
#endif
#ifndef MG_TILE_WIDE
#define MG_TILE_WIDE 16 /* for graphs whose slots fit the cache at this width */
#endif

#if defined(__GNUC__) && defined(__x86_64__) && !defined(MG_NO_CLONES)
/* Built for the baseline and again for AVX2, picked at load time (no FMA:
 * -ffp-contract=off holds in both, so both give the same bits). */
#define MG_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define MG_CLONES
#endif

#if !defined(_WIN32)
#include <pthread.h>
#define MG_HAVE_PTHREADS 1
#else
#define MG_HAVE_PTHREADS 0
#endif

/* A tile keeps a row of MG_TILE (or MG_TILE_WIDE) values per slot, not per
 * node: a value gets a slot when computed and gives it back after its last
 * reader, where a reader is a later forward step or, in the reverse sweep,
 * a partial derivative that reads it (Op.partials_read); a gradient gets a
 * slot at its first contribution and gives it back once its own reverse
 * step has read it. Selected nodes keep theirs to the end. For the MLP loss
 * graph this is about 14,000 rows instead of 137,636, so a tile of 8
 * bindings sits in L2. */
typedef struct {
    int32_t o, a, b; /* value slots of the node and its arguments; a leaf's a is its
                        column in the bindings (-1: not bound, o = c) */
    uint8_t code;
    double c;
} FStep;

typedef struct {
    int32_t vo, va, vb; /* value slots of the node and its arguments (0 where unread) */
    int32_t go, ga, gb; /* gradient slots of the node and its arguments */
    uint8_t code;
    uint8_t first; /* bit 0 (1): ga starts here, bit 1 (2): gb does, bit 2 (4): a == b */
    double c;
} RStep;

#if defined(__GNUC__)
#define MG_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define MG_ALWAYS_INLINE inline
#endif

/* Gradient rows of one op where both arguments are the same node (x * x):
 * the two contributions land on one row one after the other, as in the
 * one-binding sweep. */
#define TILE_SAME(code_, name, arity)                                                    \
    static inline void name##_tile_same(double *g, const double *x, const double *o,     \
                                        const double *go, double c, int w)               \
    {                                                                                    \
        for (int j = 0; j < w; j++) {                                                    \
            double dx, dy;                                                               \
            name##_d(x[j], (arity) == 2 ? x[j] : 0.0, c, o[j], &dx, &dy);                \
            g[j] += dx * go[j];                                                          \
            if ((arity) == 2)                                                            \
                g[j] += dy * go[j];                                                      \
        }                                                                                \
    }
#define TILE_SAME_IF_BINARY(code_, name, arity) TILE_SAME_##arity(code_, name, arity)
#define TILE_SAME_0(code_, name, arity)
#define TILE_SAME_1(code_, name, arity)
#define TILE_SAME_2(code_, name, arity) TILE_SAME(code_, name, arity)
#define TILE_SAME_3(code_, name, arity)
MG_OPS(TILE_SAME_IF_BINARY)

#define TF_0(name)                                                  \
    if (s->a < 0)                                                   \
        for (int j = 0; j < w; j++)                                 \
            o[j] = s->c;                                            \
    else                                                            \
        for (int j = 0; j < w; j++)                                 \
            o[j] = bind[row[j] + s->a];
#define TF_1(name) name##_row_f(o, v + (Py_ssize_t)s->a * w, NULL, s->c, w);
#define TF_2(name) name##_row_f(o, v + (Py_ssize_t)s->a * w, v + (Py_ssize_t)s->b * w, s->c, w);
/* Ternary ops never reach a tile: tapes with a third argument column are
 * swept whole (compile_steps sees no arg2 and refuses them). */
#define TF_3(name)
#define TF_CASE(code_, name, arity) \
    case code_: { TF_##arity(name) } break;

/* Forward over one tile of w bindings; row[j] is the offset of binding j's
 * row in bind. Inlined into one copy per width, so w is a constant. */
static MG_ALWAYS_INLINE int forward_tile(const FStep *prog, Py_ssize_t n, const double *bind,
                                         const Py_ssize_t *row, double *restrict v,
                                         const Stop *stop, const int w)
{
    Py_ssize_t lim = check_up(stop, 0, n);
    for (Py_ssize_t i = 0; i < n; i++) {
        STOP_POINT_UP
        const FStep *s = prog + i;
        double *o = v + (Py_ssize_t)s->o * w;
        switch (s->code) {
            MG_OPS(TF_CASE)
        default:
            break; /* not reached: the program was validated */
        }
    }
    return 0;
}

#define TB_0(name)
#define TB_1(name)                                                  \
    {                                                               \
        double *ga = g + (Py_ssize_t)s->ga * w;                     \
        if (s->first & 1)                                           \
            for (int j = 0; j < w; j++)                             \
                ga[j] = 0.0;                                        \
        name##_row_d(ga, NULL, v + (Py_ssize_t)s->va * w, NULL, o, go, s->c, w); \
    }
#define TB_2(name)                                                  \
    {                                                               \
        double *ga = g + (Py_ssize_t)s->ga * w;                     \
        const double *x = v + (Py_ssize_t)s->va * w;                \
        if (s->first & 1)                                           \
            for (int j = 0; j < w; j++)                             \
                ga[j] = 0.0;                                        \
        if (s->first & 4) {                                         \
            name##_tile_same(ga, x, o, go, s->c, w);                \
        } else {                                                    \
            double *gb = g + (Py_ssize_t)s->gb * w;                 \
            if (s->first & 2)                                       \
                for (int j = 0; j < w; j++)                         \
                    gb[j] = 0.0;                                    \
            name##_row_d(ga, gb, x, v + (Py_ssize_t)s->vb * w, o, go, s->c, w); \
        }                                                           \
    }
#define TB_3(name)
#define TB_CASE(code_, name, arity) \
    case code_: { TB_##arity(name) } break;

/* Reverse over one tile, along the reached non-leaf nodes (descending),
 * seeding the output's gradient slot `out` with 1. A gradient row is zeroed
 * when its first contribution arrives. */
static MG_ALWAYS_INLINE int backward_tile(const RStep *rev, Py_ssize_t nrev, const double *v,
                                          double *g, Py_ssize_t out, const Stop *stop,
                                          const int w)
{
    for (int j = 0; j < w; j++)
        g[out * w + j] = 1.0;
    Py_ssize_t lim = check_up(stop, 0, nrev);
    for (Py_ssize_t k = 0; k < nrev; k++) {
        if (MG_UNLIKELY(k == lim)) {
            if (stop_due(stop))
                return MG_STOPPED;
            lim = check_up(stop, k, nrev);
        }
        const RStep *s = rev + k;
        const double *o = v + (Py_ssize_t)s->vo * w;
        const double *go = g + (Py_ssize_t)s->go * w;
        switch (s->code) {
            MG_OPS(TB_CASE)
        default:
            break;
        }
    }
    return 0;
}

/* One copy of each sweep per tile width, each built for the baseline and
 * for AVX2. */
static MG_CLONES int forward_narrow(const FStep *prog, Py_ssize_t n, const double *bind,
                                    const Py_ssize_t *row, double *restrict v, const Stop *stop)
{
    return forward_tile(prog, n, bind, row, v, stop, MG_TILE);
}
static MG_CLONES int forward_wide(const FStep *prog, Py_ssize_t n, const double *bind,
                                  const Py_ssize_t *row, double *restrict v, const Stop *stop)
{
    return forward_tile(prog, n, bind, row, v, stop, MG_TILE_WIDE);
}
static MG_CLONES int backward_narrow(const RStep *rev, Py_ssize_t nrev, const double *v,
                                     double *g, Py_ssize_t out, const Stop *stop)
{
    return backward_tile(rev, nrev, v, g, out, stop, MG_TILE);
}
static MG_CLONES int backward_wide(const RStep *rev, Py_ssize_t nrev, const double *v, double *g,
                                   Py_ssize_t out, const Stop *stop)
{
    return backward_tile(rev, nrev, v, g, out, stop, MG_TILE_WIDE);
}

/* Everything a tiled evaluation needs; threads share it read-only and each
 * writes the rows of its own tiles. */
typedef struct {
    const FStep *prog;
    const RStep *rev;
    Py_ssize_t n, nrev;
    Py_ssize_t nv, ng;   /* value and gradient slots */
    Py_ssize_t out;      /* the output's gradient slot */
    int width;           /* bindings per tile: MG_TILE or MG_TILE_WIDE */
    const double *bind;
    Py_ssize_t k, rows;
    const int32_t *vsel; /* per selected node: its value slot */
    const int32_t *gsel; /* per selected node: its gradient slot, or -1 (gradient 0) */
    Py_ssize_t s;
    double *vout, *gout; /* (rows, s); gout NULL for no gradients */
    int flush;
    const Stop *stop; /* NULL: run to the end */
    char *rows_block;    /* every thread's value and gradient rows, 64-byte aligned */
    size_t vbytes, gbytes; /* of one thread's value rows and gradient rows (multiples of 64) */
} TileJob;

/* The tiles not yet taken: each thread takes the next one when done with
 * its last, so a thread the machine runs slower (or not at all) leaves its
 * share to the others instead of holding up the call. */
typedef struct {
    Py_ssize_t next;  /* the next tile to take */
    Py_ssize_t tiles; /* how many there are */
    int stopped;      /* a thread was told to stop: take no more */
#if !defined(__GNUC__) && MG_HAVE_PTHREADS
    pthread_mutex_t lock;
#endif
} TileQueue;

static Py_ssize_t tile_take(TileQueue *q)
{
#if defined(__GNUC__)
    if (__atomic_load_n(&q->stopped, __ATOMIC_RELAXED))
        return q->tiles;
    return __atomic_fetch_add(&q->next, 1, __ATOMIC_RELAXED);
#elif MG_HAVE_PTHREADS
    pthread_mutex_lock(&q->lock);
    const Py_ssize_t t = q->stopped ? q->tiles : q->next++;
    pthread_mutex_unlock(&q->lock);
    return t;
#else
    return q->stopped ? q->tiles : q->next++;
#endif
}

static void tile_stop(TileQueue *q)
{
#if defined(__GNUC__)
    __atomic_store_n(&q->stopped, 1, __ATOMIC_RELAXED);
#elif MG_HAVE_PTHREADS
    pthread_mutex_lock(&q->lock);
    q->stopped = 1;
    pthread_mutex_unlock(&q->lock);
#else
    q->stopped = 1;
#endif
}

typedef struct {
    const TileJob *job;
    TileQueue *queue;
    Py_ssize_t index; /* which thread: its rows in job->rows_block */
} TileSlice;

static void run_tiles(TileSlice *slice)
{
    const TileJob *job = slice->job;
    char *mine = job->rows_block + (size_t)slice->index * (job->vbytes + job->gbytes);
    double *v = (double *)mine;
    double *g = job->gout ? (double *)(mine + job->vbytes) : NULL;
    unsigned int saved = flush_enter(job->flush);
    const Py_ssize_t s = job->s;
    for (Py_ssize_t t; (t = tile_take(slice->queue)) < slice->queue->tiles;) {
        const Py_ssize_t b0 = t * job->width, left = job->rows - b0;
        /* A short last tile of at most a narrow one's bindings is swept
         * narrow, repeating fewer bindings. */
        const int w = left > MG_TILE ? job->width : MG_TILE;
        const Py_ssize_t r = left < w ? left : w;
        Py_ssize_t row[MG_TILE_WIDE];
        for (int j = 0; j < w; j++) /* a short tile repeats its last binding */
            row[j] = (b0 + (j < r ? j : r - 1)) * job->k;
        if ((w == MG_TILE ? forward_narrow : forward_wide)(job->prog, job->n, job->bind, row, v,
                                                           job->stop)) {
            tile_stop(slice->queue);
            break;
        }
        double *vo = job->vout + b0 * s;
        for (Py_ssize_t col = 0; col < s; col++) {
            const double *src = v + (Py_ssize_t)job->vsel[col] * w;
            for (Py_ssize_t j = 0; j < r; j++)
                vo[j * s + col] = src[j];
        }
        if (g != NULL) {
            if ((w == MG_TILE ? backward_narrow : backward_wide)(job->rev, job->nrev, v, g,
                                                                 job->out, job->stop)) {
                tile_stop(slice->queue);
                break;
            }
            double *go = job->gout + b0 * s;
            for (Py_ssize_t col = 0; col < s; col++) {
                const int32_t slot = job->gsel[col];
                if (slot < 0) {
                    for (Py_ssize_t j = 0; j < r; j++)
                        go[j * s + col] = 0.0;
                } else {
                    const double *src = g + (Py_ssize_t)slot * w;
                    for (Py_ssize_t j = 0; j < r; j++)
                        go[j * s + col] = src[j];
                }
            }
        }
    }
    flush_leave(job->flush, saved);
}

#if MG_HAVE_PTHREADS
static void *run_tiles_thread(void *arg)
{
    run_tiles((TileSlice *)arg);
    return NULL;
}
#endif

/* How many threads a job of `rows` bindings in tiles of `width` runs on,
 * for up to `threads`: at least a tile each, at most 64. */
static Py_ssize_t tile_threads(Py_ssize_t rows, int width, Py_ssize_t threads)
{
    const Py_ssize_t tiles = (rows + width - 1) / width;
#if !MG_HAVE_PTHREADS
    threads = 1;
#endif
    if (threads > tiles)
        threads = tiles;
    if (threads > 64)
        threads = 64;
    return threads < 1 ? 1 : threads;
}

/* Sweep the tiles on `threads` threads (this one included; job->rows_block
 * holds rows for each), each taking the next tile as it finishes one;
 * returns 0, or MG_STOPPED when told to stop. */
static int run_tile_job(const TileJob *job, Py_ssize_t threads)
{
    TileQueue queue = {0, (job->rows + job->width - 1) / job->width, 0};
    TileSlice slices[64];
    for (Py_ssize_t t = 0; t < threads; t++) {
        slices[t].job = job;
        slices[t].queue = &queue;
        slices[t].index = t;
    }
#if MG_HAVE_PTHREADS
#if !defined(__GNUC__)
    pthread_mutex_init(&queue.lock, NULL);
#endif
    pthread_t ids[64];
    int started[64] = {0};
    for (Py_ssize_t t = 1; t < threads; t++)
        started[t] = pthread_create(&ids[t], NULL, run_tiles_thread, &slices[t]) == 0;
    run_tiles(&slices[0]); /* and the tiles of any thread that could not start */
    for (Py_ssize_t t = 1; t < threads; t++)
        if (started[t])
            pthread_join(ids[t], NULL);
#if !defined(__GNUC__)
    pthread_mutex_destroy(&queue.lock);
#endif
#else
    run_tiles(&slices[0]);
#endif
    return queue.stopped ? MG_STOPPED : 0;
}

/* Scratch memory kept from one call to the next. Blocks this big come fresh
 * from the system and cost a page fault per page on first touch, which was
 * a third of a 1,000-binding call of the MLP loss graph; a spare block of
 * each kind (the program, the tiles' rows) is kept instead, up to
 * MG_SPARE_MAX bytes. Taken and given back with the GIL held, which guards
 * the spares; a call that finds none allocates its own. */
#define MG_SPARE_MAX ((size_t)64 << 20)
#define ALIGN64(x) (((x) + (size_t)63) & ~(size_t)63)
enum { SPARE_PROGRAM, SPARE_ROWS, SPARES };
static void *spare_block[SPARES];
static size_t spare_bytes[SPARES];

/* A block of at least `size` bytes (its real size in *got), or NULL. */
static void *scratch_take(int kind, size_t size, size_t *got)
{
    if (spare_block[kind] != NULL && spare_bytes[kind] >= size) {
        void *p = spare_block[kind];
        *got = spare_bytes[kind];
        spare_block[kind] = NULL;
        return p;
    }
    *got = size;
    return PyMem_RawMalloc(size ? size : 1);
}

/* Give back a block from scratch_take: kept if it is the bigger spare. */
static void scratch_give(int kind, void *p, size_t size)
{
    if (p == NULL)
        return;
    if (size > MG_SPARE_MAX || (spare_block[kind] != NULL && spare_bytes[kind] >= size)) {
        PyMem_RawFree(p);
        return;
    }
    PyMem_RawFree(spare_block[kind]);
    spare_block[kind] = p;
    spare_bytes[kind] = size;
}

/* The most bytes of slot rows a wide tile may take (each thread has its
 * own): about a core's L2 and its share of L3, where the wide tiles measured
 * fastest; beyond it the narrow tiles stay in the caches better. */
#ifndef MG_TILE_BYTES
#define MG_TILE_BYTES (2 * 1024 * 1024)
#endif

/* Bindings per tile for a program of `slots` rows: the wide tiles (half
 * the dispatches per binding) when their rows fit MG_TILE_BYTES and every
 * thread gets a full one, else the narrow ones. */
static Py_ssize_t choose_tile(Py_ssize_t slots, Py_ssize_t rows, Py_ssize_t threads)
{
    const int fits = (size_t)slots * MG_TILE_WIDE * sizeof(double) <= MG_TILE_BYTES;
    return fits && rows >= MG_TILE_WIDE * (threads > 1 ? threads : 1) ? MG_TILE_WIDE : MG_TILE;
}

/* A stack of free slots; a slot given back is the next one handed out, so
 * it is still in the cache. */
typedef struct {
    int32_t *free;
    Py_ssize_t top;
    int32_t used; /* slots handed out so far: the rows a tile needs */
} Slots;

static int32_t slot_take(Slots *p)
{
    return p->top > 0 ? p->free[--p->top] : p->used++;
}

static void slot_give(Slots *p, int32_t slot)
{
    p->free[p->top++] = slot;
}

/* Scratch of compile_steps, n entries each. */
typedef struct {
    int32_t *last;  /* the last forward step that reads each node (-1: none) */
    int32_t *vslot; /* each node's value slot */
    int32_t *gslot; /* each reached node's gradient slot */
    int32_t *order; /* the reached non-leaf nodes, descending */
    int32_t *free;  /* the free-slot stack */
    uint8_t *flags; /* KEEP_VALUE, KEEP_GRAD, REACHED */
} Scratch;

#define KEEP_VALUE 1
#define KEEP_GRAD 2
#define REACHED 4

/* Decode and check the tape into a forward program over value slots and,
 * from `out` (when rev is not NULL), the reverse program of the reached
 * non-leaf nodes over gradient slots, with their first-contribution flags.
 * Fills vsel/gsel for the s selected nodes, *nv and *ng (slots per tile
 * row), *gout (the output's gradient slot). Returns -1, or the first bad
 * node. */
static Py_ssize_t compile_steps(const Columns *t, Py_ssize_t out, const int64_t *sel,
                                Py_ssize_t s, FStep *prog, RStep *rev, Py_ssize_t *nrev,
                                int32_t *vsel, int32_t *gsel, Py_ssize_t *nv, Py_ssize_t *ng,
                                Py_ssize_t *gout, const Scratch *x)
{
    const Py_ssize_t n = t->n;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (!node_ok(t, i))
            return i;
        x->last[i] = -1;
        x->flags[i] = 0;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        const int arity = ARITY_PLUS_1[t->code[i]] - 1;
        if (arity >= 1)
            x->last[t->a[i]] = (int32_t)i;
        if (arity == 2)
            x->last[t->b[i]] = (int32_t)i;
    }
    for (Py_ssize_t j = 0; j < s; j++)
        x->flags[sel[j]] |= KEEP_VALUE | KEEP_GRAD;
    /* The reached nodes, their first contributions, and the values the
     * reverse sweep reads. */
    Py_ssize_t m = 0;
    if (rev != NULL) {
        x->flags[out] |= REACHED;
        for (Py_ssize_t i = out; i >= 0; i--) {
            const int arity = ARITY_PLUS_1[t->code[i]] - 1;
            if (!(x->flags[i] & REACHED) || arity == 0)
                continue;
            const Py_ssize_t a = t->a[i], b = arity == 2 ? t->b[i] : -1;
            RStep *r = rev + m;
            x->order[m++] = (int32_t)i;
            r->code = t->code[i];
            r->c = t->c[i];
            r->first = 0;
            if (!(x->flags[a] & REACHED))
                r->first |= 1;
            x->flags[a] |= REACHED;
            if (arity == 2) {
                if (a == b)
                    r->first |= 4;
                else if (!(x->flags[b] & REACHED))
                    r->first |= 2;
                x->flags[b] |= REACHED;
            }
            const unsigned reads = PARTIALS_READ[r->code];
            if (reads & 1)
                x->flags[a] |= KEEP_VALUE;
            if ((reads & 2) && arity == 2)
                x->flags[b] |= KEEP_VALUE;
            if (reads & 4)
                x->flags[i] |= KEEP_VALUE;
        }
    }
    *nrev = m;
    /* Value slots, in forward order. */
    Slots p = {x->free, 0, 0};
    for (Py_ssize_t i = 0; i < n; i++) {
        const int arity = ARITY_PLUS_1[t->code[i]] - 1;
        FStep *f = prog + i;
        f->code = t->code[i];
        f->c = t->c[i];
        f->a = arity >= 1 ? x->vslot[t->a[i]] : -1;
        f->b = arity == 2 ? x->vslot[t->b[i]] : -1;
        f->o = x->vslot[i] = slot_take(&p); /* before the arguments' slots are given back */
        if (arity >= 1 && x->last[t->a[i]] == i && !(x->flags[t->a[i]] & KEEP_VALUE))
            slot_give(&p, f->a);
        if (arity == 2 && t->b[i] != t->a[i] && x->last[t->b[i]] == i &&
            !(x->flags[t->b[i]] & KEEP_VALUE))
            slot_give(&p, f->b);
        if (x->last[i] < 0 && !(x->flags[i] & KEEP_VALUE))
            slot_give(&p, f->o);
    }
    *nv = p.used;
    for (Py_ssize_t j = 0; j < s; j++)
        vsel[j] = x->vslot[sel[j]];
    if (rev == NULL)
        return -1;
    /* Gradient slots, in reverse order. */
    Slots q = {x->free, 0, 0};
    *gout = x->gslot[out] = slot_take(&q);
    for (Py_ssize_t k = 0; k < m; k++) {
        const Py_ssize_t i = x->order[k];
        const int arity = ARITY_PLUS_1[t->code[i]] - 1;
        const unsigned reads = PARTIALS_READ[t->code[i]];
        const Py_ssize_t a = t->a[i], b = arity == 2 ? t->b[i] : -1;
        RStep *r = rev + k;
        r->vo = (reads & 4) ? x->vslot[i] : 0;
        r->va = (reads & 1) ? x->vslot[a] : 0;
        r->vb = (reads & 2) && arity == 2 ? x->vslot[b] : 0;
        r->go = x->gslot[i];
        if (r->first & 1)
            x->gslot[a] = slot_take(&q);
        r->ga = x->gslot[a];
        r->gb = 0;
        if (arity == 2 && !(r->first & 4)) {
            if (r->first & 2)
                x->gslot[b] = slot_take(&q);
            r->gb = x->gslot[b];
        }
        if (!(x->flags[i] & KEEP_GRAD))
            slot_give(&q, r->go);
    }
    *ng = q.used;
    for (Py_ssize_t j = 0; j < s; j++)
        gsel[j] = (x->flags[sel[j]] & REACHED) ? x->gslot[sel[j]] : -1;
    return -1;
}

/* ---- Python entry points ------------------------------------------------ */

PyDoc_STRVAR(forward_doc,
"forward(code, arg0, arg1, const, values, flush_denormals=False, stop=None, expires=0.0,\n"
"        arg2=None)\n--\n\n"
"Forward sweep: fill the non-leaf rows of values ((n,) or (n, B) float64,\n"
"C-contiguous, leaf rows already filled) in place. Returns True, or False\n"
"if it stopped early: when the first byte of the buffer stop became non-zero\n"
"or time.monotonic() passed expires (looked at every few thousand cells).\n"
"arg2 holds the third arguments (int32, -1 where none), None when no node\n"
"has one.");

static PyObject *kernel_forward(PyObject *module, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"code", "arg0", "arg1", "const", "values", "flush_denormals",
                               "stop", "expires", "arg2", NULL};
    PyObject *code, *a, *b, *c, *values, *stop_flag = NULL, *z = Py_None;
    int flush = 0, use_stop = 0;
    double expires = 0.0;
    (void)module;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOO|pOdO:forward", keywords, &code, &a, &b,
                                     &c, &values, &flush, &stop_flag, &expires, &z))
        return NULL;
    TapeBuffers tb;
    if (get_tape(code, a, b, z, c, &tb) < 0)
        return NULL;
    Py_buffer vv;
    Py_ssize_t m;
    if (get_rows(values, "values", tb.cols.n, &vv, &m) < 0) {
        release_tape(&tb);
        return NULL;
    }
    Stop stop;
    Py_buffer sv;
    if (get_stop(stop_flag, expires, m, &stop, &sv, &use_stop) < 0) {
        PyBuffer_Release(&vv);
        release_tape(&tb);
        return NULL;
    }
    const Stop *sp = use_stop ? &stop : NULL;
    Py_ssize_t bad;
    Py_BEGIN_ALLOW_THREADS
    unsigned int saved = flush_enter(flush);
    if (vv.ndim == 1 && tb.cols.z == NULL)
        bad = forward_one(&tb.cols, (double *)vv.buf, sp);
    else /* a batch, or one binding of a tape with ternary nodes: rows of m (or 1) */
        bad = (vv.ndim == 2 && m == 0) ? -1
                                       : forward_batch(&tb.cols, (double *)vv.buf,
                                                       vv.ndim == 1 ? 1 : m, sp);
    flush_leave(flush, saved);
    Py_END_ALLOW_THREADS
    if (bad >= 0)
        raise_bad_node(&tb.cols, bad);
    release_stop(&sv);
    PyBuffer_Release(&vv);
    release_tape(&tb);
    if (bad >= 0)
        return NULL;
    return PyBool_FromLong(bad != MG_STOPPED);
}

PyDoc_STRVAR(backward_doc,
"backward(code, arg0, arg1, const, values, grads, output, flush_denormals=False, stop=None,\n"
"         expires=0.0, arg2=None, seeded=False)\n--\n\n"
"Reverse sweep: add d(output)/d(node) into grads (zeroed, shaped like the\n"
"forward-filled values) for every node the output depends on. Returns True,\n"
"or False if it stopped early (stop and expires as in forward). seeded:\n"
"grads arrives holding cotangent weights in any rows up to output, and one\n"
"sweep from output propagates all of them (a vector-Jacobian product; in\n"
"a batch, each column its own seeds).");

static PyObject *kernel_backward(PyObject *module, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"code", "arg0", "arg1", "const", "values", "grads", "output",
                               "flush_denormals", "stop", "expires", "arg2", "seeded", NULL};
    PyObject *code, *a, *b, *c, *values, *grads, *stop_flag = NULL, *z = Py_None;
    Py_ssize_t out;
    int flush = 0, use_stop = 0, seeded = 0;
    double expires = 0.0;
    (void)module;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOOOn|pOdOp:backward", keywords, &code, &a,
                                     &b, &c, &values, &grads, &out, &flush, &stop_flag, &expires,
                                     &z, &seeded))
        return NULL;
    TapeBuffers tb;
    if (get_tape(code, a, b, z, c, &tb) < 0)
        return NULL;
    const Py_ssize_t n = tb.cols.n;
    Py_buffer vv, gv;
    Py_ssize_t m, mg;
    uint8_t *reached = NULL;
    double *scratch = NULL;
    PyObject *result = NULL;
    Stop stop;
    Py_buffer sv;
    sv.obj = NULL;
    if (get_rows(values, "values", n, &vv, &m) < 0)
        goto done_tape;
    if (get_rows(grads, "grads", n, &gv, &mg) < 0)
        goto done_values;
    if (gv.ndim != vv.ndim || mg != m) {
        PyErr_SetString(PyExc_ValueError, "grads must have the same shape as values");
        goto done;
    }
    if (gv.buf == vv.buf && n > 0) {
        PyErr_SetString(PyExc_ValueError, "grads and values must be different arrays");
        goto done;
    }
    if (out < 0 || out >= n) {
        PyErr_Format(PyExc_ValueError, "output %zd is out of range for %zd nodes", out, n);
        goto done;
    }
    if (get_stop(stop_flag, expires, m, &stop, &sv, &use_stop) < 0)
        goto done;
    reached = PyMem_RawCalloc((size_t)out + 1, 1);
    const int rowwise = vv.ndim == 2 || tb.cols.z != NULL; /* as in kernel_forward */
    const Py_ssize_t width = vv.ndim == 2 ? m : 1;
    if (rowwise && width > 0)
        scratch = PyMem_RawMalloc((size_t)width * sizeof(double));
    if (reached == NULL || (rowwise && width > 0 && scratch == NULL)) {
        PyErr_NoMemory();
        goto done;
    }
    const Stop *sp = use_stop ? &stop : NULL;
    Py_ssize_t bad;
    Py_BEGIN_ALLOW_THREADS
    unsigned int saved = flush_enter(flush);
    if (seeded)
        mark_seeds((const double *)gv.buf, reached, out, vv.ndim == 1 ? 1 : m);
    if (!rowwise)
        bad = backward_one(&tb.cols, (const double *)vv.buf, (double *)gv.buf, reached, out, sp,
                           seeded);
    else
        bad = width == 0 ? -1
                         : backward_batch(&tb.cols, (const double *)vv.buf, (double *)gv.buf,
                                          reached, out, width, scratch, sp, seeded);
    flush_leave(flush, saved);
    Py_END_ALLOW_THREADS
    if (bad >= 0)
        raise_bad_node(&tb.cols, bad);
    else
        result = PyBool_FromLong(bad != MG_STOPPED);
done:
    release_stop(&sv);
    PyMem_RawFree(reached);
    PyMem_RawFree(scratch);
    PyBuffer_Release(&gv);
done_values:
    PyBuffer_Release(&vv);
done_tape:
    release_tape(&tb);
    return result;
}

PyDoc_STRVAR(hvp_doc,
"hvp(code, arg0, arg1, const, values, tangents, grads, grad_tangents, output,\n"
"    flush_denormals=False, arg2=None)\n--\n\n"
"Forward-over-reverse: fill values and tangents (leaf rows filled: the\n"
"tangent v at the inputs, 0 elsewhere), then grads (d output/d node) and\n"
"grad_tangents (zeroed; at the inputs, the Hessian-vector product H v).\n"
"All four (n,) or (n, B) float64, C-contiguous, distinct.");

static PyObject *kernel_hvp(PyObject *module, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"code", "arg0", "arg1", "const", "values", "tangents", "grads",
                               "grad_tangents", "output", "flush_denormals", "arg2", NULL};
    PyObject *code, *a, *b, *c, *arrays[4], *z = Py_None;
    static const char *const names[4] = {"values", "tangents", "grads", "grad_tangents"};
    Py_ssize_t out;
    int flush = 0;
    (void)module;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOOOOOn|pO:hvp", keywords, &code, &a, &b, &c,
                                     &arrays[0], &arrays[1], &arrays[2], &arrays[3], &out, &flush,
                                     &z))
        return NULL;
    TapeBuffers tb;
    if (get_tape(code, a, b, z, c, &tb) < 0)
        return NULL;
    const Py_ssize_t n = tb.cols.n;
    Py_buffer views[4];
    Py_ssize_t m[4];
    int held = 0;
    uint8_t *reached = NULL;
    PyObject *result = NULL;
    for (; held < 4; held++)
        if (get_rows(arrays[held], names[held], n, &views[held], &m[held]) < 0)
            goto done;
    for (int k = 1; k < 4; k++) {
        if (views[k].ndim != views[0].ndim || m[k] != m[0]) {
            PyErr_Format(PyExc_ValueError, "%s must have the same shape as values", names[k]);
            goto done;
        }
        for (int l = 0; l < k; l++)
            if (views[k].buf == views[l].buf && n > 0) {
                PyErr_Format(PyExc_ValueError, "%s and %s must be different arrays", names[l],
                             names[k]);
                goto done;
            }
    }
    if (out < 0 || out >= n) {
        PyErr_Format(PyExc_ValueError, "output %zd is out of range for %zd nodes", out, n);
        goto done;
    }
    reached = PyMem_RawCalloc((size_t)out + 1, 1);
    if (reached == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    Py_ssize_t bad = -1;
    double *v = views[0].buf, *dv = views[1].buf, *g = views[2].buf, *dg = views[3].buf;
    Py_BEGIN_ALLOW_THREADS
    unsigned int saved = flush_enter(flush);
    if (views[0].ndim == 1)
        bad = hvp_one(&tb.cols, v, dv, g, dg, reached, out);
    else if (m[0] > 0)
        bad = hvp_batch(&tb.cols, v, dv, g, dg, reached, out, m[0]);
    flush_leave(flush, saved);
    Py_END_ALLOW_THREADS
    if (bad >= 0)
        raise_bad_node(&tb.cols, bad);
    else
        result = Py_NewRef(Py_None);
done:
    PyMem_RawFree(reached);
    for (int k = 0; k < held; k++)
        PyBuffer_Release(&views[k]);
    release_tape(&tb);
    return result;
}

PyDoc_STRVAR(evaluate_tiles_doc,
"evaluate_tiles(code, arg0, arg1, const, inputs, bindings, output, selection, values_out,\n"
"               grads_out=None, threads=1, flush_denormals=False, stop=None,\n"
"               expires=0.0, tile=0)\n--\n\n"
"Evaluate a batch tile by tile, keeping only the selected nodes: bindings is\n"
"(B, k) float64 for the k input nodes listed in inputs (int64); values_out and\n"
"grads_out (or None: no reverse sweep) are (B, s) float64 for the s nodes in\n"
"selection (int64), filled in place. The tiles are spread over up to\n"
"`threads` threads. A tile is TILE or TILE_WIDE bindings (tile; 0: the wide\n"
"ones when their rows fit the cache). Returns True, or False if it stopped\n"
"early (stop and expires as in forward).");

static PyObject *kernel_evaluate_tiles(PyObject *module, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"code", "arg0", "arg1", "const", "inputs", "bindings", "output",
                               "selection", "values_out", "grads_out", "threads",
                               "flush_denormals", "stop", "expires", "tile", NULL};
    PyObject *code, *a, *b, *c, *inputs, *bindings, *selection, *values_out;
    PyObject *grads_out = Py_None, *stop_flag = NULL;
    Py_ssize_t out, threads = 1, tile = 0;
    int flush = 0, use_stop = 0;
    double expires = 0.0;
    (void)module;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOOOnOO|OnpOdn:evaluate_tiles", keywords,
                                     &code, &a, &b, &c, &inputs, &bindings, &out, &selection,
                                     &values_out, &grads_out, &threads, &flush, &stop_flag,
                                     &expires, &tile))
        return NULL;
    TapeBuffers tb;
    if (get_tape(code, a, b, NULL, c, &tb) < 0)
        return NULL;
    const Py_ssize_t n = tb.cols.n;
    Py_buffer iv;
    Selected io;
    int held = 0; /* iv held; io held */
    PyObject *result = NULL;
    char *block = NULL, *rows_block = NULL; /* the program and scratch; the tiles' rows */
    size_t block_bytes = 0, rows_bytes = 0;
    const int grads = grads_out != Py_None;
    Stop stop;
    Py_buffer stop_view;
    stop_view.obj = NULL;
    if (get_array(inputs, "inputs", 'q', 8, 0, 1, &iv) < 0)
        goto done;
    held = 1;
    if (get_selected(bindings, selection, values_out, grads_out, iv.shape[0], n, &io) < 0)
        goto done;
    held = 2;
    const Py_ssize_t k = iv.shape[0], s = io.s, rows = io.rows;
    if (out < 0 || out >= n) {
        PyErr_Format(PyExc_ValueError, "output %zd is out of range for %zd nodes", out, n);
        goto done;
    }
    const int64_t *in = (const int64_t *)iv.buf, *sel = (const int64_t *)io.selection.buf;
    if (tile != 0 && tile != MG_TILE && tile != MG_TILE_WIDE) {
        PyErr_Format(PyExc_ValueError, "tile must be 0 (chosen), %d or %d", MG_TILE,
                     MG_TILE_WIDE);
        goto done;
    }
    /* One block: prog, rev, five int32 columns, flags, vsel, gsel. */
    const size_t cells = (size_t)(n ? n : 1), picks = (size_t)(s ? s : 1);
    const size_t at_rev = ALIGN64(cells * sizeof(FStep));
    const size_t at_ints = at_rev + ALIGN64(grads ? (size_t)(out + 1) * sizeof(RStep) : 0);
    const size_t at_flags = at_ints + ALIGN64(5 * cells * sizeof(int32_t));
    const size_t at_vsel = at_flags + ALIGN64(cells);
    const size_t at_gsel = at_vsel + ALIGN64(picks * sizeof(int32_t));
    block = scratch_take(SPARE_PROGRAM, at_gsel + picks * sizeof(int32_t), &block_bytes);
    if (block == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    FStep *prog = (FStep *)block;
    RStep *rev = grads ? (RStep *)(block + at_rev) : NULL;
    int32_t *ints = (int32_t *)(block + at_ints);
    int32_t *vsel = (int32_t *)(block + at_vsel), *gsel = (int32_t *)(block + at_gsel);
    const Scratch scratch = {ints, ints + cells, ints + 2 * cells, ints + 3 * cells,
                             ints + 4 * cells, (uint8_t *)(block + at_flags)};
    Py_ssize_t bad, nrev = 0, nv = 0, ng = 0, gout = 0;
    int failed = 0;
    Py_BEGIN_ALLOW_THREADS
    bad = compile_steps(&tb.cols, out, sel, s, prog, rev, &nrev, vsel, gsel, &nv, &ng, &gout,
                        &scratch);
    Py_END_ALLOW_THREADS
    if (bad >= 0) {
        raise_bad_node(&tb.cols, bad);
        goto done;
    }
    for (Py_ssize_t j = 0; j < k; j++) {
        if (in[j] < 0 || in[j] >= n || ARITY_PLUS_1[prog[in[j]].code] != 1) {
            PyErr_Format(PyExc_ValueError, "inputs[%zd] is %lld, not a leaf node", j,
                         (long long)in[j]);
            goto done;
        }
        prog[in[j]].a = (int32_t)j;
    }
    if (tile == 0)
        tile = choose_tile(nv + (grads ? ng : 0), rows, threads);
    if (get_stop(stop_flag, expires, tile, &stop, &stop_view, &use_stop) < 0)
        goto done;
    if (rows > 0) {
        /* Rows at the job's width (a narrow tail tile uses part of each). */
        const Py_ssize_t used = tile_threads(rows, (int)tile, threads);
        const size_t row_bytes = (size_t)tile * sizeof(double);
        TileJob job = {
            .prog = prog, .rev = rev, .n = n, .nrev = nrev, .nv = nv, .ng = ng, .out = gout,
            .width = (int)tile, .bind = (const double *)io.bindings.buf, .k = k, .rows = rows,
            .vsel = vsel, .gsel = gsel, .s = s,
            .vout = (double *)io.values.buf, .gout = grads ? (double *)io.grads.buf : NULL,
            .flush = flush, .stop = use_stop ? &stop : NULL,
            .vbytes = ALIGN64((size_t)(nv ? nv : 1) * row_bytes),
            .gbytes = grads ? ALIGN64((size_t)(ng ? ng : 1) * row_bytes) : 0,
        };
        rows_block = scratch_take(SPARE_ROWS, (size_t)used * (job.vbytes + job.gbytes) + 64,
                                  &rows_bytes);
        if (rows_block == NULL) {
            PyErr_NoMemory();
            goto done;
        }
        job.rows_block = (char *)(((uintptr_t)rows_block + 63) & ~(uintptr_t)63);
        Py_BEGIN_ALLOW_THREADS
        failed = run_tile_job(&job, used);
        Py_END_ALLOW_THREADS
    }
    result = PyBool_FromLong(failed != MG_STOPPED);
done:
    release_stop(&stop_view);
    scratch_give(SPARE_PROGRAM, block, block_bytes);
    scratch_give(SPARE_ROWS, rows_block, rows_bytes);
    if (held == 2)
        release_selected(&io);
    if (held >= 1)
        PyBuffer_Release(&iv);
    release_tape(&tb);
    return result;
}

PyDoc_STRVAR(decode_graph_doc,
"decode_graph(buf)\n--\n\n"
"Decode the protobuf wire bytes of a micrograd.v1.Graph into columns:\n"
"(n, code, arg0, arg1, arg2, const, names), the columns as bytearrays of\n"
"uint8, int32, int32, int32 and float64 items (arg2 None when no node has a\n"
"third argument) and names a list of (node, name) for the nodes with a\n"
"non-empty name. Raises ValueError((node, reason)).");

PyDoc_STRVAR(unpack_columns_doc,
"unpack_columns(ops, args, values, arity, uses_value)\n--\n\n"
"Validate a PackedGraph's byte columns and return (arg0, arg1, arg2, const)\n"
"as bytearrays of int32 and float64 items (arg2 None when no node has a\n"
"third argument); ops is already the code\n"
"column. arity and uses_value are per-code tables from micrograd.ops (arity\n"
"255: not an op). Raises ValueError((node, field, reason)), node -1 for the\n"
"graph as a whole.");

static PyMethodDef kernel_methods[] = {
    {"forward", (PyCFunction)(void (*)(void))kernel_forward, METH_VARARGS | METH_KEYWORDS,
     forward_doc},
    {"backward", (PyCFunction)(void (*)(void))kernel_backward, METH_VARARGS | METH_KEYWORDS,
     backward_doc},
    {"hvp", (PyCFunction)(void (*)(void))kernel_hvp, METH_VARARGS | METH_KEYWORDS, hvp_doc},
    {"evaluate_tiles", (PyCFunction)(void (*)(void))kernel_evaluate_tiles,
     METH_VARARGS | METH_KEYWORDS, evaluate_tiles_doc},
    {"compile_program", (PyCFunction)(void (*)(void))kernel_compile_program,
     METH_VARARGS | METH_KEYWORDS, compile_program_doc},
    {"run_program", (PyCFunction)(void (*)(void))kernel_run_program,
     METH_VARARGS | METH_KEYWORDS, run_program_doc},
    {"decode_graph", mg_decode_graph, METH_O, decode_graph_doc},
    {"value_columns", mg_value_columns, METH_VARARGS,
     "value_columns(root, targets, arity)\n--\n\nTape columns of the Value graph behind root:\n"
     "(order, code, arg0, arg1, const, target indices), or None for the Python path."},
    {"pack_value", mg_pack_value, METH_VARARGS,
     "pack_value(root, targets, arity, uses_value)\n--\n\nPackedGraph columns of the Value\n"
     "graph behind root: (order, ops, args, values, target indices), or None."},
    {"assign_values", mg_assign_values, METH_VARARGS,
     "assign_values(order, values, grads, arity)\n--\n\nWrite values and gradients onto the\n"
     "nodes as Value.backward would; False (nothing written) if a node is not plain."},
    {"value_backward", mg_value_backward, METH_VARARGS,
     "value_backward(root, arity)\n--\n\nValue.backward() on the C reverse sweep; False\n"
     "(nothing changed) where the Python path must run."},
    {"unpack_columns", mg_unpack_columns, METH_VARARGS, unpack_columns_doc},
    {"new_node", mg_new_node, METH_O,
     "new_node(cls)\n--\n\nobject.__new__(cls), not tracked by the cycle collector (for\n"
     "nodes that can be in no reference cycle)."},
    {NULL, NULL, 0, NULL},
};

static int kernel_exec(PyObject *module)
{
    PyObject *ops = PyList_New(0);
    if (ops == NULL)
        return -1;
#define OP_ENTRY(code_, name, ar)                                   \
    {                                                               \
        PyObject *entry = Py_BuildValue("(isi)", code_, #name, ar); \
        int failed = entry == NULL || PyList_Append(ops, entry) < 0; \
        Py_XDECREF(entry);                                          \
        if (failed) {                                               \
            Py_DECREF(ops);                                         \
            return -1;                                              \
        }                                                           \
    }
    MG_OPS(OP_ENTRY)
#undef OP_ENTRY
    PyObject *table = PyList_AsTuple(ops);
    Py_DECREF(ops);
    if (table == NULL)
        return -1;
    int failed = PyModule_AddObjectRef(module, "OPS", table) < 0;
    Py_DECREF(table);
    if (failed)
        return -1;
    if (PyModule_AddIntConstant(module, "TILE_WIDE", MG_TILE_WIDE) < 0)
        return -1;
    if (PyModule_AddIntConstant(module, "TILE", MG_TILE) < 0)
        return -1;
    return PyModule_AddObjectRef(module, "FLUSH_DENORMALS_SUPPORTED",
                                 MG_HAVE_FLUSH ? Py_True : Py_False);
}

static PyModuleDef_Slot kernel_slots[] = {
    {Py_mod_exec, kernel_exec},
    {0, NULL},
};

static struct PyModuleDef kernel_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "micrograd._kernel",
    .m_doc = "The native tape kernel: forward/reverse sweeps and the Graph wire decoder.\n"
             "OPS lists (code, name, arity) of every op the sweeps implement.",
    .m_size = 0,
    .m_methods = kernel_methods,
    .m_slots = kernel_slots,
};

PyMODINIT_FUNC PyInit__kernel(void)
{
    return PyModuleDef_Init(&kernel_module);
}
