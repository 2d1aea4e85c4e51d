"""FP8 linear layers, LoRA merging and compiled decoder layers: what `model.prepare_for_scoring` does to a model.

Tolerances: e4m3 keeps 3 mantissa bits, so one FP8 matmul is within ~4% (relative Frobenius norm) of the bf16 one;
the packed FP8 path against the plain forward of the same FP8 model is compared like the fp32 paths (the same
per-token activation scales in both, so only the reduction order differs).
"""

import numpy as np
import pytest
import torch
from torch import nn

from lmsys_trl.data import load_arena
from lmsys_trl.evaluation import resolve_scoring
from lmsys_trl.fp8 import Float8Linear, fp8_output_errors, most_sensitive, quantize_linear_layers
from lmsys_trl.kernels import compile_decoder_layers, decoder_layers
from lmsys_trl.metrics import softmax
from lmsys_trl.model import letter_token_ids, load_model, load_tokenizer, prepare_for_scoring
from lmsys_trl.scoring import calibration_forward, encode_rows, plain_forward, plain_letter_logits, score_token_rows

from conftest import ARENA_SAMPLE, PANDALM


def relative_error(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_float8_linear_is_close_to_the_linear_it_replaces():
    torch.manual_seed(0)
    linear = nn.Linear(64, 96, bias=True).to(torch.bfloat16)
    fp8 = Float8Linear(linear)
    assert fp8.weight.dtype == torch.float8_e4m3fn and fp8.weight_scale.shape == (1, 96)
    x = torch.randn(3, 7, 64, dtype=torch.bfloat16)  # 21 rows: not a multiple of 16 (padded inside)
    out = fp8(x)
    assert out.shape == (3, 7, 96) and out.dtype == torch.bfloat16
    assert 1e-3 < relative_error(out, linear(x)) < 0.06  # quantised, but close
    x[0, 0] *= 1000  # a large token has its own scale: the others keep their precision
    assert relative_error(fp8(x)[1:], linear(x)[1:]) < 0.06
    with pytest.raises(ValueError, match="divisible by 16"):
        Float8Linear(nn.Linear(60, 96))


def test_quantize_linear_layers_keeps_the_lm_head(tiny_llama):
    model = load_model(str(tiny_llama), [], precision="bf16", device="cpu")
    assert quantize_linear_layers(model) == 7 * 2  # q k v o gate up down, 2 layers
    assert type(model.lm_head) is nn.Linear and isinstance(model.model.layers[0].mlp.down_proj, Float8Linear)
    with pytest.raises(ValueError, match="no nn.Linear layers"):
        quantize_linear_layers(model.model.layers[0])


def test_calibration_ranks_the_layer_whose_inputs_fp8_crushes():
    """A layer fed one huge channel (which its weights ignore) loses the other channels to the per-token scale: the
    calibration pass measures its FP8 output error as the largest, and `most_sensitive` keeps it in bf16."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"plain": nn.Linear(64, 32), "outlier": nn.Linear(64, 32)}).to(torch.bfloat16)
    with torch.no_grad():
        model["outlier"].weight[:, 0] = 0
    x = torch.randn(48, 64, dtype=torch.bfloat16)
    spiky = x.clone()
    spiky[:, 0] = 1e6  # the other channels fall below e4m3's smallest step once scaled

    def forward():
        model["plain"](x), model["outlier"](spiky)

    errors = fp8_output_errors(model, forward)
    assert 1e-3 < errors["plain"] < 0.06 and errors["outlier"] > 0.5
    assert most_sensitive(errors, 0.5) == ["outlier"] and most_sensitive(errors, 0.01) == ["outlier"]
    assert most_sensitive(errors, 0.0) == [] and most_sensitive(errors, 1.0) == ["outlier", "plain"]
    with pytest.raises(ValueError, match="fraction must be in"):
        most_sensitive(errors, 1.5)
    assert quantize_linear_layers(model, skip=most_sensitive(errors, 0.5)) == 1
    assert type(model["outlier"]) is nn.Linear and isinstance(model["plain"], Float8Linear)


@pytest.fixture(scope="module")
def rows_and_adapter(tiny_llama, tmp_path_factory):
    """Inference rows of varied length and a random LoRA adapter saved for the tiny llama."""
    from datasets import concatenate_datasets
    from peft import LoraConfig, get_peft_model

    tokenizer = load_tokenizer(str(tiny_llama))
    data = concatenate_datasets([load_arena(str(PANDALM)).select(range(4)),
                                 load_arena(str(ARENA_SAMPLE)).select(range(3))])
    rows = encode_rows(data, tokenizer, max_length=256)
    torch.manual_seed(0)
    base = load_model(str(tiny_llama), [], precision="fp32", device="cpu")
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    adapter = tmp_path_factory.mktemp("adapter")
    get_peft_model(base, lora).save_pretrained(adapter)
    return tokenizer, rows, str(adapter)


def letter_logits(model, tokenizer, rows, pack):
    return score_token_rows(model, rows, letter_token_ids(tokenizer), tokenizer.pad_token_id, 512, pack=pack)


def test_merged_adapter_scores_like_the_unmerged_one(tiny_llama, rows_and_adapter):
    tokenizer, rows, adapter = rows_and_adapter
    unmerged = load_model(str(tiny_llama), [adapter], precision="fp32", device="cpu")
    merged = load_model(str(tiny_llama), [adapter], precision="fp32", device="cpu", merge_adapters=True)
    assert not any("lora" in name for name, _ in merged.named_modules())
    np.testing.assert_allclose(letter_logits(merged, tokenizer, rows, True),
                               letter_logits(unmerged, tokenizer, rows, True), atol=1e-4, rtol=0)


def test_fp8_keeps_named_and_calibrated_layers_in_bf16(tiny_llama, rows_and_adapter):
    tokenizer, rows, adapter = rows_and_adapter
    load = lambda **kw: load_model(str(tiny_llama), [adapter], precision="fp8", device="cpu", **kw)  # noqa: E731

    def fp8_layers(model):
        return sorted(name for name, m in model.named_modules() if isinstance(m, Float8Linear))

    everything = fp8_layers(load())
    assert len(everything) == 14  # 7 linear layers x 2
    assert fp8_layers(load(fp8_keep=("down_proj",))) == [n for n in everything if not n.endswith("down_proj")]
    calibrate = calibration_forward(rows, tokenizer.pad_token_id, tokens=512)
    calibrated = fp8_layers(load(fp8_keep_fraction=0.25, calibrate=calibrate))
    assert len(calibrated) == 14 - 4 and set(calibrated) < set(everything)
    assert fp8_layers(load(fp8_keep_fraction=0.25, calibrate=calibrate)) == calibrated  # the same rows: same choice
    with pytest.raises(ValueError, match="needs calibration rows"):
        load(fp8_keep_fraction=0.25)
    with pytest.raises(ValueError, match="no row of at most 8 tokens"):
        calibration_forward(rows, tokenizer.pad_token_id, tokens=8)


def test_fp8_packed_path_matches_the_plain_fp8_forward(tiny_llama, rows_and_adapter):
    tokenizer, rows, adapter = rows_and_adapter
    letter_ids = letter_token_ids(tokenizer)
    fp8 = load_model(str(tiny_llama), [adapter], precision="fp8", device="cpu")  # merges, then quantises
    assert sum(isinstance(m, Float8Linear) for m in fp8.modules()) == 14
    packed = letter_logits(fp8, tokenizer, rows, pack=True)
    plain = plain_letter_logits(fp8, rows, letter_ids)
    assert np.abs(softmax(packed) - softmax(plain)).max() < 1e-2  # bf16 activations: kernel parity as on the GPU
    bf16 = load_model(str(tiny_llama), [adapter], precision="bf16", device="cpu", merge_adapters=True)
    shift = np.abs(softmax(packed) - softmax(letter_logits(bf16, tokenizer, rows, pack=True))).max()
    assert 0 < shift < 0.05  # FP8 moves the probabilities a little, no more


def test_compiled_layers_score_like_eager_ones_and_plain_forward_restores_them(tiny_llama, rows_and_adapter):
    tokenizer, rows, adapter = rows_and_adapter
    model = load_model(str(tiny_llama), [adapter], precision="fp32", device="cpu", merge_adapters=True)
    eager = letter_logits(model, tokenizer, rows, pack=True)
    assert compile_decoder_layers(model, backend="aot_eager") == 2
    compiled = letter_logits(model, tokenizer, rows, pack=True)
    np.testing.assert_allclose(compiled, eager, atol=1e-4, rtol=0)
    calls = [layer._compiled_call_impl for layer in decoder_layers(model)]
    assert all(calls)
    with plain_forward(model):
        assert not any(layer._compiled_call_impl for layer in decoder_layers(model))
        assert model.config._attn_implementation == "eager"
    assert [layer._compiled_call_impl for layer in decoder_layers(model)] == calls
    assert model.config._attn_implementation == "sdpa"


def test_resolve_scoring_defaults_per_device(monkeypatch):
    auto = dict(precision="auto", attn_implementation=None, attn_softcapping=True, token_budget=None,
                max_batch_size=None, pack_rows=None, merge_adapters=True, compile_layers=None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # an FP8-capable GPU (H100/H200) still gets bf16
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    gpu = resolve_scoring(auto, "cuda:0")
    monkeypatch.undo()
    assert gpu["pack_rows"] and gpu["compile_layers"] and gpu["attn_implementation"] == "lmsys_flex"
    assert gpu["token_budget"] == 16384 and gpu["merge_adapters"]
    assert gpu["precision"] == "bf16"  # faithful by default: FP8 costs log loss on real weights (opt-in only)
    cpu = resolve_scoring(auto, "cpu")
    assert cpu["precision"] == "fp32" and not cpu["pack_rows"] and not cpu["compile_layers"]
    assert cpu["token_budget"] == 8192 and cpu["attn_implementation"] is None
    assert not resolve_scoring({**auto, "precision": "4bit"}, "cuda:0")["merge_adapters"]  # k-bit: unmerged
    assert not resolve_scoring({**auto, "max_batch_size": 4}, "cuda:0")["pack_rows"]
    with pytest.raises(ValueError, match="cannot be merged into a 4bit base"):
        prepare_for_scoring(_peft_stub(), "4bit", merge_adapters=True)


def _peft_stub():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    return get_peft_model(LlamaForCausalLM(config), LoraConfig(r=2, target_modules=["q_proj"]))


def test_fp8_on_a_gpu_without_fp8_tensor_cores_is_a_clear_error(monkeypatch):
    from lmsys_trl.fp8 import check_fp8_device

    check_fp8_device(torch.device("cpu"))  # the CPU runs FP8 matmuls (slowly): allowed
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    with pytest.raises(ValueError, match="NVIDIA A100 has \\(8, 0\\): use --precision bf16"):
        check_fp8_device(torch.device("cuda:0"))
