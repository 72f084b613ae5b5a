"""Distribution distances between two sets of sample features (the paper's section 3.1: DanceGRPO vs BranchGRPO).

Pure functions on float64 feature matrices `x [m, D]`, `y [n, D]` (numpy; anything array-like is converted).

- Unbiased MMD^2 (Gretton et al. 2012, Lemma 6): the U-statistic
      MMD^2_u = sum_{i!=j} k(x_i, x_j) / (m (m-1)) + sum_{i!=j} k(y_i, y_j) / (n (n-1))
                - 2 sum_{i,j} k(x_i, y_j) / (m n)
  whose expectation is exactly the population MMD^2, so it is ~0 (and can be negative) for equal distributions.
- KID (Binkowski et al. 2018): MMD^2_u with the cubic polynomial kernel k(x, y) = (x.y / D + 1)^3, averaged over
  `num_subsets` random subsets of `subset_size` points of each set (drawn without replacement), reported with the
  standard deviation of the subset estimates (ddof=1).
- MMD^2 with a Gaussian RBF kernel k(x, y) = exp(-||x - y||^2 / (2 h^2)); h defaults to the median heuristic (median
  pairwise distance of the pooled sample), times `bandwidth_scale`.
- A permutation test of H0 "x and y come from the same distribution": the statistic is the full-sample MMD^2_u; its
  null distribution comes from random relabellings of the pooled sample. The joint kernel matrix is computed once and
  every permutation's statistic is a quadratic form in the group indicator, evaluated for a block of permutations at
  a time with one matrix product. p = (1 + #{null >= observed}) / (1 + num_permutations), which is a valid p-value.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

KERNELS = ("polynomial", "rbf")


def _as_features(x, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name}: expected a feature matrix [N, D], got shape {x.shape}")
    if x.shape[0] < 2:
        raise ValueError(f"{name}: the unbiased MMD^2 needs at least 2 samples, got {x.shape[0]}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name}: features contain NaN or inf")
    return x


def polynomial_kernel(x: np.ndarray, y: np.ndarray, degree: int = 3, gamma: float | None = None,
                      coef0: float = 1.0) -> np.ndarray:
    """k(x, y) = (gamma x.y + coef0)^degree with gamma = 1 / D by default (KID's kernel)."""
    gamma = 1.0 / x.shape[1] if gamma is None else gamma
    return (gamma * (x @ y.T) + coef0) ** degree


def squared_distances(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    sq = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2.0 * (x @ y.T)
    return np.maximum(sq, 0.0)  # rounding can make tiny negatives


def rbf_kernel(x: np.ndarray, y: np.ndarray, bandwidth: float) -> np.ndarray:
    """k(x, y) = exp(-||x - y||^2 / (2 bandwidth^2))."""
    if not bandwidth > 0:
        raise ValueError(f"rbf bandwidth must be > 0, got {bandwidth}")
    return np.exp(-squared_distances(x, y) / (2.0 * bandwidth**2))


def median_bandwidth(x: np.ndarray, y: np.ndarray, max_points: int = 2000, seed: int = 0) -> float:
    """Median heuristic: the median pairwise distance within the pooled sample (on a random subset of at most
    `max_points` points, to bound the cost). Depends on the pooled set only, so it is permutation invariant."""
    pooled = np.concatenate([x, y])
    if pooled.shape[0] > max_points:
        pooled = pooled[np.random.default_rng(seed).choice(pooled.shape[0], max_points, replace=False)]
    dist = np.sqrt(squared_distances(pooled, pooled)[np.triu_indices(pooled.shape[0], k=1)])
    median = float(np.median(dist))
    if median <= 0:
        raise ValueError("median heuristic: all pooled points coincide; pass an explicit bandwidth")
    return median


def mmd2_from_kernels(k_xx: np.ndarray, k_yy: np.ndarray, k_xy: np.ndarray) -> float:
    """The unbiased U-statistic from the three kernel blocks (the diagonals of k_xx and k_yy are left out)."""
    m, n = k_xx.shape[0], k_yy.shape[0]
    within_x = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
    within_y = (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
    return float(within_x + within_y - 2.0 * k_xy.mean())


def _kernel_fn(kernel: str, x: np.ndarray, y: np.ndarray, bandwidth: float | None, bandwidth_scale: float,
               degree: int, gamma: float | None, coef0: float):
    """A two-argument kernel function with its parameters resolved (the rbf bandwidth from the pooled sample)."""
    if kernel == "polynomial":
        return (lambda a, b: polynomial_kernel(a, b, degree, gamma, coef0)), None
    if kernel == "rbf":
        h = (median_bandwidth(x, y) if bandwidth is None else float(bandwidth)) * bandwidth_scale
        return (lambda a, b: rbf_kernel(a, b, h)), h
    raise ValueError(f"kernel: expected one of {KERNELS}, got '{kernel}'")


def mmd2_unbiased(x, y, kernel: str = "polynomial", bandwidth: float | None = None, bandwidth_scale: float = 1.0,
                  degree: int = 3, gamma: float | None = None, coef0: float = 1.0) -> float:
    """Unbiased MMD^2 between the full samples `x [m, D]` and `y [n, D]`."""
    x, y = _as_features(x, "x"), _as_features(y, "y")
    k, _ = _kernel_fn(kernel, x, y, bandwidth, bandwidth_scale, degree, gamma, coef0)
    return mmd2_from_kernels(k(x, x), k(y, y), k(x, y))


@dataclass
class KIDResult:
    mean: float
    std: float
    subset_values: np.ndarray  # [num_subsets]
    subset_size: int


def kid(x, y, num_subsets: int = 100, subset_size: int = 1000, seed: int = 0, degree: int = 3,
        gamma: float | None = None, coef0: float = 1.0) -> KIDResult:
    """Kernel Inception Distance: cubic-polynomial MMD^2_u averaged over random subsets.

    `subset_size` is capped at min(m, n) (then every subset of the smaller set is the whole set, and only the
    other set is resampled)."""
    x, y = _as_features(x, "x"), _as_features(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y have different feature sizes: {x.shape[1]} vs {y.shape[1]}")
    if num_subsets < 1:
        raise ValueError(f"num_subsets must be >= 1, got {num_subsets}")
    size = min(subset_size, x.shape[0], y.shape[0])
    rng = np.random.default_rng(seed)
    values = np.empty(num_subsets)
    for s in range(num_subsets):
        xs = x[rng.choice(x.shape[0], size, replace=False)]
        ys = y[rng.choice(y.shape[0], size, replace=False)]
        values[s] = mmd2_from_kernels(polynomial_kernel(xs, xs, degree, gamma, coef0),
                                      polynomial_kernel(ys, ys, degree, gamma, coef0),
                                      polynomial_kernel(xs, ys, degree, gamma, coef0))
    std = float(values.std(ddof=1)) if num_subsets > 1 else 0.0
    return KIDResult(mean=float(values.mean()), std=std, subset_values=values, subset_size=size)


def mmd2_rbf(x, y, bandwidth: float | None = None, bandwidth_scale: float = 1.0) -> tuple[float, float]:
    """(unbiased Gaussian-RBF MMD^2, the bandwidth used); bandwidth None = median heuristic."""
    x, y = _as_features(x, "x"), _as_features(y, "y")
    k, h = _kernel_fn("rbf", x, y, bandwidth, bandwidth_scale, 3, None, 1.0)
    return mmd2_from_kernels(k(x, x), k(y, y), k(x, y)), h


def _permutation_statistics(kernel_NN: np.ndarray, in_x_PN: np.ndarray, m: int, n: int) -> np.ndarray:
    """MMD^2_u for each row of a 0/1 group-indicator matrix (1 = the point is labelled x), all at once.

    With a = indicator of x, b = 1 - a:  a'Ka, a'Kb, b'Kb give the three block sums; the diagonal terms of the
    within-group sums are a'diag(K) and b'diag(K)."""
    diag = np.diag(kernel_NN)
    total, trace = kernel_NN.sum(), diag.sum()
    k_a = in_x_PN @ kernel_NN                    # [P, N]
    a_k_a = (k_a * in_x_PN).sum(1)
    a_k_b = k_a.sum(1) - a_k_a
    b_k_b = total - a_k_a - 2.0 * a_k_b
    trace_a = in_x_PN @ diag
    trace_b = trace - trace_a
    return (a_k_a - trace_a) / (m * (m - 1)) + (b_k_b - trace_b) / (n * (n - 1)) - 2.0 * a_k_b / (m * n)


@dataclass
class PermutationResult:
    statistic: float          # MMD^2_u of the observed split
    p_value: float
    num_permutations: int
    kernel: str
    bandwidth: float | None   # rbf only


def permutation_test(x, y, kernel: str = "rbf", num_permutations: int = 1000, seed: int = 0,
                     bandwidth: float | None = None, bandwidth_scale: float = 1.0, degree: int = 3,
                     gamma: float | None = None, coef0: float = 1.0, block_size: int = 256) -> PermutationResult:
    """Permutation test of "x and y come from the same distribution" with the MMD^2_u statistic."""
    x, y = _as_features(x, "x"), _as_features(y, "y")
    if num_permutations < 1:
        raise ValueError(f"num_permutations must be >= 1, got {num_permutations}")
    m, n = x.shape[0], y.shape[0]
    pooled = np.concatenate([x, y])
    k, h = _kernel_fn(kernel, x, y, bandwidth, bandwidth_scale, degree, gamma, coef0)
    kernel_NN = k(pooled, pooled)
    observed_in_x = np.zeros((1, m + n))
    observed_in_x[0, :m] = 1.0
    observed = float(_permutation_statistics(kernel_NN, observed_in_x, m, n)[0])
    rng = np.random.default_rng(seed)
    exceed = 0
    for start in range(0, num_permutations, block_size):
        count = min(block_size, num_permutations - start)
        # a uniformly random relabelling: the m smallest of N iid uniforms mark the x group
        ranks = rng.random((count, m + n)).argsort(1).argsort(1)
        null = _permutation_statistics(kernel_NN, (ranks < m).astype(np.float64), m, n)
        exceed += int((null >= observed).sum())
    return PermutationResult(statistic=observed, p_value=(1 + exceed) / (1 + num_permutations),
                             num_permutations=num_permutations, kernel=kernel, bandwidth=h)


def compare_feature_sets(x, y, num_subsets: int = 100, subset_size: int = 1000, num_permutations: int = 1000,
                         bandwidth: float | None = None, bandwidth_scale: float = 1.0, seed: int = 0) -> dict:
    """Everything the paper's diversity comparison reports, as a JSON-ready dict."""
    x, y = _as_features(x, "a"), _as_features(y, "b")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"the two feature sets have different sizes: {x.shape[1]} vs {y.shape[1]}")
    kid_result = kid(x, y, num_subsets=num_subsets, subset_size=subset_size, seed=seed)
    rbf_value, h = mmd2_rbf(x, y, bandwidth=bandwidth, bandwidth_scale=bandwidth_scale)
    perm_poly = permutation_test(x, y, kernel="polynomial", num_permutations=num_permutations, seed=seed)
    perm_rbf = permutation_test(x, y, kernel="rbf", num_permutations=num_permutations, seed=seed, bandwidth=h)
    return {
        "num_a": int(x.shape[0]), "num_b": int(y.shape[0]), "feature_dim": int(x.shape[1]),
        "kid": {"mean": kid_result.mean, "std": kid_result.std, "num_subsets": num_subsets,
                "subset_size": kid_result.subset_size},
        "mmd2_rbf": {"value": rbf_value, "bandwidth": h},
        "permutation": {"num_permutations": num_permutations, "seed": seed,
                        "mmd2_polynomial": perm_poly.statistic, "p_value_polynomial": perm_poly.p_value,
                        "mmd2_rbf": perm_rbf.statistic, "p_value_rbf": perm_rbf.p_value},
    }
