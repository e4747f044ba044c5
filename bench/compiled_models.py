"""Tiny models under torch.compile, with and without fusetune's patches: how far a compiled training
step's loss and gradients are from the same step run eagerly, beside how far two eager steps are.

fusetune's kernels run as they do eagerly in a compiled patched model (the norms, RoPE and GLUs as
opaque custom ops inside the graph, the fused loss and LoRA between graphs), so what can differ from
eager is Inductor's code for the model's own layers. Comparing the same models unpatched
tells whether a gradient difference comes from the patches or from compiling the model's bf16 ops.
Each record: a model (the tiny text Llama of ``tests/patch/models.py`` or one of the tiny VLMs of
``tests/patch/vlm_models.py``, sdpa attention), patched or not (system ``fusetune`` / ``hf``), the
worst parameter's gradient difference as a fraction of that gradient's largest element, its name,
the five worst parameters' differences, and the loss difference; metric ``compiled_grad_error``
for compiled against eager and ``eager_grad_error`` for a second eager step against the first (the
step's own nondeterminism).

    python bench/compiled_models.py --out bench/results            # bf16 + Inductor on a GPU
    python bench/compiled_models.py --out /some/folder --quick     # float32 + aot_eager on a CPU
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import common
import torch

ROOT = Path(__file__).resolve().parents[1]
TOP = 5  # the worst parameters a record lists


def gradient_errors(gradients: dict, reference: dict) -> dict[str, float]:
    """``max|g - g_ref| / max|g_ref|`` of every parameter, the largest first."""
    errors = {}
    for name, expected in reference.items():
        scale = expected.abs().max().item()
        difference = (gradients[name] - expected).abs().max().item()
        errors[name] = difference / scale if scale > 0 else difference
    return dict(sorted(errors.items(), key=lambda item: item[1], reverse=True))


def step(model: torch.nn.Module, called, inputs: dict) -> tuple[float, dict]:
    """The loss and every trainable gradient (float32) after one forward + backward through ``called``."""
    model.zero_grad(set_to_none=True)
    loss = called(**inputs).loss
    loss.backward()
    return loss.item(), {name: p.grad.float().clone() for name, p in model.named_parameters()
                         if p.requires_grad and p.grad is not None}


def build(name: str, dtype: torch.dtype, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """The tiny model ``name`` (``llama`` or a key of ``VLMS``) and its batch, on ``device``."""
    from tests.patch.models import batch, tiny_model
    from tests.patch.vlm_models import tiny_vlm, vlm_batch

    if name == "llama":
        model, inputs = tiny_model("llama"), batch()
    else:
        model, inputs = tiny_vlm(name, "sdpa"), vlm_batch(name)
    model = model.to(device, dtype)
    inputs = {key: value.to(device, dtype if value.is_floating_point() else None)
              for key, value in inputs.items()}
    return model, inputs


def compare(name: str, patched: bool, backend: str, dtype: torch.dtype, device: torch.device) -> list[dict]:
    """One model, patched or not: its records, eager against eager and compiled against eager."""
    import fusetune

    model, inputs = build(name, dtype, device)
    if patched:
        fusetune.apply(model)
    config = {"model": name, "backend": backend, "dtype": str(dtype).removeprefix("torch.")}
    system = "fusetune" if patched else "hf"
    eager_loss, eager = step(model, model, inputs)
    again_loss, again = step(model, model, inputs)
    torch._dynamo.reset()
    compiled_loss, compiled = step(model, torch.compile(model, backend=backend), inputs)
    rows = []
    for metric, loss, gradients in (("eager_grad_error", again_loss, again),
                                    ("compiled_grad_error", compiled_loss, compiled)):
        errors = gradient_errors(gradients, eager)
        worst, error = next(iter(errors.items()))
        row = common.record(system, config, metric, error, worst_parameter=worst,
                            worst_parameters=dict(list(errors.items())[:TOP]),
                            loss_difference=abs(loss - eager_loss), eager_loss=eager_loss)
        print(f"{name:12s} {system:9s} {metric:20s} {error:.3e} ({worst}); loss {row['loss_difference']:.2e}",
              flush=True)
        rows.append(row)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for the JSON lines")
    parser.add_argument("--tag", default="h200", help="results file is compiled-models-<tag>.jsonl")
    parser.add_argument("--quick", action="store_true", help="float32 and aot_eager (runs on a CPU)")
    parser.add_argument("--models", default=None, help="comma list (default: llama and every tiny VLM)")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))  # fusetune and the tests' tiny models from this checkout
    from tests.patch.vlm_models import VLMS

    cuda = torch.cuda.is_available() and not args.quick
    device = torch.device("cuda" if cuda else "cpu")
    dtype, backend = (torch.bfloat16, "inductor") if cuda else (torch.float32, "aot_eager")
    names = args.models.split(",") if args.models else ["llama", *VLMS]
    path = common.open_results(args.out / f"compiled-models-{args.tag}.jsonl")
    print(f"environment: {common.environment()}\nresults: {path}", flush=True)
    for name in names:
        for patched in (False, True):
            try:
                compare(name, patched, backend, dtype, device)
            except Exception as exc:  # one model's failure is recorded; the others still run
                common.record("fusetune" if patched else "hf", {"model": name, "backend": backend},
                              "compiled_grad_error", None, common.describe(exc))
                print(f"{name} patched={patched}: {common.describe(exc)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
