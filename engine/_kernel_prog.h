/* A compiled one-binding program: forward + reverse of one output, decoded once.
 *
 * Included by _kernel.c (it uses Columns, Stop, node_ok and the op math).
 *
 * The program is built once per (tape, output) and then run for any number
 * of bindings, each run keeping only the selected nodes:
 *
 * - Forward. The non-leaf nodes are sorted by level (1 + the highest level
 *   of their arguments; leaves are level 0) and, within a level, by op, so
 *   that the sweep is a sequence of runs of one op. Nodes of one level do
 *   not depend on each other, so any order among them gives the same values;
 *   a run is one tight loop with no dispatch per node and loads the branch
 *   predictor never misses, which lets the processor overlap the cache misses
 *   of a random graph. The same loop stores each node's partial derivatives
 *   (the ones the reverse sweep would compute from the same values), while
 *   its arguments are still in registers.
 * - Reverse. Only the non-leaf nodes the output reaches, in descending node
 *   order as in backward_one, each with its argument slots: no reached[]
 *   marks, no op dispatch, just g[a] += da * g[p] per argument, so every
 *   gradient receives the same products in the same order as in the
 *   reference sweep and the results are bit-identical. A unary node's
 *   missing argument points at one of a few scratch cells past the output
 *   (its partial is 0; the cells are never read back). The partials are
 *   stored compactly in reverse order, and not at all for the ops whose
 *   partials are constants (add, sub, neg: the steps point at one shared
 *   row), so the reverse sweep streams as few bytes as it can.
 *
 * Every index in the program was checked when it was built (arguments are
 * earlier nodes, inputs are leaves), and the program holds its own copies,
 * so a run cannot leave its arrays whatever happens to the tape afterwards.
 */

#if defined(__GNUC__)
#define MG_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define MG_ALWAYS_INLINE inline
#endif

#include <stdlib.h>

/* Random graphs are bound by cache misses on the arguments: each step asks
 * for the arguments of the step PROG_AHEAD places on, so that several
 * misses are under way at once even across the calls into libm. The step
 * arrays carry PROG_AHEAD zeroed steps past their end for this. */
#ifndef PROG_AHEAD
#define PROG_AHEAD 16
#endif
/* Only where the values outgrow a core's L2 (below, the look-ahead costs
 * more than it saves). */
#ifndef PROG_AHEAD_NODES
#define PROG_AHEAD_NODES (1 << 17)
#endif
#if defined(__GNUC__)
#define PROG_PREFETCH(addr, rw) __builtin_prefetch((addr), (rw))
#else
#define PROG_PREFETCH(addr, rw) ((void)(addr))
#endif

#define PROG_SCRATCH 8 /* scratch gradient cells past the output */

/* A forward step: node dst = op(a, b) (b = a for a unary op), partials
 * into row e of the partials (PROG_CONST_ROWS constant rows first, never written;
 * then PROG_SCRATCH_ROW for nodes whose partials are not needed). */
typedef struct {
    int32_t dst, a, b, e;
} ProgStep;

typedef struct {
    int32_t start, end;
    uint8_t op;
} ProgRun;

/* A reverse step: node p passes g[p] times its partials (row e & PROG_ROW)
 * to a and b; the top bits of e say which argument is the next step's node
 * (its gradient then stays in a register: bit 29 a, 30 b, 31 z). */
typedef struct {
    int32_t p, a, b;
    uint32_t e;
} ProgRev;

#define PROG_ROW 0x1fffffffu
#define PROG_NEXT_A (1u << 29)
#define PROG_NEXT_B (1u << 30)
#define PROG_NEXT_Z (1u << 31)
/* The ops whose partials read nothing (an empty Op.partials_read: add, sub, neg) have
 * the same partials at every node, so their nodes share one constant row per op (in
 * code order; ops of one or two arguments), then comes a scratch row, then the rows of
 * the other nodes. */
#define PROG_COUNT_CONST(code_, mask) +((mask) == 0)
enum { PROG_CONST_ROWS = 0 MG_OPS_READS(PROG_COUNT_CONST) };
#undef PROG_COUNT_CONST
#define PROG_SCRATCH_ROW PROG_CONST_ROWS
#define PROG_FIRST_ROW (PROG_CONST_ROWS + 1)

typedef struct {
    Py_ssize_t n, out, k;    /* nodes, output, inputs */
    int stride;              /* partials per row: 2, or 3 for a tape with ternary nodes */
    Py_ssize_t nfwd, nruns, nrev, nleaf, rows;
    ProgStep *fwd;
    double *fc;              /* per forward step: the node's constant (pow's exponent) */
    int32_t *fz, *rz;        /* ternary tapes: the third argument per forward / reverse step */
    ProgRun *runs;
    ProgRev *rev;
    int32_t *leaf;           /* the leaves, and their values */
    double *leaf_value;
    int32_t *inputs;         /* the input nodes, in binding order */
    double *spare;           /* a workspace kept for the next run (taken under the GIL) */
} Program;

/* Which constant row holds an op's partials (-1: they depend on the values). */
static int program_const_row(uint8_t code)
{
    int row = 0;
#define PROG_ROW_OF(code_, mask)             \
    if ((mask) == 0) {                       \
        if (code == (code_))                 \
            return row;                      \
        row++;                               \
    }
    MG_OPS_READS(PROG_ROW_OF)
#undef PROG_ROW_OF
    return -1;
}

/* The constant rows, filled from the ops' own partials (the same for every node), and the
 * scratch row zeroed. */
static void program_const_rows(double *E, int S)
{
    double dx, dy;
    for (int j = 0; j < PROG_FIRST_ROW * S; j++)
        E[j] = 0.0;
#define PROG_FILL_0(code_, name)
#define PROG_FILL_1(code_, name) PROG_FILL_2(code_, name)
#define PROG_FILL_2(code_, name)                          \
    if (PARTIALS_READ[code_] == 0) {                      \
        const int r = program_const_row(code_);           \
        name##_d(0.0, 0.0, 0.0, 0.0, &dx, &dy);           \
        E[S * r] = dx;                                    \
        E[S * r + 1] = dy;                                \
    }
#define PROG_FILL_3(code_, name)
#define PROG_FILL(code_, name, arity) PROG_FILL_##arity(code_, name)
    MG_OPS(PROG_FILL)
#undef PROG_FILL
#undef PROG_FILL_0
#undef PROG_FILL_1
#undef PROG_FILL_2
#undef PROG_FILL_3
}

static void program_free(Program *p)
{
    if (p == NULL)
        return;
    PyMem_RawFree(p->fwd);
    PyMem_RawFree(p->fc);
    PyMem_RawFree(p->fz);
    PyMem_RawFree(p->rz);
    PyMem_RawFree(p->runs);
    PyMem_RawFree(p->rev);
    PyMem_RawFree(p->leaf);
    PyMem_RawFree(p->leaf_value);
    PyMem_RawFree(p->inputs);
    PyMem_RawFree(p->spare);
    PyMem_RawFree(p);
}

/* Doubles in one run's workspace: values (n), gradients (out + 1 + scratch),
 * partials (stride per row). */
static size_t program_cells(const Program *p)
{
    return (size_t)p->n + (size_t)p->out + 1 + PROG_SCRATCH + (size_t)p->stride * (size_t)p->rows;
}

#ifndef PROG_WINDOW
#define PROG_WINDOW 4096
#endif

static int program_key_order(const void *x, const void *y)
{
    const uint64_t a = *(const uint64_t *)x, b = *(const uint64_t *)y;
    return (a > b) - (a < b);
}

/* Build the program of `t` for output `out` and the given input nodes.
 * Returns NULL with *bad = the first bad node (or -1 when memory ran out,
 * -2 - j when inputs[j] is not a leaf). Runs without the GIL. */
static Program *program_build(const Columns *t, Py_ssize_t out, const int64_t *inputs,
                              Py_ssize_t k, Py_ssize_t *bad)
{
    const Py_ssize_t n = t->n;
    Program *p = PyMem_RawCalloc(1, sizeof(Program));
    int32_t *level = NULL, *order = NULL, *tmp = NULL;
    uint8_t *touched = NULL;
    *bad = -1;
    if (p == NULL)
        return NULL;
    p->n = n;
    p->out = out;
    p->k = k;
    p->stride = t->z != NULL ? 3 : 2;
    for (Py_ssize_t i = 0; i < n; i++)
        if (!node_ok(t, i)) {
            *bad = i;
            goto fail;
        }
    p->inputs = PyMem_RawMalloc((size_t)(k ? k : 1) * sizeof(int32_t));
    if (p->inputs == NULL)
        goto fail;
    for (Py_ssize_t j = 0; j < k; j++) {
        if (inputs[j] < 0 || inputs[j] >= n || ARITY_PLUS_1[t->code[inputs[j]]] != 1) {
            *bad = -2 - j;
            goto fail;
        }
        p->inputs[j] = (int32_t)inputs[j];
    }
    level = PyMem_RawMalloc((size_t)n * sizeof(int32_t));
    order = PyMem_RawMalloc((size_t)n * sizeof(int32_t));
    tmp = PyMem_RawMalloc((size_t)n * sizeof(int32_t));
    touched = PyMem_RawCalloc((size_t)n, 1);
    if (level == NULL || order == NULL || tmp == NULL || touched == NULL)
        goto fail;
    /* Levels, and the leaves. */
    Py_ssize_t nleaf = 0, nfwd = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        const int arity = ARITY_PLUS_1[t->code[i]] - 1;
        int32_t l = 0;
        if (arity == 0) {
            nleaf++;
        } else {
            l = level[t->a[i]];
            if (arity >= 2 && level[t->b[i]] > l)
                l = level[t->b[i]];
            if (arity == 3 && level[t->z[i]] > l)
                l = level[t->z[i]];
            l++;
            tmp[nfwd++] = (int32_t)i;
        }
        level[i] = l;
    }
    p->nleaf = nleaf;
    p->nfwd = nfwd;
    p->leaf = PyMem_RawMalloc((size_t)(nleaf ? nleaf : 1) * sizeof(int32_t));
    p->leaf_value = PyMem_RawMalloc((size_t)(nleaf ? nleaf : 1) * sizeof(double));
    p->fwd = PyMem_RawCalloc((size_t)nfwd + PROG_AHEAD, sizeof(ProgStep));
    p->fc = PyMem_RawMalloc((size_t)(nfwd ? nfwd : 1) * sizeof(double));
    p->runs = PyMem_RawMalloc((size_t)(nfwd ? nfwd : 1) * sizeof(ProgRun));
    p->rev = PyMem_RawCalloc((size_t)out + 1 + PROG_AHEAD, sizeof(ProgRev));
    if (t->z != NULL) {
        p->fz = PyMem_RawMalloc((size_t)(nfwd ? nfwd : 1) * sizeof(int32_t));
        p->rz = PyMem_RawMalloc((size_t)(out + 1) * sizeof(int32_t));
    }
    if (p->leaf == NULL || p->leaf_value == NULL || p->fwd == NULL || p->fc == NULL ||
        p->runs == NULL || p->rev == NULL ||
        (t->z != NULL && (p->fz == NULL || p->rz == NULL)))
        goto fail;
    for (Py_ssize_t i = 0, j = 0; i < n; i++)
        if (ARITY_PLUS_1[t->code[i]] == 1) {
            p->leaf[j] = (int32_t)i;
            p->leaf_value[j++] = t->c[i];
        }
    int8_t const_row[256];
    for (int o = 0; o < 256; o++)
        const_row[o] = (int8_t)program_const_row((uint8_t)o);
    /* The reverse list: reached non-leaf nodes, descending, each with its
     * row of partials (`order` maps node -> row meanwhile; 3: scratch). */
    for (Py_ssize_t i = 0; i < n; i++)
        order[i] = 3;
    Py_ssize_t m = 0, rows = PROG_FIRST_ROW;
    touched[out] = 1;
    for (Py_ssize_t i = out; i >= 0; i--) {
        if (!touched[i])
            continue;
        const int arity = ARITY_PLUS_1[t->code[i]] - 1;
        if (arity == 0)
            continue;
        const int32_t scratch = (int32_t)(out + 1 + (m % PROG_SCRATCH));
        const int fixed = const_row[t->code[i]];
        order[i] = fixed >= 0 ? fixed : (int32_t)rows++;
        if (p->rz != NULL)
            p->rz[m] = arity == 3 ? t->z[i] : scratch;
        ProgRev *r = p->rev + m++;
        r->p = (int32_t)i;
        r->a = t->a[i];
        r->b = arity >= 2 ? t->b[i] : scratch;
        r->e = (uint32_t)order[i];
        touched[r->a] = 1;
        if (arity >= 2)
            touched[r->b] = 1;
        if (arity == 3)
            touched[t->z[i]] = 1;
    }
    p->nrev = m;
    p->rows = rows;
    /* A contribution to the very next step's node is its last one: it is
     * carried in a register. Not when two arguments are that node: then the
     * two additions must go through memory in order. */
    for (Py_ssize_t j = 0; j + 1 < m; j++) {
        ProgRev *r = p->rev + j;
        const int32_t q = p->rev[j + 1].p;
        const int32_t z = p->rz != NULL ? p->rz[j] : -1;
        if ((r->a == q) + (r->b == q) + (z == q) == 1)
            r->e |= r->a == q ? PROG_NEXT_A : r->b == q ? PROG_NEXT_B : PROG_NEXT_Z;
    }
    /* Sort each window of PROG_WINDOW consecutive non-leaf nodes by (level,
     * op, node): long runs of one op, while the stores of the forward sweep
     * stay within a window's stretch of the values. */
    int32_t *row_of = order;
    uint64_t *keys = PyMem_RawMalloc((size_t)(nfwd ? nfwd : 1) * sizeof(uint64_t));
    if (keys == NULL)
        goto fail;
    for (Py_ssize_t j = 0; j < nfwd; j++)
        keys[j] = (uint64_t)level[tmp[j]] << 36 | (uint64_t)t->code[tmp[j]] << 28 |
                  (uint64_t)tmp[j];
    for (Py_ssize_t w = 0; w < nfwd; w += PROG_WINDOW)
        qsort(keys + w, (size_t)(nfwd - w < PROG_WINDOW ? nfwd - w : PROG_WINDOW),
              sizeof(uint64_t), program_key_order);
    for (Py_ssize_t j = 0; j < nfwd; j++)
        tmp[j] = (int32_t)(keys[j] & ((1u << 28) - 1));
    PyMem_RawFree(keys);
    Py_ssize_t nruns = 0;
    for (Py_ssize_t j = 0; j < nfwd; j++) {
        const Py_ssize_t i = tmp[j];
        const uint8_t op = t->code[i];
        const int arity = ARITY_PLUS_1[op] - 1;
        ProgStep *s = p->fwd + j;
        s->dst = (int32_t)i;
        s->a = t->a[i];
        s->b = arity >= 2 ? t->b[i] : s->a;
        /* constant rows stay unwritten */
        s->e = row_of[i] < PROG_FIRST_ROW ? PROG_SCRATCH_ROW : row_of[i];
        p->fc[j] = t->c[i];
        if (p->fz != NULL)
            p->fz[j] = arity == 3 ? t->z[i] : s->a;
        if (nruns == 0 || p->runs[nruns - 1].op != op) {
            p->runs[nruns].op = op;
            p->runs[nruns].start = (int32_t)j;
            nruns++;
        }
        p->runs[nruns - 1].end = (int32_t)(j + 1);
    }
    p->nruns = nruns;
    PyMem_RawFree(level);
    PyMem_RawFree(order);
    PyMem_RawFree(tmp);
    PyMem_RawFree(touched);
    return p;
fail:
    PyMem_RawFree(level);
    PyMem_RawFree(order);
    PyMem_RawFree(tmp);
    PyMem_RawFree(touched);
    program_free(p);
    return NULL;
}

/* One run of op `name` over steps [k0, k1): values, and with `partials` the
 * partial derivatives into E (stride S per node). */
/* Arguments: the node just computed (ld, its value lv) comes from a register
 * (in a chain of runs of one node each, every argument is the one before);
 * inside a run of one level it never is. */
#define PF_AHEAD(k)                                                          \
    if (ahead) {                                                             \
        PROG_PREFETCH(v + fwd[(k) + PROG_AHEAD].a, 0);                       \
        PROG_PREFETCH(v + fwd[(k) + PROG_AHEAD].b, 0);                       \
    }
#define PF_ARG(idx) ((idx) == ld ? lv : v[idx])
#define PF_KEEP(s, o)                                                        \
    v[s->dst] = o;                                                           \
    ld = s->dst;                                                             \
    lv = o;
#define PF_0(name)
#define PF_1(name)                                                           \
    if (partials)                                                            \
        for (Py_ssize_t k = k0; k < k1; k++) {                               \
            const ProgStep *s = fwd + k;                                     \
            PF_AHEAD(k)                                                      \
            const double x = PF_ARG(s->a);                                   \
            const double o = name##_f(x, 0.0, fc[k]);                         \
            double dx, dy;                                                   \
            name##_d(x, 0.0, fc[k], o, &dx, &dy);                             \
            double *e = E + S * (Py_ssize_t)s->e;                             \
            PF_KEEP(s, o)                                                    \
            e[0] = dx;                                                       \
            e[1] = 0.0;                                                      \
            if (S == 3)                                                      \
                e[2] = 0.0;                                                  \
        }                                                                    \
    else                                                                     \
        for (Py_ssize_t k = k0; k < k1; k++) {                               \
            const ProgStep *s = fwd + k;                                     \
            PF_AHEAD(k)                                                      \
            const double o = name##_f(PF_ARG(s->a), 0.0, fc[k]);              \
            PF_KEEP(s, o)                                                    \
        }
#define PF_2(name)                                                           \
    if (partials)                                                            \
        for (Py_ssize_t k = k0; k < k1; k++) {                               \
            const ProgStep *s = fwd + k;                                     \
            PF_AHEAD(k)                                                      \
            const double x = PF_ARG(s->a), y = PF_ARG(s->b);                 \
            const double o = name##_f(x, y, fc[k]);                           \
            double dx, dy;                                                   \
            name##_d(x, y, fc[k], o, &dx, &dy);                               \
            double *e = E + S * (Py_ssize_t)s->e;                             \
            PF_KEEP(s, o)                                                    \
            e[0] = dx;                                                       \
            e[1] = dy;                                                       \
            if (S == 3)                                                      \
                e[2] = 0.0;                                                  \
        }                                                                    \
    else                                                                     \
        for (Py_ssize_t k = k0; k < k1; k++) {                               \
            const ProgStep *s = fwd + k;                                     \
            PF_AHEAD(k)                                                      \
            const double o = name##_f(PF_ARG(s->a), PF_ARG(s->b), fc[k]);     \
            PF_KEEP(s, o)                                                    \
        }
#define PF_3(name)                                                           \
    for (Py_ssize_t k = k0; k < k1; k++) {                                   \
        const ProgStep *s = fwd + k;                                         \
        PF_AHEAD(k)                                                          \
        const double x = PF_ARG(s->a), y = PF_ARG(s->b), w = PF_ARG(fz[k]);   \
        const double o = name##_f(x, y, w);                                  \
        PF_KEEP(s, o)                                                        \
        if (partials && S == 3) {                                            \
            double *e = E + S * (Py_ssize_t)s->e;                             \
            name##_d(x, y, w, o, &e[0], &e[1], &e[2]);                       \
        }                                                                    \
    }
#define PF_CASE(code_, name, arity) \
    case code_: { PF_##arity(name) } break;

static MG_ALWAYS_INLINE int program_forward_s(const Program *p, double *restrict v,
                                             double *restrict E, int partials, const Stop *stop,
                                             const int S, const int ahead)
{
    const ProgStep *fwd = p->fwd;
    const double *fc = p->fc;
    const int32_t *fz = p->fz;
    const Py_ssize_t block = stop != NULL ? stop->block : PY_SSIZE_T_MAX;
    Py_ssize_t left = block;
    int32_t ld = -1;
    double lv = 0.0;
    for (Py_ssize_t r = 0; r < p->nruns; r++) {
        const ProgRun *run = p->runs + r;
        Py_ssize_t k0 = run->start;
        while (k0 < run->end) {
            const Py_ssize_t k1 = run->end - k0 > left ? k0 + left : run->end;
            switch (run->op) {
                MG_OPS(PF_CASE)
            default:
                break; /* not reached: the program was validated */
            }
            left -= k1 - k0;
            k0 = k1;
            if (MG_UNLIKELY(left == 0)) {
                if (stop_due(stop))
                    return MG_STOPPED;
                left = block;
            }
        }
    }
    return 0;
}

static MG_NOINLINE int program_forward2(const Program *p, double *restrict v, double *restrict E,
                                        int partials, const Stop *stop)
{
    if (p->n >= PROG_AHEAD_NODES)
        return program_forward_s(p, v, E, partials, stop, 2, 1);
    return program_forward_s(p, v, E, partials, stop, 2, 0);
}

static MG_NOINLINE int program_forward3(const Program *p, double *restrict v, double *restrict E,
                                        int partials, const Stop *stop)
{
    if (p->n >= PROG_AHEAD_NODES)
        return program_forward_s(p, v, E, partials, stop, 3, 1);
    return program_forward_s(p, v, E, partials, stop, 3, 0);
}

/* The reverse sweep: g (out + 1 + scratch cells) zeroed, the output seeded. */
static MG_ALWAYS_INLINE int program_backward_s(const Program *p, const double *restrict E,
                                              double *g, const Stop *stop, const int S_,
                                              const int ahead)
{
    const ProgRev *rev = p->rev;
    const int32_t *rz = p->rz;
    const Py_ssize_t nrev = p->nrev;
    const Py_ssize_t block = stop != NULL ? stop->block : PY_SSIZE_T_MAX;
    Py_ssize_t k = 0;
    double R = 0.0;
    int carry = 0;
    while (k < nrev) {
        const Py_ssize_t k1 = nrev - k > block ? k + block : nrev;
        for (; k < k1; k++) {
            const ProgRev *r = rev + k;
            if (ahead) {
                PROG_PREFETCH(g + rev[k + PROG_AHEAD].a, 1);
                PROG_PREFETCH(g + rev[k + PROG_AHEAD].b, 1);
            }
            double G = g[r->p];
            if (carry) { /* the previous step's contribution, the last one to this node */
                G += R;
                g[r->p] = G;
            }
            const uint32_t ew = r->e;
            const double *e = E + S_ * (Py_ssize_t)(ew & PROG_ROW);
            const double ca = e[0] * G, cb = e[1] * G;
            if (ew & PROG_NEXT_A)
                R = ca;
            else
                g[r->a] += ca;
            if (ew & PROG_NEXT_B)
                R = cb;
            else
                g[r->b] += cb;
            if (S_ == 3) {
                const double cz = e[2] * G;
                if (ew & PROG_NEXT_Z)
                    R = cz;
                else
                    g[rz[k]] += cz;
            }
            carry = (ew & ~PROG_ROW) != 0;
        }
        if (k < nrev && stop_due(stop))
            return MG_STOPPED;
    }
    return 0;
}

static MG_NOINLINE int program_backward2(const Program *p, const double *restrict E, double *g,
                                         const Stop *stop)
{
    if (p->n >= PROG_AHEAD_NODES)
        return program_backward_s(p, E, g, stop, 2, 1);
    return program_backward_s(p, E, g, stop, 2, 0);
}

static MG_NOINLINE int program_backward3(const Program *p, const double *restrict E, double *g,
                                         const Stop *stop)
{
    if (p->n >= PROG_AHEAD_NODES)
        return program_backward_s(p, E, g, stop, 3, 1);
    return program_backward_s(p, E, g, stop, 3, 0);
}

/* Run the program for `rows` bindings (rows of k values), keeping the s
 * selected nodes' values (and, with gout, gradients) per row. `work` holds
 * program_cells() doubles. Returns 0 or MG_STOPPED. */
static int program_run(const Program *p, double *work, const double *bind, Py_ssize_t rows,
                       const int64_t *sel, Py_ssize_t s, double *vout, double *gout,
                       const Stop *stop)
{
    const Py_ssize_t n = p->n, out = p->out, k = p->k;
    double *v = work, *g = work + n, *E = g + out + 1 + PROG_SCRATCH;
    for (Py_ssize_t row = 0; row < rows; row++) {
        for (Py_ssize_t j = 0; j < p->nleaf; j++)
            v[p->leaf[j]] = p->leaf_value[j];
        const double *b = bind + row * k;
        for (Py_ssize_t j = 0; j < k; j++)
            v[p->inputs[j]] = b[j];
        const int partials = gout != NULL;
        if (partials)
            program_const_rows(E, p->stride);
        int stopped = p->stride == 3 ? program_forward3(p, v, E, partials, stop)
                                     : program_forward2(p, v, E, partials, stop);
        if (stopped)
            return MG_STOPPED;
        double *vo = vout + row * s;
        for (Py_ssize_t j = 0; j < s; j++)
            vo[j] = v[sel[j]];
        if (gout == NULL)
            continue;
        memset(g, 0, (size_t)(out + 1 + PROG_SCRATCH) * sizeof(double));
        g[out] = 1.0;
        stopped = p->stride == 3 ? program_backward3(p, E, g, stop)
                                 : program_backward2(p, E, g, stop);
        if (stopped)
            return MG_STOPPED;
        double *go = gout + row * s;
        for (Py_ssize_t j = 0; j < s; j++)
            go[j] = sel[j] <= out ? g[sel[j]] : 0.0;
    }
    return 0;
}

/* ---- Python entry points ------------------------------------------------ */

#define PROGRAM_CAPSULE "micrograd._kernel.Program"

static void program_capsule_free(PyObject *capsule)
{
    program_free((Program *)PyCapsule_GetPointer(capsule, PROGRAM_CAPSULE));
}

PyDoc_STRVAR(compile_program_doc,
"compile_program(code, arg0, arg1, const, inputs, output, arg2=None)\n--\n\n"
"Decode and check the tape once into a one-binding program for node output,\n"
"bound through the leaf nodes in inputs (int64): an opaque object for\n"
"run_program. The program keeps its own copy of the tape.");

static PyObject *kernel_compile_program(PyObject *module, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"code", "arg0", "arg1", "const", "inputs", "output", "arg2", NULL};
    PyObject *code, *a, *b, *c, *inputs, *z = Py_None;
    Py_ssize_t out;
    (void)module;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOOn|O:compile_program", keywords, &code,
                                     &a, &b, &c, &inputs, &out, &z))
        return NULL;
    TapeBuffers tb;
    if (get_tape(code, a, b, z, c, &tb) < 0)
        return NULL;
    Py_buffer iv;
    if (get_array(inputs, "inputs", 'q', 8, 0, 1, &iv) < 0) {
        release_tape(&tb);
        return NULL;
    }
    PyObject *result = NULL;
    if (out < 0 || out >= tb.cols.n) {
        PyErr_Format(PyExc_ValueError, "output %zd is out of range for %zd nodes", out,
                     tb.cols.n);
        goto done;
    }
    if (tb.cols.n >= (Py_ssize_t)1 << 28) {
        PyErr_SetString(PyExc_ValueError, "the tape is too long for a program");
        goto done;
    }
    Program *p;
    Py_ssize_t bad;
    Py_BEGIN_ALLOW_THREADS
    p = program_build(&tb.cols, out, (const int64_t *)iv.buf, iv.shape[0], &bad);
    Py_END_ALLOW_THREADS
    if (p == NULL) {
        if (bad >= 0)
            raise_bad_node(&tb.cols, bad);
        else if (bad == -1)
            PyErr_NoMemory();
        else
            PyErr_Format(PyExc_ValueError, "inputs[%zd] is not a leaf node", -2 - bad);
        goto done;
    }
    result = PyCapsule_New(p, PROGRAM_CAPSULE, program_capsule_free);
    if (result == NULL)
        program_free(p);
done:
    PyBuffer_Release(&iv);
    release_tape(&tb);
    return result;
}

PyDoc_STRVAR(run_program_doc,
"run_program(program, bindings, selection, values_out, grads_out=None,\n"
"            flush_denormals=False, stop=None, expires=0.0)\n--\n\n"
"Run a compiled program for each row of bindings ((B, k) float64 over its\n"
"inputs), filling values_out and grads_out ((B, s) float64, or None: no\n"
"reverse sweep) with the s nodes of selection (int64). Bit-identical to\n"
"forward + backward. Returns True, or False if it stopped early (stop and\n"
"expires as in forward).");

static PyObject *kernel_run_program(PyObject *module, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"program", "bindings", "selection", "values_out", "grads_out",
                               "flush_denormals", "stop", "expires", NULL};
    PyObject *capsule, *bindings, *selection, *values_out, *grads_out = Py_None;
    PyObject *stop_flag = NULL;
    int flush = 0, use_stop = 0;
    double expires = 0.0;
    (void)module;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOO|OpOd:run_program", keywords, &capsule,
                                     &bindings, &selection, &values_out, &grads_out, &flush,
                                     &stop_flag, &expires))
        return NULL;
    Program *p = PyCapsule_GetPointer(capsule, PROGRAM_CAPSULE);
    if (p == NULL)
        return NULL;
    const int grads = grads_out != Py_None;
    Selected io;
    int held = 0;
    PyObject *result = NULL;
    double *work = NULL;
    Stop stop;
    Py_buffer stop_view;
    stop_view.obj = NULL;
    if (get_selected(bindings, selection, values_out, grads_out, p->k, p->n, &io) < 0)
        goto done;
    held = 1;
    const Py_ssize_t s = io.s, rows = io.rows;
    const int64_t *sel = (const int64_t *)io.selection.buf;
    if (get_stop(stop_flag, expires, 1, &stop, &stop_view, &use_stop) < 0)
        goto done;
    work = p->spare; /* the GIL is held: no other run takes it meanwhile */
    p->spare = NULL;
    if (work == NULL)
        work = PyMem_RawMalloc(program_cells(p) * sizeof(double));
    if (work == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    int stopped = 0;
    if (rows > 0) {
        Py_BEGIN_ALLOW_THREADS
        unsigned int saved = flush_enter(flush);
        stopped = program_run(p, work, (const double *)io.bindings.buf, rows, sel, s,
                              (double *)io.values.buf, grads ? (double *)io.grads.buf : NULL,
                              use_stop ? &stop : NULL);
        flush_leave(flush, saved);
        Py_END_ALLOW_THREADS
    }
    result = PyBool_FromLong(stopped != MG_STOPPED);
done:
    if (work != NULL) {
        if (p->spare == NULL)
            p->spare = work;
        else
            PyMem_RawFree(work);
    }
    release_stop(&stop_view);
    if (held)
        release_selected(&io);
    return result;
}
