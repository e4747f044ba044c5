"""bench/compiled_models.py: its per-parameter measure on gradients worked out by hand, and a
patched model's comparison on CPU (float32, aot_eager), where the compiled and eager steps are the
same maths in the same order: every difference is zero."""

import compiled_models
import pytest
import torch


def test_each_parameter_is_measured_by_its_largest_element_the_worst_first():
    reference = {"small": torch.tensor([1.0, -2.5]), "zero": torch.zeros(2), "exact": torch.ones(3)}
    gradients = {"small": torch.tensor([1.0, -2.0]), "zero": torch.tensor([0.0, 0.1]),
                 "exact": torch.ones(3)}
    errors = compiled_models.gradient_errors(gradients, reference)
    assert list(errors) == ["small", "zero", "exact"]
    assert errors["small"] == pytest.approx(0.5 / 2.5)
    assert errors["zero"] == pytest.approx(0.1)  # a zero reference: the difference itself
    assert errors["exact"] == 0.0


def test_a_patched_models_compiled_step_equals_its_eager_step_on_cpu():
    rows = compiled_models.compare("llama", True, "aot_eager", torch.float32, torch.device("cpu"))
    assert [row["metric"] for row in rows] == ["eager_grad_error", "compiled_grad_error"]
    assert all(row["system"] == "fusetune" and row["config"]["model"] == "llama" for row in rows)
    assert all(row["value"] == 0.0 and row["loss_difference"] == 0.0 for row in rows)
    assert len(rows[1]["worst_parameters"]) == compiled_models.TOP
