/* The bodies of the fused CPU kernels, written once for one element type.

   fused_cpu.c includes this file once per dtype with T (the element type), SUF (the name
   suffix), SQRT (its square root) and SINGLE (1 for float: the test's comparison in float)
   defined. Row sums are accumulated in double for either type, so rows of large values
   (|g| near 1e30 in float32) do not overflow. */

#define NAME_JOIN(a, b) a##_##b
#define NAME_EXPAND(a, b) NAME_JOIN(a, b)
#define NAME(a) NAME_EXPAND(a, SUF)
#define DOT(a, b) ((double)(a) * (double)(b))
static void NAME(cosine_stats)(const T* restrict w, const T* restrict g, int64_t n,
                               int64_t d, int nt, double* restrict stats) {
  FOR_ROWS(i, n, n * d, {
    const T* restrict wi = w + i * d;
    const T* restrict gi = g + i * d;
    double ww = 0, gw = 0, gg = 0;
    _Pragma("omp simd reduction(+:ww,gw,gg)")
    for (int64_t j = 0; j < d; ++j) {
      ww += DOT(wi[j], wi[j]); gw += DOT(gi[j], wi[j]); gg += DOT(gi[j], gi[j]);
    }
    stats[3 * i] = ww; stats[3 * i + 1] = gw; stats[3 * i + 2] = gg;
  })
}

/* ---- AdamP: m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2; p = m / (sqrt(v) rbc2 + eps) -- */

static void NAME(adamp_plain)(T* restrict w, const T* restrict g, T* restrict m,
                              T* restrict v, int64_t numel, const AdamPGroup* h,
                              T ss, T rbc2) {
  const T b1 = h->beta1, c1 = 1 - h->beta1, b2 = h->beta2, c2 = 1 - h->beta2;
  const T kb = h->nesterov ? b1 : 1, kg = h->nesterov ? c1 : 0;
  const T eps = h->eps, decay = h->decay_plain, sign = h->sign;
  const int nt = h->nthreads;
  const int64_t blocks = (numel + BLOCK - 1) / BLOCK;
  FOR_ROWS(b, blocks, numel, {
    const int64_t end = (b + 1) * BLOCK < numel ? (b + 1) * BLOCK : numel;
    _Pragma("omp simd")
    for (int64_t j = b * BLOCK; j < end; ++j) {
      const T gj = sign * g[j];
      const T mj = b1 * m[j] + c1 * gj, vj = b2 * v[j] + c2 * gj * gj;
      m[j] = mj; v[j] = vj;
      const T p = (kb * mj + kg * gj) / (SQRT(vj) * rbc2 + eps);
      w[j] = w[j] * decay - ss * p;
    }
  })
}

/* Channel view, rows of at most ROW_CACHE: one pass over memory per row. */
static void NAME(adamp_rows)(T* restrict w, const T* restrict g, T* restrict m,
                             T* restrict v, int64_t n, int64_t d, const AdamPGroup* h,
                             T ss, T rbc2) {
  const T b1 = h->beta1, c1 = 1 - h->beta1, b2 = h->beta2, c2 = 1 - h->beta2;
  const T kb = h->nesterov ? b1 : 1, kg = h->nesterov ? c1 : 0;
  const T eps = h->eps, sign = h->sign;
  const double decay = h->decay_projected;
  const int nt = h->nthreads;
  FOR_ROWS(i, n, n * d, {
    T p[ROW_CACHE];
    T* restrict wi = w + i * d;
    const T* restrict gi = g + i * d;
    T* restrict mi = m + i * d;
    T* restrict vi = v + i * d;
    double ww = 0, wp = 0;
    _Pragma("omp simd reduction(+:ww,wp)")
    for (int64_t j = 0; j < d; ++j) {
      const T gj = sign * gi[j];
      const T mj = b1 * mi[j] + c1 * gj, vj = b2 * vi[j] + c2 * gj * gj;
      mi[j] = mj; vi[j] = vj;
      const T pj = (kb * mj + kg * gj) / (SQRT(vj) * rbc2 + eps);
      p[j] = pj; ww += DOT(wi[j], wi[j]); wp += DOT(wi[j], pj);
    }
    const T a = (T)(decay + (double)ss * radial_coefficient(wp, ww, h->eps));
    _Pragma("omp simd")
    for (int64_t j = 0; j < d; ++j) wi[j] = wi[j] * a - ss * p[j];
  })
}

/* Two passes, any view: state, then the weights. VIEW_AUTO: the test's sums are gathered in
   the first pass (from the weights before the step) and the view chosen in between. */
static int NAME(adamp_two_pass)(T* restrict w, const T* restrict g, T* restrict m,
                                T* restrict v, int64_t n, int64_t d, int view,
                                const AdamPGroup* h, T ss, T rbc2, double* restrict sums) {
  const T b1 = h->beta1, c1 = 1 - h->beta1, b2 = h->beta2, c2 = 1 - h->beta2;
  const T kb = h->nesterov ? b1 : 1, kg = h->nesterov ? c1 : 0;
  const T eps = h->eps, sign = h->sign;
  const int nt = h->nthreads;
  FOR_ROWS(i, n, n * d, {
    const T* restrict wi = w + i * d;
    const T* restrict gi = g + i * d;
    T* restrict mi = m + i * d;
    T* restrict vi = v + i * d;
    double ww = 0, gw = 0, gg = 0, wp = 0;
    _Pragma("omp simd reduction(+:ww,gw,gg,wp)")
    for (int64_t j = 0; j < d; ++j) {
      const T gj = sign * gi[j];
      const T mj = b1 * mi[j] + c1 * gj, vj = b2 * vi[j] + c2 * gj * gj;
      mi[j] = mj; vi[j] = vj;
      const T pj = (kb * mj + kg * gj) / (SQRT(vj) * rbc2 + eps);
      ww += DOT(wi[j], wi[j]); gw += DOT(gj, wi[j]); gg += DOT(gj, gj); wp += DOT(wi[j], pj);
    }
    sums[4 * i] = ww; sums[4 * i + 1] = gw; sums[4 * i + 2] = gg; sums[4 * i + 3] = wp;
  })
  double layer_s;
  view = two_pass_view(sums, n, d, view, h->delta, h->eps, SINGLE, &layer_s);
  FOR_ROWS(i, n, n * d, {
    const double s = two_pass_coefficient(sums, i, view, layer_s, h->eps);
    const double decay = view == VIEW_NONE ? h->decay_plain : h->decay_projected;
    const T a = (T)(decay + (double)ss * s);
    T* restrict wi = w + i * d;
    const T* restrict gi = g + i * d;
    const T* restrict mi = m + i * d;
    const T* restrict vi = v + i * d;
    _Pragma("omp simd")
    for (int64_t j = 0; j < d; ++j) {
      const T num = kb * mi[j] + kg * sign * gi[j];
      wi[j] = wi[j] * a - ss * (num / (SQRT(vi[j]) * rbc2 + eps));
    }
  })
  return view;
}

/* The view of one tensor when its mode fixes it or the test runs first; VIEW_AUTO when the
   test is left to the two-pass body. */
static int NAME(first_view)(int32_t mode, const T* w, const T* g, int64_t n, int64_t d, int nt,
                            double delta, double eps, double* scratch) {
  if (mode == MODE_CHANNEL) return VIEW_CHANNEL;
  if (mode == MODE_LAYER) return VIEW_LAYER;
  if (mode == MODE_PLAIN) return VIEW_NONE;
  if (mode == MODE_AUTO_TWO_PASS || d > ROW_CACHE) return VIEW_AUTO;
  NAME(cosine_stats)(w, g, n, d, nt, scratch);
  return choose_view(scratch, 3, n, d, delta, eps, SINGLE);
}

void NAME(scaleinv_adamp)(int64_t k, T** W, T** G, T** M, T** V, float** S,
                          const int64_t* N, const int64_t* D, const int32_t* mode,
                          const AdamPGroup* h, double* scratch, int8_t* views) {
  for (int64_t t = 0; t < k; ++t) {
    const int64_t n = N[t], d = D[t];
    const float step = *S[t] + 1.0f;
    *S[t] = step;
    const T ss = h->lr / (1 - pow(h->beta1, step));
    const T rb = 1 / sqrt(1 - pow(h->beta2, step));
    int view = NAME(first_view)(mode[t], W[t], G[t], n, d, h->nthreads, h->delta, h->eps,
                                scratch);
    if (view == VIEW_NONE) NAME(adamp_plain)(W[t], G[t], M[t], V[t], n * d, h, ss, rb);
    else if (view == VIEW_CHANNEL && d <= ROW_CACHE)
      NAME(adamp_rows)(W[t], G[t], M[t], V[t], n, d, h, ss, rb);
    else view = NAME(adamp_two_pass)(W[t], G[t], M[t], V[t], n, d, view, h, ss, rb, scratch);
    views[t] = (int8_t)view;
  }
}

/* ---- SGDP: b = mu b + (1-dampening) g; p = g + mu b (nesterov) or b -------------------- */

static void NAME(sgdp_plain)(T* restrict w, const T* restrict g, T* restrict b,
                             int64_t numel, const SGDPGroup* h) {
  const T kb = h->nesterov ? h->momentum : 1, kg = h->nesterov ? 1 : 0;
  const T mu = h->momentum, cg = 1 - h->dampening, lr = h->lr;
  const T decay = h->decay_plain, sign = h->sign;
  const int nt = h->nthreads;
  const int64_t blocks = (numel + BLOCK - 1) / BLOCK;
  FOR_ROWS(blk, blocks, numel, {
    const int64_t end = (blk + 1) * BLOCK < numel ? (blk + 1) * BLOCK : numel;
    _Pragma("omp simd")
    for (int64_t j = blk * BLOCK; j < end; ++j) {
      const T gj = sign * g[j];
      const T bj = mu * b[j] + cg * gj;
      b[j] = bj;
      w[j] = w[j] * decay - lr * (kg * gj + kb * bj);
    }
  })
}

/* w_i <- a w_i - lr (p_i, projected by ts when the buffer is: b_i <- b_i - ts w_i). */
static inline void NAME(sgdp_write_row)(T* restrict wi, const T* restrict gi,
                                        T* restrict bi, int64_t d, T a, T ts, T lr, T kg,
                                        T kb, T sign, int project_buffer) {
  if (project_buffer) {  /* never with nesterov: p is the buffer itself */
    _Pragma("omp simd")
    for (int64_t j = 0; j < d; ++j) {
      const T pj = bi[j];
      bi[j] = pj - wi[j] * ts;
      wi[j] = wi[j] * a - lr * pj;
    }
  } else {
    _Pragma("omp simd")
    for (int64_t j = 0; j < d; ++j) wi[j] = wi[j] * a - lr * (kg * sign * gi[j] + kb * bi[j]);
  }
}

static void NAME(sgdp_rows)(T* restrict w, const T* restrict g, T* restrict b, int64_t n,
                            int64_t d, const SGDPGroup* h) {
  /* No row buffer: p is rebuilt from the row of g and b, both still in cache. */
  const T kb = h->nesterov ? h->momentum : 1, kg = h->nesterov ? 1 : 0;
  const T mu = h->momentum, cg = 1 - h->dampening, lr = h->lr, sign = h->sign;
  const int project_buffer = h->project_buffer, nt = h->nthreads;
  FOR_ROWS(i, n, n * d, {
    T* restrict wi = w + i * d;
    const T* restrict gi = g + i * d;
    T* restrict bi = b + i * d;
    double ww = 0, wp = 0;
    _Pragma("omp simd reduction(+:ww,wp)")
    for (int64_t j = 0; j < d; ++j) {
      const T gj = sign * gi[j];
      const T bj = mu * bi[j] + cg * gj;
      bi[j] = bj;
      ww += DOT(wi[j], wi[j]); wp += DOT(wi[j], kg * gj + kb * bj);
    }
    const double s = radial_coefficient(wp, ww, h->eps);
    const T a = (T)(h->decay_projected + h->lr * s), ts = (T)s;
    NAME(sgdp_write_row)(wi, gi, bi, d, a, ts, lr, kg, kb, sign, project_buffer);
  })
}

static int NAME(sgdp_two_pass)(T* restrict w, const T* restrict g, T* restrict b, int64_t n,
                               int64_t d, int view, const SGDPGroup* h, double* restrict sums) {
  const T kb = h->nesterov ? h->momentum : 1, kg = h->nesterov ? 1 : 0;
  const T mu = h->momentum, cg = 1 - h->dampening, lr = h->lr, sign = h->sign;
  const int project_buffer = h->project_buffer, nt = h->nthreads;
  FOR_ROWS(i, n, n * d, {
    const T* restrict wi = w + i * d;
    const T* restrict gi = g + i * d;
    T* restrict bi = b + i * d;
    double ww = 0, gw = 0, gg = 0, wp = 0;
    _Pragma("omp simd reduction(+:ww,gw,gg,wp)")
    for (int64_t j = 0; j < d; ++j) {
      const T gj = sign * gi[j];
      const T bj = mu * bi[j] + cg * gj;
      bi[j] = bj;
      ww += DOT(wi[j], wi[j]); gw += DOT(gj, wi[j]); gg += DOT(gj, gj);
      wp += DOT(wi[j], kg * gj + kb * bj);
    }
    sums[4 * i] = ww; sums[4 * i + 1] = gw; sums[4 * i + 2] = gg; sums[4 * i + 3] = wp;
  })
  double layer_s;
  view = two_pass_view(sums, n, d, view, h->delta, h->eps, SINGLE, &layer_s);
  FOR_ROWS(i, n, n * d, {
    const double s = two_pass_coefficient(sums, i, view, layer_s, h->eps);
    const double decay = view == VIEW_NONE ? h->decay_plain : h->decay_projected;
    const T a = (T)(decay + h->lr * s), ts = (T)s;
    T* restrict wi = w + i * d;
    const T* restrict gi = g + i * d;
    T* restrict bi = b + i * d;
    NAME(sgdp_write_row)(wi, gi, bi, d, a, ts, lr, kg, kb, sign, project_buffer);
  })
  return view;
}

void NAME(scaleinv_sgdp)(int64_t k, T** W, T** G, T** B, const int64_t* N, const int64_t* D,
                         const int32_t* mode, const SGDPGroup* h, double* scratch,
                         int8_t* views) {
  for (int64_t t = 0; t < k; ++t) {
    const int64_t n = N[t], d = D[t];
    int view = NAME(first_view)(mode[t], W[t], G[t], n, d, h->nthreads, h->delta, h->eps,
                                scratch);
    if (view == VIEW_NONE) NAME(sgdp_plain)(W[t], G[t], B[t], n * d, h);
    else if (view == VIEW_CHANNEL && d <= ROW_CACHE) NAME(sgdp_rows)(W[t], G[t], B[t], n, d, h);
    else view = NAME(sgdp_two_pass)(W[t], G[t], B[t], n, d, view, h, scratch);
    views[t] = (int8_t)view;
  }
}

#undef NAME_JOIN
#undef NAME_EXPAND
#undef NAME
#undef DOT
