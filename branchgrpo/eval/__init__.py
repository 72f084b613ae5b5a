"""Evaluation: distribution distances between sample sets (KID, MMD^2, permutation tests) and the image feature
extractors they run on. `diversity` is pure numpy; `features` imports open_clip / torchvision only when an
extractor is built."""

from branchgrpo.eval.diversity import (  # noqa: F401
    KIDResult,
    PermutationResult,
    compare_feature_sets,
    kid,
    median_bandwidth,
    mmd2_rbf,
    mmd2_unbiased,
    permutation_test,
    polynomial_kernel,
    rbf_kernel,
)
