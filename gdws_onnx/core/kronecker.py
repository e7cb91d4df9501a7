"""Structured approximations of a fully connected weight: sums of Kronecker products and plain
low rank (pure numpy).

A layer computes y = W x with W of shape (m, n) (out x in). A Kronecker shape (p, q, r, s) has
m = p r, n = q s, and W ~ sum_{t<R} A_t (x) B_t with A_t (p x q), B_t (r x s). Van Loan and
Pitsianis: the rearrangement R(W), (pq) x (rs), R(W)[a q + i, b s + j] = W[a r + b, i s + j],
maps A (x) B to vec(A) vec(B)^T, so the nearest rank-R sum is the truncated SVD of R(W)
(Eckart-Young) and its relative squared error is sum_{t>=R} sigma_t^2 / sum_t sigma_t^2.

Row-major application: with x (length n) read as X (q x s), (A (x) B) x = vec(A X B^T), read as
a (p x r) matrix. Applying B first costs R q r (s + p) MACs per input row, A first R p s (q + r);
the dense layer costs m n. Plain low rank W ~ U V (U m x R, V R x n, R (m + n) MACs) is the
degenerate shape (m, 1, 1, n), whose rearrangement is W itself.

Errors here are relative squared Frobenius errors ||W - W_R||_F^2 / ||W||_F^2, the convention of
the conv rewrite's error budget (allocate.relative_lego).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gdws_onnx.errors import OptionError

SCHEMES = ("kronecker", "lowrank")
B_FIRST, A_FIRST = "b_first", "a_first"  # which factor a Kronecker realization applies first


def _divisors(k: int) -> list[int]:
    return [d for d in range(1, k + 1) if k % d == 0]


@dataclass(frozen=True)
class KroneckerShape:
    """Factor shapes of W (m x n) ~ sum_t A_t (x) B_t: A_t is p x q, B_t is r x s (m = p r, n = q s)."""

    p: int
    q: int
    r: int
    s: int

    @property
    def m(self) -> int:
        return self.p * self.r

    @property
    def n(self) -> int:
        return self.q * self.s

    @property
    def max_rank(self) -> int:
        """The rank of R(W) at most: min(p q, r s); at this rank the sum is exact."""
        return min(self.p * self.q, self.r * self.s)

    @property
    def is_proper(self) -> bool:
        """False for the shapes that are the dense layer (a 1 x 1 factor) or plain low rank
        (a column times a row: q = r = 1 or p = s = 1)."""
        dense = self.p * self.q == 1 or self.r * self.s == 1
        outer = (self.q == 1 and self.r == 1) or (self.p == 1 and self.s == 1)
        return not (dense or outer)

    def order_macs(self, rank: int, order: str) -> int:
        """MACs per input row of a rank-`rank` realization applying B first (R q r (s + p)) or A first
        (R p s (q + r))."""
        if order == B_FIRST:
            return rank * self.q * self.r * (self.s + self.p)
        if order == A_FIRST:
            return rank * self.p * self.s * (self.q + self.r)
        raise ValueError(f"order must be {B_FIRST!r} or {A_FIRST!r}, got {order!r}")

    def best_order(self) -> str:
        """The cheaper order (B first on ties); it does not depend on the rank."""
        return B_FIRST if self.order_macs(1, B_FIRST) <= self.order_macs(1, A_FIRST) else A_FIRST

    def macs(self, rank: int) -> int:
        """MACs per input row of a rank-`rank` realization in its cheaper order."""
        return self.order_macs(rank, self.best_order())

    def params(self, rank: int) -> int:
        """R (p q + r s) weights."""
        return rank * (self.p * self.q + self.r * self.s)

    def __str__(self) -> str:
        return f"{self.p}x{self.q} (x) {self.r}x{self.s}"


def kronecker_shapes(m: int, n: int, proper: bool = True) -> list[KroneckerShape]:
    """Every factor shape of an m x n weight: one per divisor pair p r = m and q s = n; with
    `proper`, without the dense and plain-low-rank ones (KroneckerShape.is_proper)."""
    if m < 1 or n < 1:
        raise ValueError(f"weight dims must be positive, got {m} x {n}")
    shapes = [KroneckerShape(p, q, m // p, n // q) for p in _divisors(m) for q in _divisors(n)]
    return [sh for sh in shapes if sh.is_proper or not proper]


def _checked_matrix(weight: np.ndarray, shape: KroneckerShape | None = None) -> np.ndarray:
    w = np.asarray(weight, dtype=np.float64)
    if w.ndim != 2:
        raise ValueError(f"an FC weight must be a 2-D matrix, got shape {w.shape}")
    if shape is not None and w.shape != (shape.m, shape.n):
        raise ValueError(f"weight shape {w.shape} does not match Kronecker shape {shape} ({shape.m} x {shape.n})")
    return w


def rearrange(weight: np.ndarray, shape: KroneckerShape) -> np.ndarray:
    """Van Loan-Pitsianis R(W), (p q) x (r s): R[a q + i, b s + j] = W[a r + b, i s + j], so that
    R(A (x) B) = vec(A) vec(B)^T (row-major vec)."""
    w = _checked_matrix(weight, shape)
    sh = shape
    return w.reshape(sh.p, sh.r, sh.q, sh.s).transpose(0, 2, 1, 3).reshape(sh.p * sh.q, sh.r * sh.s)


def unrearrange(rearranged: np.ndarray, shape: KroneckerShape) -> np.ndarray:
    """The inverse of `rearrange`: (p q) x (r s) -> W, m x n."""
    sh = shape
    rw = np.asarray(rearranged)
    if rw.shape != (sh.p * sh.q, sh.r * sh.s):
        raise ValueError(f"rearranged matrix must be {(sh.p * sh.q, sh.r * sh.s)}, got {rw.shape}")
    return rw.reshape(sh.p, sh.q, sh.r, sh.s).transpose(0, 2, 1, 3).reshape(sh.m, sh.n)


def kron_sum(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """sum_t A_t (x) B_t for a (R, p, q) and b (R, r, s)."""
    a, b = np.asarray(a), np.asarray(b)
    big = np.einsum("tai,tbj->abij", a, b)  # [a, b, i, j] = sum_t A_t[a, i] B_t[b, j]
    return big.reshape(a.shape[1] * b.shape[1], a.shape[2] * b.shape[2])


def tail_errors(singular_values: np.ndarray) -> np.ndarray:
    """e[R] = sum_{t>=R} sigma_t^2 / sum_t sigma_t^2 for R = 0 .. len(sigma): the relative squared
    error of the best rank-R approximation (Eckart-Young); all zeros for a zero matrix."""
    sq = np.asarray(singular_values, dtype=np.float64) ** 2
    total = float(sq.sum())
    tail = np.concatenate([np.cumsum(sq[::-1])[::-1], [0.0]])
    return tail / total if total > 0 else np.zeros_like(tail)


@dataclass(frozen=True)
class KroneckerFactors:
    """W ~ sum_t A_t (x) B_t: a (R, p, q), b (R, r, s), applied in `order`; `error` is the predicted
    relative squared error (the SVD tail of R(W))."""

    shape: KroneckerShape
    a: np.ndarray
    b: np.ndarray
    error: float
    order: str = B_FIRST
    scheme: str = "kronecker"

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    @property
    def macs(self) -> int:
        return self.shape.order_macs(self.rank, self.order)

    @property
    def params(self) -> int:
        return self.shape.params(self.rank)

    def matrix(self) -> np.ndarray:
        """The approximation sum_t A_t (x) B_t, m x n, in float64."""
        return kron_sum(self.a.astype(np.float64), self.b.astype(np.float64))

    def astype(self, dtype: np.dtype) -> KroneckerFactors:
        return KroneckerFactors(self.shape, self.a.astype(dtype), self.b.astype(dtype), self.error, self.order)

    def describe(self) -> str:
        return f"kronecker {self.shape}, rank {self.rank}, {self.order.replace('_', ' ')}"


@dataclass(frozen=True)
class LowRankFactors:
    """W ~ U V: u (m, R), v (R, n); `error` is the predicted relative squared error (the SVD tail of W)."""

    u: np.ndarray
    v: np.ndarray
    error: float
    scheme: str = "lowrank"

    @property
    def rank(self) -> int:
        return int(self.u.shape[1])

    @property
    def macs(self) -> int:
        return self.rank * (self.u.shape[0] + self.v.shape[1])

    @property
    def params(self) -> int:
        return self.macs

    def matrix(self) -> np.ndarray:
        """The approximation U V, m x n, in float64."""
        return self.u.astype(np.float64) @ self.v.astype(np.float64)

    def astype(self, dtype: np.dtype) -> LowRankFactors:
        return LowRankFactors(self.u.astype(dtype), self.v.astype(dtype), self.error)

    def describe(self) -> str:
        return f"lowrank, rank {self.rank}"


FCFactors = KroneckerFactors | LowRankFactors


def _check_rank(rank: int, max_rank: int) -> int:
    if not 1 <= int(rank) <= max_rank:
        raise ValueError(f"rank must be in [1, {max_rank}], got {rank}")
    return int(rank)


def _split(u: np.ndarray, s: np.ndarray, vt: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """(U_R sqrt(S_R), sqrt(S_R) V_R^T): both sides carry the same scale (kind to float16)."""
    root = np.sqrt(s[:rank])
    return u[:, :rank] * root, root[:, None] * vt[:rank]


def nearest_kronecker(weight: np.ndarray, shape: KroneckerShape, rank: int,
                      order: str | None = None) -> KroneckerFactors:
    """The nearest (Frobenius) sum of `rank` Kronecker products of `shape`: the rank-R truncated SVD
    of R(W), U S V^T, split as vec(A_t) = sqrt(s_t) u_t, vec(B_t) = sqrt(s_t) v_t. Exact at
    rank = shape.max_rank. `order` (B first or A first) defaults to the cheaper one."""
    u, s, vt = np.linalg.svd(rearrange(weight, shape), full_matrices=False)
    rank = _check_rank(rank, shape.max_rank)
    left, right = _split(u, s, vt, rank)
    sh = shape
    return KroneckerFactors(shape=sh, a=left.T.reshape(rank, sh.p, sh.q), b=right.reshape(rank, sh.r, sh.s),
                            error=float(tail_errors(s)[rank]), order=order or sh.best_order())


def truncated_svd(weight: np.ndarray, rank: int) -> LowRankFactors:
    """The nearest rank-R matrix U V (Eckart-Young), U = U_R sqrt(S_R), V = sqrt(S_R) V_R^T."""
    w = _checked_matrix(weight)
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    rank = _check_rank(rank, min(w.shape))
    left, right = _split(u, s, vt, rank)
    return LowRankFactors(u=left, v=right, error=float(tail_errors(s)[rank]))


def check_budgets(error_budget: float | None, mac_reduction: float | None) -> None:
    """Exactly one budget: error_budget in [0, 1) or mac_reduction >= 1."""
    if (error_budget is None) == (mac_reduction is None):
        raise OptionError("give exactly one of {0} and {1}", "error_budget", "mac_reduction")
    if error_budget is not None and not 0 <= error_budget < 1:
        raise OptionError(f"{{0}} must be in [0, 1), got {error_budget}", "error_budget")
    if mac_reduction is not None and not mac_reduction >= 1:
        raise OptionError(f"{{0}} must be >= 1, got {mac_reduction}", "mac_reduction")


def error_floor(dtype: np.dtype) -> float:
    """(8 eps)^2 of the weight dtype: an error budget below it keeps numerically-zero terms for
    nothing, so it is raised to it (as allocate.relative_lego does)."""
    return (8 * float(np.finfo(dtype).eps)) ** 2


def _effective_budget(weight: np.ndarray, error_budget: float | None, dtype: np.dtype | None) -> float | None:
    """The error budget raised to the floor of `dtype` (default: the weight's float dtype, else float32)."""
    if error_budget is None:
        return None
    if dtype is None:
        dtype = weight.dtype if np.issubdtype(np.asarray(weight).dtype, np.floating) else np.float32
    return max(error_budget, error_floor(dtype))


def choose_rank(errors: np.ndarray, macs_of_rank, error_budget: float | None = None,
                mac_budget: float | None = None) -> int | None:
    """Under an error budget the smallest R >= 1 with errors[R] <= error_budget; under a MAC budget
    the largest R with macs_of_rank(R) <= mac_budget (None when rank 1 already costs more)."""
    max_rank = len(errors) - 1
    if error_budget is not None:  # errors[max_rank] = 0: some rank always qualifies
        return int(np.argmax(errors[1:] <= error_budget)) + 1
    per_rank = macs_of_rank(1)
    if per_rank > mac_budget:
        return None
    return min(max_rank, int(mac_budget // per_rank))


def _better(a: tuple[float, int], b: tuple[float, int] | None, by_error: bool) -> bool:
    """(error, macs) a beats b: fewer MACs (then lower error) under an error budget, lower error
    (then fewer MACs) under a MAC budget."""
    if b is None:
        return True
    return (a[1], a[0]) < (b[1], b[0]) if not by_error else (a[0], a[1]) < (b[0], b[1])


def search_kronecker(weight: np.ndarray, error_budget: float | None = None, mac_reduction: float | None = None,
                     shapes: list[KroneckerShape] | None = None, max_shapes: int | None = 32,
                     dtype: np.dtype | None = None) -> KroneckerFactors | None:
    """The best sum of Kronecker products over factor shapes (divisor pairs) and ranks.

    Error budget: the fewest MACs with predicted error <= error_budget (raised to error_floor(dtype)),
    lower error on ties. MAC budget: the lowest error with MACs <= m n / mac_reduction, fewer MACs on
    ties. Shapes (default: the proper ones) are visited by their rank-1 cost, cheapest first, at most
    `max_shapes` of them (None: all); each costs one SVD of R(W). None when no shape fits."""
    check_budgets(error_budget, mac_reduction)
    eps = _effective_budget(np.asarray(weight), error_budget, dtype)
    w = _checked_matrix(weight)
    mac_budget = None if mac_reduction is None else w.size / mac_reduction
    candidates = sorted(kronecker_shapes(*w.shape) if shapes is None else shapes, key=lambda sh: sh.macs(1))
    best, best_key = None, None
    for sh in candidates[:max_shapes]:
        if eps is not None and best_key is not None and sh.macs(1) > best_key[1]:
            break  # sorted by rank-1 cost: no later shape is cheaper
        if mac_budget is not None and sh.macs(1) > mac_budget:
            break
        errors = tail_errors(np.linalg.svd(rearrange(w, sh), compute_uv=False))
        rank = choose_rank(errors, sh.macs, eps, mac_budget)
        key = (float(errors[rank]), sh.macs(rank))
        if _better(key, best_key, by_error=eps is None):
            best, best_key = (sh, rank), key
    return None if best is None else nearest_kronecker(w, *best)


def search_lowrank(weight: np.ndarray, error_budget: float | None = None, mac_reduction: float | None = None,
                   dtype: np.dtype | None = None) -> LowRankFactors | None:
    """The truncated SVD with the fewest MACs within error_budget (raised to error_floor(dtype)), or
    the lowest error with MACs <= m n / mac_reduction; None when rank 1 already costs more."""
    check_budgets(error_budget, mac_reduction)
    eps = _effective_budget(np.asarray(weight), error_budget, dtype)
    w = _checked_matrix(weight)
    m, n = w.shape
    rank = choose_rank(tail_errors(np.linalg.svd(w, compute_uv=False)), lambda k: k * (m + n), eps,
                       None if mac_reduction is None else w.size / mac_reduction)
    return None if rank is None else truncated_svd(w, rank)


@dataclass(frozen=True)
class SchemeComparison:
    """Both schemes' best choice for one weight at one budget, and which wins on error per MAC:
    under an error budget the one with fewer MACs (lower error on ties), under a MAC budget the
    one with lower error (fewer MACs on ties); plain low rank, the simpler, on full ties. A scheme
    with no choice (None) loses."""

    kronecker: KroneckerFactors | None
    lowrank: LowRankFactors | None
    dense_macs: int
    winner: str | None  # "kronecker", "lowrank", or None when neither fits

    def chosen(self, scheme: str) -> FCFactors | None:
        """The named scheme's choice."""
        return {"kronecker": self.kronecker, "lowrank": self.lowrank}[scheme]


def compare_schemes(weight: np.ndarray, error_budget: float | None = None, mac_reduction: float | None = None,
                    max_shapes: int | None = 32, dtype: np.dtype | None = None) -> SchemeComparison:
    """search_kronecker and search_lowrank at the same budget, and the winner (SchemeComparison)."""
    kron = search_kronecker(weight, error_budget, mac_reduction, max_shapes=max_shapes, dtype=dtype)
    low = search_lowrank(weight, error_budget, mac_reduction, dtype=dtype)
    by_error = error_budget is None
    keys = {name: (f.error, f.macs) for name, f in (("lowrank", low), ("kronecker", kron)) if f is not None}
    winner = None
    for name, key in keys.items():
        if winner is None or _better(key, keys[winner], by_error):
            winner = name
    return SchemeComparison(kronecker=kron, lowrank=low, dense_macs=int(np.asarray(weight).size), winner=winner)
