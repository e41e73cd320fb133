"""The verification rule itself: it must pass what is right and fail what is not."""

import math

import numpy as np
import pytest
import torch

from scanopt import verify
from scanopt._tensor import check_tensor, empty, poisoned


def _ref(shape=(64, 33), seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


def test_rel_l2_exact_and_scaled():
    ref = _ref()
    assert verify.rel_l2(ref, ref) == 0.0
    assert verify.rel_l2(ref * 1.01, ref) == pytest.approx(0.01, rel=1e-9)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_output_never_passes(bad):
    ref = _ref()
    out = ref.copy()
    out[3, 4] = bad
    assert verify.rel_l2(out, ref) == math.inf
    assert not verify.compare("x", out, ref, dtype="float32").passed


def test_non_finite_reference_entries_must_match_exactly():
    ref = _ref((4, 5))
    ref[1, :] = -np.inf  # e.g. the log-sum-exp of fully masked rows
    out = ref.copy()
    assert verify.rel_l2(out, ref) == 0.0
    out[1, 2] = 0.0
    assert verify.rel_l2(out, ref) == math.inf


def test_shape_mismatch_fails():
    assert verify.rel_l2(_ref((3, 4)), _ref((4, 3))) == math.inf


def test_budget_per_dtype():
    ref = _ref()
    out = ref * (1 + 5e-3)
    assert verify.compare("x", out, ref, dtype="bfloat16").passed
    assert not verify.compare("x", out, ref, dtype="float16").passed
    assert not verify.compare("x", out, ref, dtype="float32").passed


def test_twice_the_torch_error_rule():
    ref = _ref()
    noise = _ref(seed=1)
    baseline = ref + 5e-3 * noise  # above the bf16 floor, so the 2x rule binds
    ok = ref + 9.5e-3 * noise
    bad = ref + 10.5e-3 * noise
    assert verify.compare("x", ok, ref, dtype="bfloat16", baseline=baseline).passed
    assert not verify.compare("x", bad, ref, dtype="bfloat16", baseline=baseline).passed


def test_floor_keeps_exact_baseline_from_demanding_bit_identity():
    ref = _ref()
    out = ref * (1 + 1e-6)
    assert verify.compare("x", out, ref, dtype="float32", baseline=ref).passed
    assert not verify.compare("x", ref * (1 + 1e-5), ref, dtype="float32", baseline=ref).passed


def test_torch_bf16_tensors_are_compared_in_float64():
    ref = _ref()
    out = torch.tensor(ref).to(torch.bfloat16)
    check = verify.compare("x", out, ref)
    assert check.dtype == "bfloat16"
    assert 1e-4 < check.err < 5e-3 and check.passed


def test_report_collects_and_asserts():
    ref = _ref()
    report = verify.Report("op", "case")
    with pytest.raises(AssertionError, match="no checks|FAILED"):
        report.assert_ok()  # a report with no checks is not a pass
    report.check("out", ref, ref, dtype="float32")
    report.assert_ok()
    report.check("grad", ref + 1, ref, dtype="float32")
    assert not report.passed
    with pytest.raises(AssertionError, match="grad"):
        report.assert_ok()
    assert "FAILED" in report.summary()


def test_unknown_dtype_is_an_error():
    with pytest.raises(ValueError, match="dtype"):
        verify.compare("x", _ref(), _ref(), dtype="int8")


def test_poisoned_allocation(monkeypatch):
    monkeypatch.setenv("SCANOPT_POISON", "1")
    assert torch.isnan(empty((3, 4), torch.float32, "cpu")).all()
    assert torch.isnan(poisoned((2,), torch.bfloat16, "cpu")).all()
    monkeypatch.setenv("SCANOPT_POISON", "0")
    assert empty((3, 4), torch.float16, "cpu").shape == (3, 4)


def test_check_tensor_names_the_argument():
    t = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"^u must have 3 dimensions"):
        check_tensor("u", t, ndim=3)
    with pytest.raises(ValueError, match=r"^A must have shape \(2, \*, 4\)"):
        check_tensor("A", torch.zeros(2, 3, 5), shape=(2, None, 4))
    with pytest.raises(TypeError, match=r"^delta must be float32 or float16 or bfloat16"):
        check_tensor("delta", torch.zeros(2, dtype=torch.int32))
    with pytest.raises(TypeError, match=r"^B must be a torch.Tensor"):
        check_tensor("B", [1.0])
    with pytest.raises(ValueError, match=r"^C is on cpu but the other inputs are on meta"):
        check_tensor("C", t, device=torch.device("meta"))
    assert check_tensor("u", t, ndim=(2, 3)) is t
