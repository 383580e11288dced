"""load_adapter reads PEFT adapters with modules_to_save and LoRA biases (float base: outputs equal PEFT's)."""

import json

import peft
import pytest
import torch
import transformers as tf

import qlora_kit
from qlora_kit import models


def _bert():
    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, num_labels=3)  # fmt: skip
    return tf.BertForSequenceClassification(cfg).eval()


def _trained(pm, inputs):
    """A couple of optimizer steps so that A, B, the saved modules and the biases all differ from their init."""
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.5)
    pm.train()
    for _ in range(2):
        pm(**inputs).loss.backward()
        opt.step()
        opt.zero_grad()
    return pm.eval()


def test_bert_sequence_classification_with_modules_to_save(tmp_path):
    ids = torch.randint(1, 64, (2, 9))
    inputs = {"input_ids": ids, "labels": torch.tensor([0, 2])}
    cfg = peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"])
    pm = _trained(peft.get_peft_model(_bert(), cfg), inputs)
    pm.save_pretrained(tmp_path)
    assert "classifier" in json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"]
    ours = qlora_kit.load_adapter(_bert(), tmp_path)
    with torch.no_grad():
        expected = pm(input_ids=ids).logits
        assert not torch.equal(expected, _bert()(input_ids=ids).logits)
        assert torch.equal(ours(input_ids=ids).logits, expected)


def test_gpt2_bias_lora_only(tmp_path):
    ids = torch.randint(0, 256, (2, 9))
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], bias="lora_only", fan_in_fan_out=True)
    pm = _trained(peft.get_peft_model(models.tiny_gpt2(), cfg), {"input_ids": ids, "labels": ids})
    pm.save_pretrained(tmp_path)
    ours = qlora_kit.load_adapter(models.tiny_gpt2(), tmp_path)
    trained_bias = pm.base_model.model.transformer.h[0].attn.c_attn.base_layer.bias
    assert not torch.equal(trained_bias, models.tiny_gpt2().transformer.h[0].attn.c_attn.bias)
    assert torch.equal(ours.transformer.h[0].attn.c_attn.bias, trained_bias)
    with torch.no_grad():
        assert torch.equal(ours(input_ids=ids).logits, pm(input_ids=ids).logits)


def test_lora_bias_is_refused_by_name(tmp_path):
    cfg = peft.LoraConfig(r=2, target_modules=["q_proj"], lora_bias=True)
    peft.get_peft_model(models.tiny_llama(), cfg).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="lora_bias=True"):
        qlora_kit.load_adapter(models.tiny_llama(), tmp_path)
