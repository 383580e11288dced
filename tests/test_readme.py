"""The README works as written: its Python examples run in order in one namespace, and its shell commands run
top to bottom in a fresh directory, in order (each must exit 0)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"

# commands the test does not run, and why (any other README command runs; a new one must be added here
# consciously to be skipped)
NOT_RUN = {
    "python -m pytest -q -n 2 -p no:cacheprovider": "the test suite itself",
    "qlora-kit finetune llama_qlora model=/models/Llama-3.1-8B dataset=/data/train.jsonl text_column=text": (
        "an 8B model and a dataset that are placeholders for the user's own"
    ),
    "accelerate launch -m qlora_kit.cli finetune llama_qlora": "Llama-3.1-8B on GPUs",
    "accelerate launch --multi_gpu --num_processes 2 -m qlora_kit.cli finetune llama70b_fsdp_qlora": (
        "Llama-3.1-70B on two GPUs (tests/test_fsdp.py runs the same launch on a tiny model over gloo)"
    ),
    "accelerate launch --multi_gpu --num_processes 2 -m qlora_kit.cli finetune llama70b_fsdp_qlora "
    "fsdp_cpu_offload=true": "Llama-3.1-70B on two GPUs with CPU offload",
}


def test_readme_python_examples_run(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 3
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)  # noqa: S102 - our own README
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "tiny-nf4" / "quantization.json").is_file()


def readme_commands() -> list[str]:
    """Every command of the README's bash blocks, in order: comments dropped, `a && b` split, installs
    dropped (this environment is the installed package)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S):
        for line in block.splitlines():
            line = re.sub(r"\s{2,}#.*$", "", line).strip()  # the README's comments follow two spaces
            for command in (c.strip() for c in line.split(" && ") if c.strip()):
                if not command.startswith("pip install "):
                    commands.append(command)
    return commands


def test_readme_lists_the_commands_this_test_skips():
    commands = readme_commands()
    assert set(NOT_RUN) <= set(commands), set(NOT_RUN) - set(commands)
    assert commands[0] == "qlora-kit finetune quickstart"  # the main job comes first


@pytest.mark.slow
def test_readme_commands_run_in_order_in_a_fresh_directory(tmp_path):
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # qlora-kit, python
    ran = []
    for command in readme_commands():
        if command in NOT_RUN:
            continue
        proc = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, f"README command failed: {command}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
        ran.append((command, proc.stdout))
    out = dict(ran)
    assert "done · 300 steps" in out["qlora-kit finetune quickstart"]
    assert (tmp_path / "runs" / "quickstart" / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "runs" / "my" / "adapter" / "adapter_model.safetensors").is_file()  # no collision
    assert (tmp_path / "runs" / "my" / "merged" / "tokenizer.json").is_file()
    assert (tmp_path / "tiny-nf4" / "quantization.json").is_file()
    template_run = next(text for command, text in ran if "prompt_template" in command)
    assert "'### Instruction:\\nAdd 2 and 3.\\n### Response:\\n5'" in template_run  # newlines, as the user meant
    assert not (tmp_path / "runs" / "instr").exists()  # the dry run wrote nothing
