"""Random-weight Llama models, a small tokenizer and chat datasets, built locally.

Used by the test fixtures (a tiny model that trains on the CPU in about a second) and by the
GPU scripts (the same code with real shapes), since neither place can reach the model hub."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

WORDS = (
    "the a one cat dog bird fox runs jumps sleeps sings over under near quick brown lazy happy "
    "small large river tree house garden morning evening light dark green blue red yellow and or "
    "but because then when where why how what who is was be have has had do does did"
).split()
SPECIAL_TOKENS = ["<|pad|>", "<|begin|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# CHAT_TEMPLATE with {% generation %} marks around the assistant's tokens, for assistant_only_loss.
MARKED_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}<|assistant|>{% generation %}{{ m['content'] }}"
    "<|end|>{% endgeneration %}{% else %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# Shapes of public models, used by the benchmarks (random weights measure the same speed).
LLAMA_3_1_8B = {
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "intermediate_size": 14336,
    "vocab_size": 128256,
}
PHI_4_14B = {
    "hidden_size": 5120,
    "num_hidden_layers": 40,
    "num_attention_heads": 40,
    "num_key_value_heads": 10,
    "intermediate_size": 17920,
    "vocab_size": 100352,
}
# Qwen2.5-32B's sizes on a Llama (32.8 B parameters): the largest shape tried on two cards.
QWEN_2_5_32B = {
    "hidden_size": 5120,
    "num_hidden_layers": 64,
    "num_attention_heads": 40,
    "num_key_value_heads": 8,
    "intermediate_size": 27648,
    "vocab_size": 152064,
}
# A 317 M Llama: big enough for the GPU scripts to exercise Unsloth's kernels, small enough for
# a minute's training (scripts/gpu-*, bench --shape small, the planner's tests).
SMALL_LLAMA = {
    "hidden_size": 1024,
    "num_hidden_layers": 16,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "intermediate_size": 4096,
    "vocab_size": 32000,
}
TINY = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
}


def sentence(rng: random.Random, words: int = 12) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def build_tokenizer(vocab_size: int = 512, *, seed: int = 0) -> Any:
    """A byte-level BPE trained on generated sentences (under a second), with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(seed)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator((sentence(rng) for _ in range(3000)), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<|begin|>", eos_token="<|end|>", pad_token="<|pad|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_llama(
    path: Path,
    *,
    shape: dict[str, int] | None = None,
    dtype: str = "float32",
    max_position_embeddings: int = 4096,
    seed: int = 0,
    device: str = "cpu",
) -> Path:
    """Save a random-weight Llama and its tokenizer as a Hugging Face model folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = dict(shape or TINY)
    tokenizer = build_tokenizer(seed=seed)
    # Big vocabularies (real shapes) keep their size: the embedding and logits cost memory.
    vocab = max(shape.pop("vocab_size", len(tokenizer)), len(tokenizer))
    config = LlamaConfig(
        vocab_size=vocab,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **shape,
    )
    torch.manual_seed(seed)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))  # built in its dtype: a 32B model has no room for float32
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default_dtype)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, max_shard_size="4GB")
    tokenizer.save_pretrained(path)
    del model
    if device != "cpu":
        torch.cuda.empty_cache()  # leave the card to the training that follows
    return path


def chat_rows(count: int, *, seed: int = 0, words: int = 12, system: bool = False) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        messages = [{"role": "system", "content": "be brief"}] if system else []
        messages += [
            {"role": "user", "content": sentence(rng, words)},
            {"role": "assistant", "content": sentence(rng, words)},
        ]
        rows.append({"messages": messages})
    return rows


def qa_rows(count: int) -> list[dict[str, str]]:
    """Question/answer rows under column names no format knows (a job maps them)."""
    return [
        {"question": f"what number comes after {i} and why is it so", "answer": f" {i + 1}, by counting"}
        for i in range(count)
    ]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def cache_hub_model(hub_cache: Path, repo_id: str, files: Path | dict[str, bytes]) -> Path:
    """Put a model (a folder, or files by name) into a Hugging Face cache as `hf download` would
    have (models--org--name/refs/main and snapshots/<commit>/), so it loads offline by its Hub id."""
    repo = hub_cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    contents = {p.name: p.read_bytes() for p in files.iterdir() if p.is_file()} if isinstance(files, Path) else files
    for name, data in contents.items():
        (snapshot / name).write_bytes(data)
    return snapshot


def cache_hub_dataset(datasets_cache: Path, repo_id: str, rows: list[dict[str, Any]] | None = None) -> Path:
    """A Hub dataset as `datasets` keeps it after a first load_dataset (HF_DATASETS_CACHE/
    org___name/default/0.0.0/<hash>/), so it loads offline by its id: its train split holds
    `rows`, prepared by datasets' own json builder (without rows, only the folder, a stub). A
    lowercase name: datasets names the folder of `SomeName` some_name."""
    *namespace, name = repo_id.split("/")
    assert name == name.lower(), repo_id
    folder = datasets_cache / "___".join([*namespace, name]) / "default" / "0.0.0" / ("0" * 16)
    folder.mkdir(parents=True, exist_ok=True)
    if rows is None:
        (folder / "dataset_info.json").write_text("{}")
        return folder
    from datasets import load_dataset

    source = write_jsonl(datasets_cache / f"{name}.jsonl", rows)
    loaded = load_dataset("json", data_files=str(source), split="train", cache_dir=str(datasets_cache / "_prepare"))
    prepared = Path(loaded.cache_files[0]["filename"]).parent
    (folder / "dataset_info.json").write_bytes((prepared / "dataset_info.json").read_bytes())
    (folder / f"{name}-train.arrow").write_bytes((prepared / "json-train.arrow").read_bytes())
    return folder


# ---- rows of the preference and reward methods -----------------------------------------------------


def preference_rows(count: int, *, seed: int = 0, chat: bool = True) -> list[dict[str, Any]]:
    """An easy preference set: whatever the question, the same answer is preferred to the same other
    one, so a DPO run's reward margin grows within a few dozen steps."""
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    for _ in range(count):
        question = sentence(rng, 8)
        chosen, rejected = "the happy cat sleeps", "a dark river runs"
        if chat:
            rows.append(
                {
                    "prompt": [{"role": "user", "content": question}],
                    "chosen": [{"role": "assistant", "content": chosen}],
                    "rejected": [{"role": "assistant", "content": rejected}],
                }
            )
        else:
            rows.append({"prompt": question, "chosen": " " + chosen, "rejected": " " + rejected})
    return rows


def openai_preference_rows(count: int, *, seed: int = 0) -> list[dict[str, Any]]:
    """Preference pairs in OpenAI's DPO JSONL: input.messages, preferred_output, non_preferred_output."""
    return [
        {
            "input": {"messages": row["prompt"], "tools": [], "parallel_tool_calls": True},
            "preferred_output": row["chosen"],
            "non_preferred_output": row["rejected"],
        }
        for row in preference_rows(count, seed=seed)
    ]


def unpaired_rows(count: int, *, seed: int = 0) -> list[dict[str, Any]]:
    """KTO's rows: a completion and whether it is desirable, alternately."""
    rows = preference_rows(count, seed=seed, chat=False)
    return [
        {"prompt": row["prompt"], "completion": row["chosen" if i % 2 == 0 else "rejected"], "label": i % 2 == 0}
        for i, row in enumerate(rows)
    ]


def reachable_answer_rows(model: Path, count: int, *, top_k: int = 4) -> list[dict[str, Any]]:
    """Prompts whose exact answer is one token the random model already samples now and then: the
    token most often among its `top_k` next tokens over the prompts. A GRPO run sampling with that
    top_k then meets the answer from its first steps, and learns to give it (an exact-match task a
    tiny model learns in a few dozen steps)."""
    import collections

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    policy = AutoModelForCausalLM.from_pretrained(model)
    prompts = [f"the {word}" for word in WORDS[:count]]
    seen: collections.Counter[int] = collections.Counter()
    with torch.no_grad():
        for prompt in prompts:
            logits = policy(**tokenizer(prompt, return_tensors="pt")).logits[0, -1]
            seen.update(int(i) for i in logits.topk(top_k).indices if int(i) not in tokenizer.all_special_ids)
    answer = next(
        text
        for token, _count in seen.most_common()
        if (text := tokenizer.decode([token])).strip() and text.isprintable() and "\ufffd" not in text
    )
    return [{"prompt": prompt, "answer": answer} for prompt in prompts]


def chat_prompt_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The same prompts as OpenAI's reinforcement rows: `messages` ending with the user's turn."""
    return [{"messages": [{"role": "user", "content": row["prompt"]}], "answer": row["answer"]} for row in rows]
