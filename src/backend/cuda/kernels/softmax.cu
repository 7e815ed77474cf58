// The router: row-wise softmax of its logits (rows, cols), one warp per row (cols = experts:
// small), and its backward. Router logits, probabilities and their gradients are f32 in both
// variants.

extern "C" __global__ void softmax_rows_fwd(float* out, const float* logits, int rows, int cols) {
    int row = blockIdx.x * (blockDim.x / WARP) + threadIdx.x / WARP, lane = threadIdx.x % WARP;
    if (row >= rows) return;
    const float* z = logits + (size_t)row * cols;
    float m = -INFINITY;
    for (int j = lane; j < cols; j += WARP) m = fmaxf(m, z[j]);
    m = warp_max(m);
    float sum = 0.0f;
    for (int j = lane; j < cols; j += WARP) sum += expf(z[j] - m);
    float inv = 1.0f / warp_sum(sum);
    for (int j = lane; j < cols; j += WARP) out[(size_t)row * cols + j] = expf(z[j] - m) * inv;
}

// The router's backward through its softmax (Backend::router_bwd), one thread per token t (experts
// are few), in the CPU backend's order of operations (src/backend/cpu/router.rs): dP, then
// through the softmax, then the z-loss. dgate holds the first `ran` slots' gradients: later slots
// were dropped by the experts' capacity (gate gradient 0). dlogits is activation storage (the GEMMs it feeds read
// it), so dP is formed twice per expert in f32 (for ⟨dP, P⟩, then for the output) instead of in
// the output row: each sum in the CPU's order, so the f32 values are the CPU's. Token t's slots
// are slots[offsets[t]..offsets[t+1]], ascending; aux holds E load-balance then E P-Penalty
// gradients. Grid-stride over tokens.
extern "C" __global__ void router_bwd(act_t* dlogits, const float* dgate, const float* probs, const float* logits,
                                      const unsigned* offsets, const unsigned* slots, const unsigned* slot_expert,
                                      const float* gate, const float* aux, float entropy, float z_loss, int n, int e,
                                      unsigned ran) {
    const float nf = (float)n;
    auto dg = [&](unsigned s) { return s < ran ? dgate[s] : 0.0f; };
    for (size_t t = blockIdx.x * (size_t)blockDim.x + threadIdx.x; t < (size_t)n; t += (size_t)gridDim.x * blockDim.x) {
        const float* p = probs + t * e;
        const float* z = logits + t * e;
        // g_i = P_i / S over the token's experts: dP_i = (dg_i − Σ_j dg_j g_j) / S.
        const unsigned a = offsets[t], b = offsets[t + 1];
        float sum = 0.0f, dot = 0.0f;
        for (unsigned k = a; k < b; k++) sum += p[slot_expert[slots[k]]];
        for (unsigned k = a; k < b; k++) dot += dg(slots[k]) * gate[slots[k]];
        // lse = z_j − ln P_j at the most probable expert.
        float lse = 0.0f;
        if (entropy > 0.0f || z_loss > 0.0f) {
            int j = 0;
            for (int i = 1; i < e; i++) j = p[i] > p[j] ? i : j;
            lse = z[j] - logf(p[j]);
        }
        auto dp = [&](int i) {
            float d = 0.0f;
            for (unsigned k = a; k < b; k++)
                if (slot_expert[slots[k]] == (unsigned)i) d += (dg(slots[k]) - dot) / sum;
            d = d + aux[i];
            d += aux[e + i];
            // ∂(−P ln P)/∂P = −(ln P + 1), ln P_i = z_i − lse.
            if (entropy > 0.0f && p[i] > 0.0f) d -= entropy * ((z[i] - lse) + 1.0f) / nf;
            return d;
        };
        float pd = 0.0f;
        for (int i = 0; i < e; i++) pd += dp(i) * p[i];
        for (int i = 0; i < e; i++) {
            float d = p[i] * (dp(i) - pd);
            if (z_loss > 0.0f) d += z_loss * 2.0f * lse * p[i] / nf;
            st(dlogits + t * e + i, d);
        }
    }
}

// ---- routing on the device (Backend::route) ----------------------------------------------------
// model::router::select's selection, bitwise (the same keys, scan order and f32 sums), and the
// aux losses' sums, in four launches: route_select per token, route_group_sums per (quantity,
// group of `group` consecutive tokens), route_scan a warp per quantity, route_layout per
// (expert, group). The host then reads E counts, E + 2 sums and the slots, not N × E probabilities and
// logits. Chosen experts are a 64-bit mask (two words a token): E ≤ 64.

#define ROUTE_CHOSEN (-2147483647 - 1)

// f32::total_cmp's order as integers, ROUTE_CHOSEN + 1 at least (ROUTE_CHOSEN marks a chosen
// expert), as router::choose forms it.
__device__ __forceinline__ int route_key(float v) {
    const int bits = __float_as_int(v);
    return max(bits ^ (int)((unsigned)(bits >> 31) >> 1), ROUTE_CHOSEN + 1);
}
__device__ __forceinline__ bool route_has(const unsigned* chosen, size_t t, int x) { return (chosen[2 * t + x / 32] >> (x % 32)) & 1u; }

// Per token: the chosen experts (the largest key first, ties to the lower index, until Top-K
// (top_k > 0) has min(top_k, e) or Top-P's mass, summed in that order, reaches top_p), and its
// entropy and z-loss terms (stats: lse − ⟨P, z⟩, lse², with lse as router_bwd forms it).
extern "C" __global__ void route_select(unsigned* chosen, float* stats, const float* probs, const float* logits, int n, int e, int top_k, float top_p) {
    for (size_t t = blockIdx.x * (size_t)blockDim.x + threadIdx.x; t < (size_t)n; t += (size_t)gridDim.x * blockDim.x) {
        const float* p = probs + t * e;
        const float* z = logits + t * e;
        unsigned long long mask = 0;
        float mass = 0.0f;
        for (int count = 1;; count++) {
            int best = 0, key = (mask & 1) ? ROUTE_CHOSEN : route_key(p[0]);
            for (int x = 1; x < e; x++) {
                const int k = (mask >> x) & 1 ? ROUTE_CHOSEN : route_key(p[x]);
                if (k > key) best = x, key = k;
            }
            mask |= 1ull << best;
            mass += p[best];
            if (top_k > 0 ? count >= min(top_k, e) : (mass >= top_p || count == e)) break;
        }
        chosen[2 * t] = (unsigned)mask;
        chosen[2 * t + 1] = (unsigned)(mask >> 32);
        int j = 0;
        for (int i = 1; i < e; i++) j = p[i] > p[j] ? i : j;
        const float lse = z[j] - logf(p[j]);
        float dot = 0.0f;
        for (int i = 0; i < e; i++) dot += p[i] * z[i];
        stats[2 * t] = lse - dot;
        stats[2 * t + 1] = lse * lse;
    }
}

// Per quantity q and group g (index q · groups + g): for q < e the group's tokens routed to
// expert q (counts) and Σ P_q (sums, f64); q = e, e + 1: Σ of the entropy and z-loss terms.
extern "C" __global__ void route_group_sums(unsigned* counts, double* sums, const unsigned* chosen, const float* probs, const float* stats, int n, int e, int groups, int group) {
    const size_t total = (size_t)(e + 2) * groups;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        const int q = (int)(i / groups), g = (int)(i % groups);
        const size_t t0 = (size_t)g * group, t1 = min(t0 + group, (size_t)n);
        unsigned count = 0;
        double sum = 0.0;
        for (size_t t = t0; t < t1; t++) {
            if (q < e) {
                count += route_has(chosen, t, q);
                sum += probs[t * e + q];
            } else {
                sum += stats[2 * t + (q - e)];
            }
        }
        if (q < e) counts[i] = count;
        sums[i] = sum;
    }
}

// A warp per quantity q (grid e + 2, 32 threads): for q < e, its expert's group counts become
// offsets from the expert's first slot and its total (totals[q]); every q sums its groups'
// sums (totals_q[q]). A lane takes a stretch of consecutive groups: a serial pass over all of
// them was a chain of dependent loads (~20 µs at 1,024 groups), the warp's takes 1/32 of it.
extern "C" __global__ void route_scan(unsigned* offsets, unsigned* totals, double* totals_q, const unsigned* counts, const double* sums, int e, int groups) {
    const int q = blockIdx.x, lane = threadIdx.x, stretch = (groups + WARP - 1) / WARP;
    const int g0 = min(lane * stretch, groups), g1 = min(g0 + stretch, groups);
    const size_t row = (size_t)q * groups;
    unsigned count = 0;
    double sum = 0.0;
    for (int g = g0; g < g1; g++) {
        if (q < e) count += counts[row + g];
        sum += sums[row + g];
    }
    sum = warp_sum_f64(sum);  // a fixed tree: lane 0's is the same every run
    if (lane == 0) totals_q[q] = sum;
    if (q >= e) return;
    // The stretches before this lane's: an inclusive scan of the counts, then one step back.
    unsigned before = count;
    for (int d = 1; d < WARP; d *= 2) {
        const unsigned v = __shfl_sync(0xffffffffu, before, max(lane - d, 0));
        if (lane >= d) before += v;
    }
    if (lane == WARP - 1) totals[q] = before;
    before -= count;
    for (int g = g0; g < g1; g++) {
        offsets[row + g] = before;
        before += counts[row + g];
    }
}

// Per expert x and group g: the group's tokens routed to x, ascending, into x's slots from
// offsets[x · groups + g] past the experts before x (Σ totals), each with its gate
// P_x / Σ_chosen P (summed in ascending expert order, as router::select does).
extern "C" __global__ void route_layout(unsigned* token, float* gate, const unsigned* chosen, const float* probs, const unsigned* offsets, const unsigned* totals, int n, int e, int groups, int group) {
    const size_t total = (size_t)e * groups;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        const int x = (int)(i / groups), g = (int)(i % groups);
        const size_t t0 = (size_t)g * group, t1 = min(t0 + group, (size_t)n);
        unsigned slot = offsets[i];
        for (int y = 0; y < x; y++) slot += totals[y];
        for (size_t t = t0; t < t1; t++) {
            if (!route_has(chosen, t, x)) continue;
            const float* p = probs + t * e;
            float sum = 0.0f;
            for (int y = 0; y < e; y++)
                if (route_has(chosen, t, y)) sum += p[y];
            token[slot] = (unsigned)t;
            gate[slot] = p[x] / sum;
            slot++;
        }
    }
}
