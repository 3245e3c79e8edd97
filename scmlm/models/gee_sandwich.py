"""Cluster-robust sandwich covariances of the GEE with small-sample corrections, and their degrees of freedom.

Everything here is p × p algebra on the per-cluster information ``A_d`` and scores ``g_d`` of every gene (from
:mod:`scmlm.models.gee_kernel`), vectorised over genes: :func:`sandwich_from_blocks` (the corrected covariance and the
Bell–McCaffrey df under the working model), :func:`bm_df` (those df alone, for a contrast within donors) and
:func:`design_df` (the df of a contrast from the donor-level design: Satterthwaite for one row, Hotelling's T² with
Zhang's df, "HTZ", for several).
"""

from __future__ import annotations

import numpy as np

CORRECTION_POWER = {"kc": 0.5, "md": 1.0, "md_scaled": 1.0, "none": 0.0}
"""Power ``c`` of ``(I - H_dd)^-c`` applied to each cluster's residuals (``"avg"`` averages ``kc`` and ``md``)."""


def _decompose(A: np.ndarray):
    """``B = sum_d A_d``, ``B^1/2``, ``B^-1/2``, ``B^-1``, the eigen-decomposition ``lam, Q`` of
    ``M_d = I - B^-1/2 A_d B^-1/2`` per cluster, and the genes whose ``B`` is non-singular."""
    p = A.shape[-1]
    B = A.sum(axis=0)
    B = 0.5 * (B + np.swapaxes(B, -1, -2))
    wb, Ub = np.linalg.eigh(B)
    ok = wb.min(axis=-1) > 1e-12 * np.maximum(wb.max(axis=-1), 1e-300)
    wb = np.where(ok[..., None], wb, 1.0)
    UbT = np.swapaxes(Ub, -1, -2)
    b_half = (Ub * np.sqrt(wb)[..., None, :]) @ UbT
    b_mhalf = (Ub / np.sqrt(wb)[..., None, :]) @ UbT
    Binv = (Ub / wb[..., None, :]) @ UbT
    Asym = 0.5 * (A + np.swapaxes(A, -1, -2))
    Msym = np.eye(p) - b_mhalf[None] @ Asym @ b_mhalf[None]
    lam, Q = np.linalg.eigh(0.5 * (Msym + np.swapaxes(Msym, -1, -2)))
    return B, b_half, b_mhalf, Binv, Asym, lam, Q, ok


def _correct(b_mhalf, Q, scale, v):
    """``Q diag(scale) Q' B^-1/2 v`` per cluster (``v``: clusters × genes × p, or genes × p for one vector)."""
    h = np.einsum("gab,...gb->...ga", b_mhalf, v)
    h = np.einsum("kgba,gb->kga", Q, h) if v.ndim == 2 else np.einsum("kgba,kgb->kga", Q, h)
    return np.einsum("kgab,kgb->kga", Q, scale * h)


def sandwich_from_blocks(
    A: np.ndarray, g: np.ndarray, small_sample: str, c: np.ndarray | None = None, md_scale: float = 1.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cluster-robust sandwich covariances (genes × p × p) from cluster information ``A`` (clusters × genes × p × p)
    and scores ``g`` (clusters × genes × p), with a small-sample correction; a flag per gene for a valid result; and,
    for a contrast vector ``c``, the Bell–McCaffrey (Satterthwaite) degrees of freedom of ``c'beta`` (else NaN).

    ``"kc"`` (Kauermann & Carroll 2001), ``"md"`` (Mancl & DeRouen 2001), ``"avg"`` (their average, Ford & Westgate
    2017), ``"md_scaled"`` (``"md"`` times ``md_scale``) or ``"none"`` (Liang–Zeger). The corrections replace each
    cluster's residuals ``r_d`` by ``(I - H_dd)^-1/2 r_d`` (KC) or ``(I - H_dd)^-1 r_d`` (MD), with the cluster
    leverage ``H_dd = D_d B^-1 D_d' V_d^-1`` and ``B = sum_d A_d``. In closed form from p × p matrices: with
    ``M_d = I - B^-1/2 A_d B^-1/2 = Q diag(1 - lam) Q'``, the corrected score is
    ``u_d = B^1/2 Q diag((1 - lam)^-c) Q' B^-1/2 g_d`` (``c = 1/2`` KC, ``1`` MD) and
    ``cov = B^-1 (sum_d u_d u_d') B^-1``. A gene is invalid if ``B`` is singular or a cluster has leverage 1 in some
    direction (``lam >= 1``: that donor alone determines a coefficient).

    Degrees of freedom (Bell & McCaffrey 2002; Pustejovsky & Tipton 2018, as R's clubSandwich): the estimated
    variance of ``c'beta`` is ``sum_d (a_d' r_d)^2`` with ``a_d = V_d^-1 D_d w_d``,
    ``w_d = B^-1/2 Q diag((1 - lam)^-c) Q' B^-1/2 c``. Under the working model the residuals have covariance
    ``V - D B^-1 D'``, so the quadratic form's Satterthwaite df is ``tr(Om)^2 / tr(Om^2)`` with the clusters ×
    clusters matrix ``Om = diag(w_d' A_d w_d) - U' B^-1 U``, ``U = [A_d w_d]``: p × p algebra again. With equal
    leverage in every donor it equals ``clusters - donor-level coefficients``; donors of unequal weight lower it.
    For ``"avg"`` the df are those of Kauermann–Carroll.
    """
    K, G, p, _ = A.shape
    _, b_half, b_mhalf, Binv, Asym, lam_c, Q, ok = _decompose(A)
    powers = (0.5, 1.0) if small_sample == "avg" else (CORRECTION_POWER[small_sample],)
    if max(powers) > 0:
        good = lam_c.min(axis=2) > 1e-10  # clusters × genes
        ok &= good.all(axis=0)
        lam_c = np.where(good[:, :, None], lam_c, 1.0)
    cov = np.zeros((G, p, p))
    for power in powers:
        u = np.einsum("gab,kgb->kga", b_half, _correct(b_mhalf, Q, lam_c**-power, g)) if power > 0 else g
        cov += Binv @ np.einsum("kga,kgb->gab", u, u) @ Binv
    cov /= len(powers)
    if small_sample == "md_scaled":
        cov *= md_scale
    df = np.full(G, np.nan)
    if c is not None:
        cg = np.broadcast_to(np.asarray(c, dtype=float), (G, p))
        w = np.einsum("gab,kgb->kga", b_mhalf, _correct(b_mhalf, Q, lam_c ** -powers[0], cg))
        Om = _omega(Asym, Binv, w, w)
        tr = np.trace(Om, axis1=1, axis2=2)
        tr2 = np.einsum("gkj,gjk->g", Om, Om)
        with np.errstate(divide="ignore", invalid="ignore"):
            df = np.where(tr2 > 0, tr * tr / tr2, np.nan)
    return cov, ok, df


def _omega(Asym, Binv, ws, wt):
    """genes × clusters × clusters: ``Cov(ws_d' g_d, wt_j' g_j)`` under the working model,
    ``delta_dj ws_d' A_d wt_d - (A_d ws_d)' B^-1 (A_j wt_j)``."""
    Us = np.einsum("kgab,kgb->kga", Asym, ws)
    Ut = np.einsum("kgab,kgb->kga", Asym, wt)
    Om = -np.einsum("kga,gab,jgb->gkj", Us, Binv, Ut)
    idx = np.arange(Asym.shape[0])
    Om[:, idx, idx] += np.einsum("kga,kga->gk", ws, Ut)
    return Om


def bm_df(A: np.ndarray, c: np.ndarray, power: float = 0.5) -> np.ndarray:
    """Bell–McCaffrey (Satterthwaite) df of ``c'beta`` per gene under the working model, with the adjustment
    ``(I - H_dd)^-power`` (``0.5``: Kauermann–Carroll, the CR2 of clubSandwich): :func:`htz_eta` for one row, in
    ``O(clusters p^2)`` per gene instead of a clusters × clusters matrix.

    With ``Om = diag(a) - C``, ``a_d = w_d' A_d w_d``, ``C_dj = u_d' B^-1 u_j`` and ``u_d = A_d w_d``:
    ``tr(Om) = sum_d (a_d - C_dd)`` and ``tr(Om^2) = sum_d (a_d^2 - 2 a_d C_dd) + tr((B^-1 S)^2)``,
    ``S = sum_d u_d u_d'``.
    """
    _, _, b_mhalf, Binv, Asym, lam, Q, _ = _decompose(A)
    G, p = A.shape[1], A.shape[-1]
    cg = np.broadcast_to(np.asarray(c, dtype=float).ravel(), (G, p))
    w = np.einsum("gab,kgb->kga", b_mhalf, _correct(b_mhalf, Q, np.maximum(lam, 1e-10) ** -power, cg))
    u = np.einsum("kgab,kgb->kga", Asym, w)
    a = np.einsum("kga,kga->gk", w, u)
    cdd = np.einsum("kga,gab,kgb->gk", u, Binv, u)
    M = Binv @ np.einsum("kga,kgb->gab", u, u)
    tr = (a - cdd).sum(axis=1)
    tr2 = (a * a - 2.0 * a * cdd).sum(axis=1) + np.einsum("gab,gba->g", M, M)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(tr2 > 0, tr * tr / tr2, np.nan)


def htz_eta(A: np.ndarray, L: np.ndarray, power: float = 0.5) -> np.ndarray:
    """Degrees of freedom ``eta`` (per gene) of the corrected sandwich estimate of ``cov(L beta)`` under the working
    model: Satterthwaite for one row, Zhang's for several (Tipton & Pustejovsky 2015, clubSandwich's ``"HTZ"``).

    The estimate ``Omega_hat`` (k × k) is a quadratic form in the residuals; after standardising so that its
    expectation is the identity, ``eta = k (k + 1) / sum_st Var(Omega_hat_st)`` (the Wishart with ``eta`` df has
    ``Var = (1 + delta_st) / eta``). For one row this is ``tr(Om)^2 / tr(Om^2)``, the Bell–McCaffrey df.
    """
    L = np.atleast_2d(L)
    k = L.shape[0]
    _, _, b_mhalf, Binv, Asym, lam, Q, _ = _decompose(A)
    G, p = A.shape[1], A.shape[-1]
    scale = np.maximum(lam, 1e-10) ** -power
    ws = [np.einsum("gab,kgb->kga", b_mhalf, _correct(b_mhalf, Q, scale, np.broadcast_to(row, (G, p)))) for row in L]
    Om = [[_omega(Asym, Binv, ws[s], ws[t]) for t in range(k)] for s in range(k)]
    E = np.moveaxis(np.array([[np.trace(Om[s][t], axis1=1, axis2=2) for t in range(k)] for s in range(k)]), 2, 0)
    ev, eU = np.linalg.eigh(E)
    T = (eU / np.sqrt(np.maximum(ev, 1e-300))[:, None, :]) @ np.swapaxes(eU, 1, 2)  # E^-1/2
    Omt = [
        [sum(T[:, s, a, None, None] * T[:, t, b, None, None] * Om[a][b] for a in range(k) for b in range(k))
         for t in range(k)]
        for s in range(k)
    ]  # fmt: skip
    var = np.zeros(G)
    for s in range(k):
        for t in range(k):
            var += np.einsum("gdj,gdj->g", Omt[s][s], Omt[t][t]) + np.einsum("gdj,gjd->g", Omt[s][t], Omt[t][s])
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(var > 0, k * (k + 1) / var, np.nan)


def design_df(Z: np.ndarray, L: np.ndarray) -> float:
    """Degrees of freedom of a donor-level contrast from the donor-level design alone.

    ``Z`` (clusters × q) holds each donor's row of the design columns constant within donors and ``L`` (k × q) the
    contrast on those columns. The df are those that a linear model with one observation per donor, equal weights and
    the CR2 (Kauermann–Carroll) sandwich gives the same contrast (:func:`htz_eta`: Satterthwaite for one row, HTZ for
    several): ``K - q`` for two groups of donors, a Welch-type value when the contrast's variance rests on some groups
    only (a pairwise contrast of three dose groups with 4 donors each: 6, not 9). The working weights of the GEE are
    deliberately not used: with few donors they are estimated too noisily to count donors by.
    """
    A = np.einsum("ka,kb->kab", Z, Z)[:, None]
    return round(float(htz_eta(A, L, 0.5)[0]), 9)  # integers stay integers (e.g. K - q for two groups)
