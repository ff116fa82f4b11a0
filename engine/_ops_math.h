/* The math of every op of the native kernel, one section per op, mirroring
 * micrograd.ops entry by entry (the same formulas, so the two agree to the
 * last bit where libm and Python's math agree).
 *
 * For an op of arity 1 or 2:
 *   <name>_f(x, y, c)                        its value (y is 0 for unary ops,
 *                                            c the node's constant)
 *   <name>_d(x, y, c, o, &dx, &dy)           its partials; o is the value
 *   <name>_dd(x, y, c, o, &dxx, &dxy, &dyy)  its second derivatives (HVP)
 * For an op of arity 3 (no constant):
 *   <name>_f(x, y, z), <name>_d(x, y, z, o, &dx, &dy, &dz) and
 *   <name>_dd(x, y, z, o, dd) with dd[6] = xx, xy, yy, xz, yz, zz.
 *
 * Adding an op: its entry in micrograd.ops, its section here, its line in
 * the proto enum; scripts/gen-ops regenerates the dispatch list
 * (_ops_list.h), and the sweeps are built from that list.
 */
#ifndef MG_OPS_MATH_H
#define MG_OPS_MATH_H

#include <math.h>

#define MG_UNUSED(x) (void)(x)
#define MG_LN2 0.6931471805599453
#define MG_LN10 2.302585092994046
#define MG_TWO_OVER_SQRT_PI 1.1283791670955126
#define MG_SOFTPLUS_THRESHOLD 20.0

/* An op that is linear in each argument has no second derivatives. */
#define MG_FLAT_DD(name)                                                                  \
    static inline void name##_dd(double x, double y, double c, double o, double *dxx,     \
                                 double *dxy, double *dyy)                                \
    { MG_UNUSED(x); MG_UNUSED(y); MG_UNUSED(c); MG_UNUSED(o); *dxx = *dxy = *dyy = 0.0; }

/* A unary op: value F, first derivative D, second derivative DD, in x and o. */
#define MG_UNARY(name, F, D, DD)                                                          \
    static inline double name##_f(double x, double y, double c)                          \
    { MG_UNUSED(y); MG_UNUSED(c); return (F); }                                           \
    static inline void name##_d(double x, double y, double c, double o, double *dx,       \
                                double *dy)                                               \
    { MG_UNUSED(x); MG_UNUSED(y); MG_UNUSED(c); MG_UNUSED(o); *dx = (D); *dy = 0.0; }     \
    static inline void name##_dd(double x, double y, double c, double o, double *dxx,     \
                                 double *dxy, double *dyy)                                \
    {                                                                                     \
        MG_UNUSED(x); MG_UNUSED(y); MG_UNUSED(c); MG_UNUSED(o);                           \
        *dxx = (DD); *dxy = 0.0; *dyy = 0.0;                                              \
    }

/* ---- arithmetic ------------------------------------------------------------ */

static inline double add_f(double x, double y, double c) { MG_UNUSED(c); return x + y; }
static inline void add_d(double x, double y, double c, double o, double *dx, double *dy)
{ MG_UNUSED(x); MG_UNUSED(y); MG_UNUSED(c); MG_UNUSED(o); *dx = 1.0; *dy = 1.0; }
MG_FLAT_DD(add)

static inline double sub_f(double x, double y, double c) { MG_UNUSED(c); return x - y; }
static inline void sub_d(double x, double y, double c, double o, double *dx, double *dy)
{ MG_UNUSED(x); MG_UNUSED(y); MG_UNUSED(c); MG_UNUSED(o); *dx = 1.0; *dy = -1.0; }
MG_FLAT_DD(sub)

static inline double mul_f(double x, double y, double c) { MG_UNUSED(c); return x * y; }
static inline void mul_d(double x, double y, double c, double o, double *dx, double *dy)
{ MG_UNUSED(c); MG_UNUSED(o); *dx = y; *dy = x; }
static inline void mul_dd(double x, double y, double c, double o, double *dxx, double *dxy,
                          double *dyy)
{ MG_UNUSED(x); MG_UNUSED(y); MG_UNUSED(c); MG_UNUSED(o); *dxx = 0.0; *dxy = 1.0; *dyy = 0.0; }

static inline double div_f(double x, double y, double c) { MG_UNUSED(c); return x / y; }
static inline void div_d(double x, double y, double c, double o, double *dx, double *dy)
{ MG_UNUSED(x); MG_UNUSED(c); *dx = 1.0 / y; *dy = -(o / y); }
static inline void div_dd(double x, double y, double c, double o, double *dxx, double *dxy,
                          double *dyy)
{ MG_UNUSED(x); MG_UNUSED(c); *dxx = 0.0; *dxy = -((1.0 / y) / y); *dyy = 2.0 * ((o / y) / y); }

MG_UNARY(neg, -x, -1.0, 0.0)

/* x ** c; the derivative is 0 when c == 0 (not 0 * inf at x == 0). */
static inline double pow_f(double x, double y, double c) { MG_UNUSED(y); return pow(x, c); }
static inline void pow_d(double x, double y, double c, double o, double *dx, double *dy)
{ MG_UNUSED(y); MG_UNUSED(o); *dx = c == 0.0 ? 0.0 : c * pow(x, c - 1.0); *dy = 0.0; }
static inline void pow_dd(double x, double y, double c, double o, double *dxx, double *dxy,
                          double *dyy)
{
    MG_UNUSED(y); MG_UNUSED(o);
    *dxx = (c == 0.0 || c == 1.0) ? 0.0 : c * (c - 1.0) * pow(x, c - 2.0);
    *dxy = 0.0; *dyy = 0.0;
}

/* x ** y with both operands nodes, masked at 0 as PyTorch does. */
static inline double pow_value_f(double x, double y, double c) { MG_UNUSED(c); return pow(x, y); }
static inline void pow_value_d(double x, double y, double c, double o, double *dx, double *dy)
{
    MG_UNUSED(c);
    *dx = y == 0.0 ? 0.0 : y * pow(x, y - 1.0);
    *dy = (x == 0.0 && y >= 0.0) ? 0.0 : o * log(x);
}
static inline void pow_value_dd(double x, double y, double c, double o, double *dxx, double *dxy,
                                double *dyy)
{
    MG_UNUSED(c);
    const double lx = log(x);
    *dxx = (y == 0.0 || y == 1.0) ? 0.0 : y * (y - 1.0) * pow(x, y - 2.0);
    *dxy = (x == 0.0 && y >= 1.0) ? 0.0 : pow(x, y - 1.0) * (1.0 + y * lx);
    *dyy = (x == 0.0 && y >= 0.0) ? 0.0 : o * lx * lx;
}

/* ---- micrograd's activations ------------------------------------------------ */

/* max(0, x) that keeps nan; derivative 0 at x == 0. */
MG_UNARY(relu, x <= 0.0 ? 0.0 : x, x > 0.0 ? 1.0 : 0.0, 0.0)
MG_UNARY(tanh, tanh(x), 1.0 - o * o, -2.0 * o * (1.0 - o * o))
MG_UNARY(exp, exp(x), o, o)
MG_UNARY(log, log(x), 1.0 / x, -((1.0 / x) / x))

/* Logistic function, computed so that neither tail overflows. */
static inline double mg_sigmoid(double x)
{
    if (x >= 0.0)
        return 1.0 / (1.0 + exp(-x));
    if (x != x)
        return x;
    double e = exp(x);
    return e / (1.0 + e);
}
MG_UNARY(sigmoid, mg_sigmoid(x), o * (1.0 - o), o * (1.0 - o) * (1.0 - 2.0 * o))

/* ---- trigonometry ------------------------------------------------------------ */

MG_UNARY(sin, sin(x), cos(x), -o)
MG_UNARY(cos, cos(x), -sin(x), -o)
MG_UNARY(tan, tan(x), 1.0 + o * o, 2.0 * o * (1.0 + o * o))

/* 1/sqrt(1 - x²) as PyTorch computes it: inf at ±1, nan beyond. */
static inline double mg_asin_d(double x) { return 1.0 / sqrt(-x * x + 1.0); }
static inline double mg_asin_dd(double x) { double r = mg_asin_d(x); return x * r * r * r; }
MG_UNARY(asin, asin(x), mg_asin_d(x), mg_asin_dd(x))
MG_UNARY(acos, acos(x), -mg_asin_d(x), -mg_asin_dd(x))

static inline double mg_atan_dd(double x) { double r = 1.0 / (x * x + 1.0); return -2.0 * x * r * r; }
MG_UNARY(atan, atan(x), 1.0 / (x * x + 1.0), mg_atan_dd(x))

/* ---- hyperbolic ------------------------------------------------------------------ */

MG_UNARY(sinh, sinh(x), cosh(x), o)
MG_UNARY(cosh, cosh(x), sinh(x), o)

static inline double mg_asinh_d(double x) { return 1.0 / sqrt(x * x + 1.0); }
static inline double mg_asinh_dd(double x) { double r = mg_asinh_d(x); return -x * r * r * r; }
MG_UNARY(asinh, asinh(x), mg_asinh_d(x), mg_asinh_dd(x))

static inline double mg_acosh_d(double x) { return 1.0 / sqrt(x * x - 1.0); }
static inline double mg_acosh_dd(double x) { double r = mg_acosh_d(x); return -x * r * r * r; }
MG_UNARY(acosh, acosh(x), mg_acosh_d(x), mg_acosh_dd(x))

static inline double mg_atanh_dd(double x) { double r = 1.0 / (1.0 - x * x); return 2.0 * x * r * r; }
MG_UNARY(atanh, atanh(x), 1.0 / (1.0 - x * x), mg_atanh_dd(x))

/* ---- roots, logarithms, exponentials ---------------------------------------------- */

MG_UNARY(sqrt, sqrt(x), 1.0 / (2.0 * o), -1.0 / (4.0 * o * o * o))
MG_UNARY(log1p, log1p(x), 1.0 / (x + 1.0), -((1.0 / (x + 1.0)) / (x + 1.0)))
MG_UNARY(expm1, expm1(x), o + 1.0, o + 1.0)
MG_UNARY(log2, log2(x), 1.0 / (x * MG_LN2), -((1.0 / (x * MG_LN2)) / x))
MG_UNARY(log10, log10(x), 1.0 / (x * MG_LN10), -((1.0 / (x * MG_LN10)) / x))

static inline double mg_erf_d(double x) { return MG_TWO_OVER_SQRT_PI * exp(-(x * x)); }
MG_UNARY(erf, erf(x), mg_erf_d(x), -2.0 * x * mg_erf_d(x))

/* log(1 + e^x), and x itself above PyTorch's threshold 20 (slope exactly 1). */
static inline double mg_softplus(double x)
{ return x > MG_SOFTPLUS_THRESHOLD ? x : log1p(exp(x)); }
static inline double mg_softplus_d(double x)
{
    if (x > MG_SOFTPLUS_THRESHOLD)
        return 1.0;
    const double z = exp(x);
    return z / (z + 1.0);
}
static inline double mg_softplus_dd(double x)
{
    if (x > MG_SOFTPLUS_THRESHOLD)
        return 0.0;
    const double s = mg_softplus_d(x);
    return s * (1.0 - s);
}
MG_UNARY(softplus, mg_softplus(x), mg_softplus_d(x), mg_softplus_dd(x))

/* ---- piecewise: |x| and rounding ------------------------------------------------------ */

/* -1, 0 or 1; 0 for ±0 and nan (torch.sign, and abs's derivative: PyTorch's sgn). */
static inline double mg_sign(double x) { return x > 0.0 ? 1.0 : (x < 0.0 ? -1.0 : 0.0); }
MG_UNARY(abs, fabs(x), mg_sign(x), 0.0)
MG_UNARY(floor, floor(x), 0.0, 0.0)
MG_UNARY(ceil, ceil(x), 0.0, 0.0)
MG_UNARY(sign, mg_sign(x), 0.0, 0.0)

/* ---- binary ----------------------------------------------------------------------------- */

/* atan2(x, y) as torch.atan2(x, y); 1/(x² + y²) is taken as 0 at the origin. */
static inline double mg_atan2_recip(double x, double y)
{
    const double r = x * x + y * y;
    return r == 0.0 ? 0.0 : 1.0 / r;
}
static inline double atan2_f(double x, double y, double c) { MG_UNUSED(c); return atan2(x, y); }
static inline void atan2_d(double x, double y, double c, double o, double *dx, double *dy)
{
    MG_UNUSED(c); MG_UNUSED(o);
    const double recip = mg_atan2_recip(x, y);
    *dx = y * recip;
    *dy = -x * recip;
}
static inline void atan2_dd(double x, double y, double c, double o, double *dxx, double *dxy,
                            double *dyy)
{
    MG_UNUSED(c); MG_UNUSED(o);
    const double recip = mg_atan2_recip(x, y), r2 = recip * recip;
    *dxx = -2.0 * x * y * r2;
    *dxy = (x * x - y * y) * r2;
    *dyy = 2.0 * x * y * r2;
}

/* nan if either is nan; a tie returns x and splits the gradient in half (PyTorch). */
static inline double maximum_f(double x, double y, double c)
{ MG_UNUSED(c); return (x != x || y != y) ? NAN : (x >= y ? x : y); }
static inline void maximum_d(double x, double y, double c, double o, double *dx, double *dy)
{
    MG_UNUSED(c); MG_UNUSED(o);
    if (x == y) {
        *dx = *dy = 0.5;
        return;
    }
    *dx = x < y ? 0.0 : 1.0;
    *dy = x > y ? 0.0 : 1.0;
}
MG_FLAT_DD(maximum)

static inline double minimum_f(double x, double y, double c)
{ MG_UNUSED(c); return (x != x || y != y) ? NAN : (x <= y ? x : y); }
static inline void minimum_d(double x, double y, double c, double o, double *dx, double *dy)
{
    MG_UNUSED(c); MG_UNUSED(o);
    if (x == y) {
        *dx = *dy = 0.5;
        return;
    }
    *dx = x > y ? 0.0 : 1.0;
    *dy = x < y ? 0.0 : 1.0;
}
MG_FLAT_DD(minimum)

/* ---- ternary ------------------------------------------------------------------------------ */

/* y where x > 0, else z (a nan condition picks z); no gradient into the condition. */
static inline double where_f(double x, double y, double z) { return x > 0.0 ? y : z; }
static inline void where_d(double x, double y, double z, double o, double *dx, double *dy,
                           double *dz)
{
    MG_UNUSED(y); MG_UNUSED(z); MG_UNUSED(o);
    const int take = x > 0.0;
    *dx = 0.0;
    *dy = take ? 1.0 : 0.0;
    *dz = take ? 0.0 : 1.0;
}
static inline void where_dd(double x, double y, double z, double o, double dd[6])
{
    MG_UNUSED(x); MG_UNUSED(y); MG_UNUSED(z); MG_UNUSED(o);
    for (int k = 0; k < 6; k++)
        dd[k] = 0.0;
}

#endif
