"""The CPU kernels of the fused path: C99 + OpenMP, built once per machine, called via ctypes.

One call runs a whole AdamP or SGDP step over every tensor of a group. Per tensor ``w`` (seen
as ``[n, d]`` rows, one per output channel) the kernel reads memory as few times as the maths
allows (DESIGN.md section 5); AdamP's counts, in arrays of one element per weight:

* never projected (1-D tensors, ``scale_invariant=False``): one pass, like
  ``torch.optim.AdamW(fused=True)`` (7 arrays);
* ``"auto"``: first the cosine test, which reads only ``g`` and ``w`` (2 arrays), then
* no view: the same single pass (2 + 7 = 9 arrays);
* channel view: one pass per row; the row's update ``p`` is kept in a cache-resident buffer
  while ``<w_i, p_i>`` is summed, then ``w_i`` is written from cache (2 + 7 = 9 arrays; 7
  when ``scale_invariant="channel"`` skips the test);
* layer view, or rows longer than the buffer: state update and dot products (6 arrays), then
  the weight update (4 arrays; 5 with nesterov).

The decision is made inside the kernel (on a CPU there is no host-device round trip to
avoid). The cosine test and the projection are the maths of :mod:`scaleinv.projection`
written again in C, since C cannot call it; ``tests/test_fast_path.py`` holds them to the
float64 reference and to ``adamp`` 0.3.0.

The library is compiled with the system C compiler (``$CC``, else ``cc``: the toolchain
``torch.compile`` needs on a CPU too) into ``$SCALEINV_CACHE_DIR`` (default
``~/.cache/scaleinv``), keyed by a hash of the source, the compiler, the flags and the host,
so the cost (one or two seconds) is paid once per machine. Where no compiler works,
:func:`load` warns once and returns ``None``, and :mod:`scaleinv.fused` uses the multi-tensor
body instead.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch
from torch import Tensor

# Each body is written once and instantiated for float (f32) and double (f64).
_C_SOURCE = r"""
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
#define FOR_ROWS(i, count, work, ...) for (int64_t i = 0; i < (count); ++i) __VA_ARGS__
#endif

/* MODE_AUTO_TWO_PASS: the test's sums are gathered in the first of two passes (best when the
   layer view is expected, or rows are long). VIEW_AUTO: not decided yet. */
enum { MODE_PLAIN = 0, MODE_AUTO = 1, MODE_CHANNEL = 2, MODE_LAYER = 3, MODE_AUTO_TWO_PASS = 4 };
enum { VIEW_AUTO = -1, VIEW_NONE = 0, VIEW_CHANNEL = 1, VIEW_LAYER = 2 };

/* Group hyperparameters (doubles, as Python computes them). */
typedef struct {
  double lr, beta1, beta2, eps, decay_plain, decay_projected, delta, sign;
  int32_t nesterov, nthreads;
} AdamPGroup;

typedef struct {
  double lr, momentum, dampening, eps, decay_plain, decay_projected, delta, sign;
  int32_t nesterov, project_buffer, nthreads;
} SGDPGroup;

/* The view the cosine test picks from the row sums <w,w>, <g,w>, <g,g> at stats[stride*i+0..2]. */
static int choose_view(const double* stats, int64_t stride, int64_t n, int64_t d, double delta,
                       double eps) {
  double max_cos = 0.0, ww = 0.0, gw = 0.0, gg = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    double rww = stats[stride * i], rgw = stats[stride * i + 1], rgg = stats[stride * i + 2];
    double c = fabs(rgw) / (fmax(sqrt(rgg), eps) * fmax(sqrt(rww), eps));
    max_cos = c > max_cos ? c : max_cos;
    ww += rww; gw += rgw; gg += rgg;
  }
  if ((float)max_cos < (float)(delta / sqrt((double)d))) return VIEW_CHANNEL;
  double layer_cos = fabs(gw) / (fmax(sqrt(gg), eps) * fmax(sqrt(ww), eps));
  if ((float)layer_cos < (float)(delta / sqrt((double)(n * d)))) return VIEW_LAYER;
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
                         double eps, double* layer_s) {
  if (view == VIEW_AUTO) view = choose_view(sums, 4, n, d, delta, eps);
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

#define DEFINE_KERNELS(T, SUF, SQRT)                                                           \
                                                                                               \
static void cosine_stats_##SUF(const T* restrict w, const T* restrict g, int64_t n,            \
                               int64_t d, int nt, double* restrict stats) {                    \
  FOR_ROWS(i, n, n * d, {                                                                      \
    const T* restrict wi = w + i * d;                                                          \
    const T* restrict gi = g + i * d;                                                          \
    T ww = 0, gw = 0, gg = 0;                                                                  \
    _Pragma("omp simd reduction(+:ww,gw,gg)")                                                  \
    for (int64_t j = 0; j < d; ++j) {                                                          \
      ww += wi[j] * wi[j]; gw += gi[j] * wi[j]; gg += gi[j] * gi[j];                           \
    }                                                                                          \
    stats[3 * i] = ww; stats[3 * i + 1] = gw; stats[3 * i + 2] = gg;                           \
  })                                                                                           \
}                                                                                              \
                                                                                               \
/* ---- AdamP: m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2; p = m / (sqrt(v) rbc2 + eps) -- */  \
                                                                                               \
static void adamp_plain_##SUF(T* restrict w, const T* restrict g, T* restrict m,               \
                              T* restrict v, int64_t numel, const AdamPGroup* h,               \
                              T ss, T rbc2) {                                                  \
  const T b1 = h->beta1, c1 = 1 - h->beta1, b2 = h->beta2, c2 = 1 - h->beta2;                  \
  const T kb = h->nesterov ? b1 : 1, kg = h->nesterov ? c1 : 0;                                \
  const T eps = h->eps, decay = h->decay_plain, sign = h->sign;                                \
  const int nt = h->nthreads;                                                                  \
  const int64_t blocks = (numel + BLOCK - 1) / BLOCK;                                          \
  FOR_ROWS(b, blocks, numel, {                                                                 \
    const int64_t end = (b + 1) * BLOCK < numel ? (b + 1) * BLOCK : numel;                     \
    _Pragma("omp simd")                                                                        \
    for (int64_t j = b * BLOCK; j < end; ++j) {                                                \
      const T gj = sign * g[j];                                                                \
      const T mj = b1 * m[j] + c1 * gj, vj = b2 * v[j] + c2 * gj * gj;                         \
      m[j] = mj; v[j] = vj;                                                                    \
      const T p = (kb * mj + kg * gj) / (SQRT(vj) * rbc2 + eps);                               \
      w[j] = w[j] * decay - ss * p;                                                            \
    }                                                                                          \
  })                                                                                           \
}                                                                                              \
                                                                                               \
/* Channel view, rows of at most ROW_CACHE: one pass over memory per row. */                   \
static void adamp_rows_##SUF(T* restrict w, const T* restrict g, T* restrict m,                \
                             T* restrict v, int64_t n, int64_t d, const AdamPGroup* h,         \
                             T ss, T rbc2) {                                                   \
  const T b1 = h->beta1, c1 = 1 - h->beta1, b2 = h->beta2, c2 = 1 - h->beta2;                  \
  const T kb = h->nesterov ? b1 : 1, kg = h->nesterov ? c1 : 0;                                \
  const T eps = h->eps, sign = h->sign;                                                        \
  const double decay = h->decay_projected;                                                     \
  const int nt = h->nthreads;                                                                  \
  FOR_ROWS(i, n, n * d, {                                                                      \
    T p[ROW_CACHE];                                                                            \
    T* restrict wi = w + i * d;                                                                \
    const T* restrict gi = g + i * d;                                                          \
    T* restrict mi = m + i * d;                                                                \
    T* restrict vi = v + i * d;                                                                \
    T ww = 0, wp = 0;                                                                          \
    _Pragma("omp simd reduction(+:ww,wp)")                                                     \
    for (int64_t j = 0; j < d; ++j) {                                                          \
      const T gj = sign * gi[j];                                                               \
      const T mj = b1 * mi[j] + c1 * gj, vj = b2 * vi[j] + c2 * gj * gj;                       \
      mi[j] = mj; vi[j] = vj;                                                                  \
      const T pj = (kb * mj + kg * gj) / (SQRT(vj) * rbc2 + eps);                              \
      p[j] = pj; ww += wi[j] * wi[j]; wp += wi[j] * pj;                                        \
    }                                                                                          \
    const T a = (T)(decay + (double)ss * radial_coefficient(wp, ww, h->eps));                  \
    _Pragma("omp simd")                                                                        \
    for (int64_t j = 0; j < d; ++j) wi[j] = wi[j] * a - ss * p[j];                             \
  })                                                                                           \
}                                                                                              \
                                                                                               \
/* Any view in two passes: state and <w_i, p_i>, <w_i, w_i> (dots[2*i]), then the weights. */  \
/* Two passes, any view: state, then the weights. VIEW_AUTO: the test's sums are gathered in   \
   the first pass (from the weights before the step) and the view chosen in between. */        \
static int adamp_two_pass_##SUF(T* restrict w, const T* restrict g, T* restrict m,             \
                                T* restrict v, int64_t n, int64_t d, int view,                 \
                                const AdamPGroup* h, T ss, T rbc2, double* restrict sums) {    \
  const T b1 = h->beta1, c1 = 1 - h->beta1, b2 = h->beta2, c2 = 1 - h->beta2;                  \
  const T kb = h->nesterov ? b1 : 1, kg = h->nesterov ? c1 : 0;                                \
  const T eps = h->eps, sign = h->sign;                                                        \
  const int nt = h->nthreads;                                                                  \
  FOR_ROWS(i, n, n * d, {                                                                      \
    const T* restrict wi = w + i * d;                                                          \
    const T* restrict gi = g + i * d;                                                          \
    T* restrict mi = m + i * d;                                                                \
    T* restrict vi = v + i * d;                                                                \
    T ww = 0, gw = 0, gg = 0, wp = 0;                                                          \
    _Pragma("omp simd reduction(+:ww,gw,gg,wp)")                                               \
    for (int64_t j = 0; j < d; ++j) {                                                          \
      const T gj = sign * gi[j];                                                               \
      const T mj = b1 * mi[j] + c1 * gj, vj = b2 * vi[j] + c2 * gj * gj;                       \
      mi[j] = mj; vi[j] = vj;                                                                  \
      const T pj = (kb * mj + kg * gj) / (SQRT(vj) * rbc2 + eps);                              \
      ww += wi[j] * wi[j]; gw += gj * wi[j]; gg += gj * gj; wp += wi[j] * pj;                  \
    }                                                                                          \
    sums[4 * i] = ww; sums[4 * i + 1] = gw; sums[4 * i + 2] = gg; sums[4 * i + 3] = wp;        \
  })                                                                                           \
  double layer_s;                                                                              \
  view = two_pass_view(sums, n, d, view, h->delta, h->eps, &layer_s);                          \
  FOR_ROWS(i, n, n * d, {                                                                      \
    const double s = two_pass_coefficient(sums, i, view, layer_s, h->eps);                     \
    const double decay = view == VIEW_NONE ? h->decay_plain : h->decay_projected;              \
    const T a = (T)(decay + (double)ss * s);                                                   \
    T* restrict wi = w + i * d;                                                                \
    const T* restrict gi = g + i * d;                                                          \
    const T* restrict mi = m + i * d;                                                          \
    const T* restrict vi = v + i * d;                                                          \
    _Pragma("omp simd")                                                                        \
    for (int64_t j = 0; j < d; ++j) {                                                          \
      const T num = kb * mi[j] + kg * sign * gi[j];                                            \
      wi[j] = wi[j] * a - ss * (num / (SQRT(vi[j]) * rbc2 + eps));                             \
    }                                                                                          \
  })                                                                                           \
  return view;                                                                                 \
}                                                                                              \
                                                                                               \
/* The view of one tensor when its mode fixes it or the test runs first; VIEW_AUTO when the    \
   test is left to the two-pass body. */                                                       \
static int first_view_##SUF(int32_t mode, const T* w, const T* g, int64_t n, int64_t d, int nt, \
                            double delta, double eps, double* scratch) {                       \
  if (mode == MODE_CHANNEL) return VIEW_CHANNEL;                                               \
  if (mode == MODE_LAYER) return VIEW_LAYER;                                                   \
  if (mode == MODE_PLAIN) return VIEW_NONE;                                                    \
  if (mode == MODE_AUTO_TWO_PASS || d > ROW_CACHE) return VIEW_AUTO;                           \
  cosine_stats_##SUF(w, g, n, d, nt, scratch);                                                 \
  return choose_view(scratch, 3, n, d, delta, eps);                                            \
}                                                                                              \
                                                                                               \
void scaleinv_adamp_##SUF(int64_t k, T** W, T** G, T** M, T** V, float** S,                    \
                          const int64_t* N, const int64_t* D, const int32_t* mode,             \
                          const AdamPGroup* h, double* scratch, int8_t* views) {               \
  for (int64_t t = 0; t < k; ++t) {                                                            \
    const int64_t n = N[t], d = D[t];                                                          \
    const float step = *S[t] + 1.0f;                                                           \
    *S[t] = step;                                                                              \
    const T ss = h->lr / (1 - pow(h->beta1, step));                                            \
    const T rb = 1 / sqrt(1 - pow(h->beta2, step));                                            \
    int view = first_view_##SUF(mode[t], W[t], G[t], n, d, h->nthreads, h->delta, h->eps,      \
                                scratch);                                                      \
    if (view == VIEW_NONE) adamp_plain_##SUF(W[t], G[t], M[t], V[t], n * d, h, ss, rb);        \
    else if (view == VIEW_CHANNEL && d <= ROW_CACHE)                                           \
      adamp_rows_##SUF(W[t], G[t], M[t], V[t], n, d, h, ss, rb);                               \
    else view = adamp_two_pass_##SUF(W[t], G[t], M[t], V[t], n, d, view, h, ss, rb, scratch);  \
    views[t] = (int8_t)view;                                                                   \
  }                                                                                            \
}                                                                                              \
                                                                                               \
/* ---- SGDP: b = mu b + (1-dampening) g; p = g + mu b (nesterov) or b -------------------- */ \
                                                                                               \
static void sgdp_plain_##SUF(T* restrict w, const T* restrict g, T* restrict b,                \
                             int64_t numel, const SGDPGroup* h) {                              \
  const T kb = h->nesterov ? h->momentum : 1, kg = h->nesterov ? 1 : 0;                        \
  const T mu = h->momentum, cg = 1 - h->dampening, lr = h->lr;                                 \
  const T decay = h->decay_plain, sign = h->sign;                                              \
  const int nt = h->nthreads;                                                                  \
  const int64_t blocks = (numel + BLOCK - 1) / BLOCK;                                          \
  FOR_ROWS(blk, blocks, numel, {                                                               \
    const int64_t end = (blk + 1) * BLOCK < numel ? (blk + 1) * BLOCK : numel;                 \
    _Pragma("omp simd")                                                                        \
    for (int64_t j = blk * BLOCK; j < end; ++j) {                                              \
      const T gj = sign * g[j];                                                                \
      const T bj = mu * b[j] + cg * gj;                                                        \
      b[j] = bj;                                                                               \
      w[j] = w[j] * decay - lr * (kg * gj + kb * bj);                                          \
    }                                                                                          \
  })                                                                                           \
}                                                                                              \
                                                                                               \
/* w_i <- a w_i - lr (p_i, projected by ts when the buffer is: b_i <- b_i - ts w_i). */        \
static inline void sgdp_write_row_##SUF(T* restrict wi, const T* restrict gi,                  \
                                        T* restrict bi, int64_t d, T a, T ts, T lr, T kg,      \
                                        T kb, T sign, int project_buffer) {                    \
  if (project_buffer) {  /* never with nesterov: p is the buffer itself */                     \
    _Pragma("omp simd")                                                                        \
    for (int64_t j = 0; j < d; ++j) {                                                          \
      const T pj = bi[j];                                                                      \
      bi[j] = pj - wi[j] * ts;                                                                 \
      wi[j] = wi[j] * a - lr * pj;                                                             \
    }                                                                                          \
  } else {                                                                                     \
    _Pragma("omp simd")                                                                        \
    for (int64_t j = 0; j < d; ++j) wi[j] = wi[j] * a - lr * (kg * sign * gi[j] + kb * bi[j]); \
  }                                                                                            \
}                                                                                              \
                                                                                               \
static void sgdp_rows_##SUF(T* restrict w, const T* restrict g, T* restrict b, int64_t n,      \
                            int64_t d, const SGDPGroup* h) {                                   \
  /* No row buffer: p is rebuilt from the row of g and b, both still in cache. */              \
  const T kb = h->nesterov ? h->momentum : 1, kg = h->nesterov ? 1 : 0;                        \
  const T mu = h->momentum, cg = 1 - h->dampening, lr = h->lr, sign = h->sign;                 \
  const int project_buffer = h->project_buffer, nt = h->nthreads;                              \
  FOR_ROWS(i, n, n * d, {                                                                      \
    T* restrict wi = w + i * d;                                                                \
    const T* restrict gi = g + i * d;                                                          \
    T* restrict bi = b + i * d;                                                                \
    T ww = 0, wp = 0;                                                                          \
    _Pragma("omp simd reduction(+:ww,wp)")                                                     \
    for (int64_t j = 0; j < d; ++j) {                                                          \
      const T gj = sign * gi[j];                                                               \
      const T bj = mu * bi[j] + cg * gj;                                                       \
      bi[j] = bj;                                                                              \
      ww += wi[j] * wi[j]; wp += wi[j] * (kg * gj + kb * bj);                                  \
    }                                                                                          \
    const double s = radial_coefficient(wp, ww, h->eps);                                       \
    const T a = (T)(h->decay_projected + h->lr * s), ts = (T)s;                                \
    sgdp_write_row_##SUF(wi, gi, bi, d, a, ts, lr, kg, kb, sign, project_buffer);              \
  })                                                                                           \
}                                                                                              \
                                                                                               \
static int sgdp_two_pass_##SUF(T* restrict w, const T* restrict g, T* restrict b, int64_t n,   \
                               int64_t d, int view, const SGDPGroup* h, double* restrict sums) { \
  const T kb = h->nesterov ? h->momentum : 1, kg = h->nesterov ? 1 : 0;                        \
  const T mu = h->momentum, cg = 1 - h->dampening, lr = h->lr, sign = h->sign;                 \
  const int project_buffer = h->project_buffer, nt = h->nthreads;                              \
  FOR_ROWS(i, n, n * d, {                                                                      \
    const T* restrict wi = w + i * d;                                                          \
    const T* restrict gi = g + i * d;                                                          \
    T* restrict bi = b + i * d;                                                                \
    T ww = 0, gw = 0, gg = 0, wp = 0;                                                          \
    _Pragma("omp simd reduction(+:ww,gw,gg,wp)")                                               \
    for (int64_t j = 0; j < d; ++j) {                                                          \
      const T gj = sign * gi[j];                                                               \
      const T bj = mu * bi[j] + cg * gj;                                                       \
      bi[j] = bj;                                                                              \
      ww += wi[j] * wi[j]; gw += gj * wi[j]; gg += gj * gj; wp += wi[j] * (kg * gj + kb * bj); \
    }                                                                                          \
    sums[4 * i] = ww; sums[4 * i + 1] = gw; sums[4 * i + 2] = gg; sums[4 * i + 3] = wp;        \
  })                                                                                           \
  double layer_s;                                                                              \
  view = two_pass_view(sums, n, d, view, h->delta, h->eps, &layer_s);                          \
  FOR_ROWS(i, n, n * d, {                                                                      \
    const double s = two_pass_coefficient(sums, i, view, layer_s, h->eps);                     \
    const double decay = view == VIEW_NONE ? h->decay_plain : h->decay_projected;              \
    const T a = (T)(decay + h->lr * s), ts = (T)s;                                             \
    T* restrict wi = w + i * d;                                                                \
    const T* restrict gi = g + i * d;                                                          \
    T* restrict bi = b + i * d;                                                                \
    sgdp_write_row_##SUF(wi, gi, bi, d, a, ts, lr, kg, kb, sign, project_buffer);              \
  })                                                                                           \
  return view;                                                                                 \
}                                                                                              \
                                                                                               \
void scaleinv_sgdp_##SUF(int64_t k, T** W, T** G, T** B, const int64_t* N, const int64_t* D,   \
                         const int32_t* mode, const SGDPGroup* h, double* scratch,             \
                         int8_t* views) {                                                      \
  for (int64_t t = 0; t < k; ++t) {                                                            \
    const int64_t n = N[t], d = D[t];                                                          \
    int view = first_view_##SUF(mode[t], W[t], G[t], n, d, h->nthreads, h->delta, h->eps,      \
                                scratch);                                                      \
    if (view == VIEW_NONE) sgdp_plain_##SUF(W[t], G[t], B[t], n * d, h);                       \
    else if (view == VIEW_CHANNEL && d <= ROW_CACHE) sgdp_rows_##SUF(W[t], G[t], B[t], n, d, h); \
    else view = sgdp_two_pass_##SUF(W[t], G[t], B[t], n, d, view, h, scratch);                 \
    views[t] = (int8_t)view;                                                                   \
  }                                                                                            \
}

DEFINE_KERNELS(float, f32, sqrtf)
DEFINE_KERNELS(double, f64, sqrt)
"""

_FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fPIC", "-shared", "-std=c99")
# Tried in order: OpenMP threads; SIMD pragmas only (macOS clang has no -fopenmp); neither.
_FLAG_CHOICES = ((*_FLAGS, "-fopenmp"), (*_FLAGS, "-fopenmp-simd"), _FLAGS)

MODE_PLAIN, MODE_AUTO, MODE_CHANNEL, MODE_LAYER, MODE_AUTO_TWO_PASS = 0, 1, 2, 3, 4
VIEW_NAMES = (None, "channel", "layer")
DTYPE_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}


class _AdamPGroup(ctypes.Structure):
    _fields_ = [(name, ctypes.c_double) for name in (
        "lr", "beta1", "beta2", "eps", "decay_plain", "decay_projected", "delta", "sign")
    ] + [("nesterov", ctypes.c_int32), ("nthreads", ctypes.c_int32)]


class _SGDPGroup(ctypes.Structure):
    _fields_ = [(name, ctypes.c_double) for name in (
        "lr", "momentum", "dampening", "eps", "decay_plain", "decay_projected", "delta", "sign")
    ] + [("nesterov", ctypes.c_int32), ("project_buffer", ctypes.c_int32),
         ("nthreads", ctypes.c_int32)]


def cache_dir() -> Path:
    """Where built kernels live: ``$SCALEINV_CACHE_DIR`` or ``~/.cache/scaleinv``."""
    configured = os.environ.get("SCALEINV_CACHE_DIR")
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "scaleinv"


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc") or shutil.which("clang")


def _build(compiler: str, flags: tuple[str, ...], target: Path) -> bool:
    """Compile the kernels into ``target``; ``False`` if the compiler or the disk refuses."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            source = Path(tmp) / "scaleinv_fused.c"
            source.write_text(_C_SOURCE)
            built = Path(tmp) / target.name
            result = subprocess.run(
                [compiler, *flags, str(source), "-o", str(built), "-lm"],
                capture_output=True, text=True, check=False,
            )
            if result.returncode != 0:
                return False
            os.replace(built, target)  # atomic: concurrent builders leave one complete file
    except OSError:
        return False
    return True


_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_load_failed = False


def load() -> ctypes.CDLL | None:
    """The kernel library, built on first use; ``None`` where no C compiler can build it."""
    global _library, _load_failed
    if _library is not None or _load_failed:
        return _library
    with _lock:
        if _library is not None or _load_failed:
            return _library
        compiler = _compiler()
        if compiler is None:
            _load_failed = True
            warnings.warn("scaleinv fused CPU kernels need a C compiler (set $CC); "
                          "falling back to the multi-tensor body", RuntimeWarning, stacklevel=3)
            return None
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True,
                                 check=False).stdout
        # A read-only home directory falls back to the temporary directory.
        directories = (cache_dir(), Path(tempfile.gettempdir()) / "scaleinv")
        for flags in _FLAG_CHOICES:
            key = hashlib.sha256("\0".join(
                [_C_SOURCE, compiler, version, platform.machine(), platform.node(), *flags]
            ).encode()).hexdigest()[:20]
            for directory in directories:
                target = directory / f"fused_{key}.so"
                if target.exists() or _build(compiler, flags, target):
                    _library = _declare(ctypes.CDLL(str(target)))
                    return _library
        _load_failed = True
        warnings.warn(f"scaleinv could not build its fused CPU kernels with {compiler}; "
                      "falling back to the multi-tensor body", RuntimeWarning, stacklevel=3)
        return None


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    for suffix in DTYPE_SUFFIX.values():
        getattr(lib, f"scaleinv_adamp_{suffix}").argtypes = [
            i64, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ctypes.POINTER(_AdamPGroup), ptr, ptr]
        getattr(lib, f"scaleinv_sgdp_{suffix}").argtypes = [
            i64, ptr, ptr, ptr, ptr, ptr, ptr, ctypes.POINTER(_SGDPGroup), ptr, ptr]
    return lib


def _pointers(tensors: list[Tensor]) -> ctypes.Array:
    return (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])


def _run(kernel: str, tensors: list[list[Tensor]], modes: list[int],
         group: ctypes.Structure) -> list[str | None]:
    """Call ``kernel`` on ``tensors`` (lists whose first is the params; the last may be the
    float32 step counters); returns the view each param was projected on."""
    lib = load()
    if lib is None:
        raise RuntimeError("the fused CPU kernels are not available (no working C compiler)")
    params = tensors[0]
    count = len(params)
    rows = [p.shape[0] if p.dim() >= 2 else 1 for p in params]
    lengths = [p.numel() // n for p, n in zip(params, rows, strict=True)]
    scratch = (ctypes.c_double * (4 * max(rows)))()
    views = (ctypes.c_int8 * count)()
    function = getattr(lib, f"{kernel}_{DTYPE_SUFFIX[params[0].dtype]}")
    function(count, *[_pointers(ts) for ts in tensors], (ctypes.c_int64 * count)(*rows),
             (ctypes.c_int64 * count)(*lengths), (ctypes.c_int32 * count)(*modes),
             ctypes.byref(group), scratch, views)
    return [VIEW_NAMES[v] for v in views]


def adamp_step(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor], steps: list[Tensor], modes: list[int], *, lr: float,
    beta1: float, beta2: float, eps: float, decay_plain: float, decay_projected: float,
    delta: float, nesterov: bool, maximize: bool,
) -> list[str | None]:
    """One AdamP step in place; returns the view each tensor was projected on.

    All tensors: CPU, one dtype (float32 or float64), rows (output channels) that are
    contiguous blocks of memory, laid out like their param; ``steps``: float32 0-dim
    counters, incremented here. ``modes``: :data:`MODE_PLAIN` (never project),
    :data:`MODE_AUTO` (cosine test), :data:`MODE_CHANNEL` or :data:`MODE_LAYER` per tensor.
    Per tensor, after ``t += 1`` and the moment updates::

        p = m / (sqrt(v) / sqrt(1 - beta2^t) + eps)      (nesterov: beta1 m + (1 - beta1) g)
        w <- w (decay + lr s / (1 - beta1^t)) - lr / (1 - beta1^t) p

    with ``s`` the radial coefficient of the chosen view, ``decay = decay_projected``; no
    view: ``s = 0``, ``decay = decay_plain``.
    """
    group = _AdamPGroup(lr, beta1, beta2, eps, decay_plain, decay_projected, delta,
                        -1.0 if maximize else 1.0, int(nesterov), torch.get_num_threads())
    return _run("scaleinv_adamp", [params, grads, exp_avgs, exp_avg_sqs, steps], modes, group)


def sgdp_step(
    params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor], modes: list[int],
    *, lr: float, momentum: float, dampening: float, eps: float, decay_plain: float,
    decay_projected: float, delta: float, nesterov: bool, project_buffer: bool,
    maximize: bool,
) -> list[str | None]:
    """One SGDP step in place (tensors and ``modes`` as in :func:`adamp_step`)::

        b <- momentum b + (1 - dampening) g ;  p = g + momentum b (nesterov) or b
        w <- w (decay + lr s) - lr p           (project_buffer: b <- p - w s too)
    """
    group = _SGDPGroup(lr, momentum, dampening, eps, decay_plain, decay_projected, delta,
                       -1.0 if maximize else 1.0, int(nesterov), int(project_buffer),
                       torch.get_num_threads())
    return _run("scaleinv_sgdp", [params, grads, momentum_buffers], modes, group)
