"""sum_partials: the norms' per-program fp32 partial sums of their parameter gradients, added up and
cast in one launch, checked against float64 sums."""

import pytest
import torch

from fusetune.ops import partial_sums
from fusetune.ops.partial_sums import partial_buffer, sum_partials
from tests.ops.checks import DEVICE, assert_close_to_float64


def filled_buffer(programs, gradients, n_cols):
    buffer = partial_buffer(programs, gradients, n_cols, torch.device(DEVICE))
    gen = torch.Generator().manual_seed(programs * 100 + n_cols)
    buffer.copy_(torch.randn(buffer.shape, generator=gen))
    return buffer


# Program counts below, at and above one tile of rows (512 at the shipped settings), and column
# counts that are not multiples of a program's columns.
@pytest.mark.parametrize("programs", [1, 37, 600])
@pytest.mark.parametrize("n_cols", [5, 130])
@pytest.mark.parametrize("dtypes", [(torch.float32,), (torch.bfloat16,), (torch.bfloat16, torch.float16)],
                         ids=["fp32", "bf16", "bf16+fp16"])
def test_each_gradient_is_its_column_sum_in_its_dtype(programs, n_cols, dtypes):
    buffer = filled_buffer(programs, len(dtypes), n_cols)
    sums = sum_partials(buffer, *dtypes)
    expected = buffer.double().sum(0)
    for index, (total, dtype) in enumerate(zip(sums, dtypes, strict=True)):
        assert total.dtype == dtype and total.shape == (n_cols,)
        assert_close_to_float64(total, expected[index], dtype, f"gradient {index}")


def test_rows_of_the_tile_loop_all_count(monkeypatch):
    """With tiles of 8 rows, 21 programs take three tiles, the last one partly masked."""
    monkeypatch.setattr(partial_sums, "_TILE", 8 * partial_sums._COLUMNS)
    buffer = filled_buffer(21, 1, 3)
    (total,) = sum_partials(buffer, torch.float32)
    assert_close_to_float64(total, buffer.double().sum(0)[0], torch.float32, "sum")


def test_no_gradients_needs_no_buffer():
    assert partial_buffer(8, 0, 16, torch.device(DEVICE)) is None


def test_a_dtype_for_each_gradient_is_required():
    buffer = filled_buffer(4, 2, 8)
    with pytest.raises(ValueError, match="one dtype for each"):
        sum_partials(buffer, torch.float32)
