"""Small random-weight Hugging Face models and tokenizer-like batches, for tests and benchmarks.

Built from configs (no download, a few milliseconds); the same helpers serve the test suite, the
bench scripts and their subprocesses, so none of them edits ``sys.path``.
"""

import contextlib
import os

import torch
from transformers import (
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)


def tiny_llama(hidden=64, layers=2, intermediate=96, heads=4, kv_heads=2, vocab=128, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).to(dtype).eval()


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    config = GPT2Config(n_embd=48, n_layer=2, n_head=4, vocab_size=100, n_positions=64)
    return GPT2LMHeadModel(config).eval()


def tiny_bert(seed=0):
    torch.manual_seed(seed)
    config = BertConfig(
        hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=100
    )
    return BertModel(config).eval()


def tiny_t5(seed=0):
    """A 2+2-layer T5 (encoder-decoder) with a 100-token vocabulary."""
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=100,
        d_model=32,
        d_kv=8,
        d_ff=48,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        decoder_start_token_id=0,
        pad_token_id=0,
    )
    return T5ForConditionalGeneration(config).eval()


def token_batches(vocab, n_batches=3, batch=2, seq=12, seed=0, pad_last=True):
    """Batches like a tokenizer's output, right-padded (the last sequences shorter)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(0, vocab, (batch, seq), generator=g)
        mask = torch.ones(batch, seq, dtype=torch.long)
        if pad_last:
            lengths = torch.randint(seq // 2, seq + 1, (batch,), generator=g)
            for i, length in enumerate(lengths):
                mask[i, length:] = 0
                ids[i, length:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


BENCH_SMALL_ENV = "CORDA_BENCH_SMALL"


def bench_small() -> bool:
    """True when ``CORDA_BENCH_SMALL`` is set (not "" or "0"): the speed suites in ``bench/speed``
    then pick tiny shapes, so CI can run every benchmark once (``--benchmark-disable``) in seconds
    to check that none is broken. Figures from such a run mean nothing."""
    return os.environ.get(BENCH_SMALL_ENV, "") not in ("", "0")


BENCH_CHECK_ENV = "CORDA_BENCH_CHECK"


def bench_check() -> bool:
    """True when ``CORDA_BENCH_CHECK`` is set (not "" or "0") and ``CORDA_BENCH_SMALL`` is not: the
    GPU speed suites then pick the one-command GPU check's shapes (``bench/gpu/run.sh``: the target
    shapes only, few rounds) instead of their full grids. No effect on a CPU."""
    return not bench_small() and os.environ.get(BENCH_CHECK_ENV, "") not in ("", "0")


@contextlib.contextmanager
def peft_loftq_on_weight_device():
    """PEFT's own LoftQ, computed on the weight's device: PEFT 0.21's ``loftq_init`` moves every
    weight to ``"cuda"`` / ``"xpu"``, so on a machine without one it cannot run. Its source with
    that one line changed is PEFT's LoftQ as the oracle of tests and the anchor of benchmarks."""
    import inspect

    from peft.tuners.lora import layer
    from peft.utils import loftq_utils

    line = 'compute_device = "xpu" if is_xpu_available() else "cuda"'
    source = inspect.getsource(loftq_utils.loftq_init)
    if source.count(line) != 1:
        raise RuntimeError(f"peft {loftq_utils.__name__}.loftq_init no longer has the line {line!r}")
    namespace = dict(vars(loftq_utils))
    exec(compile(source.replace(line, "compute_device = device"), inspect.getfile(loftq_utils), "exec"), namespace)
    saved = layer.loftq_init
    layer.loftq_init = namespace["loftq_init"]
    try:
        yield
    finally:
        layer.loftq_init = saved
