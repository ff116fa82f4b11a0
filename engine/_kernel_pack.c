/* micrograd._kernel: native walks of a Value graph.
 *
 * value_columns and pack_value turn the graph behind a Value into tape
 * columns or PackedGraph byte columns without a Python step per node;
 * assign_values writes a remote result back onto the nodes; value_backward
 * is Value.backward() swept in C over the nodes themselves. All read the Value slots
 * (_a, _b, _c, _code, data, grad) directly at the offsets their member
 * descriptors give, hold the GIL throughout and run no Python code, so the
 * graph cannot change under them. The node order is exactly that of
 * micrograd.engine.topological_order (a depth-first post-order taking first
 * arguments first), so a tape built here equals the one built in Python.
 *
 * Anything out of the ordinary (a subclass node, a slot that is not a float,
 * an op code the table passed in does not know) makes these functions
 * return None, and the caller takes the pure-Python path, which gives the
 * precise error if there is one.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <stdint.h>
#include <string.h>

#include "_ops_list.h"
#include "_ops_math.h"

PyObject *mg_value_columns(PyObject *module, PyObject *args);
PyObject *mg_pack_value(PyObject *module, PyObject *args);
PyObject *mg_assign_values(PyObject *module, PyObject *args);
PyObject *mg_value_backward(PyObject *module, PyObject *args);
PyObject *mg_new_node(PyObject *module, PyObject *type);

/* From _kernel.c. */
int mg_native_arity(unsigned code); /* arity of an op the sweeps know, -1 otherwise */

#define NOT_AN_OP 255

/* ---- the Value slots ---------------------------------------------------- */

typedef struct {
    PyTypeObject *type;
    Py_ssize_t a, b, c, code, data, grad;
} Slots;

static int slot_offset(PyTypeObject *type, const char *name, Py_ssize_t *offset)
{
    PyObject *d = PyObject_GetAttrString((PyObject *)type, name);
    if (d == NULL) {
        PyErr_Clear();
        return -1;
    }
    int ok = Py_IS_TYPE(d, &PyMemberDescr_Type) &&
             ((PyMemberDescrObject *)d)->d_member->type == T_OBJECT_EX;
    if (ok)
        *offset = ((PyMemberDescrObject *)d)->d_member->offset;
    Py_DECREF(d);
    return ok ? 0 : -1;
}

/* The slot layout of `type`, or -1 if it is not a slotted Value-like type. */
static int get_slots(PyTypeObject *type, Slots *s)
{
    s->type = type;
    return (slot_offset(type, "_a", &s->a) < 0 || slot_offset(type, "_b", &s->b) < 0 ||
            slot_offset(type, "_c", &s->c) < 0 || slot_offset(type, "_code", &s->code) < 0 ||
            slot_offset(type, "data", &s->data) < 0 || slot_offset(type, "grad", &s->grad) < 0)
               ? -1
               : 0;
}

#define SLOT(obj, off) (*(PyObject **)((char *)(obj) + (off)))

static int as_double(PyObject *x, double *out)
{
    if (x != NULL && PyFloat_CheckExact(x)) {
        *out = PyFloat_AS_DOUBLE(x);
        return 0;
    }
    if (x != NULL && PyLong_CheckExact(x)) {
        *out = PyLong_AsDouble(x);
        if (*out == -1.0 && PyErr_Occurred()) {
            PyErr_Clear();
            return -1;
        }
        return 0;
    }
    return -1;
}

/* ---- a pointer -> index map --------------------------------------------- */

/* Nodes made one after another sit next to each other in memory (the
 * allocator hands out small objects from the same pages), so the map is
 * keyed by page: a small hash table of pages, each with one int32 per
 * 16-byte object slot. Looking up the neighbours of the last node hits the
 * same page, usually cached. A slot holds 0 (not seen), -1 (seen, not yet
 * placed) or the node's index + 1. */
#define PAGE_SHIFT 12
/* Distinct live objects of one type start at least tp_basicsize bytes apart,
 * so address >> grain, grain = floor(log2(tp_basicsize)), tells them apart. */

typedef struct {
    uintptr_t page;
    int32_t *slots; /* NULL: empty entry */
} Page;

typedef struct {
    Page *pages;
    size_t mask, used;
    uintptr_t last_page;
    int32_t *last;
    int grain; /* log2 of the bytes each slot stands for */
} NodeMap;

static size_t hash_page(uintptr_t p)
{
    uint64_t x = (uint64_t)p;
    x ^= x >> 33;
    x *= 0xFF51AFD7ED558CCDull;
    x ^= x >> 33;
    return (size_t)x;
}

static int map_init(NodeMap *m, Py_ssize_t basicsize)
{
    m->grain = 4;
    while (m->grain < PAGE_SHIFT && ((Py_ssize_t)1 << (m->grain + 1)) <= basicsize)
        m->grain++;
    m->mask = 255;
    m->used = 0;
    m->last = NULL;
    m->last_page = 0;
    m->pages = PyMem_RawCalloc(m->mask + 1, sizeof(Page));
    return m->pages ? 0 : -1;
}

static void map_free(NodeMap *m)
{
    if (m->pages != NULL)
        for (size_t h = 0; h <= m->mask; h++)
            PyMem_RawFree(m->pages[h].slots);
    PyMem_RawFree(m->pages);
    m->pages = NULL;
}

static Page *page_entry(Page *pages, size_t mask, uintptr_t page)
{
    size_t h = hash_page(page) & mask;
    while (pages[h].slots != NULL && pages[h].page != page)
        h = (h + 1) & mask;
    return pages + h;
}

/* The slot of `key`; a missing page is created when `create` (NULL: no
 * memory) and otherwise gives NULL. */
static int32_t *map_slot(NodeMap *m, PyObject *key, int create)
{
    const uintptr_t addr = (uintptr_t)key, page = addr >> PAGE_SHIFT;
    const size_t slots = (size_t)1 << (PAGE_SHIFT - m->grain);
    const size_t off = (addr >> m->grain) & (slots - 1);
    if (m->last != NULL && page == m->last_page)
        return m->last + off;
    Page *e = page_entry(m->pages, m->mask, page);
    if (e->slots == NULL) {
        if (!create)
            return NULL;
        if ((m->used + 1) * 2 > m->mask) {
            size_t mask = 2 * m->mask + 1;
            Page *grown = PyMem_RawCalloc(mask + 1, sizeof(Page));
            if (grown == NULL)
                return NULL;
            for (size_t h = 0; h <= m->mask; h++)
                if (m->pages[h].slots != NULL)
                    *page_entry(grown, mask, m->pages[h].page) = m->pages[h];
            PyMem_RawFree(m->pages);
            m->pages = grown;
            m->mask = mask;
            e = page_entry(m->pages, m->mask, page);
        }
        e->slots = PyMem_RawCalloc(slots, sizeof(int32_t));
        if (e->slots == NULL)
            return NULL;
        e->page = page;
        m->used++;
    }
    m->last_page = page;
    m->last = e->slots;
    return e->slots + off;
}

/* ---- the walk ------------------------------------------------------------ */

typedef struct {
    Slots slots;
    NodeMap map;
    PyObject ***blocks; /* the order, ORDER_BLOCK nodes a block (no copy when it grows);
                           borrowed: the graph is held by its root */
    Py_ssize_t n, n_blocks;
} Walk;

#define ORDER_SHIFT 14
#define ORDER_BLOCK ((Py_ssize_t)1 << ORDER_SHIFT)
#define ORDER(w, i) ((w)->blocks[(i) >> ORDER_SHIFT][(i) & (ORDER_BLOCK - 1)])

static void walk_free(Walk *w)
{
    map_free(&w->map);
    w->map.pages = NULL;
    for (Py_ssize_t k = 0; k < w->n_blocks; k++)
        PyMem_RawFree(w->blocks[k]);
    PyMem_RawFree(w->blocks);
    w->blocks = NULL;
    w->n_blocks = 0;
}

/* A node argument: NULL for None; `bad` set if it is not a node of the type. */
static PyObject *argument(const Walk *w, PyObject *v, Py_ssize_t off, int *bad)
{
    PyObject *x = SLOT(v, off);
    if (x == Py_None)
        return NULL;
    if (x == NULL || Py_TYPE(x) != w->slots.type)
        *bad = 1;
    return *bad ? NULL : x;
}

/* The post-order of topological_order. Returns 0, 1 (not a plain graph:
 * fall back to Python) or -1 (no memory, exception set). */
static int walk(PyObject *root, Walk *w)
{
    w->blocks = NULL;
    w->n = w->n_blocks = 0;
    w->map.pages = NULL;
    if (get_slots(Py_TYPE(root), &w->slots) < 0)
        return 1;
    size_t cap_stack = 1024, top = 0;
    PyObject **stack = PyMem_RawMalloc(cap_stack * sizeof(PyObject *));
    if (map_init(&w->map, w->slots.type->tp_basicsize) < 0 || stack == NULL)
        goto nomem;
    stack[top++] = root;
    while (top > 0) {
        PyObject *v = stack[--top];
        if (v == NULL) { /* the node below has all its arguments placed */
            PyObject *u = stack[--top];
            if (w->n == w->n_blocks * ORDER_BLOCK) {
                PyObject ***grown =
                    PyMem_RawRealloc(w->blocks, (size_t)(w->n_blocks + 1) * sizeof(PyObject **));
                if (grown == NULL)
                    goto nomem;
                w->blocks = grown;
                w->blocks[w->n_blocks] = PyMem_RawMalloc((size_t)ORDER_BLOCK * sizeof(PyObject *));
                if (w->blocks[w->n_blocks] == NULL)
                    goto nomem;
                w->n_blocks++;
            }
            if (w->n >= INT32_MAX - 1)
                goto plain;
            *map_slot(&w->map, u, 0) = (int32_t)(w->n + 1);
            ORDER(w, w->n) = u;
            w->n++;
            continue;
        }
        int32_t *mark = map_slot(&w->map, v, 1);
        if (mark == NULL)
            goto nomem;
        if (*mark != 0)
            continue;
        *mark = -1;
        int bad = 0;
        PyObject *a = argument(w, v, w->slots.a, &bad);
        PyObject *b = argument(w, v, w->slots.b, &bad);
        if (bad)
            goto plain;
        if (top + 4 > cap_stack) {
            cap_stack *= 2;
            PyObject **grown = PyMem_RawRealloc(stack, cap_stack * sizeof(PyObject *));
            if (grown == NULL)
                goto nomem;
            stack = grown;
        }
        stack[top++] = v;
        stack[top++] = NULL;
        /* As topological_order: an argument already seen is not pushed. */
        int32_t *seen;
        if (b != NULL && ((seen = map_slot(&w->map, b, 0)) == NULL || *seen == 0))
            stack[top++] = b;
        if (a != NULL && ((seen = map_slot(&w->map, a, 0)) == NULL || *seen == 0))
            stack[top++] = a;
    }
    PyMem_RawFree(stack);
    return 0;
plain:
    PyMem_RawFree(stack);
    walk_free(w);
    return 1;
nomem:
    PyMem_RawFree(stack);
    walk_free(w);
    PyErr_NoMemory();
    return -1;
}

static int32_t index_of(Walk *w, PyObject *v)
{
    const int32_t *slot = map_slot(&w->map, v, 0);
    return slot == NULL || *slot <= 0 ? -1 : *slot - 1;
}

/* One node's code, argument indices and constant, checked against the arity
 * table (a bytes object of per-code arities, NOT_AN_OP for no op). */
typedef struct {
    const uint8_t *arity;
    Py_ssize_t n_codes;
} Table;

/* The op code a node's _code slot holds (k), or -1 when it is not an int naming an op of
 * the table. */
static long op_code(const Table *t, PyObject *k)
{
    if (k == NULL || !PyLong_CheckExact(k))
        return -1;
    long kc = PyLong_AsLong(k);
    if (kc == -1 && PyErr_Occurred())
        PyErr_Clear();
    if (kc < 0 || kc >= t->n_codes || t->arity[kc] == NOT_AN_OP)
        return -1;
    return kc;
}

static int node_fields(Walk *w, const Table *t, Py_ssize_t i, uint8_t *code, int32_t *a,
                       int32_t *b, double *c)
{
    PyObject *v = ORDER(w, i);
    const long kc = op_code(t, SLOT(v, w->slots.code));
    if (kc < 0)
        return -1;
    *code = (uint8_t)kc;
    PyObject *x = SLOT(v, w->slots.a), *y = SLOT(v, w->slots.b);
    const int arity = t->arity[kc];
    if ((arity >= 1) != (x != Py_None) || (arity == 2) != (y != Py_None))
        return -1;
    *a = arity >= 1 ? index_of(w, x) : -1;
    *b = arity == 2 ? index_of(w, y) : -1;
    return as_double(SLOT(v, arity == 0 ? w->slots.data : w->slots.c), c);
}

static PyObject *order_list(const Walk *w)
{
    PyObject *list = PyList_New(w->n);
    if (list == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < w->n; i++)
        PyList_SET_ITEM(list, i, Py_NewRef(ORDER(w, i)));
    return list;
}

/* Indices of `targets` (a sequence of objects), -1 where not in the graph. */
static PyObject *target_indices(Walk *w, PyObject *targets)
{
    PyObject *seq = PySequence_Fast(targets, "targets must be a sequence");
    if (seq == NULL)
        return NULL;
    Py_ssize_t m = PySequence_Fast_GET_SIZE(seq);
    PyObject *out = PyList_New(m);
    for (Py_ssize_t j = 0; out != NULL && j < m; j++) {
        PyObject *ix = PyLong_FromLong(index_of(w, PySequence_Fast_GET_ITEM(seq, j)));
        if (ix == NULL)
            Py_CLEAR(out);
        else
            PyList_SET_ITEM(out, j, ix);
    }
    Py_DECREF(seq);
    return out;
}

static int get_table(PyObject *arity, Table *t)
{
    if (!PyBytes_Check(arity)) {
        PyErr_SetString(PyExc_TypeError, "arity must be bytes");
        return -1;
    }
    t->arity = (const uint8_t *)PyBytes_AS_STRING(arity);
    t->n_codes = PyBytes_GET_SIZE(arity);
    return 0;
}

/* value_columns(root, targets, arity) -> (order, code, arg0, arg1, const, indices) | None */
PyObject *mg_value_columns(PyObject *module, PyObject *args)
{
    PyObject *root, *targets, *arity;
    (void)module;
    if (!PyArg_ParseTuple(args, "OOO:value_columns", &root, &targets, &arity))
        return NULL;
    Table t;
    if (get_table(arity, &t) < 0)
        return NULL;
    Walk w;
    int r = walk(root, &w);
    if (r != 0)
        return r < 0 ? NULL : Py_NewRef(Py_None);
    const Py_ssize_t n = w.n;
    PyObject *code = PyByteArray_FromStringAndSize(NULL, n);
    PyObject *a = PyByteArray_FromStringAndSize(NULL, 4 * n);
    PyObject *b = PyByteArray_FromStringAndSize(NULL, 4 * n);
    PyObject *c = PyByteArray_FromStringAndSize(NULL, 8 * n);
    PyObject *result = NULL;
    if (code == NULL || a == NULL || b == NULL || c == NULL)
        goto done;
    uint8_t *pc = (uint8_t *)PyByteArray_AS_STRING(code);
    int32_t *pa = (int32_t *)PyByteArray_AS_STRING(a), *pb = (int32_t *)PyByteArray_AS_STRING(b);
    double *pk = (double *)PyByteArray_AS_STRING(c);
    for (Py_ssize_t i = 0; i < n; i++)
        if (node_fields(&w, &t, i, pc + i, pa + i, pb + i, pk + i) < 0) {
            result = Py_NewRef(Py_None);
            goto done;
        }
    PyObject *order = order_list(&w);
    PyObject *found = order ? target_indices(&w, targets) : NULL;
    if (found != NULL)
        result = Py_BuildValue("(NOOOON)", order, code, a, b, c, found);
    else
        Py_XDECREF(order);
done:
    Py_XDECREF(code);
    Py_XDECREF(a);
    Py_XDECREF(b);
    Py_XDECREF(c);
    walk_free(&w);
    return result;
}

/* pack_value(root, targets, arity, uses_value) -> (order, ops, args, values, indices) | None:
 * PackedGraph columns (little-endian uint32 args, float64 values). */
PyObject *mg_pack_value(PyObject *module, PyObject *args)
{
    PyObject *root, *targets, *arity, *uses_value;
    (void)module;
    if (!PyArg_ParseTuple(args, "OOOO:pack_value", &root, &targets, &arity, &uses_value))
        return NULL;
    Table t;
    if (get_table(arity, &t) < 0)
        return NULL;
    if (!PyBytes_Check(uses_value) || PyBytes_GET_SIZE(uses_value) != t.n_codes) {
        PyErr_SetString(PyExc_TypeError, "uses_value must be bytes as long as arity");
        return NULL;
    }
    const uint8_t *uses = (const uint8_t *)PyBytes_AS_STRING(uses_value);
    Walk w;
    int r = walk(root, &w);
    if (r != 0)
        return r < 0 ? NULL : Py_NewRef(Py_None);
    const Py_ssize_t n = w.n;
    PyObject *ops = PyBytes_FromStringAndSize(NULL, n);
    uint8_t *argbuf = PyMem_RawMalloc((size_t)(8 * n + 8));
    uint8_t *valbuf = PyMem_RawMalloc((size_t)(8 * n + 8));
    PyObject *result = NULL;
    if (ops == NULL || argbuf == NULL || valbuf == NULL) {
        if (ops != NULL)
            PyErr_NoMemory();
        goto done;
    }
    uint8_t *po = (uint8_t *)PyBytes_AS_STRING(ops);
    size_t na = 0, nv = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        int32_t x, y;
        double c;
        if (node_fields(&w, &t, i, po + i, &x, &y, &c) < 0) {
            result = Py_NewRef(Py_None);
            goto done;
        }
        const int ar = t.arity[po[i]];
        uint32_t u[2] = {(uint32_t)x, (uint32_t)y};
        for (int s = 0; s < ar; s++, na++) /* little-endian, byte by byte: any host */
            for (int k = 0; k < 4; k++)
                argbuf[4 * na + k] = (uint8_t)(u[s] >> (8 * k));
        if (uses[po[i]]) {
            uint64_t bits;
            memcpy(&bits, &c, 8);
            for (int k = 0; k < 8; k++)
                valbuf[8 * nv + k] = (uint8_t)(bits >> (8 * k));
            nv++;
        }
    }
    PyObject *order = order_list(&w);
    PyObject *found = order ? target_indices(&w, targets) : NULL;
    if (found != NULL)
        result = Py_BuildValue("(NOy#y#N)", order, ops, (const char *)argbuf, (Py_ssize_t)(4 * na),
                               (const char *)valbuf, (Py_ssize_t)(8 * nv), found);
    else
        Py_XDECREF(order);
done:
    Py_XDECREF(ops);
    PyMem_RawFree(argbuf);
    PyMem_RawFree(valbuf);
    walk_free(&w);
    return result;
}

/* Replace an object slot with a new float; 0, or -1 with an exception. */
static int set_float(PyObject *v, Py_ssize_t off, double x)
{
    PyObject *f = PyFloat_FromDouble(x);
    if (f == NULL)
        return -1;
    PyObject *old = SLOT(v, off);
    SLOT(v, off) = f;
    Py_XDECREF(old); /* a float or an int: frees without running Python code */
    return 0;
}

/* set_float for a node's data, which a remote pass mostly gives back unchanged:
 * a float slot holding the same bits already is left as it is (no allocation). */
static int set_data(PyObject *v, Py_ssize_t off, double x)
{
    PyObject *old = SLOT(v, off);
    if (old != NULL && PyFloat_CheckExact(old)) {
        double held = PyFloat_AS_DOUBLE(old);
        if (memcmp(&held, &x, sizeof x) == 0)
            return 0;
    }
    return set_float(v, off, x);
}

/* Buffers of n float64, read-only. */
static int get_doubles(PyObject *obj, Py_ssize_t n, Py_buffer *view)
{
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0)
        return -1;
    if (view->itemsize != 8 || view->len != 8 * n || view->format == NULL ||
        strcmp(view->format, "d") != 0) {
        PyErr_Format(PyExc_ValueError, "expected %zd float64 numbers", n);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

/* assign_values(order, values, grads, arity) -> bool: every node takes its value
 * (a float holding the same bits stays);
 * interior nodes take their gradient, leaves add it to theirs (Value.backward's
 * rule). False (nothing written) when a node is not a plain Value. */
PyObject *mg_assign_values(PyObject *module, PyObject *args)
{
    PyObject *order, *values, *grads, *arity;
    (void)module;
    if (!PyArg_ParseTuple(args, "O!OOO:assign_values", &PyList_Type, &order, &values, &grads,
                          &arity))
        return NULL;
    Table t;
    if (get_table(arity, &t) < 0)
        return NULL;
    const Py_ssize_t n = PyList_GET_SIZE(order);
    if (n == 0)
        Py_RETURN_TRUE;
    Slots s;
    if (get_slots(Py_TYPE(PyList_GET_ITEM(order, 0)), &s) < 0)
        Py_RETURN_FALSE;
    Py_buffer vv, gv;
    if (get_doubles(values, n, &vv) < 0)
        return NULL;
    if (get_doubles(grads, n, &gv) < 0) {
        PyBuffer_Release(&vv);
        return NULL;
    }
    const double *pv = vv.buf, *pg = gv.buf;
    PyObject *result = Py_False;
    /* First check every node, so that nothing is half written. */
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *v = PyList_GET_ITEM(order, i);
        double old;
        if (Py_TYPE(v) != s.type)
            goto done;
        const long kc = op_code(&t, SLOT(v, s.code));
        if (kc < 0)
            goto done;
        if (t.arity[kc] == 0 && as_double(SLOT(v, s.grad), &old) < 0)
            goto done;
        PyObject *d = SLOT(v, s.data);
        if (d == NULL || !(PyFloat_CheckExact(d) || PyLong_CheckExact(d)))
            goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *v = PyList_GET_ITEM(order, i);
        const int leaf = t.arity[PyLong_AsLong(SLOT(v, s.code))] == 0;
        double g = pg[i];
        if (leaf) {
            double old = 0.0;
            as_double(SLOT(v, s.grad), &old);
            g = old + g;
        }
        if (set_data(v, s.data, pv[i]) < 0 || set_float(v, s.grad, g) < 0) {
            result = NULL;
            goto done;
        }
    }
    result = Py_True;
done:
    PyBuffer_Release(&vv);
    PyBuffer_Release(&gv);
    return Py_XNewRef(result);
}

/* ---- Value.backward ------------------------------------------------------ */

/* The reverse sweep runs on the Value objects themselves: every node is
 * given a fresh float as its gradient (0.0, 1.0 at the root, a leaf's old
 * gradient on a leaf), and the sweep adds into those floats in place. They
 * are new objects that only their node's slot refers to, and no Python code
 * runs until the sweep is over, so nothing can see them change. Besides the
 * gradients themselves (which the call leaves behind anyway) the walk's
 * order and one op code per node are all it holds: no index map, value or
 * gradient arrays. The operations and their order are those of the Python
 * loop in Value.backward (and of the tape's reverse sweep). */

#define FVAL(o) (((PyFloatObject *)(o))->ob_fval)

#define OBJ_BWD_0(name)
#define OBJ_BWD_1(name)                                                         \
    {                                                                           \
        PyObject *x = SLOT(v, s->a);                                            \
        double dx, dy;                                                          \
        name##_d(FVAL(SLOT(x, s->data)), 0.0, FVAL(SLOT(v, s->c)), FVAL(SLOT(v, s->data)), \
                 &dx, &dy);                                                     \
        (void)dy;                                                               \
        FVAL(SLOT(x, s->grad)) += dx * gi;                                      \
    }
#define OBJ_BWD_2(name)                                                         \
    {                                                                           \
        PyObject *x = SLOT(v, s->a), *y = SLOT(v, s->b);                        \
        double dx, dy;                                                          \
        name##_d(FVAL(SLOT(x, s->data)), FVAL(SLOT(y, s->data)), FVAL(SLOT(v, s->c)),     \
                 FVAL(SLOT(v, s->data)), &dx, &dy);                             \
        FVAL(SLOT(x, s->grad)) += dx * gi;                                      \
        FVAL(SLOT(y, s->grad)) += dy * gi;                                      \
    }
#define OBJ_BWD_3(name) /* declined before the sweep */
#define OBJ_BWD_CASE(code_, name, arity) \
    case code_: OBJ_BWD_##arity(name) break;

static void sweep_objects(const Walk *w, const uint8_t *code)
{
    const Slots *s = &w->slots;
    for (Py_ssize_t i = w->n - 1; i >= 0; i--) {
        PyObject *v = ORDER(w, i);
        const double gi = FVAL(SLOT(v, s->grad));
        (void)gi;
        switch (code[i]) {
            MG_OPS(OBJ_BWD_CASE)
        default:
            break;
        }
    }
}

/* Whether node i can be swept in place: an op the sweep knows with the
 * arguments its arity says (nodes of the walk's type), and exact floats
 * where the sweep reads (data, the constant of an op; a gradient may also
 * be an int). Its code goes to *code. */
static int sweepable(const Walk *w, const Table *t, Py_ssize_t i, uint8_t *code)
{
    const Slots *s = &w->slots;
    PyObject *v = ORDER(w, i);
    const long kc = op_code(t, SLOT(v, s->code));
    if (kc < 0)
        return 0;
    const int arity = t->arity[kc];
    if (arity > 2 || mg_native_arity((unsigned)kc) != arity)
        return 0;
    PyObject *x = SLOT(v, s->a), *y = SLOT(v, s->b), *d = SLOT(v, s->data);
    if ((arity >= 1) != (x != Py_None) || (arity == 2) != (y != Py_None))
        return 0; /* (the walk checked that arguments are nodes of the type) */
    double old; /* any gradient is replaced, and freeing a float or an int runs no Python */
    if (d == NULL || !PyFloat_CheckExact(d) || as_double(SLOT(v, s->grad), &old) < 0)
        return 0;
    if (arity > 0) {
        PyObject *c = SLOT(v, s->c);
        if (c == NULL || !PyFloat_CheckExact(c))
            return 0;
    }
    *code = (uint8_t)kc;
    return 1;
}

/* value_backward(root, arity) -> bool: Value.backward() run in C, with the same
 * operations in the same order. False (nothing changed) when the graph is not
 * plain or uses an op the sweep does not know. */
PyObject *mg_value_backward(PyObject *module, PyObject *args)
{
    PyObject *root, *arity;
    (void)module;
    if (!PyArg_ParseTuple(args, "OO:value_backward", &root, &arity))
        return NULL;
    Table t;
    if (get_table(arity, &t) < 0)
        return NULL;
    Walk w;
    int r = walk(root, &w);
    if (r != 0)
        return r < 0 ? NULL : Py_NewRef(Py_False);
    map_free(&w.map); /* the order is all the sweep needs */
    const Py_ssize_t n = w.n;
    uint8_t *code = PyMem_RawMalloc((size_t)n + 1);
    PyObject *result = Py_False;
    if (code == NULL) {
        PyErr_NoMemory();
        result = NULL;
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++)
        if (!sweepable(&w, &t, i, code + i))
            goto done;
    if (t.arity[code[n - 1]] == 0)
        goto done; /* a leaf root: Python's one addition is all there is */
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *v = ORDER(&w, i);
        double g = 0.0;
        if (i == n - 1)
            g = 1.0;
        else if (t.arity[code[i]] == 0)
            as_double(SLOT(v, w.slots.grad), &g);
        if (set_float(v, w.slots.grad, g) < 0) {
            result = NULL; /* out of memory: some gradients are already reset */
            goto done;
        }
    }
    sweep_objects(&w, code);
    result = Py_True;
done:
    PyMem_RawFree(code);
    walk_free(&w);
    return Py_XNewRef(result);
}

/* ---- nodes the cycle collector need not visit ---------------------------- */

/* new_node(type) -> object.__new__(type), not tracked by the cycle collector.
 * The nodes Value's operators make refer only to earlier nodes and to floats,
 * so they are never part of a reference cycle; left tracked, every
 * collection triggered while a big graph is built walks all of it (more than
 * half the time of building a long chain). An untracked object still frees
 * by reference counting, and one that refers to a tracked object keeps it
 * alive, as any outside reference does. Custom nodes (closures) stay
 * tracked. */
PyObject *mg_new_node(PyObject *module, PyObject *type)
{
    (void)module;
    if (!PyType_Check(type) || ((PyTypeObject *)type)->tp_itemsize != 0 ||
        !PyType_IsSubtype((PyTypeObject *)type, &PyBaseObject_Type)) {
        PyErr_SetString(PyExc_TypeError, "new_node expects a class of fixed-size instances");
        return NULL;
    }
    PyTypeObject *t = (PyTypeObject *)type;
    PyObject *node = t->tp_alloc(t, 0);
    if (node != NULL && PyObject_IS_GC(node) && PyObject_GC_IsTracked(node))
        PyObject_GC_UnTrack(node);
    return node;
}
