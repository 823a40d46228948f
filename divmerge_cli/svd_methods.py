"""2025's data-free merges that work on the singular structure of each layer's task matrices:
TSV-M (Gargiulo et al., CVPR 2025, arXiv 2412.00081), Iso-C and Iso-CTS (Marczak et al., ICML 2025,
arXiv 2502.04959) and WUDI (Cheng et al., ICML 2025, arXiv 2503.08099).

Each is a merge function with methods.py's contract, `fn(base, xs, p, glob, rng, prep=None)`,
called on whole tensors (an SVD is of the whole matrix). Rules shared by the four, as in the
papers' code and FusionBench's implementations:
- every 2-D tensor [R, C] gets the method: embeddings and the LM head too (FusionBench treats any
  2-D tensor alike and excludes none by default; the papers' code excludes only CLIP's
  `text_projection`, which language models do not have);
- every other tensor (norms, biases, 0-dim) gets the task-arithmetic mean (1/n) sum_t tau_t;
- theta = theta0 + scaling_factor * merged, on every tensor (FusionBench scales the whole merged
  task vector; TSV's paper calls the factor alpha).
- An SVD keeps the directions whose singular value is above torch.linalg.matrix_rank's tolerance
  (sigma_max * max(R, C) * float32 eps). A full fine-tune's task matrices are full rank, so this is
  the papers' rule; for LoRA experts (tau of rank r_t) it keeps the updates' span instead of
  filling the null space with directions that are rounding noise. TSV-M, Iso-C and Iso-CTS take
  LoRA updates as their factors (`fn.lowrank`, _factored): the same merge without a dense SVD.
- a 2-D tensor is [out, in], as nn.Linear's: Iso-CTS and WUDI depend on it (Method.oriented),
  and the merge engine hands them GPT-2's Conv1D weights, stored [in, out], transposed.
No method here draws random numbers: `rng` is unused.
Every tensor they make is made on their inputs' device (`Method.on_device`: the merge engine
hands them tensors on `--device`, where the SVDs and WUDI's steps are worth a GPU).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .errors import UserError

EPS = torch.finfo(torch.float32).eps
ADAM = (0.9, 0.999, 1e-8)  # torch.optim.Adam's defaults, as WUDI's code uses them


def _taus(base: Tensor, xs: list[Tensor]) -> Tensor:
    """tau_t = x_t - base, stacked [n, ...] in float32 (the inputs are never written to)."""
    return torch.stack([x.float() - base for x in xs])


def _tol(s_max: float, shape) -> float:
    return s_max * max(shape) * EPS


def thin_svd(a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """torch.linalg.svd(a, full_matrices=False), in a's dtype. LAPACK's gesdd (torch's CPU driver)
    fails to converge in float32 on some matrices with many (near-)repeated singular values, such
    as Iso-CTS's stack of singular vectors of SmolLM2's o_proj (574 x 576, all ~1); float64
    converges on those, so a failure is retried there. A matrix that fails in both is a UserError
    (the merge names its tensor); one that holds NaN or Inf, a FloatingPointError."""
    if not torch.isfinite(a).all():  # LAPACK may return NaN for them, or fail to converge
        raise FloatingPointError("NaN or Inf in an SVD's matrix")
    try:
        return torch.linalg.svd(a, full_matrices=False)
    except torch.linalg.LinAlgError:
        pass
    try:
        u, s, vh = torch.linalg.svd(a.double(), full_matrices=False)
    except torch.linalg.LinAlgError:
        raise UserError(
            f"the SVD of a {tuple(a.shape)} matrix did not converge, in float32 or float64"
        ) from None
    return u.to(a.dtype), s.to(a.dtype), vh.to(a.dtype)


def _svd(a: Tensor, tol: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """a = u diag(s) vh, keeping the singular values above `tol` (default: a's own matrix-rank
    tolerance)."""
    u, s, vh = thin_svd(a)
    if tol is None:
        tol = _tol(float(s[0]), a.shape) if len(s) else 0.0
    k = int((s > tol).sum())
    return u[:, :k], s[:k], vh[:k]


def _polar(a: Tensor) -> Tensor:
    """The orthogonal matrix nearest to a (orthonormal columns, or rows when a is wide): u vh of
    its SVD, as TSV-M and Iso-CTS orthogonalise the stacked singular vectors."""
    u, _, vh = thin_svd(a)
    return u @ vh


def _per_matrix(merge: Callable[[Tensor, dict], Tensor | None]) -> Callable[..., Tensor]:
    """A merge function (methods.py's contract) from `merge(t, glob)`, the merged task matrix of
    a stack t [n, R, C] of 2-D task vectors, or None to merge it as the other tensors are:
    theta0 + scaling_factor * (merged, else the task vectors' mean)."""

    def fn(base, xs, p, glob, rng, prep=None) -> Tensor:
        t = _taus(base, xs)
        # a matrix no task changes merges to zero under every method: no SVD, no step
        merged = merge(t, glob) if t.dim() == 3 and t.any() else None
        merged = t.mean(0) if merged is None else merged
        return merged.mul_(glob["scaling_factor"]).add_(base)

    fn.__name__, fn.__qualname__, fn.__doc__ = merge.__name__, merge.__qualname__, merge.__doc__
    return fn


# A task matrix tau = left @ right: right is None for a dense tau (left is tau itself); LoRA
# updates stay as their factors (left = scale * B [R, r], right = A [r, C]) and are never densified.
Factors = tuple[Tensor, Tensor | None]
FactoredMerge = Callable[[list[Factors], tuple[int, int], dict], Tensor | None]


def _dense(f: Factors) -> Tensor:
    return f[0] if f[1] is None else f[0] @ f[1]


def _mat_svd(f: Factors, shape: tuple[int, int], tol: float | None = None):
    """_svd of tau = left @ right; from the factors by two thin QRs and the SVD of an r x r core
    (B = Q_b R_b, A^T = Q_a R_a, tau = Q_b (R_b R_a^T) Q_a^T): the same singular triplets as
    the dense SVD, for O((R + C) r^2) instead of O(R C min(R, C))."""
    left, right = f
    if right is None:
        return _svd(left, tol)
    if not left.shape[1]:
        return left.new_zeros(shape[0], 0), left.new_zeros(0), left.new_zeros(0, shape[1])
    qb, rb = torch.linalg.qr(left)
    qa, ra = torch.linalg.qr(right.T)
    w, s, zh = thin_svd(rb @ ra.T)
    if tol is None:
        tol = _tol(float(s[0]), shape) if len(s) else 0.0
    k = int((s > tol).sum())
    return qb @ w[:, :k], s[:k], zh[:k] @ qa.T


def _sum(fs: list[Factors]) -> Factors:
    """sum_t tau_t: dense, or the factors side by side (rank at most sum_t r_t)."""
    if any(r is None for _, r in fs):
        return sum(_dense(f) for f in fs), None
    return torch.cat([left for left, _ in fs], 1), torch.cat([r for _, r in fs], 0)


def _factored(merge: FactoredMerge) -> Callable[..., Tensor]:
    """_per_matrix's merge function from `merge(fs, shape, glob)` over the n task matrices as
    Factors (dense here). Its `.lowrank(base, taus, glob)` merges LoRA updates (taskvectors.
    LowRank, or None where a task leaves the matrix alone) from their factors: the same merge to
    float32 rounding, no dense SVD (the merge engine calls it for LoRA experts)."""
    fn = _per_matrix(lambda t, glob: merge([(tau, None) for tau in t], t.shape[1:], glob))

    def lowrank(base: Tensor, taus: list, glob: dict) -> Tensor:
        shape = tuple(base.shape)
        z = base.new_zeros
        fs = [
            (z(shape[0], 0), z(0, shape[1])) if tau is None else (tau.B * tau.scale, tau.A)
            for tau in taus
        ]
        merged = merge(fs, shape, glob) if any(f[0].any() for f in fs) else None
        if merged is None:  # as _per_matrix: the mean
            merged = _dense(_sum(fs)) / len(fs)
        return merged.mul_(glob["scaling_factor"]).add_(base)

    fn.lowrank = lowrank
    fn.__name__, fn.__qualname__, fn.__doc__ = merge.__name__, merge.__qualname__, merge.__doc__
    return fn


# --- TSV-M ----------------------------------------------------------------------------------


def tsv_factors(fs: list[Factors], shape) -> tuple[Tensor, Tensor, Tensor, list[int]] | None:
    """TSV-M on one matrix's n task matrices (Factors) of `shape` [R, C]: each tau_t's top
    k = min(R, C) // n singular triplets, the left vectors side by side and the right ones
    stacked, each set orthogonalised (Procrustes: the nearest orthogonal matrix), so that the
    tasks' components no longer interfere. Returns (U, S, V, sizes): task t owns `sizes[t]`
    consecutive columns of U, entries of S and rows of V. None when the matrix has fewer than n
    singular directions (k = 0, FusionBench would zero it): it is merged as the other tensors are."""
    n = len(fs)
    k = min(shape) // n
    if k == 0:
        return None
    svds = [_mat_svd(f, shape, 0.0) for f in fs]
    tol = _tol(max((float(s[0]) for _, s, _ in svds if len(s)), default=0.0), shape)
    us, ss, vs, sizes = [], [], [], []
    for u, s, vh in svds:
        keep = min(k, int((s > tol).sum()))  # a LoRA tau of rank r_t < k has r_t components
        us.append(u[:, :keep])
        ss.append(s[:keep])
        vs.append(vh[:keep])
        sizes.append(keep)
    if not sum(sizes):
        z = fs[0][0].new_zeros
        return z(shape[0], 0), z(0), z(0, shape[1]), sizes
    return _polar(torch.cat(us, 1)), torch.cat(ss), _polar(torch.cat(vs, 0)), sizes


def tsv_components(t: Tensor) -> Tensor:
    """Each task's orthogonalised component U_t diag(S_t) V_t [n, R, C] (they sum to TSV-M's
    merged matrix); outside 2-D matrices, tau_t / n (they sum to the mean, TSV-M's rule there).
    The processed task vectors DivMerge weighs with base_method: tsv (processed.py)."""
    f = tsv_factors([(tau, None) for tau in t], t.shape[1:]) if t.dim() == 3 else None
    if f is None:
        return t / len(t)
    u, s, v, sizes = f
    out = torch.zeros_like(t)
    a = 0
    for i, k in enumerate(sizes):
        out[i] = (u[:, a : a + k] * s[a : a + k]) @ v[a : a + k]
        a += k
    return out


@_factored
def tsv(fs: list[Factors], shape, glob: dict) -> Tensor | None:
    """TSV-M: theta0 + alpha * U diag(S) V from the tasks' orthogonalised top singular vectors."""
    f = tsv_factors(fs, shape)
    if f is None:
        return None
    u, s, v, _ = f
    return (u * s) @ v


# --- Iso-C and Iso-CTS ----------------------------------------------------------------------


@_factored
def iso_c(fs: list[Factors], shape, glob: dict) -> Tensor:
    """Iso-C: the summed task matrix with its spectrum made flat, every singular value replaced
    by their mean: theta0 + alpha * mean(s) U V^T, U diag(s) V^T = sum_t tau_t."""
    u, s, vh = _mat_svd(_sum(fs), shape)
    return s.mean() * (u @ vh) if len(s) else fs[0][0].new_zeros(shape)


def iso_cts_split(r: int, n: int, fraction: float) -> tuple[int, int]:
    """(k, m): the common subspace keeps the sum's top k directions and each of the n tasks adds
    m of its own, k + n m = r. As the paper's code: k = int(r fraction), m = round((r - k) / n),
    then k = r - n m takes what the tasks leave (m is lowered when n m would exceed r)."""
    m = round((r - int(r * fraction)) / n)
    if n * m > r:
        m = r // n
    return r - n * m, m


@_factored
def iso_cts(fs: list[Factors], shape, glob: dict) -> Tensor:
    """Iso-CTS: the summed matrix's top singular directions (the common subspace), plus, for each
    task, the top directions of its task matrix with the common subspace projected out; both sets
    of singular vectors orthogonalised, and the spectrum made flat at the mean of the kept
    singular values: theta0 + alpha * mean(S) U V^T."""
    u, s, vh = _mat_svd(_sum(fs), shape)
    if not len(s):
        return fs[0][0].new_zeros(shape)
    tol = _tol(float(s[0]), shape)
    k, m = iso_cts_split(len(s), len(fs), glob["common_space_fraction"])
    us, ss, vs = [u[:, :k]], [s[:k]], [vh[:k]]
    if m:
        for left, right in fs:  # the task's own directions, outside the common subspace
            ut, st, vt = _mat_svd((left - us[0] @ (us[0].T @ left), right), shape, tol)
            us.append(ut[:, :m])
            ss.append(st[:m])
            vs.append(vt[:m])
    flat = torch.cat(ss).mean()
    return flat * (_polar(torch.cat(us, 1)) @ _polar(torch.cat(vs, 0)))


# --- WUDI -------------------------------------------------------------------------------------


def wudi_objective(merged: Tensor, t: Tensor) -> Tensor:
    """WUDI's interference: sum_t ||(tau_m - tau_t) tau_t^T||_F^2 / ||tau_t||_F^2; a task vector's
    rows span its layer's inputs (the paper's Theorem), so this is the output change each task's
    inputs see, weighted per task."""
    total = merged.new_zeros(())
    for tau in t:
        norm = tau.square().sum()
        if norm > 0:
            total += ((merged - tau) @ tau.T).square().sum() / norm
    return total


def gram_factor(g: Tensor, max_rank: int) -> Tensor | None:
    """L [C, r] with L L^T = g (a PSD Gram matrix [C, C]) to float32 rounding, or None when g's
    rank exceeds max_rank. Pivoted Cholesky in float64; once every remaining diagonal entry is
    below eps ||g||_F, each step checks the part left out, E = g - L L^T, and stops when
    ||E||_F <= sqrt(C) eps ||g||_F (a float32 product with g rounds about as much). LoRA
    experts' Gram matrices have rank sum_t r_t plus rounding noise (theta_t - theta0 in float32);
    a full fine-tune's are full rank and give up after max_rank pivots."""
    c = g.shape[0]
    g64 = g.double()
    size = float(torch.linalg.matrix_norm(g64))
    d = g64.diagonal().clone()
    lf = g64.new_zeros(c, max_rank)
    for j in range(max_rank + 1):
        p = int(d.argmax())
        if float(d[p]) <= EPS * size:
            rest = float(torch.linalg.matrix_norm(g64 - lf[:, :j] @ lf[:, :j].T))
            if rest <= c**0.5 * EPS * size:
                return lf[:, :j].to(g.dtype)
        if j == max_rank or float(d[p]) <= 0:
            break
        col = (g64[:, p] - lf[:, :j] @ lf[p, :j]) / float(d[p]) ** 0.5
        lf[:, j] = col
        d = (d - col.square()).clamp_(min=0)
        d[p] = 0.0
    return None


@_per_matrix
def wudi(t: Tensor, glob: dict) -> Tensor:
    """WUDI: from tau_m = sum_t tau_t (task arithmetic), `iterations` steps of Adam (lr `lr`) on
    wudi_objective, in float32. Its gradient is 2 (tau_m G - K), G = sum_t w_t tau_t^T tau_t
    [C, C], K = sum_t w_t tau_t tau_t^T tau_t, w_t = 1 / ||tau_t||^2, so a step is one
    [R, C] x [C, C] product and R x R interference matrices are never formed (a vocabulary-sized
    embedding would need gigabytes). When G has rank r <= C / 4 (LoRA experts) it is used as
    L L^T (gram_factor), two [R, C] x [C, r] products a step; a matrix no task changes (G = 0:
    the gradient is 0 and Adam does not move) is returned at once. Deterministic: no randomness,
    a fixed number of steps."""
    cols = t.shape[2]
    g, k = t.new_zeros(cols, cols), t.new_zeros(t.shape[1:])
    for tau in t:
        norm = float(tau.square().sum())
        if norm > 0:  # a task that leaves this matrix alone adds no interference term
            gt = (tau.T @ tau) / norm
            g += gt
            k += tau @ gt
    merged = t.sum(0)
    if not g.any():
        return merged
    lf = gram_factor(g, cols // 4)
    if lf is None:
        gradient = lambda m: (m @ g).sub_(k).mul_(2)  # noqa: E731
    else:
        gradient = lambda m: ((m @ lf) @ lf.T).sub_(k).mul_(2)  # noqa: E731
    b1, b2, eps = ADAM
    lr = glob["lr"]
    m1, m2 = torch.zeros_like(merged), torch.zeros_like(merged)
    for step in range(1, int(glob["iterations"]) + 1):
        grad = gradient(merged)
        m1.mul_(b1).add_(grad, alpha=1 - b1)
        m2.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        denom = (m2.sqrt() / (1 - b2**step) ** 0.5).add_(eps)  # as torch.optim.Adam
        merged.addcdiv_(m1, denom, value=-lr / (1 - b1**step))
    return merged


# --- what validate says they cost --------------------------------------------------------------

# Calibrated on one core of these machines against the methods' measured times on SmolLM2's
# matrix shapes (576x576 to 49152x576, 3 experts): the SVD estimates were 0.9 to 2.3 times the
# measured times (issue 27), mostly on the safe side. WUDI's, recalibrated on one core (matmul
# 87-99 GF/s, Adam 1.5-5.6 ns an entry), are 1.3-1.4 times its measured pairs: full fine-tunes
# (dense steps, 760 s) and LoRA adapters (factored steps, 128 s).
SVD_FLOPS = 1e10  # flop/s of torch.linalg.svd (13 GF/s on tall matrices, ~8 on wide ones)
MATMUL_FLOPS = 7e10  # flop/s of a float32 matmul
# one entry's gradient and Adam update (~10 memory-bound passes), in matmul flops
ADAM_ENTRY_FLOPS = 250


def svd_flops(rows: int, cols: int) -> float:
    """A thin SVD with vectors of a rows x cols matrix: about 4 m n^2 + 8 n^3 (m >= n)."""
    m, n = max(rows, cols), min(rows, cols)
    return 4.0 * m * n * n + 8.0 * n**3


def work(
    method: str,
    shape: tuple[int, ...],
    n: int,
    glob: dict,
    rank: int | None = None,
    factored: bool = False,
) -> tuple[list, float, int]:
    """One tensor's work for `method` over n experts: the shapes of the SVDs it computes, the
    flops of its other products, and the float32 matrices of its shape it holds beside the
    inputs (the merge engine's own copies excluded). `rank` bounds the sum of the task
    matrices' ranks when known (LoRA experts: 0 where none changes the tensor); `factored`: the
    method gets those experts' factors (a data-free merge, _factored), not dense matrices."""
    if len(shape) != 2 or rank == 0:
        return [], 0.0, 0
    rows, cols = shape
    r = min(shape)
    if from_factors(method, rank, factored):
        return _factored_work(method, shape, n, rank)
    if method == "tsv":
        k = r // n
        if not k:
            return [], 0.0, 0
        return [shape] * n + [(rows, n * k), (n * k, cols)], 0.0, n + 3
    if method == "iso_c":
        return [shape], 0.0, 3
    if method == "iso_cts":
        return [shape] * (n + 1) + [(rows, r), (r, cols)], 0.0, 6
    if method == "wudi":
        steps = int(glob.get("iterations", 0))
        low = rank is not None and rank <= cols // 4  # wudi's factored Gram matrix
        product = 4.0 * rows * cols * rank if low else 2.0 * rows * cols * cols
        per_step = product + ADAM_ENTRY_FLOPS * rows * cols
        return [], per_step * steps + 4.0 * n * rows * cols * cols, 5
    return [], 0.0, 0


def from_factors(method: str, rank: int | None, factored: bool) -> bool:
    """Whether `method` decomposes the experts' factors (work()'s rank and factored), not dense
    task matrices read whole."""
    return factored and rank is not None and method in FACTORED


def _factored_work(method: str, shape: tuple[int, int], n: int, rank: int):
    """work() from the factors of n updates of total rank K (_mat_svd): thin QRs of [R, r] and
    [C, r] and an r x r core SVD per decomposition, the orthogonalising SVDs of [R, K] and
    [K, C], and the merged matrix as a rank-K product."""
    rows, cols = shape
    q = max(1, rank // n)  # about one expert's rank
    qr = lambda k: 4.0 * (rows + cols) * k * k  # noqa: E731
    product = 2.0 * rows * cols * rank
    polar = [(rows, rank), (rank, cols)]
    if method == "tsv":
        return [(q, q)] * n + polar, n * qr(q) + product, 2
    if method == "iso_c":
        return [(rank, rank)], qr(rank) + product, 2
    projections = n * (qr(q) + 4.0 * rows * rank * q)  # iso_cts: each task outside the common part
    return [(rank, rank)] + [(q, q)] * n + polar, qr(rank) + projections + product, 2


SVD_METHODS = ("tsv", "iso_c", "iso_cts", "wudi")
FACTORED = ("tsv", "iso_c", "iso_cts")  # _factored: LoRA experts' factors, never densified
