"""The README's main job, end to end on the real embedded model (SmolLM2-135M, offline)."""

import json
import os

import pytest
import torch

from corda_kernels import cli
from corda_kernels.integrations import loading

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2_available():
    try:
        loading.default_model_location()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


def test_init_main_job(tmp_path, smollm2_available, capsys):
    out = tmp_path / "run"
    code = cli.main(
        [
            "init",
            "--mode",
            "kpa",
            "--rank",
            "4",
            "--samples",
            "8",
            "--seq-len",
            "48",
            "--batch-size",
            "4",
            "--targets",
            r"model\.layers\.(0|29)\..*",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0, printed
    report = json.loads((out / "report.json").read_text())
    assert report["check_ok"] and report["method"] == "corda-kpa"
    assert len(report["energy"]["per_layer"]) == 14
    assert [s["name"] for s in report["stages"]] == ["load", "calibrate", "decompose", "export"]
    assert "output check" in printed and "peak RSS" in printed and "q_proj" in printed
    for path in [
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "residual_model/config.json",
        "covariances/covariances.safetensors",
    ]:
        assert (out / path).exists(), path

    # The written adapter on the written residual base reproduces the original model.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    original, tokenizer = loading.load_model(None, None)
    residual = AutoModelForCausalLM.from_pretrained(str(out / "residual_model"))
    adapted = PeftModel.from_pretrained(residual, str(out / "adapter")).eval()
    batch = tokenizer(["The capital of France is"], return_tensors="pt")
    with torch.no_grad():
        want, got = original(**batch).logits, adapted(**batch).logits
    assert (got - want).abs().max() < 2e-4


def test_report_command(tmp_path, smollm2_available, capsys):
    code = cli.main(
        [
            "report",
            "--samples",
            "4",
            "--seq-len",
            "32",
            "--eval-samples",
            "4",
            "--discard",
            "0,16",
            "--targets",
            r"model\.layers\.(3|4)\.mlp\..*",
            "--out",
            str(tmp_path),
            "--no-progress",
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0
    assert "| discarded r | SVD | ASVD | CO-SVD |" in printed
    assert os.path.getsize(tmp_path / "discard_report.png") > 1000
    rows = [line for line in printed.splitlines() if line.startswith("| 16 |")]
    svd, asvd, cosvd = (float(v) for v in rows[0].strip("|").split("|")[1:])
    assert cosvd <= svd  # the paper's central claim, on real weights and text


def test_bad_arguments(tmp_path, capsys):
    code = cli.main(
        ["init", "--calib", str(tmp_path / "missing.jsonl"), "--model", str(tmp_path), "--out", str(tmp_path)]
    )
    assert code == 2
    assert "error" in capsys.readouterr().err


def test_init_quantized(tmp_path, smollm2_available, capsys):
    """``--quantize nf4``: the residual is written as a pre-quantized 4-bit checkpoint that transformers
    loads, and the output check is reported, not enforced (quantizing changes the logits)."""
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "run"
    args = ["init", "--rank", "4", "--samples", "4", "--seq-len", "32", "--batch-size", "4", "--quantize", "nf4"]
    args += ["--targets", r"model\.layers\.0\..*", "--out", str(out), "--no-progress"]
    code = cli.main(args)
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "not checked (nf4 residual)" in printed
    config = json.loads((out / "residual_model" / "config.json").read_text())
    assert config["quantization_config"]["load_in_4bit"] and config["quantization_config"]["bnb_4bit_use_double_quant"]
