/* One precision of the fused sense loss; sense_loss.c includes this file once per REAL type.
 *
 * Expects REAL (float or double), NAME (the exported function), EXP and LOG (the matching libm
 * functions). See sense_loss.c for the arguments and fused_loss.py for the Python side.
 */

static REAL CAT(dot_, NAME)(const REAL *a, const REAL *b, int64_t n) {
    REAL s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
    return s;
}

/* out[k] = h . c[k] for k < count, four senses per pass over h: one accumulator per sense keeps
 * four independent FMA chains in flight (a single dot product waits on its own adds). */
static void CAT(dots_, NAME)(const REAL *h, const REAL *c, int64_t count, int64_t width, int64_t depth, REAL *out) {
    int64_t k = 0;
    for (; k + 4 <= count; k += 4) {
        const REAL *c0 = c + k * depth, *c1 = c0 + depth, *c2 = c1 + depth, *c3 = c2 + depth;
        REAL s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
        for (int64_t i = 0; i < width; ++i) {
            s0 += h[i] * c0[i];
            s1 += h[i] * c1[i];
            s2 += h[i] * c2[i];
            s3 += h[i] * c3[i];
        }
        out[k] = s0, out[k + 1] = s1, out[k + 2] = s2, out[k + 3] = s3;
    }
    for (; k < count; ++k) out[k] = CAT(dot_, NAME)(h, c + k * depth, width);
}

/* dq[i] = sum_k w[k] * c[k][i], four senses per pass over dq. */
static void CAT(combine_, NAME)(const REAL *w, const REAL *c, int64_t count, int64_t width, int64_t depth, REAL *dq) {
    memset(dq, 0, sizeof(REAL) * (size_t)width);
    int64_t k = 0;
    for (; k + 4 <= count; k += 4) {
        const REAL *c0 = c + k * depth, *c1 = c0 + depth, *c2 = c1 + depth, *c3 = c2 + depth;
        const REAL w0 = w[k], w1 = w[k + 1], w2 = w[k + 2], w3 = w[k + 3];
#pragma omp simd
        for (int64_t i = 0; i < width; ++i) dq[i] += w0 * c0[i] + w1 * c1[i] + w2 * c2[i] + w3 * c3[i];
    }
    for (; k < count; ++k) {
        const REAL *ck = c + k * depth;
        const REAL wk = w[k];
#pragma omp simd
        for (int64_t i = 0; i < width; ++i) dq[i] += wk * ck[i];
    }
}

int64_t NAME(const REAL *states, int64_t positions, int64_t width, const int64_t *ids, const int64_t *targets,
             const REAL *centres, int64_t k_max, int64_t depth, const uint8_t *mask, const int64_t *token_to_row,
             int64_t vocab, const int64_t *soft_ids, const REAL *soft_probs, int64_t soft_k, double temperature,
             int similarity, double loss_scale, REAL *grad, REAL *loss, int64_t *counts) {
    /* Count the labelled positions first, so the loss and the gradients come out already divided by n. */
    int64_t labelled = 0;
    for (int64_t pos = 0; pos < positions; ++pos) {
        const int64_t id = ids[pos];
        labelled += targets[pos] >= 0 && id >= 0 && id < vocab && token_to_row[id] >= 0;
    }
    const double mean_scale = loss_scale / (double)(labelled > 0 ? labelled : 1);
    const REAL inv_t = (REAL)(1.0 / temperature), grad_scale = (REAL)(mean_scale / temperature);
    double total = 0;
    int64_t n = 0, top1 = 0, top5 = 0, status = 0;

    /* Positions split over torch's OpenMP threads (the same libgomp: torch bundles libgomp.so.1,
     * which this library's soname resolves to once torch is loaded), so no second thread pool. */
#pragma omp parallel reduction(+ : total, n, top1, top5) if (positions >= PARALLEL_MIN_POSITIONS)
    {
    /* Scratch for one position: logits, their gradient, the soft target, the queries' gradient. */
    REAL *logits = malloc(sizeof(REAL) * (size_t)(3 * k_max + depth));
    REAL *dlogits = logits + k_max, *p = dlogits + k_max, *dq = p + k_max;
    int64_t error = logits ? 0 : ERR_MEMORY;

#pragma omp for schedule(static)
    for (int64_t pos = 0; pos < positions; ++pos) {
        const REAL *h = states + pos * width;
        REAL *g = grad ? grad + pos * width : NULL;
        const int64_t id = ids[pos], target = targets[pos];
        const int64_t row = (id >= 0 && id < vocab) ? token_to_row[id] : -1;
        if (target < 0 || row < 0) { /* not labelled: no loss, no gradient */
            if (g) memset(g, 0, sizeof(REAL) * (size_t)width);
            continue;
        }
        if (error) continue;
        if (target >= k_max) { error = ERR_TARGET - pos; continue; }
        const REAL *c = centres + row * k_max * depth;
        const uint8_t *m = mask + row * k_max;

        /* cos: the query is h / |h| (senses are unit rows); l2: [h, 1] against [2c, -|c|^2]. */
        REAL norm = 0, scale = 1;
        if (similarity == SIM_COS) {
            norm = (REAL)sqrt((double)CAT(dot_, NAME)(h, h, width));
            scale = 1 / (norm > (REAL)1e-12 ? norm : (REAL)1e-12);
        }
        /* Senses past the last unmasked one are padding: not read at all. */
        int64_t used = k_max;
        while (used > 0 && !m[used - 1]) --used;
        CAT(dots_, NAME)(h, c, used, width, depth, logits);
        REAL top = -INFINITY;
        for (int64_t k = 0; k < k_max; ++k) {
            REAL v = -INFINITY;
            if (k < used && m[k]) {
                v = scale * logits[k];
                if (similarity == SIM_L2) v += c[k * depth + width];
                v *= inv_t;
            }
            logits[k] = v;
            if (v > top) top = v;
        }
        REAL sum = 0;
        for (int64_t k = 0; k < k_max; ++k) sum += EXP(logits[k] - top);
        const REAL lse = top + LOG(sum);

        if (soft_ids) { /* KL(p || q) against the renormalised top-k teacher distribution */
            const int64_t *si = soft_ids + pos * soft_k;
            const REAL *sp = soft_probs + pos * soft_k;
            REAL mass = 0, p_sum = 0;
            for (int64_t j = 0; j < soft_k; ++j) mass += si[j] >= 0 ? sp[j] : 0;
            mass = mass > (REAL)1e-12 ? mass : (REAL)1e-12;
            memset(p, 0, sizeof(REAL) * (size_t)k_max);
            for (int64_t j = 0; j < soft_k && !error; ++j) {
                if (si[j] >= k_max) error = ERR_SOFT_ID - pos;
                else if (si[j] >= 0) p[si[j]] += sp[j] / mass;
            }
            if (error) continue;
            for (int64_t k = 0; k < k_max; ++k) p_sum += p[k];
            for (int64_t k = 0; k < k_max; ++k) {
                const REAL log_q = logits[k] - lse;
                if (p[k] > 0) total += (double)(p[k] * (LOG(p[k] > (REAL)1e-12 ? p[k] : (REAL)1e-12) - log_q));
                dlogits[k] = EXP(log_q) * p_sum - p[k];
            }
        } else { /* cross-entropy against the teacher's sense */
            total += (double)(lse - logits[target]);
            for (int64_t k = 0; k < k_max; ++k) dlogits[k] = EXP(logits[k] - lse);
            dlogits[target] -= 1;
        }

        /* Agreement: how many senses score above the target (ties count for it). */
        int64_t above = 0;
        for (int64_t k = 0; k < k_max; ++k) above += logits[k] > logits[target];
        top1 += above == 0;
        top5 += above < TOP_K;
        ++n;

        if (!g) continue;
        /* d loss / d query = sum_k dlogit_k / T * c_k, then through the query transform. */
        for (int64_t k = 0; k < used; ++k) dlogits[k] *= grad_scale;
        CAT(combine_, NAME)(dlogits, c, used, width, depth, dq);
        if (similarity == SIM_COS && norm > (REAL)1e-12) {
            /* d(h/|h|)/dh: remove the radial part, divide by |h|. */
            const REAL radial = CAT(dot_, NAME)(h, dq, width) * scale;
#pragma omp simd
            for (int64_t i = 0; i < width; ++i) g[i] = (dq[i] - h[i] * scale * radial) * scale;
        } else {
#pragma omp simd
            for (int64_t i = 0; i < width; ++i) g[i] = dq[i] * scale;
        }
    }
    free(logits);
    if (error) {
#pragma omp critical
        if (!status) status = error;
    }
    }
    *loss = (REAL)(total * mean_scale);
    counts[0] = n;
    counts[1] = top1;
    counts[2] = top5;
    return status;
}
