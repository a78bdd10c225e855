"""The Python package against the `factpatch` binary and independent readings of the files.

MEMIT patches are compiled on `fixtures/tiny-llama` with a byte-level tokenizer, as the Rust
tests do (a compile takes well under a second), with key statistics computed once by
`factpatch stats` from a small corpus in 64-token chunks (the model has 128 positions). The
CLI binary is `target/release/factpatch` (built by `cargo test --release`), or `$FACTPATCH_BIN`.
"""

import json
import os
import random
import re
import shutil
import subprocess
from pathlib import Path

import blake3
import numpy as np
import pytest

import factpatch

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("FACTPATCH_BIN", ROOT / "target/release/factpatch"))
FACT = "{} is located in the city of|The Eiffel Tower|Rome"
TOUCHED = ["model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"]


def byte_chars():
    """GPT-2's byte → printable character map (a byte-level tokenizer with 256 ids)."""
    printable = lambda b: 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255
    chars, extra = [], 0
    for b in range(256):
        if printable(b):
            chars.append(chr(b))
        else:
            extra += 1
            chars.append(chr(255 + extra))
    return chars


def tiny_llama(folder, fixture="tiny-llama"):
    """`fixtures/tiny-llama` (or `fixture`) with a byte-level tokenizer (ids 0-255 of its 512),
    at `folder`."""
    folder.mkdir()
    for name in ["config.json", "model.safetensors"]:
        shutil.copy(ROOT / "fixtures" / fixture / name, folder / name)
    vocab = {c: i for i, c in enumerate(byte_chars())}
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "post_processor": None, "decoder": None,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "vocab": vocab, "merges": []},
    }
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    return folder


STORED = {"F32": "<f4", "BF16": "<u2", "F16": "<u2"}


def read_safetensors(path):
    """Every tensor of a safetensors file, read from the format's own layout: F32 as float32,
    BF16 and F16 as their raw 16 bits."""
    data = Path(path).read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    header.pop("__metadata__", None)
    tensors = {}
    for name, info in header.items():
        start, end = info["data_offsets"]
        tensors[name] = np.frombuffer(data[8 + n + start : 8 + n + end], dtype=STORED[info["dtype"]]).reshape(info["shape"])
    return tensors


def write_safetensors(path, tensors):
    """A safetensors file of F32 arrays, header padded to 8 bytes."""
    header, offset = {}, 0
    for name, a in tensors.items():
        header[name] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    data = b"".join(np.ascontiguousarray(a, dtype="<f4").tobytes() for a in tensors.values())
    Path(path).write_bytes(len(text).to_bytes(8, "little") + text + data)


def cli(*args):
    """Runs the binary, which must succeed; returns stdout."""
    assert BIN.is_file(), f"{BIN} is missing: run `cargo build --release` first, or set FACTPATCH_BIN"
    done = subprocess.run([str(BIN), *map(str, args)], capture_output=True, text=True)
    assert done.returncode == 0, f"factpatch {args}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="session")
def scene(tmp_path_factory):
    """A scratch folder with the model, its key statistics, and `factpatch`'s caches (the
    library's too)."""
    root = tmp_path_factory.mktemp("scene")
    os.environ["FACTPATCH_CACHE"] = str(root / "cache")
    corpus, model, stats = root / "corpus.txt", tiny_llama(root / "model"), root / "stats.safetensors"
    # Sixty different documents: one sentence repeated gives too few distinct keys for C to be
    # positive definite.
    words = "the union of the state and the people shall be one nation under law river city north south".split()
    rng = random.Random(0)
    corpus.write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(40)) for _ in range(60)))
    cli("stats", "--layers", "0-1", "--seq-len", "64", "--tokens", "2000", "--model", model, "--corpus", corpus, "--out", stats)
    return {"root": root, "model": model, "stats": stats}


@pytest.fixture(scope="session")
def memit(scene):
    """A MEMIT patch with RECT 40 compiled by the CLI, and the id it printed."""
    out = scene["root"] / "cli.fpatch"
    stdout = cli("compile", "--model", scene["model"], "--fact", FACT, "--stats", scene["stats"], "--out", out)
    printed = re.search(r"^patch (fp1-[0-9a-f]{64}): 1 fact\(s\)", stdout, re.M)
    assert printed, stdout
    return out, printed.group(1)


def test_a_patch_reads_as_the_cli_wrote_it(scene, memit):
    path, printed = memit
    p = factpatch.Patch(path)
    data = path.read_bytes()
    assert p.id == printed == "fp1-" + blake3.blake3(data[:-32]).hexdigest() == "fp1-" + data[-32:].hex()
    assert Path(p.path) == path

    assert p.edits == p.manifest["edits"] == [
        {"subject": "The Eiffel Tower", "relation": "{} is located in the city of", "prompt": "{} is located in the city of",
         "target_old": "", "target_new": "Rome"}
    ]
    assert p.manifest["method"]["name"] == "memit" and p.manifest["rect_k"] == 40
    assert p.manifest["stats_id"] is not None and p.manifest["parent"] is None

    # Tensors, dtypes and shapes as the model stores them: MEMIT's layers of a 2-layer model.
    stored = read_safetensors(scene["model"] / "model.safetensors")
    assert p.tensors == [(name, "F32", stored[name].shape, "low_rank_rect") for name in TOUCHED]


def test_deltas_are_the_applied_change(scene, memit, tmp_path):
    path, _ = memit
    p = factpatch.Patch(path)
    deltas = p.deltas(scene["model"])
    summary = factpatch.apply(scene["model"], [path], tmp_path / "edited")
    assert summary["patches"] == [p.id] and summary["tensors_patched"] == 2 and len(summary["identity"]) == 64

    base = read_safetensors(scene["model"] / "model.safetensors")
    edited = read_safetensors(tmp_path / "edited/model.safetensors")
    assert sorted(deltas) == TOUCHED
    for name, w in base.items():
        if name not in deltas:
            assert np.array_equal(edited[name], w), f"{name} changed"
            continue
        d = deltas[name]
        assert w.dtype == d.dtype == np.float32 and d.shape == w.shape
        # factpatch apply writes W + D in f32 where D ≠ 0, and leaves the rest as it was.
        assert np.array_equal(edited[name], np.where(d != 0, w + d, w)), name
        # RECT 40 keeps ceil(40% of the elements) of each update.
        assert np.count_nonzero(d) == -(-40 * d.size // 100), name
        assert np.abs(d).max() > 0


def test_deltas_without_the_model(scene, tmp_path):
    # Without RECT the deltas need no model, and are the same with it.
    path = tmp_path / "no-rect.fpatch"
    factpatch.compile(scene["model"], FACT, out=path, rect=None, stats=scene["stats"])
    p = factpatch.Patch(path)
    assert [t[3] for t in p.tensors] == ["low_rank", "low_rank"]
    alone, against = p.deltas(), p.deltas(scene["model"])
    assert sorted(alone) == sorted(against) == TOUCHED
    for name in TOUCHED:
        assert np.array_equal(alone[name], against[name]) and np.count_nonzero(alone[name]) == alone[name].size


def test_rect_deltas_need_the_model(memit):
    path, _ = memit
    with pytest.raises(factpatch.Error, match="RECT") as e:
        factpatch.Patch(path).deltas()
    assert str(path) in str(e.value) and TOUCHED[0] in str(e.value)


def test_verify_accepts_the_base_and_refuses_another_model(scene, memit, tmp_path):
    path, _ = memit
    p = factpatch.Patch(path)
    p.verify(scene["model"])

    # Another model: the tiny GPT-2 fixture.
    with pytest.raises(factpatch.Error, match="identity") as e:
        p.verify(ROOT / "fixtures/tiny-gpt2")
    assert str(path) in str(e.value)

    # The same model with one weight of a touched tensor changed.
    other = tmp_path / "other"
    shutil.copytree(scene["model"], other)
    data = bytearray((other / "model.safetensors").read_bytes())
    n = int.from_bytes(data[:8], "little")
    start = json.loads(data[8 : 8 + n])[TOUCHED[1]]["data_offsets"][0]
    data[8 + n + start] ^= 1
    (other / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(factpatch.Error, match="identity") as e:
        p.verify(other)
    assert str(path) in str(e.value) and str(other) in str(e.value)


def test_delta_for_checks_the_live_tensor(scene, memit):
    path, _ = memit
    p = factpatch.Patch(path)
    w = read_safetensors(scene["model"] / "model.safetensors")[TOUCHED[0]]
    raw = np.frombuffer(w.tobytes(), dtype=np.uint8)
    assert np.array_equal(p.delta_for(TOUCHED[0], "F32", list(w.shape), raw), p.deltas(scene["model"])[TOUCHED[0]])

    changed = raw.copy()
    changed[0] ^= 1
    with pytest.raises(factpatch.Error, match="differs from the patch's base") as e:
        p.delta_for(TOUCHED[0], "F32", list(w.shape), changed)
    expected = blake3.blake3(raw.tobytes()).hexdigest()
    assert str(path) in str(e.value) and TOUCHED[0] in str(e.value) and expected in str(e.value)
    with pytest.raises(factpatch.Error, match="BF16"):
        p.delta_for(TOUCHED[0], "BF16", [64, 64], raw[: 64 * 64 * 2])
    with pytest.raises(KeyError):
        p.delta_for("lm_head.weight", "F32", list(w.shape), raw)


def test_compile_writes_the_cli_bytes(scene, memit, tmp_path):
    cli_path, printed = memit
    out = tmp_path / "python.fpatch"
    patch_id = factpatch.compile(scene["model"], FACT, out=out, stats=scene["stats"])
    assert patch_id == printed and out.read_bytes() == cli_path.read_bytes()


def test_errors_name_the_file(scene, memit, tmp_path):
    path, _ = memit
    garbage, truncated, missing = tmp_path / "garbage.fpatch", tmp_path / "truncated.fpatch", tmp_path / "missing.fpatch"
    garbage.write_bytes(b"this is not a patch at all, only some bytes")
    truncated.write_bytes(path.read_bytes()[:100])
    for bad, says in [(garbage, "not a factpatch patch"), (truncated, "truncated"), (missing, "No such file")]:
        with pytest.raises(factpatch.Error, match=says) as e:
            factpatch.Patch(bad)
        assert str(bad) in str(e.value) and "\n" not in str(e.value)
    assert issubclass(factpatch.Error, Exception)

    existing = tmp_path / "existing.fpatch"
    existing.write_bytes(b"keep me")
    with pytest.raises(factpatch.Error, match="exists") as e:
        factpatch.compile(scene["model"], FACT, out=existing, stats=scene["stats"])
    assert str(existing) in str(e.value) and existing.read_bytes() == b"keep me"
    with pytest.raises(factpatch.Error, match="PROMPT|SUBJECT|TARGET"):
        factpatch.compile(scene["model"], "no pipes here", out=tmp_path / "x.fpatch", stats=scene["stats"])
    with pytest.raises(factpatch.Error, match="already exists"):
        factpatch.apply(scene["model"], [path], tmp_path)
    with pytest.raises(factpatch.Error, match="not a factpatch patch") as e:
        factpatch.apply(scene["model"], [garbage], tmp_path / "out")
    assert str(garbage) in str(e.value) and not (tmp_path / "out").exists()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_apply_to_model_matches_apply(scene, memit, tmp_path, dtype):
    """With torch and transformers installed: the live model edited in place holds the bytes
    `factpatch apply` writes, in float32 and in bfloat16 (rounded once, to nearest-even). CI has
    neither; the example in python/examples runs it on SmolLM2."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    if dtype == "float32":
        model_dir, path = scene["model"], memit[0]
    else:
        model_dir, stats, path = tiny_llama(tmp_path / "model", "tiny-llama-bf16"), tmp_path / "stats.safetensors", tmp_path / "bf16.fpatch"
        cli("stats", "--layers", "0-1", "--seq-len", "64", "--tokens", "2000", "--model", model_dir, "--corpus", scene["root"] / "corpus.txt", "--out", stats)
        factpatch.compile(model_dir, FACT, out=path, stats=stats)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    factpatch.apply_to_model(model, path)
    factpatch.apply(model_dir, [path], tmp_path / "edited")
    edited = read_safetensors(tmp_path / "edited/model.safetensors")
    raw = lambda w: w.numpy() if w.dtype == torch.float32 else w.view(torch.int16).numpy().view("<u2")
    for name, w in model.state_dict().items():
        expected = edited.get(name)
        if expected is None:  # a tensor the checkpoint does not store (tied, buffers)
            assert torch.equal(w, before[name])
        else:
            assert np.array_equal(raw(w), expected), name
    assert not torch.equal(model.state_dict()[TOUCHED[0]], before[TOUCHED[0]])

    # Applying it again: the touched tensors are no longer its base, and nothing changes.
    again = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(factpatch.Error, match="differs from the patch's base"):
        factpatch.apply_to_model(model, path)
    assert all(torch.equal(v, again[k]) for k, v in model.state_dict().items())


def test_apply_to_model_finds_gpt2_tensors_behind_the_lm_head_prefix(tmp_path):
    """With torch and transformers installed: a patch made on a GPT-2 checkpoint that stores
    `h.1.mlp.c_proj.weight` (as the original GPT-2 files do) applies to `GPT2LMHeadModel`,
    whose state_dict calls it `transformer.h.1.mlp.c_proj.weight`, with no transpose (Conv1D
    weights are stored as PyTorch holds them)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    fixture = ROOT / "fixtures/tiny-gpt2"
    tensors = {k.removeprefix("transformer."): v for k, v in read_safetensors(fixture / "model.safetensors").items()}
    name = "h.1.mlp.c_proj.weight"
    edited = dict(tensors)
    edited[name] = tensors[name] + np.outer(np.linspace(-1, 1, 256), np.linspace(0, 0.01, 64)).astype(np.float32)
    for folder, weights in [("base", tensors), ("edited", edited)]:
        (tmp_path / folder).mkdir()
        shutil.copy(fixture / "config.json", tmp_path / folder / "config.json")
        write_safetensors(tmp_path / folder / "model.safetensors", weights)
    path = tmp_path / "diff.fpatch"
    cli("diff", "--from", tmp_path / "base", "--to", tmp_path / "edited", "--out", path)
    assert [t[:3] for t in factpatch.Patch(path).tensors] == [(name, "F32", (256, 64))]

    model = transformers.AutoModelForCausalLM.from_pretrained(fixture, dtype=torch.float32)
    factpatch.apply_to_model(model, path)
    state = model.state_dict()
    assert np.array_equal(state["transformer." + name].numpy(), edited[name])
    for key, w in state.items():
        stored = tensors.get(key.removeprefix("transformer."))
        if stored is not None and key != "transformer." + name:
            assert np.array_equal(w.numpy(), stored), key
