"""Evaluate our (quantized) causal LMs through lm-evaluation-harness, with a local task and no downloads.

lm-eval is an optional extra (``pip install qlora-kit[evaluation]``); everything here imports it only when
called. The model goes in as a live object through ``HFLM(pretrained=model, tokenizer=...)``; the
held-out documents go in as a local JSON-lines file described by a task YAML that this module writes
(``output_type: loglikelihood_rolling``, the same kind of task as lm-eval's wikitext), so the numbers
come from lm-eval's own rolling-window code: disjoint windows of ``max_length`` tokens, the first one
conditioned on the end-of-text token; it reports word and byte perplexity and bits per byte.

Example:
    >>> tok = byte_tokenizer()
    >>> lm_eval_perplexity(model, tok, held_out_texts, context=128)["byte_perplexity"]
    3.52
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from torch import nn

TASK_NAME = "qlora_kit_heldout"

_TASK_YAML = """\
# local held-out perplexity task written by qlora_kit.eval.lm_eval_bridge (no downloads)
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
metadata:
  version: 1.0
"""


def byte_tokenizer():
    """A ``PreTrainedTokenizerFast`` whose token ids are the UTF-8 bytes of the text (vocabulary 256).

    Byte 0 doubles as the end-of-text / padding token (it never occurs in source files). The reference
    language model in ``qlora_kit/bench/reference_models.py`` is trained on exactly these ids.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    b2u = _bytes_to_unicode()
    vocab = {b2u[i]: i for i in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    eos = b2u[0]
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, bos_token=eos, pad_token=eos)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (what the ByteLevel pre-tokenizer uses)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def write_local_task(directory: str | Path, texts: Sequence[str], task: str = TASK_NAME) -> Path:
    """Write ``texts`` as a JSON-lines file plus the lm-eval task YAML that reads it; returns the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / f"{task}.jsonl"
    with data.open("w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    (directory / f"{task}.yaml").write_text(_TASK_YAML.format(task=task, data=json.dumps(str(data))))
    return directory


def lm_eval_perplexity(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    *,
    context: int = 128,
    batch_size: int = 8,
    task_dir: str | Path | None = None,
    limit: int | None = None,
) -> dict:
    """Held-out perplexity of ``model`` through lm-eval's ``HFLM`` and a local rolling-loglikelihood task.

    Args:
        model: a transformers causal LM object (float or quantized in place by qlora-kit).
        tokenizer: its tokenizer (e.g. :func:`byte_tokenizer`).
        texts: held-out documents.
        context: ``max_length`` of lm-eval's rolling windows.
        batch_size: lm-eval batch size.
        task_dir: where to write the task files (default: a temporary directory).
        limit: evaluate only the first this many documents.

    Returns:
        {"word_perplexity", "byte_perplexity", "bits_per_byte", "protocol"}.

    Raises:
        ImportError: lm-eval is not installed (the message says how to install it).
    """
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ImportError(
            "the lm-eval bridge needs lm-evaluation-harness; install it with: pip install 'lm-eval>=0.4'"
        ) from None
    import tempfile

    with tempfile.TemporaryDirectory(prefix="qlora_kit_lm_eval_") as tmp:
        directory = write_local_task(task_dir or tmp, texts)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=context)
        out = simple_evaluate(
            model=lm,
            tasks=[TASK_NAME],
            task_manager=TaskManager(include_path=str(directory)),
            limit=limit,
            log_samples=False,
        )
    res = out["results"][TASK_NAME]

    def metric(name: str) -> float:
        for key, value in res.items():
            if key.split(",")[0] == name:
                return float(value)
        raise KeyError(f"lm-eval returned no {name!r}; got {sorted(res)}")

    return {
        "word_perplexity": metric("word_perplexity"),
        "byte_perplexity": metric("byte_perplexity"),
        "bits_per_byte": metric("bits_per_byte"),
        "protocol": f"lm-eval {TASK_NAME} (loglikelihood_rolling, max_length {context}), {len(texts)} documents",
    }
