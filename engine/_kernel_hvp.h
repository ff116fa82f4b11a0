/* Second order for the native kernel: Hessian-vector products by
 * forward-over-reverse, included by _kernel.c after the tape's Columns.
 *
 * The forward sweep carries a tangent beside every value
 * (dv[i] = sum_k d_k * dv[arg_k]); the reverse sweep carries the tangent of
 * every gradient beside it:
 *   g[a]  += d_a * g[i]
 *   dg[a] += d_a * dg[i] + g[i] * sum_l d_al * dv[arg_l]
 * with d_a the op's partials (<name>_d) and d_al its second derivatives
 * (<name>_dd). With the tangent of the inputs set to v, dg at the inputs is
 * H v. The arithmetic is in the same order as PythonKernel.hvp. One binding
 * (n,) and a node-major batch (n, B) share the code: m is the row length
 * (1 for one binding).
 */
#ifndef MG_KERNEL_HVP_H
#define MG_KERNEL_HVP_H

/* ---- forward: values and tangents --------------------------------------- */

#define HVPF_0(name)
#define HVPF_1(name)                                                                 \
    if (MG_UNLIKELY(!ARG_OK1)) return i;                                             \
    for (Py_ssize_t j = 0; j < m; j++) {                                             \
        const double x = v[ai * m + j];                                              \
        const double o = name##_f(x, 0.0, C[i]);                                     \
        double dx, dy;                                                               \
        name##_d(x, 0.0, C[i], o, &dx, &dy);                                         \
        v[i * m + j] = o;                                                            \
        dv[i * m + j] = dx * dv[ai * m + j];                                         \
    }
#define HVPF_2(name)                                                                 \
    if (MG_UNLIKELY(!ARG_OK2)) return i;                                             \
    for (Py_ssize_t j = 0; j < m; j++) {                                             \
        const double x = v[ai * m + j], y = v[bi * m + j];                           \
        const double o = name##_f(x, y, C[i]);                                       \
        double dx, dy;                                                               \
        name##_d(x, y, C[i], o, &dx, &dy);                                           \
        v[i * m + j] = o;                                                            \
        dv[i * m + j] = dx * dv[ai * m + j] + dy * dv[bi * m + j];                   \
    }
#define HVPF_3(name)                                                                 \
    {                                                                                \
        const Py_ssize_t zi = THIRD(t, i);                                           \
        if (MG_UNLIKELY(!ARG_OK3)) return i;                                         \
        for (Py_ssize_t j = 0; j < m; j++) {                                         \
            const double x = v[ai * m + j], y = v[bi * m + j], z = v[zi * m + j];    \
            const double o = name##_f(x, y, z);                                      \
            double dx, dy, dz;                                                       \
            name##_d(x, y, z, o, &dx, &dy, &dz);                                     \
            v[i * m + j] = o;                                                        \
            dv[i * m + j] =                                                          \
                dx * dv[ai * m + j] + dy * dv[bi * m + j] + dz * dv[zi * m + j];     \
        }                                                                            \
    }
#define HVPF_CASE(code_, name, arity) \
    case code_: { HVPF_##arity(name) } break;

static inline Py_ssize_t hvp_forward(const Columns *t, double *v, double *dv, Py_ssize_t m)
{
    const uint8_t *code = t->code;
    const int32_t *A = t->a, *B = t->b;
    const double *C = t->c;
    const Py_ssize_t n = t->n;
    for (Py_ssize_t i = 0; i < n; i++) {
        const Py_ssize_t ai = A[i], bi = B[i];
        (void)ai; (void)bi;
        switch (code[i]) {
            MG_OPS(HVPF_CASE)
        default:
            return i;
        }
    }
    return -1;
}

/* ---- reverse: gradients and their tangents ------------------------------- */

#define HVPB_0(name)
#define HVPB_1(name)                                                                 \
    if (MG_UNLIKELY(!ARG_OK1)) return i;                                             \
    for (Py_ssize_t j = 0; j < m; j++) {                                             \
        const double x = v[ai * m + j], o = v[i * m + j];                            \
        const double gi = g[i * m + j], dgi = dg[i * m + j];                         \
        double dx, dy, dxx, dxy, dyy;                                                \
        name##_d(x, 0.0, C[i], o, &dx, &dy);                                         \
        name##_dd(x, 0.0, C[i], o, &dxx, &dxy, &dyy);                                \
        g[ai * m + j] += dx * gi;                                                    \
        dg[ai * m + j] += dx * dgi + gi * (dxx * dv[ai * m + j]);                    \
    }                                                                                \
    reached[ai] = 1;
#define HVPB_2(name)                                                                 \
    if (MG_UNLIKELY(!ARG_OK2)) return i;                                             \
    for (Py_ssize_t j = 0; j < m; j++) {                                             \
        const double x = v[ai * m + j], y = v[bi * m + j], o = v[i * m + j];         \
        const double gi = g[i * m + j], dgi = dg[i * m + j];                         \
        const double ta = dv[ai * m + j], tb = dv[bi * m + j];                       \
        double dx, dy, dxx, dxy, dyy;                                                \
        name##_d(x, y, C[i], o, &dx, &dy);                                           \
        name##_dd(x, y, C[i], o, &dxx, &dxy, &dyy);                                  \
        g[ai * m + j] += dx * gi;                                                    \
        g[bi * m + j] += dy * gi;                                                    \
        dg[ai * m + j] += dx * dgi + gi * (dxx * ta + dxy * tb);                     \
        dg[bi * m + j] += dy * dgi + gi * (dxy * ta + dyy * tb);                     \
    }                                                                                \
    reached[ai] = 1;                                                                 \
    reached[bi] = 1;
#define HVPB_3(name)                                                                 \
    {                                                                                \
        const Py_ssize_t zi = THIRD(t, i);                                           \
        if (MG_UNLIKELY(!ARG_OK3)) return i;                                         \
        for (Py_ssize_t j = 0; j < m; j++) {                                         \
            const double x = v[ai * m + j], y = v[bi * m + j], z = v[zi * m + j];    \
            const double o = v[i * m + j], gi = g[i * m + j], dgi = dg[i * m + j];   \
            const double ta = dv[ai * m + j], tb = dv[bi * m + j], tz = dv[zi * m + j]; \
            double dx, dy, dz, dd[6];                                                \
            name##_d(x, y, z, o, &dx, &dy, &dz);                                     \
            name##_dd(x, y, z, o, dd);                                               \
            g[ai * m + j] += dx * gi;                                                \
            g[bi * m + j] += dy * gi;                                                \
            g[zi * m + j] += dz * gi;                                                \
            dg[ai * m + j] += dx * dgi + gi * (dd[0] * ta + dd[1] * tb + dd[3] * tz); \
            dg[bi * m + j] += dy * dgi + gi * (dd[1] * ta + dd[2] * tb + dd[4] * tz); \
            dg[zi * m + j] += dz * dgi + gi * (dd[3] * ta + dd[4] * tb + dd[5] * tz); \
        }                                                                            \
        reached[ai] = 1;                                                             \
        reached[bi] = 1;                                                             \
        reached[zi] = 1;                                                             \
    }
#define HVPB_CASE(code_, name, arity) \
    case code_: { HVPB_##arity(name) } break;

static inline Py_ssize_t hvp_backward(const Columns *t, const double *v, const double *dv,
                                      double *g, double *dg, uint8_t *restrict reached,
                                      Py_ssize_t out, Py_ssize_t m)
{
    const uint8_t *code = t->code;
    const int32_t *A = t->a, *B = t->b;
    const double *C = t->c;
    for (Py_ssize_t j = 0; j < m; j++)
        g[out * m + j] = 1.0;
    reached[out] = 1;
    for (Py_ssize_t i = out; i >= 0; i--) {
        if (!reached[i])
            continue;
        const Py_ssize_t ai = A[i], bi = B[i];
        (void)ai; (void)bi;
        switch (code[i]) {
            MG_OPS(HVPB_CASE)
        default:
            return i;
        }
    }
    return -1;
}

/* One binding: the same sweeps with rows of one element, which the compiler
 * specialises (m is the constant 1 here). */
static MG_NOINLINE Py_ssize_t hvp_one(const Columns *t, double *v, double *dv, double *g,
                                      double *dg, uint8_t *restrict reached, Py_ssize_t out)
{
    Py_ssize_t bad = hvp_forward(t, v, dv, 1);
    return bad >= 0 ? bad : hvp_backward(t, v, dv, g, dg, reached, out, 1);
}

/* A batch of m bindings, rows node-major as in the other sweeps. */
static MG_NOINLINE Py_ssize_t hvp_batch(const Columns *t, double *v, double *dv, double *g,
                                        double *dg, uint8_t *restrict reached, Py_ssize_t out,
                                        Py_ssize_t m)
{
    Py_ssize_t bad = hvp_forward(t, v, dv, m);
    return bad >= 0 ? bad : hvp_backward(t, v, dv, g, dg, reached, out, m);
}

#endif
