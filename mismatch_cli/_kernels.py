"""The compiled loops of `kernels` (numba), imported on their first use through it: see
its docstring. Each function's docstring says what it computes and which numpy code it
replaced."""

from __future__ import annotations

import math

import numpy as np
from numba import njit


def _no_dunders_from_llvmlite_ffi() -> None:
    """llvmlite's FFI object (`llvmlite.binding.ffi.lib`) answers ANY attribute with a
    function wrapper, `__dict__` included; vLLM 0.32 starting an in-process engine (TRL's
    colocate mode) scans every loaded module's objects with `vars(value).get(...)` and
    fails on it. Dunder names now raise AttributeError, as for any object; llvmlite only
    looks up its `LLVMPY_*` functions that way."""
    from llvmlite.binding import ffi

    cls = type(ffi.lib)
    if getattr(cls, "_mismatch_no_dunders", False):
        return
    lookup = cls.__getattr__

    def getattr_(self: object, name: str) -> object:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return lookup(self, name)

    cls.__getattr__ = getattr_
    cls._mismatch_no_dunders = True


_no_dunders_from_llvmlite_ffi()
_JIT = {"cache": True, "nogil": True, "error_model": "numpy"}


@njit(**_JIT)
def any_negative(x: np.ndarray) -> bool:
    """Is a value of x [n] negative (finite and < 0; NaN and -inf are not)?"""
    for i in range(x.size):
        if -math.inf < x[i] < 0.0:
            return True
    return False


@njit(**_JIT)
def sketch_add(
    x: np.ndarray,
    logx: np.ndarray,
    g: np.ndarray,
    counts: np.ndarray,
    zeros: np.ndarray,
    mins: np.ndarray,
    maxs: np.ndarray,
    inv_log_gamma: float,
    k0: int,
) -> None:
    """Add values x [n] >= 0 (their logs logx [n], from numpy's vectorised log; groups g [n],
    intp; an empty g: group 0) into a sketch's counts [G, B], zeros [G], mins / maxs [G], in
    place: v > 0 to bucket clip(ceil(log(v) / log(gamma)), k0, k0 + B - 1) - k0, 0 to
    `zeros`; NaN and +-inf are skipped."""
    top = k0 + counts.shape[1] - 1
    one = g.size == 0
    for i in range(x.size):
        v = x[i]
        if not math.isfinite(v):
            continue
        gi = 0 if one else g[i]
        if v == 0.0:
            zeros[gi] += 1
        else:
            k = math.ceil(logx[i] * inv_log_gamma)
            if k < k0:
                k = k0
            elif k > top:
                k = top
            counts[gi, k - k0] += 1
        if v < mins[gi]:
            mins[gi] = v
        if v > maxs[gi]:
            maxs[gi] = v


@njit(**_JIT, inline="always")
def _code(v: float, edges: np.ndarray) -> int:
    """The bucket of one p (`bucket_codes`): a branch-free count of the interior edges at or
    below it (~2 ns a value here, against ~9 for a search that stops at the first edge
    above, whose branch the values' spread makes unpredictable)."""
    nb = edges.size - 1
    k = 0
    for j in range(1, nb):
        k += v >= edges[j]
    return k if (v >= edges[0] and v <= edges[nb]) else nb  # NaN fails both


@njit(**_JIT)
def bucket_codes(p: np.ndarray, edges: np.ndarray, out: np.ndarray) -> None:
    """out [n] = the bucket of each p [n]: the number of interior edges at or below it (edges
    [B + 1] ascending; p == edges[-1] in the last bucket), B for p outside [edges[0],
    edges[-1]] or NaN."""
    for i in range(p.size):
        out[i] = _code(p[i], edges)


@njit(**_JIT)
def row_sums(
    p: np.ndarray,
    edges: np.ndarray,
    local: np.ndarray,
    bucket: np.ndarray,
    rows: np.ndarray,
    seq_n: np.ndarray,
    seq_x: np.ndarray,
) -> None:
    """Over every row of a batch, finite delta or not: the bucket of p [n] into `bucket` [n]
    (`bucket_codes`), and added into rows [B + 1] (rows per bucket), seq_n and seq_x [k]
    (rows and the sum of 1 - p per batch-local sequence, local [n])."""
    for i in range(p.size):
        b = _code(p[i], edges)
        bucket[i] = b
        rows[b] += 1
        s = local[i]
        seq_n[s] += 1
        seq_x[s] += 1.0 - p[i]


@njit(**_JIT)
def run_starts(x: np.ndarray, out: np.ndarray) -> int:
    """The first row of each run of equal values of x [n] into out [n]; returns how many."""
    if x.size == 0:
        return 0
    out[0] = 0
    r = 1
    for i in range(1, x.size):
        if x[i] != x[i - 1]:
            out[r] = i
            r += 1
    return r


@njit(**_JIT)
def expand_runs(at: np.ndarray, starts: np.ndarray, seq: np.ndarray, local: np.ndarray) -> None:
    """Rows of runs (first rows `starts` [r], ascending; the runs cover seq [n]): seq[i] =
    at[run of i], local[i] = at[run of i] - at[0]."""
    n, r = seq.size, starts.size
    for j in range(r):
        stop = starts[j + 1] if j + 1 < r else n
        v = at[j]
        w = v - at[0]
        for i in range(starts[j], stop):
            seq[i] = v
            local[i] = w


@njit(**_JIT)
def split_sums(mask: np.ndarray, x: np.ndarray) -> tuple[float, float]:
    """(sum of x [n] where mask [n] is False, sum where it is True), both summed directly in
    one pass (`np.bincount(mask, weights=x)` cast the mask to intp first); four partial sums
    a side, so that the additions do not wait on one another."""
    a = np.zeros(4)
    b = np.zeros(4)
    n = x.size
    top = n - n % 4
    for i in range(0, top, 4):
        for j in range(4):
            v = x[i + j]
            if mask[i + j]:
                b[j] += v
            else:
                a[j] += v
    for i in range(top, n):
        if mask[i]:
            b[0] += x[i]
        else:
            a[0] += x[i]
    return (a[0] + a[1]) + (a[2] + a[3]), (b[0] + b[1]) + (b[2] + b[3])


@njit(**_JIT)
def segment_counts(values: np.ndarray, starts: np.ndarray, out: np.ndarray) -> None:
    """out[s] = the sum, as a float64, of the bool or integer values [n] from starts[s] to
    the next start (starts [S] ascending, the first 0): exact, as
    `np.add.reduceat(values, starts, dtype=np.float64)` is, without its buffered cast."""
    n, S = values.size, starts.size
    for s in range(S):
        stop = starts[s + 1] if s + 1 < S else n
        c = 0
        for i in range(starts[s], stop):
            c += values[i]
        out[s] = c


@njit(**_JIT)
def segment_rows(values: np.ndarray, starts: np.ndarray, out: np.ndarray) -> None:
    """out[s] = the float64 sum of the rows of values [n, G] from starts[s] to the next start
    (starts [S] ascending, the first 0), in one pass over the rows (`np.add.reduceat` along
    axis 0 took ~75 ms per 10^6 x 24 values here; this ~8)."""
    n, S = values.shape[0], starts.size
    G = values.shape[1]
    for s in range(S):
        stop = starts[s + 1] if s + 1 < S else n
        for g in range(G):
            out[s, g] = 0.0
        for i in range(starts[s], stop):
            for g in range(G):
                out[s, g] += values[i, g]


@njit(**_JIT)
def level_sums(
    L: np.ndarray,
    fin: np.ndarray,
    absd: np.ndarray,
    d: np.ndarray,
    k3: np.ndarray,
    outside: np.ndarray,
    n: np.ndarray,
    sums: np.ndarray,
    level_max: np.ndarray,
) -> None:
    """A sweep batch's sums per level L [n] (each row's, >= 0): rows per level `n` [nb]
    (added into); finite rows (fin [n] bool), |delta| `absd`, delta `d`, k3 `k3` [n] and rows
    outside the ratio band (outside [n] bool) per level, `sums` [5, nb] (written); the
    largest finite |delta| per level `level_max` [nb] (maxed into). Replaced six weighted
    `np.bincount`s (each cast L and the bool weights first) and `np.maximum.at`; the sums
    run over the rows in order, as bincount's do."""
    sums[:] = 0.0
    for i in range(L.size):
        lv = L[i]
        n[lv] += 1
        a = absd[i]
        if fin[i]:
            sums[0, lv] += 1.0
            if a > level_max[lv]:
                level_max[lv] = a
        sums[1, lv] += a
        sums[2, lv] += d[i]
        sums[3, lv] += k3[i]
        if outside[i]:
            sums[4, lv] += 1.0


@njit(**_JIT)
def column_stats(values: np.ndarray, total: np.ndarray, mx: np.ndarray) -> None:
    """total[g] += the float64 sum of column g of values [n, G], the rows added in order
    (numpy's order for `values.sum(axis=0, dtype=np.float64)` of a C-ordered array);
    mx[g] = max(mx[g], the column's max), NaN kept as `np.maximum` keeps it. One pass over
    the grid instead of numpy's two (its float32 -> float64 cast buffered, ~6 ms per
    10^6 x 24 values each)."""
    n, G = values.shape
    t = np.zeros(G)
    m = mx.copy()
    for i in range(n):
        for g in range(G):
            v = values[i, g]
            t[g] += v
            if v > m[g] or v != v:
                m[g] = v
    for g in range(G):
        total[g] += t[g]
        mx[g] = m[g]


@njit(**_JIT)
def group_sums(v: np.ndarray, g: np.ndarray, nonfinite: np.ndarray, sums: np.ndarray) -> None:
    """Per group (g [n], intp): add the sum of the finite values of v [n] into sums [G] and
    the count of the others (NaN, +-inf) into nonfinite [G], in one pass."""
    for i in range(v.size):
        x = v[i]
        if math.isfinite(x):
            sums[g[i]] += x
        else:
            nonfinite[g[i]] += 1


@njit(**_JIT)
def keyed_sums(
    g: np.ndarray,
    fin: np.ndarray,
    d: np.ndarray,
    ad: np.ndarray,
    k3: np.ndarray,
    p: np.ndarray,
    sid: np.ndarray,
    tail: float,
    log_band: float,
    sums: np.ndarray,
    pair_g: np.ndarray,
    pair_s: np.ndarray,
) -> int:
    """`analysis.GroupAccumulator`'s sums of one batch: rows with their group g [n] (-1: no
    key, left out), finite flags fin [n] and, for the finite rows in order, delta d, |delta|
    ad, k3_t and p [m]. Adds into sums [7, G] (rows, finite rows, sums of |delta|, delta, k3,
    tail |delta|, rows with |delta| > log_band), and writes the (group, seq_id) of each keyed
    row whose group or sid [n] differs from the keyed row before it to pair_g / pair_s [n];
    returns how many."""
    j = 0  # index among the finite rows
    k = 0
    last_g, last_s = -1, 0
    for i in range(g.size):
        gi = g[i]
        f = fin[i]
        if gi >= 0:
            sums[0, gi] += 1.0
            if k == 0 or gi != last_g or sid[i] != last_s:
                pair_g[k], pair_s[k] = gi, sid[i]
                k += 1
            last_g, last_s = gi, sid[i]
            if f:
                a = ad[j]
                sums[1, gi] += 1.0
                sums[2, gi] += a
                sums[3, gi] += d[j]
                sums[4, gi] += k3[j]
                if p[j] < tail:
                    sums[5, gi] += a
                if a > log_band:
                    sums[6, gi] += 1.0
        if f:
            j += 1
    return k


@njit(**_JIT)
def finite_loop(
    d: np.ndarray,
    ea: np.ndarray,
    em1: np.ndarray,
    rr: np.ndarray,
    p: np.ndarray,
    pt: np.ndarray,
    pi: np.ndarray,
    bucket: np.ndarray,
    local: np.ndarray,
    tail: float,
    caps: np.ndarray,
    log_band: float,
    clamp: float,
    groups: int,
    seqs: int,
    line: float,
    ad: np.ndarray,
    x: np.ndarray,
    k3: np.ndarray,
    cover: np.ndarray,
    g_n: np.ndarray,
    g_mean: np.ndarray,
    g_m2: np.ndarray,
    g_ad: np.ndarray,
    g_x: np.ndarray,
    above_cap: np.ndarray,
    s_fin: np.ndarray,
    s_d: np.ndarray,
    s_ad: np.ndarray,
    s_tail_n: np.ndarray,
    s_tail_d: np.ndarray,
    cand: np.ndarray,
    out: np.ndarray,
) -> None:
    """The loop of `kernels.finite_sums`, which computes the transcendental functions first
    with numpy: delta d, expm1|delta| `ea`, expm1(-delta) `em1`, exp(-delta clamped) `rr`,
    the `by` side's p, p_train pt, p_infer pi, bucket (intp), local (the batch-local
    sequence of each token), all [m]; |delta| `ad` read. Writes 1 - p `x`, k3_t `k3` and
    the argument of the log1p of the eps each token needs `cover` ([m] each,
    theory.eps_to_cover: expm1|delta| / max(1 - p, 0), 0 at delta 0);
    per flat group bucket * 2 + (p < tail) [groups]: the count `g_n`, mean and M2 of delta,
    sums of |delta| and of 1 - p; tokens with r above each cap [len(caps)]; per batch-local
    sequence [seqs]: finite tokens, sums of delta and |delta|, tail tokens and their delta.
    With `line` >= 0, the indices of the envelope candidates (|delta| > line min(1 - p, 1))
    go to `cand` [m], their number to n_cand. Writes the scalar sums named by `kernels.SUMS`
    to `out` (the moments' M2 and the co-moment about this batch's means). The arrays are
    zeroed here; `above_cap` is added into."""
    m = d.size
    g_n[:] = 0
    g_mean[:] = 0.0
    g_m2[:] = 0.0
    g_ad[:] = 0.0
    g_x[:] = 0.0
    for a in (s_fin, s_d, s_ad, s_tail_n, s_tail_d):
        a[:] = 0.0
    sum_ad = sxx = sxy = syy = 0.0
    max_ad = -math.inf
    n_inf = 0
    sum_k2 = sum_k3 = sum_r = sum_r2 = sum_chi2 = sum_dp = sum_pt = sum_pi = 0.0
    min_r, max_r, max_dp = math.inf, -math.inf, -math.inf
    n_out = n_cand = 0
    ncap = caps.size
    for i in range(m):
        di = d[i]
        a = ad[i]
        xi = 1.0 - p[i]
        is_tail = p[i] < tail
        gi = bucket[i] * 2 + (1 if is_tail else 0)
        x[i] = xi
        g_n[gi] += 1
        g_mean[gi] += di  # the sum, divided below
        g_ad[gi] += a
        g_x[gi] += xi
        sum_ad += a
        sxx += xi * xi
        sxy += xi * a
        syy += a * a
        if a > max_ad:
            max_ad = a
        # theory.eps_to_cover: log(1 + (exp(|delta|) - 1) / max(1 - p, 0)) / 2, 0 at delta 0;
        # its log1p and halving come after (numpy), inf stays inf
        if a > 0.0:
            c = ea[i] / max(xi, 0.0)
        else:
            c = 0.0
        cover[i] = c
        if math.isinf(c):
            n_inf += 1
        # metrics.py: the log-ratio -delta clamped, k3 unclamped, r = exp(clamped), and
        # expm1(2 c) = (r - 1)(r + 1); inside the clamp k3 and the latter come from one
        # expm1(c), without cancellation (r itself is exp: 1 + expm1(c) loses its relative
        # precision near c = -20 and can move r across a cap)
        lr = -di
        e = em1[i]
        k3i = e - lr
        if -clamp <= lr <= clamp:
            cl = lr
            chi = e * (e + 2.0)
        else:
            cl = min(max(lr, -clamp), clamp)
            chi = math.expm1(2.0 * cl)
        r = rr[i]
        k3[i] = k3i
        sum_k3 += k3i
        sum_k2 += cl * cl
        sum_r += r
        sum_r2 += r * r
        if r < min_r:
            min_r = r
        if r > max_r:
            max_r = r
        sum_chi2 += chi
        # aggregates.EnvelopeCandidates: kept unless |delta| <= line * min(1 - p, 1)
        if line >= 0.0 and not (a <= line * min(xi, 1.0)):
            cand[n_cand] = i
            n_cand += 1
        for j in range(ncap):
            if r > caps[j]:
                above_cap[j] += 1
        if a > log_band:
            n_out += 1
        dp = abs(pt[i] - pi[i])
        sum_dp += dp
        if dp > max_dp:
            max_dp = dp
        sum_pt += pt[i]
        sum_pi += pi[i]
        s = local[i]
        s_fin[s] += 1.0
        s_d[s] += di
        s_ad[s] += a
        if is_tail:
            s_tail_n[s] += 1.0
            s_tail_d[s] += di
    for gi in range(groups):
        if g_n[gi] > 0:
            g_mean[gi] /= g_n[gi]
    mean_ad = sum_ad / m if m else 0.0
    mt = sum_pt / m if m else 0.0
    mi = sum_pi / m if m else 0.0
    m2_ad = m2_pt = m2_pi = co = 0.0
    for i in range(m):
        gi = bucket[i] * 2 + (1 if p[i] < tail else 0)
        dev = d[i] - g_mean[gi]
        g_m2[gi] += dev * dev
        da = ad[i] - mean_ad
        m2_ad += da * da
        dt, dq = pt[i] - mt, pi[i] - mi
        m2_pt += dt * dt
        m2_pi += dq * dq
        co += dt * dq
    vals = (
        sum_ad, sxx, sxy, syy, max_ad, float(n_inf),
        sum_k2, sum_k3, sum_r, sum_r2, min_r, max_r, sum_chi2, float(n_out),
        sum_dp, max_dp, sum_pt, sum_pi, m2_ad, m2_pt, m2_pi, co, float(n_cand),
    )  # fmt: skip
    for j in range(len(vals)):
        out[j] = vals[j]
