"""One comparison for the tensor-parallel equivalence tests: a parallel model against the
one-device reference, on the same inputs.

``errors_against_reference`` returns the differences larger than ``tol`` (max abs): of the outputs
of ``model(*args)`` (logits), of the losses of ``model(*args, labels=labels)``, and, after both
losses' backward, of every gradient of ``ref`` against ``grads_of(model)[name]`` (e.g. the TP shards
gathered by ``megacore.parallel.gather_full_state_dict(model, grads=True)``). A reference parameter
without a gradient is compared only if the model's has one.
"""

from __future__ import annotations


def errors_against_reference(model, ref, args: tuple, labels, grads_of, tol: float) -> dict[str, float]:
    errors = {"logits": (model(*args) - ref(*args)).abs().max().item()}
    loss, ref_loss = model(*args, labels=labels), ref(*args, labels=labels)
    errors["loss"] = (loss - ref_loss).abs().item()
    loss.backward()
    ref_loss.backward()
    grads = grads_of(model)
    for name, p in ref.named_parameters():
        if p.grad is None and grads.get(name) is None:
            continue
        errors[f"grad {name}"] = (grads[name] - p.grad).abs().max().item()
    return {k: v for k, v in errors.items() if not v <= tol}
