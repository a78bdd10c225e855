"""factpatch for Python: read, verify and apply weight patches, and compile fact edits.

    import factpatch
    patch = factpatch.Patch("eiffel.fpatch")     # read and verified: .id, .edits, .tensors, .manifest
    patch.verify("models/SmolLM2-135M-Instruct")  # the base model's identity and tensor hashes
    factpatch.apply_to_model(model, "eiffel.fpatch")  # a loaded PyTorch / transformers model, in place

Everything but `apply_to_model` runs in Rust (`factpatch._native`), in the library functions
the `factpatch` command line calls, so results are the CLI's to the byte. Errors raise
`factpatch.Error` with the CLI's one-line message, naming the file and the problem.
"""

import json
import os

from . import _native
from ._native import Error, Patch, apply

__all__ = ["Error", "Patch", "apply", "compile", "apply_to_model"]


def _paths(value):
    """None, one path, or an iterable of paths → a list of path strings."""
    if value is None:
        return []
    if isinstance(value, (str, bytes, os.PathLike)):
        return [os.fspath(value)]
    return [os.fspath(v) for v in value]


def compile(
    model,
    fact=None,
    requests=None,
    *,
    out,
    method="memit",
    rect=40,
    layers=None,
    seed=0,
    stats=None,
    corpus=None,
    stats_tokens=100_000,
    cache=None,
    sets=None,
    on=None,
    editor=None,
):
    """Compiles fact edits into a patch written at `out`; returns its id (`fp1-…`).

    As `factpatch compile --model MODEL --fact … --requests … --out OUT` with the same options,
    and the same bytes: `fact` is one `'PROMPT|SUBJECT|TARGET'` string or a list of them,
    `requests` one request file or a list (formats/requests.md); `method` is memit, rome,
    emmet, alphaedit, encore, kn or mend (with `editor`, a file from `factpatch mend train`); `rect` the RECT percentage kept (None keeps the whole update);
    `layers` a list of layer indices (default: the family's). Key statistics come from the file
    `stats`, else from the `corpus` file(s) (computed once with `stats_tokens` tokens, then
    cached in `cache`, default `$FACTPATCH_CACHE/stats`), else from the cache. `sets` maps
    hyperparameter names to values (`--set KEY=JSON`), `on` lists patches already applied.
    """
    facts = [fact] if isinstance(fact, str) else list(fact or [])
    assignments = [f"{key}={json.dumps(value)}" for key, value in (sets or {}).items()]
    return _native.compile(
        os.fspath(model),
        os.fspath(out),
        facts,
        _paths(requests),
        method,
        None if rect is None else float(rect),
        None if layers is None else [int(layer) for layer in layers],
        int(seed),
        None if stats is None else os.fspath(stats),
        _paths(corpus),
        int(stats_tokens),
        None if cache is None else os.fspath(cache),
        assignments,
        _paths(on),
        None if editor is None else os.fspath(editor),
    )


def _state_key(state, name, patch):
    """The `state_dict` key holding the stored tensor `name`: the name itself, or the one key
    ending with `.name` (GPT-2's LM head model adds `transformer.`, wrappers add their own)."""
    if name in state:
        return name
    keys = [k for k in state if k.endswith("." + name)]
    if len(keys) == 1:
        return keys[0]
    found = "none" if not keys else ", ".join(keys)
    raise Error(f"{patch.path}: tensor `{name}` is not one tensor of the model's state_dict (keys ending with it: {found})")


def apply_to_model(model, patch):
    """Adds a patch's deltas in place to a loaded PyTorch model; returns the `Patch`.

    `model` is a `torch.nn.Module` (e.g. a transformers `LlamaForCausalLM` or
    `GPT2LMHeadModel`) whose `state_dict()` holds each touched tensor under its stored name,
    possibly behind a prefix. GPT-2's Conv1D weights are stored as PyTorch holds them, so no
    tensor is transposed. `patch` is a path or a `Patch`.

    Before anything changes, every touched tensor is checked against the patch's base (dtype,
    shape, and the blake3 of its bytes, by the same Rust function `factpatch apply` uses), and
    its RECT mask is computed against the live weights; any mismatch raises `factpatch.Error`
    and leaves the model as it was. Each changed element becomes W + D rounded to the tensor's
    dtype, as `factpatch apply` writes it. The model-wide identity a patch may record is not
    checked: the live model's tensors need not be the checkpoint's.
    """
    import torch

    if not isinstance(patch, Patch):
        patch = Patch(patch)
    dtypes = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
    state = model.state_dict()
    planned = []
    for name, _, _, _ in patch.tensors:
        target = state[_state_key(state, name, patch)]
        if target.dtype not in dtypes:
            raise Error(f"{patch.path}: tensor `{name}` is {target.dtype} in the model; patches apply to float32, float16 and bfloat16 tensors")
        live = target.detach().to("cpu").contiguous()
        data = live.view(torch.uint8).reshape(-1).numpy()
        delta = torch.from_numpy(patch.delta_for(name, dtypes[target.dtype], list(live.shape), data))
        changed = delta != 0
        patched = torch.where(changed, (live.to(torch.float32) + delta).to(live.dtype), live)
        bad = changed & ~torch.isfinite(patched)
        if bad.any():
            index = int(bad.reshape(-1).nonzero()[0])
            raise Error(f"{patch.path}: tensor `{name}` element {index} becomes non-finite once patched")
        planned.append((target, patched))
    with torch.no_grad():
        for target, patched in planned:
            target.copy_(patched)
    return patch
