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

/* A sweep returns -1, or the index of the first node it could not evaluate. */

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
#define FWD1_3(name, P, Q)                                           \
    {                                                                \
        const Py_ssize_t ai = A[i], bi = B[i], zi = THIRD(t, i);     \
        double x, y, z;                                              \
        NEAR_ARG(x, ai, Q, P)                                        \
        NEAR_ARG(y, bi, Q, P)                                        \
        NEAR_ARG(z, zi, Q, P)                                        \
        P = name##_f(x, y, z);                                       \
        v[i] = P;                                                    \
    }
#define FWD1_EVEN_LABEL(code_, name, arity) [code_] = &&even_##name,
#define FWD1_ODD_LABEL(code_, name, arity) [code_] = &&odd_##name,
#define FWD1_HANDLERS(code_, name, arity)                            \
    even_##name:                                                     \
    FWD1_##arity(name, r_even, r_odd)                                \
    if (MG_UNLIKELY(++i == n))                                       \
        return -1;                                                   \
    goto *odd[code[i]];                                              \
    odd_##name:                                                      \
    FWD1_##arity(name, r_odd, r_even)                                \
    if (MG_UNLIKELY(++i == n))                                       \
        return -1;                                                   \
    goto *even[code[i]];

static MG_NOINLINE Py_ssize_t forward_one(const Columns *t, double *restrict v)
{
    static const void *const even[256] = {[0 ... 255] = &&unknown, MG_OPS(FWD1_EVEN_LABEL)};
    static const void *const odd[256] = {[0 ... 255] = &&unknown, MG_OPS(FWD1_ODD_LABEL)};
    const uint8_t *code = t->code;
    const int32_t *A = t->a, *B = t->b;
    const double *C = t->c;
    const Py_ssize_t n = t->n;
    double r_even = 0.0, r_odd = 0.0;
    Py_ssize_t i;
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

static MG_NOINLINE Py_ssize_t forward_one(const Columns *t, double *restrict v)
{
    const uint8_t *code = t->code;
    const int32_t *A = t->a, *B = t->b;
    const double *C = t->c;
    const Py_ssize_t n = t->n;
    for (Py_ssize_t i = 0; i < n; i++) {
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
#define BWD1_3(name)                                                 \
    {                                                                \
        const Py_ssize_t ai = A[i], bi = B[i], zi = THIRD(t, i);     \
        if (MG_UNLIKELY(!ARG_OK3))                                   \
            return i;                                                \
        double dx, dy, dz;                                           \
        name##_d(v[ai], v[bi], v[zi], v[i], &dx, &dy, &dz);          \
        GRAD_ADD(ai, dx * G0)                                        \
        GRAD_ADD(bi, dy * G0)                                        \
        GRAD_ADD(zi, dz * G0)                                        \
        reached[ai] = 1;                                             \
        reached[bi] = 1;                                             \
        reached[zi] = 1;                                             \
    }
#define BWD1_LABEL(code_, name, arity) [code_] = &&grad_##name,
/* Leave node i: store its gradient, slide the window down to the next
 * reached node and dispatch it. */
#define BWD1_NEXT                                                    \
    g[i] = G0;                                                       \
    for (;;) {                                                       \
        if (MG_UNLIKELY(--i < 0))                                    \
            return -1;                                               \
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
                                           uint8_t *restrict reached, Py_ssize_t out, int seeded)
{
    static const void *const labels[256] = {[0 ... 255] = &&unknown, MG_OPS(BWD1_LABEL)};
    const uint8_t *code = t->code;
    const int32_t *A = t->a, *B = t->b;
    const double *C = t->c;
    Py_ssize_t i = out;
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
                                           uint8_t *restrict reached, Py_ssize_t out, int seeded)
{
    const uint8_t *code = t->code;
    const int32_t *A = t->a, *B = t->b;
    const double *C = t->c;
    if (!seeded)
        g[out] = 1.0;
    reached[out] = 1;
    for (Py_ssize_t i = out; i >= 0; i--) {
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

static MG_NOINLINE Py_ssize_t forward_batch(const Columns *t, double *v, Py_ssize_t m)
{
    const uint8_t *code = t->code;
    const int32_t *A = t->a, *B = t->b;
    const double *C = t->c;
    const Py_ssize_t n = t->n;
    for (Py_ssize_t i = 0; i < n; i++) {
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
                                             Py_ssize_t m, double *scratch, int seeded)
{
    const uint8_t *code = t->code;
    const int32_t *A = t->a, *B = t->b;
    const double *C = t->c;
    for (Py_ssize_t j = 0; j < m && !seeded; j++)
        g[out * m + j] = 1.0;
    reached[out] = 1;
    for (Py_ssize_t i = out; i >= 0; i--) {
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
    return fmt[0] == want;
}

static const char *dtype_name(char want)
{
    return want == 'B' ? "uint8" : want == 'i' ? "int32" : "float64";
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
        PyErr_Format(PyExc_ValueError, "node %zd: unknown op code %u", i, k);
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

/* ---- Python entry points ------------------------------------------------ */

PyDoc_STRVAR(forward_doc,
"forward(code, arg0, arg1, const, values, flush_denormals=False, arg2=None)\n--\n\n"
"Forward sweep: fill the non-leaf rows of values ((n,) or (n, B) float64,\n"
"C-contiguous, leaf rows already filled) in place. arg2 holds the third\n"
"arguments (int32, -1 where none), None when no node has one.");

static PyObject *kernel_forward(PyObject *module, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"code", "arg0", "arg1", "const", "values", "flush_denormals",
                               "arg2", NULL};
    PyObject *code, *a, *b, *c, *values, *z = Py_None;
    int flush = 0;
    (void)module;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOO|pO:forward", keywords, &code, &a, &b, &c,
                                     &values, &flush, &z))
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
    Py_ssize_t bad;
    Py_BEGIN_ALLOW_THREADS
    unsigned int saved = flush_enter(flush);
    if (vv.ndim == 1)
        bad = forward_one(&tb.cols, (double *)vv.buf);
    else
        bad = m == 0 ? -1 : forward_batch(&tb.cols, (double *)vv.buf, m);
    flush_leave(flush, saved);
    Py_END_ALLOW_THREADS
    if (bad >= 0)
        raise_bad_node(&tb.cols, bad);
    PyBuffer_Release(&vv);
    release_tape(&tb);
    if (bad >= 0)
        return NULL;
    Py_RETURN_NONE;
}

PyDoc_STRVAR(backward_doc,
"backward(code, arg0, arg1, const, values, grads, output, flush_denormals=False,\n"
"         arg2=None, seeded=False)\n--\n\n"
"Reverse sweep: add d(output)/d(node) into grads (zeroed, shaped like the\n"
"forward-filled values) for every node the output depends on. seeded:\n"
"grads arrives holding cotangent weights in any rows up to output, and one\n"
"sweep from output propagates all of them (a vector-Jacobian product; in\n"
"a batch, each column its own seeds).");

static PyObject *kernel_backward(PyObject *module, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"code", "arg0", "arg1", "const", "values", "grads", "output",
                               "flush_denormals", "arg2", "seeded", NULL};
    PyObject *code, *a, *b, *c, *values, *grads, *z = Py_None;
    Py_ssize_t out;
    int flush = 0, seeded = 0;
    (void)module;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOOOn|pOp:backward", keywords, &code, &a, &b,
                                     &c, &values, &grads, &out, &flush, &z, &seeded))
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
    reached = PyMem_RawCalloc((size_t)out + 1, 1);
    if (vv.ndim == 2 && m > 0)
        scratch = PyMem_RawMalloc((size_t)m * sizeof(double));
    if (reached == NULL || (vv.ndim == 2 && m > 0 && scratch == NULL)) {
        PyErr_NoMemory();
        goto done;
    }
    Py_ssize_t bad;
    Py_BEGIN_ALLOW_THREADS
    unsigned int saved = flush_enter(flush);
    if (seeded)
        mark_seeds((const double *)gv.buf, reached, out, vv.ndim == 1 ? 1 : m);
    if (vv.ndim == 1)
        bad = backward_one(&tb.cols, (const double *)vv.buf, (double *)gv.buf, reached, out,
                           seeded);
    else
        bad = m == 0 ? -1
                     : backward_batch(&tb.cols, (const double *)vv.buf, (double *)gv.buf, reached,
                                      out, m, scratch, seeded);
    flush_leave(flush, saved);
    Py_END_ALLOW_THREADS
    if (bad >= 0)
        raise_bad_node(&tb.cols, bad);
    else
        result = Py_NewRef(Py_None);
done:
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
    {"decode_graph", mg_decode_graph, METH_O, decode_graph_doc},
    {"unpack_columns", mg_unpack_columns, METH_VARARGS, unpack_columns_doc},
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
