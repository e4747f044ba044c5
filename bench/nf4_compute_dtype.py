"""How far bitsandbytes' 4-bit product and fusetune's fused one are from float64 maths, by compute dtype.

For a bitsandbytes NF4 ``Linear4bit`` (192 -> 37, bias, 15 tokens) with each pair of activation
dtype and ``compute_dtype`` (``bnb_4bit_compute_dtype``), and weights quantised from float32 or
float16, prints the norm-wise relative error against float64 maths of what ``Linear4bit``
computes (input, weight and bias in the compute dtype, their exact product) of: bitsandbytes'
output, fusetune's ``lora_linear`` following the compute dtype, and ``lora_linear`` ignoring it (the
activations' dtype, as before the thirty-fifth session); then the same for x's gradient. On CUDA
bitsandbytes 0.50 multiplies in its own fused GEMM, so the comparison is with float64, not with
bitsandbytes bit for bit (``tests/patch/test_qlora_compute_dtype.py``).

    python bench/nf4_compute_dtype.py    (on a GPU, with bitsandbytes installed)
"""

from __future__ import annotations

import bitsandbytes as bnb
import torch

from fusetune.ops.lora import LoraWeights, lora_linear

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
PAIRS = [(BF16, F32), (F16, F32), (F32, BF16), (F32, F16), (F16, BF16), (BF16, F16), (BF16, BF16), (F16, F16)]


def _error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value.detach().double() - reference).norm() / reference.norm())


def _case(weight_dtype: torch.dtype, x_dtype: torch.dtype, compute: torch.dtype) -> str:
    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(192, 37, bias=True, compute_dtype=compute, quant_type="nf4")
    source = (torch.randn(37, 192) * 0.05).to(weight_dtype)
    layer.weight = bnb.nn.Params4bit(source, requires_grad=False, quant_type="nf4", module=layer)
    layer.bias = torch.nn.Parameter(torch.randn(37) * 0.1, requires_grad=False)
    layer = layer.cuda()
    x = torch.randn(15, 192, device="cuda").to(x_dtype).requires_grad_()
    grad = torch.randn(15, 37, device="cuda").to(x_dtype)
    dense = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(compute).double()
    # Before the forward, which rounds Linear4bit's bias to x's dtype in place (both ops then read it).
    exact = x.detach().to(compute).double() @ dense.t() + layer.bias.detach().to(compute).double()
    exact_dx = grad.to(compute).double() @ dense
    theirs = layer(x)
    theirs.backward(grad)
    theirs_dx, x.grad = x.grad, None
    weights = LoraWeights(layer.weight, None, None, 0.0, layer.bias, compute_dtype=compute)
    following = lora_linear(x, weights)[0]
    following.backward(grad)
    ignoring = lora_linear(x, weights._replace(compute_dtype=None))[0]
    return (f"weight {str(weight_dtype)[6:]:8} x {str(x_dtype)[6:]:8} compute {str(compute)[6:]:8} | output: "
            f"bitsandbytes {_error(theirs, exact):.2e}, fusetune {_error(following, exact):.2e}, ignoring "
            f"the compute dtype {_error(ignoring, exact):.2e} | dx: bitsandbytes "
            f"{_error(theirs_dx, exact_dx):.2e}, fusetune {_error(x.grad, exact_dx):.2e}")


def main() -> None:
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "bitsandbytes", bnb.__version__)
    for weight_dtype in (F32, F16):
        for x_dtype, compute in PAIRS:
            print(_case(weight_dtype, x_dtype, compute), flush=True)


if __name__ == "__main__":
    main()
