"""Null calibration of gee_de's small-sample rules on donor-level designs (measurement script, not a test).

Fits each null of ``tests/gee_nulls.py`` once per gene and evaluates several corrections / df rules on the same fits,
printing the fraction of p < 0.05 and p < 0.01 per rule and test.

    python benchmarks/calib_gee.py two 3 2000 600 1      # design, donors per level, cells (or lo-hi), genes, seed
    python benchmarks/calib_gee.py tool dose 4 50-400 1000 45,46,47 binomial   # gee_de's default, pooled seeds

Rule names: covariance (``md``, ``md_scaled`` = MD x (K - q) / K, ``kc``, ``avg``, ``p0.75`` = one correction
``(I - H_dd)^-3/4``) and df: ``K-q``; ``HTZ(eq)`` Satterthwaite / Zhang's df of the donor-level design (equal
weights, the ``design_df`` of gee_de); ``HTZ(work)`` the same under the GEE's working model (``work.kc``: with the
Kauermann–Carroll adjustment). Joint tests are Hotelling's T² on the df. gee_de's default is ``avg HTZ(eq)`` for a
t test of a donor-level contrast, ``md_scaled HTZ(eq)`` for a joint test of donor-level rows and
``md HTZ(work.kc)`` for a t test within donors. The gene filter here (>= 10 expressing cells) differs slightly from
gee_de's, so figures can differ from ``tool`` in the third decimal.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import scipy.sparse as sp
from gee_nulls import null_cells

from scmlm.models import gee as G
from scmlm.models import gee_kernel as GK


def _pre(A, power):
    B = A.sum(axis=0)
    B = 0.5 * (B + np.swapaxes(B, -1, -2))
    wb, Ub = np.linalg.eigh(B)
    UbT = np.swapaxes(Ub, -1, -2)
    bmh = (Ub / np.sqrt(wb)[..., None, :]) @ UbT
    Binv = (Ub / wb[..., None, :]) @ UbT
    p = A.shape[-1]
    M = np.eye(p) - bmh[None] @ A @ bmh[None]
    lam, Q = np.linalg.eigh(0.5 * (M + np.swapaxes(M, -1, -2)))
    lam = np.maximum(lam, 1e-10)
    return bmh, Binv, Q, lam**-power


def _w(pre, c):
    bmh, _, Q, S = pre
    h = np.einsum("gab,b->ga", bmh, c)
    h = np.einsum("kgba,gb->kga", Q, h)
    h = np.einsum("kgab,kgb->kga", Q, S * h)
    return np.einsum("gab,kgb->kga", bmh, h)


def _om(A, Binv, ws, wt):
    Us = np.einsum("kgab,kgb->kga", A, ws)
    Ut = np.einsum("kgab,kgb->kga", A, wt)
    Om = -np.einsum("kga,gab,jgb->gkj", Us, Binv, Ut)
    K = A.shape[0]
    idx = np.arange(K)
    Om[:, idx, idx] += np.einsum("kga,kga->gk", ws, Ut)
    return Om


def rule(A, g, L, power, A_df=None, power_df=None):
    """Vhat (G,k,k) of L beta with correction `power`, and the HTZ eta from A_df (default A) at power_df."""
    pre = _pre(A, power)
    ws = [_w(pre, c) for c in L]
    x = np.stack([np.einsum("kga,kga->gk", w, g) for w in ws], axis=1)  # G,k,K
    V = np.einsum("gsk,gtk->gst", x, x)
    A_df = A if A_df is None else A_df
    pre_df = _pre(A_df, power if power_df is None else power_df)
    wd = [_w(pre_df, c) for c in L]
    k = len(L)
    Om = [[_om(A_df, pre_df[1], wd[s], wd[t]) for t in range(k)] for s in range(k)]
    E = np.array([[np.trace(Om[s][t], axis1=1, axis2=2) for t in range(k)] for s in range(k)])  # k,k,G
    E = np.moveaxis(E, 2, 0)
    ev, eU = np.linalg.eigh(E)
    T = (eU / np.sqrt(np.maximum(ev, 1e-300))[:, None, :]) @ np.swapaxes(eU, 1, 2)
    Omt = [[sum(T[:, s, a, None, None] * T[:, t, b, None, None] * Om[a][b] for a in range(k) for b in range(k))
            for t in range(k)] for s in range(k)]  # fmt: skip
    var = 0.0
    for s in range(k):
        for t in range(k):
            var = var + np.einsum("gdj,gdj->g", Omt[s][s], Omt[t][t]) + np.einsum("gdj,gjd->g", Omt[s][t], Omt[t][s])
    eta = k * (k + 1) / var
    return V, eta


def pvals(est, V, eta, k, scale, cap):
    eta = np.minimum(eta, cap)
    if k == 1:
        t = est[:, 0] / np.sqrt(scale * V[:, 0, 0])
        return 2 * stats.t.sf(np.abs(t), eta)
    W = np.einsum("gs,gst,gt->g", est, np.linalg.inv(scale * V), est)
    F = W * (eta - k + 1) / (eta * k)
    return stats.f.sf(F, k, np.maximum(eta - k + 1, 1e-3))


def design(adata, kind):
    obs = adata.obs
    one = np.ones(adata.n_obs)
    if kind == "dose":
        X = np.column_stack([one, obs["condition"] == "d1", obs["condition"] == "d2"]).astype(float)
        tests = {"t_d1": [[0, 1, 0]], "t_d2-d1": [[0, -1, 1]], "F_dose": [[0, 1, 0], [0, 0, 1]]}
    elif kind == "batch":
        X = np.column_stack([one, obs["batch"] == "b1", obs["batch"] == "b2", obs["condition"] == "case"]).astype(float)
        tests = {"t_cond": [[0, 0, 0, 1]], "F_batch+cond": [[0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]}
    else:
        X = np.column_stack([one, obs["condition"] == "case"]).astype(float)
        tests = {"t_cond": [[0, 1]]}
    return X, {k: np.asarray(v, dtype=float) for k, v in tests.items()}


POOL: dict = {}


def run(kind, n_per, cells, n_genes, seed, family="nb"):
    adata = null_cells(kind, n_per, cells, n_genes, seed)
    X, tests = design(adata, kind)
    codes = adata.obs["donor"].cat.codes.to_numpy()
    K = codes.max() + 1
    off = np.log(np.asarray(adata.X.sum(axis=1)).ravel()) if family != "binomial" else None
    Y = adata.X.toarray().astype(float)
    if family == "binomial":
        Y = (Y > 0).astype(float)
    nexpr = (Y > 0).sum(0)
    keep = (nexpr >= 10) & (nexpr < Y.shape[0])
    Y = Y[:, keep]
    dz = GK.kernel_design(X, codes, K, off, ["nb", "poisson", "binomial"].index(family), 100)
    C = sp.csc_matrix(Y)
    out = GK.kernel_out(Y.shape[1], K, X.shape[1])
    GK.gee_chunk(dz, C.data.astype(float), C.indices.astype(np.int64), C.indptr.astype(np.int64), out)
    ok = (out.status == 0) & (out.last_step < 1e-6)
    beta, rho = out.beta[ok], out.rho[ok]
    A = np.ascontiguousarray(np.swapaxes(out.A[ok], 0, 1))
    g = np.ascontiguousarray(np.swapaxes(out.g[ok], 0, 1))
    A = 0.5 * (A + np.swapaxes(A, 2, 3))
    cdf = G.cluster_df(X, codes, K)
    q, const = cdf.n_between, cdf.const
    # equal-weight donor-level working model: each donor one unit with its donor-level row
    rows = np.stack([X[codes == d][0] for d in range(K)])
    Aeq = np.broadcast_to(np.einsum("ka,kb->kab", rows, rows)[:, None], A.shape).copy()
    sizes = np.bincount(codes)
    print(f"{kind} {n_per}/level cells {cells} seed {seed} {family}: K={K} q={q} genes {ok.sum()} "
          f"cells/donor {sizes.min()}-{sizes.max()} rho median {np.median(rho):.3f}")  # fmt: skip
    for name, L in tests.items():
        k = L.shape[0]
        est = beta @ L.T
        donor_level = bool(np.all(L[:, ~const] == 0))
        s_md = (K - q) / K if donor_level else 1.0
        res = {}
        V, eta = rule(A, g, L, 1.0)
        res["md_scaled K-q"] = pvals(est, V, np.full(len(est), K - q), k, s_md, K - q)
        if False:
            res["md_scaled HTZ(work)"] = pvals(est, V, eta, k, s_md, K - q)
        res["md K-q"] = pvals(est, V, np.full(len(est), K - q), k, 1.0, K - q)
        res["md HTZ(work)"] = pvals(est, V, eta, k, 1.0, K - q)
        if not donor_level:
            _, eta_wk = rule(A, g, L, 1.0, power_df=0.5)
            res["md HTZ(work.kc)"] = pvals(est, V, eta_wk, k, 1.0, K - q)
            res["md mean(HTZ(work),K-q)"] = pvals(est, V, 0.5 * (np.minimum(eta, K - q) + K - q), k, 1.0, K - q)
            print(
                f"  {name}: eta_work(md) median {np.median(eta):.2f} q10 {np.quantile(eta, 0.1):.2f}; "
                f"eta_work(kc) median {np.median(eta_wk):.2f}"
            )
        if donor_level:
            _, eta_eq = rule(A, g, L, 1.0, A_df=Aeq, power_df=0.5)
            res["md_scaled HTZ(eq)"] = pvals(est, V, eta_eq, k, s_md, K - q)
            res["md HTZ(eq)"] = pvals(est, V, eta_eq, k, 1.0, K - q)
        Vk, etak = rule(A, g, L, 0.5)
        res["kc K-q"] = pvals(est, Vk, np.full(len(est), K - q), k, 1.0, K - q)
        res["kc HTZ(work)"] = pvals(est, Vk, etak, k, 1.0, K - q)
        Va = 0.5 * (V + Vk)
        _, eta_a = rule(A, g, L, 0.75)
        res["avg K-q"] = pvals(est, Va, np.full(len(est), K - q), k, 1.0, K - q)
        res["avg HTZ(work)"] = pvals(est, Va, eta_a, k, 1.0, K - q)
        if donor_level:
            res["kc HTZ(eq)"] = pvals(est, Vk, eta_eq, k, 1.0, K - q)
            res["avg HTZ(eq)"] = pvals(est, Va, eta_eq, k, 1.0, K - q)
        for pw in (0.75, 0.625):
            Vp, eta_p = rule(A, g, L, pw)
            res[f"p{pw:g} K-q"] = pvals(est, Vp, np.full(len(est), K - q), k, 1.0, K - q)
            if donor_level:
                res[f"p{pw:g} HTZ(eq)"] = pvals(est, Vp, eta_eq, k, 1.0, K - q)
        if donor_level and k > 1:  # joint tests: eta between the donor-level design's HTZ and K - q
            mid = 0.5 * (eta_eq + (K - q))
            res["avg Hot(mid)"] = pvals(est, Va, mid, k, 1.0, K - q)
            res["avg Hot(K-q-1)"] = pvals(est, Va, np.full(len(est), K - q - 1.0), k, 1.0, K - q)
            print(f"  {name}: eta_eq median {np.median(eta_eq):.2f}; eta_work(md) median {np.median(eta):.2f}")
        for r, p in res.items():
            p = p[np.isfinite(p)]
            POOL.setdefault((name, r), []).append(p)
            print(f"  {name:14s} {r:22s} n={p.size:5d}  p<.05 {np.mean(p < 0.05):.4f}  p<.01 {np.mean(p < 0.01):.4f}")


CONTRASTS = {
    "two": ("~ condition", {"t": ("condition", "case", "ctrl")}),
    "paired": ("~ condition", {"t": ("condition", "case", "ctrl")}),
    "batch": ("~ batch + condition", {"t": ("condition", "case", "ctrl")}),
    "dose": (
        "~ condition",
        {
            "t_d1": ("condition", "d1", "d0"),
            "t_d2-d1": ("condition", "d2", "d1"),
            "F": [("condition", "d1", "d0"), ("condition", "d2", "d0")],
        },
    ),
}


def tool(kind, n_per, cells, n_genes, seeds, family="nb", **kw):
    """Fractions of p < 0.05 / 0.01 of ``scmlm.tl.gee_de`` (default options unless ``kw``) pooled over seeds."""
    import scmlm

    design_, contrasts = CONTRASTS[kind]
    pooled: dict = {}
    for seed in seeds:
        adata = null_cells(kind, n_per, cells, n_genes, seed)
        t = scmlm.tl.gee_de(adata, design_, contrasts, family=family, inplace=False, **kw).table
        t = t[t["status"] == "ok"]
        for name, sub in t.groupby("contrast"):
            pooled.setdefault(name, []).append(sub["pvalue"].to_numpy())
    opts = " ".join(f"{k}={v}" for k, v in kw.items()) or "default"
    for name, ps in pooled.items():
        p = np.concatenate(ps)
        print(
            f"{kind:6s} {n_per}/level cells {cells!s:10s} {family:8s} {opts:22s} {name:8s} seeds {seeds} "
            f"genes {p.size:5d}  p<.05 {np.mean(p < 0.05):.4f}  p<.01 {np.mean(p < 0.01):.4f}"
        )


if __name__ == "__main__" and sys.argv[1] == "tool":
    kind, n_per, cells, n_genes, seed = sys.argv[2:7]
    fam = sys.argv[7] if len(sys.argv) > 7 else "nb"
    cells = tuple(int(c) for c in cells.split("-")) if "-" in cells else int(cells)
    tool(kind, int(n_per), cells, int(n_genes), [int(x) for x in seed.split(",")], fam)
elif __name__ == "__main__":
    kind, n_per, cells, n_genes, seed = sys.argv[1:6]
    fam = sys.argv[6] if len(sys.argv) > 6 else "nb"
    cells = tuple(int(c) for c in cells.split("-")) if "-" in cells else int(cells)
    seeds = [int(x) for x in seed.split(",")]
    for sd in seeds:
        run(kind, int(n_per), cells, int(n_genes), sd, fam)
    print(f"POOLED {kind} {n_per}/level cells {cells} seeds {seed} {fam}")
    for (name, r), ps in POOL.items():
        p = np.concatenate(ps)
        print(f"  {name:14s} {r:22s} n={p.size:5d}  p<.05 {np.mean(p < 0.05):.4f}  p<.01 {np.mean(p < 0.01):.4f}")
