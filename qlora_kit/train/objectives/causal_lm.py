"""Causal language modelling: next-token cross-entropy on packed token blocks."""

from __future__ import annotations

import math

import torch
from torch import nn

from ...recipe import Recipe
from .base import Objective


def _from_pretrained_dtype_kw() -> str:
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def lm_activation_bytes(model: nn.Module, recipe: Recipe, a: int) -> int:
    """Rough activation memory of a decoder LM step: with checkpointing only each layer's input is kept,
    plus one layer recomputed in full; logits (fp32, with their gradient) on top.

    Args:
        model: the LM (only its ``config`` is read, so a weightless ``meta`` model works).
        recipe: batch size, sequence length and gradient checkpointing.
        a: bytes per activation element.
    """
    cfg = getattr(model, "config", None)
    h = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", 0)
    layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", 0)
    ffn = getattr(cfg, "intermediate_size", None) or 4 * h
    vocab = getattr(cfg, "vocab_size", 0)
    tokens = recipe.batch_size * recipe.seq_len
    per_layer = tokens * (12 * h + 3 * ffn) * a
    checkpointed = recipe.gradient_checkpointing or recipe.fsdp_activation_checkpointing
    body = layers * tokens * h * a + per_layer if checkpointed else layers * per_layer
    return int(body + 3 * tokens * vocab * 4)


class CausalLM(Objective):
    """Next-token cross-entropy on packed token blocks; labels are the inputs (the model shifts them)."""

    name = "causal_lm"
    unit = "tokens"
    data_kind = "text"
    language_model = True
    supports_fsdp = True
    quantizes_on_load = True

    @classmethod
    def builtin(cls, recipe: Recipe, vocab_size: int | None) -> dict[str, nn.Module]:
        from ... import models

        if recipe.model == "tiny-gpt2":
            # untied head: the base is random, so the recipes adapt the output head as well as the embeddings
            return {"model": models.tiny_gpt2(vocab_size=vocab_size or 256, tie_word_embeddings=False).train()}
        return {"model": models.tiny_llama(vocab_size=vocab_size or 256).train()}

    @classmethod
    def pretrained(
        cls, recipe: Recipe, source: str, dtype: torch.dtype, meta: bool, qconfig=None
    ) -> dict[str, nn.Module]:
        """The model from ``source``; with ``qconfig`` quantized as its weights are read (``qlora_kit.hf``): one
        float layer at a time is ever in memory, so no process (and no FSDP rank) holds the float model."""
        from transformers import AutoConfig, AutoModelForCausalLM

        if meta:
            from accelerate import init_empty_weights

            config = AutoConfig.from_pretrained(source)
            with init_empty_weights():
                return {"model": AutoModelForCausalLM.from_config(config)}
        kwargs = {_from_pretrained_dtype_kw(): dtype, "low_cpu_mem_usage": True, "use_safetensors": True}
        if qconfig is not None:
            from ...hf import QuantizationConfig

            kwargs.update(quantization_config=QuantizationConfig(qconfig), device_map="cpu")
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs).train()
        if getattr(model, "loss_type", "") is None:  # GPT-2's class name maps to no loss: transformers warns
            model.loss_type = "ForCausalLM"
        return {"model": model}

    def activation_bytes(self, model: nn.Module, role: str, a: int) -> int:
        return lm_activation_bytes(model, self.recipe, a)

    def loss(self, model: nn.Module, batch: torch.Tensor, g: torch.Generator, offset: int, global_n: int):
        return model(input_ids=batch, labels=batch).loss

    @torch.no_grad()
    def eval_sums(self, model: nn.Module, batch: torch.Tensor, g: torch.Generator, offset: int, global_n: int):
        """(sum of per-token losses, number of predicted tokens)."""
        loss = model(input_ids=batch, labels=batch).loss.float()
        n = batch.shape[0] * (batch.shape[1] - 1)
        return loss * n, n

    def evaluate(self, run) -> dict:
        out = super().evaluate(run)
        out["eval_ppl"] = math.exp(min(out["eval_loss"], 50.0))
        return out

    def eval_protocol(self, run) -> str:
        """What evaluate() measures (``qlora-kit eval`` measures the same first sequences by default)."""
        if run.data.eval is None:
            return ""
        n = min(len(run.data.eval), self.recipe.eval_batches * run.B * run.world)
        return f" (first {n} held-out sequences x {self.recipe.seq_len} tokens)"

    def next_steps(self, out_dir) -> list[tuple[str, str]]:
        return [("next", f"qlora-kit eval {out_dir}  ·  qlora-kit merge {out_dir} --output {out_dir / 'merged'}")]
