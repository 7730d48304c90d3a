/* The fused CPU kernels of scaleinv: one call runs a whole AdamP or SGDP step over every
   tensor of a group (see scaleinv/_fused_cpu.py for the passes and docs/contract.md for the
   maths). Built by scaleinv._cbuild; each body is written once, in fused_cpu_body.h, and
   instantiated below for float and double. */
#include <math.h>
#include <stdint.h>

#define ROW_CACHE 8192      /* longest row kept in the per-thread buffer */
#define PAR_MIN 32768       /* smallest tensor (elements) worth a parallel region */
#define BLOCK 16384         /* elements per parallel chunk of the flat (plain) loop */

/* for (i = 0; i < count; ++i) body, on nthreads OpenMP threads when the work is large. */
#ifdef _OPENMP
#define FOR_ROWS(i, count, work, ...)                                                        \
  if (nt > 1 && (work) >= PAR_MIN) {                                                         \
    _Pragma("omp parallel for schedule(static) num_threads(nt)")                             \
    for (int64_t i = 0; i < (count); ++i) __VA_ARGS__                                        \
  } else {                                                                                   \
    for (int64_t i = 0; i < (count); ++i) __VA_ARGS__                                        \
  }
#else
#define FOR_ROWS(i, count, work, ...)                                                        \
  (void)nt;                                                                                  \
  for (int64_t i = 0; i < (count); ++i) __VA_ARGS__
#endif

/* Modes and views: defined once in scaleinv/_constants.py, passed in as -D flags.
   MODE_AUTO_TWO_PASS: the test's sums are gathered in the first of two passes (best when the
   layer view is expected, or rows are long). VIEW_AUTO: not decided yet. */
#ifndef SCALEINV_MODE_PLAIN
#error "build with the -DSCALEINV_* flags of scaleinv._constants.c_defines()"
#endif
enum {
  MODE_PLAIN = SCALEINV_MODE_PLAIN, MODE_AUTO = SCALEINV_MODE_AUTO,
  MODE_CHANNEL = SCALEINV_MODE_CHANNEL, MODE_LAYER = SCALEINV_MODE_LAYER,
  MODE_AUTO_TWO_PASS = SCALEINV_MODE_AUTO_TWO_PASS
};
enum {
  VIEW_AUTO = SCALEINV_VIEW_AUTO, VIEW_NONE = SCALEINV_VIEW_NONE,
  VIEW_CHANNEL = SCALEINV_VIEW_CHANNEL, VIEW_LAYER = SCALEINV_VIEW_LAYER
};

/* Group hyperparameters (doubles, as Python computes them). */
typedef struct {
  double lr, beta1, beta2, eps, decay_plain, decay_projected, delta, sign;
  int32_t nesterov, nthreads;
} AdamPGroup;

typedef struct {
  double lr, momentum, dampening, eps, decay_plain, decay_projected, delta, sign;
  int32_t nesterov, project_buffer, nthreads;
} SGDPGroup;

/* a < b in float (single) or double: the comparison of the tensor's dtype. */
static int less(double a, double b, int single) {
  return single ? (float)a < (float)b : a < b;
}

/* The view the cosine test picks from the row sums <w,w>, <g,w>, <g,g> at stats[stride*i+0..2].
   A NaN cosine (NaN or inf in g or w, 0/0 with eps = 0) counts as +inf: it fails the test,
   as NaN < threshold does, and survives the max. */
static int choose_view(const double* stats, int64_t stride, int64_t n, int64_t d, double delta,
                       double eps, int single) {
  double max_cos = 0.0, ww = 0.0, gw = 0.0, gg = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    double rww = stats[stride * i], rgw = stats[stride * i + 1], rgg = stats[stride * i + 2];
    double c = fabs(rgw) / (fmax(sqrt(rgg), eps) * fmax(sqrt(rww), eps));
    if (isnan(c)) c = INFINITY;
    max_cos = c > max_cos ? c : max_cos;
    ww += rww; gw += rgw; gg += rgg;
  }
  if (less(max_cos, delta / sqrt((double)d), single)) return VIEW_CHANNEL;
  double layer_cos = fabs(gw) / (fmax(sqrt(gg), eps) * fmax(sqrt(ww), eps));
  if (less(layer_cos, delta / sqrt((double)(n * d)), single)) return VIEW_LAYER;
  return VIEW_NONE;
}

/* s = <w, p> / (|w| + eps)^2: the projected update is p - w s. */
static double radial_coefficient(double wp, double ww, double eps) {
  double r = sqrt(ww) + eps;
  return wp / (r * r);
}

/* From the row sums [<w,w>, <g,w>, <g,g>, <w,p>] of a two-pass step: the view (the test runs
   where view is VIEW_AUTO) and, for the layer view, the one coefficient of every row. */
static int two_pass_view(const double* sums, int64_t n, int64_t d, int view, double delta,
                         double eps, int single, double* layer_s) {
  if (view == VIEW_AUTO) view = choose_view(sums, 4, n, d, delta, eps, single);
  *layer_s = 0.0;
  if (view == VIEW_LAYER) {
    double ww = 0.0, wp = 0.0;
    for (int64_t i = 0; i < n; ++i) { ww += sums[4 * i]; wp += sums[4 * i + 3]; }
    *layer_s = radial_coefficient(wp, ww, eps);
  }
  return view;
}

/* Row i's coefficient s_i in a two-pass step, for the view two_pass_view chose. */
static double two_pass_coefficient(const double* sums, int64_t i, int view, double layer_s,
                                   double eps) {
  if (view == VIEW_LAYER) return layer_s;
  return view == VIEW_CHANNEL ? radial_coefficient(sums[4 * i + 3], sums[4 * i], eps) : 0.0;
}


#define T float
#define SUF f32
#define SQRT sqrtf
#define SINGLE 1
#include "fused_cpu_body.h"
#undef T
#undef SUF
#undef SQRT
#undef SINGLE

#define T double
#define SUF f64
#define SQRT sqrt
#define SINGLE 0
#include "fused_cpu_body.h"
#undef T
#undef SUF
#undef SQRT
#undef SINGLE
