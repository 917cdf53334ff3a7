"""Rank policies on hand-computed spectra: each keeps exactly the rank its definition says."""

from __future__ import annotations

import math

import pytest
import torch

from lib_loramerge.errors import LoraMergeError
from lib_loramerge.ops.policies import RankPolicy, policy_from_options

# σ = 4, 3, 2, 1: energies 16, 9, 4, 1 (total 30, cumulative 16/30, 25/30, 29/30, 1); Σσ = 10 (cumulative .4 .7 .9 1)
SIGMA = torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64)


@pytest.mark.parametrize("kind,value,rank", [
    ("rank", 3, 3), ("rank", 10, 4),
    ("threshold", 0.5, 1), ("threshold", 16 / 30, 1), ("threshold", 0.8, 2), ("threshold", 0.9, 3),
    ("threshold", 1.0, 4),
    ("sv_fro", 0.9, 2), ("sv_fro", math.sqrt(25 / 30), 2), ("sv_fro", 0.95, 3), ("sv_fro", 1.0, 4),
    ("sv_cumulative", 0.4, 1), ("sv_cumulative", 0.7, 2), ("sv_cumulative", 0.71, 3), ("sv_cumulative", 1.0, 4),
    ("sv_ratio", 1.0, 1), ("sv_ratio", 1.5, 2), ("sv_ratio", 2.0, 3), ("sv_ratio", 4.0, 4), ("sv_ratio", 100.0, 4),
])
def test_each_policy_keeps_what_its_definition_says(kind, value, rank):
    assert RankPolicy(kind, value).validate().choose(SIGMA) == rank


def test_limits_are_inclusive_and_the_full_spectrum_is_reachable():
    # kohya: sv_ratio keeps σ > σ₁/R (R = 2 would keep 2 here) and every index is capped at len − 1 (R = 4: 3)
    assert RankPolicy("sv_ratio", 2.0).choose(SIGMA) == 3
    assert RankPolicy("sv_ratio", 4.0).choose(SIGMA) == 4
    assert RankPolicy("sv_fro", 1.0).choose(SIGMA) == 4
    # values computed from fp32 factors land a hair off the limit: within 1e-6 counts as meeting it
    assert RankPolicy("sv_ratio", 4.0).choose(SIGMA * torch.tensor([1, 1, 1, 1 - 1e-7], dtype=torch.float64)) == 4


def test_cap_zero_values_and_a_partial_spectrum():
    assert RankPolicy("threshold", 1.0, cap=2).choose(SIGMA) == 2
    assert RankPolicy("sv_ratio", 100.0, cap=3).choose(SIGMA) == 3
    assert RankPolicy("threshold", 1.0).choose(torch.tensor([4.0, 0.0, 0.0])) == 1
    assert RankPolicy("rank", 5).choose(torch.zeros(3)) == 0
    # only the leading values of a sketch, with the true ‖ΔW‖² = 30
    assert RankPolicy("threshold", 0.8).choose(SIGMA[:2], energy=30.0) == 2
    assert RankPolicy("threshold", 0.9).choose(SIGMA[:2], energy=30.0) == 2  # out of reach: all it has
    assert RankPolicy("threshold", 0.6).choose(SIGMA[:2]) == 1  # without it: 16 of 16 + 9 would do
    assert RankPolicy("threshold", 0.6).choose(SIGMA[:2], energy=30.0) == 2  # 16 of 30 does not


@pytest.mark.parametrize("policy,message", [
    (RankPolicy("threshold", 0.0), r"threshold must be in \(0, 1\]"),
    (RankPolicy("sv_cumulative", 1.5), r"sv_cumulative must be in \(0, 1\]"),
    (RankPolicy("sv_ratio", 0.5), "sv_ratio must be at least 1"),
    (RankPolicy("rank", 0), "at least 1"), (RankPolicy("rank", 2.5), "whole number"),
    (RankPolicy("rank", 4, cap=2), "goes with a dynamic policy only"),
    (RankPolicy("sv_fro", float("nan")), "finite number"), (RankPolicy("knee", 1.0), "unknown rank policy"),
])
def test_bad_values_are_one_line_errors(policy, message):
    with pytest.raises(LoraMergeError, match=message):
        policy.validate()


def test_exactly_one_policy_from_options():
    assert policy_from_options(sv_fro=0.9, cap=8) == RankPolicy("sv_fro", 0.9, 8)
    with pytest.raises(LoraMergeError, match="exactly one rank policy.*got none"):
        policy_from_options()
    with pytest.raises(LoraMergeError, match="got --rank, --threshold"):
        policy_from_options(rank=4, threshold=0.5)
    assert "σ ≥ σ_max/2" in RankPolicy("sv_ratio", 2.0, 16).describe()
