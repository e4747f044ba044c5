"""bench/compiled_models.py: its per-parameter measure, on gradients worked out by hand. (Its whole
run is the maths of tests/patch/test_compiled.py, a patched model compiled against eager; on CPU it
runs with ``--quick``.)"""

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
