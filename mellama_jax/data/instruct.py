"""Instruction data: read Alpaca (medalpaca) / Dolly / ShareGPT (and the Me-LLaMA authors' human/agent records) /
prompt-response records (JSON, JSON Lines, Parquet, Arrow, `datasets` folders), render them through a prompt template,
tokenise with loss weight 1 on response tokens only, truncate or pack, and write them as ArrayRecord rows
(`instruct_batches.py` reads them back in training).

Each turn is tokenised piece by piece (as Meta's LLaMA-2 chat code does): the rendered user side gets weight 0
and the assistant's text plus EOS gets weight 1, so the weighted tokens are exactly the tokenised responses.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import yaml
from array_record.python.array_record_module import ArrayRecordWriter

from mellama_jax.data.corpus import BadRecord, Report
from mellama_jax.data.readers import records
from mellama_jax.data.tokenizer import Tokenizer
from mellama_jax.options import POSITIVE, option
from mellama_jax.outputs import atomic_output


@dataclasses.dataclass(frozen=True)
class Conversation:
    """The texts as the record holds them; a template decides whether surrounding whitespace is stripped."""

    turns: tuple[tuple[str, str], ...]  # (user, assistant) pairs
    system: str = ""
    input: str = ""  # Alpaca's optional context, joined to the first user message by the template


@dataclasses.dataclass(frozen=True)
class Template:
    name: str
    preamble: str = ""  # once, before the first turn
    system_format: str = "{system}\n\n"  # prepended to the first user message when a system prompt exists
    user_format: str = "{user}"
    input_format: str = "\n\n{input}"
    bos_each_turn: bool = False  # LLaMA-2 chat wraps every turn in <s> ... </s>
    strip: bool = True  # strip each message's surrounding whitespace before rendering


TEMPLATES = {
    "llama2_chat": Template(
        "llama2_chat",
        system_format="<<SYS>>\n{system}\n<</SYS>>\n\n",
        user_format="[INST] {user} [/INST]",
        bos_each_turn=True,
    ),
    "alpaca": Template(
        "alpaca",
        preamble=(
            "Below is an instruction that describes a task. Write a response that "
            "appropriately completes the request.\n\n"
        ),
        user_format="### Instruction:\n{user}\n\n### Response:\n",
        input_format="\n\n### Input:\n{input}",
    ),
    # The Me-LLaMA authors' chat wrapper, `mellama_prompt` in src/model_prompt.py:5-6 (BIDS-Xu-Lab/Me-LLaMA @
    # 08c893f2), applied to the prompt text as it stands (their task prompts begin and end with newlines):
    # docs/evaluation.md says which models were tuned and are evaluated in it.
    "mellama": Template("mellama", user_format="Human: \n{user}\n\nAssistant: \n", strip=False),
}


def load_template(name_or_path: str) -> Template:
    if name_or_path in TEMPLATES:
        return TEMPLATES[name_or_path]
    path = Path(name_or_path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such template file; built-in templates: {sorted(TEMPLATES)}")

    data = yaml.safe_load(path.read_text()) or {}
    try:
        return Template(**{"name": path.stem, **data})
    except TypeError as e:
        raise BadRecord(f"{path}: bad template ({e})") from None


# ----------------------------------------------------------------------------------------- reading

# "agent": the Me-LLaMA authors' instruction records (src/preprocess_instruct.py:43-47, build_finetuning_instruction)
_USER, _ASSISTANT, _SYSTEM = {"human", "user"}, {"gpt", "assistant", "bot", "model", "agent"}, {"system"}


def _format_of(obj: dict) -> str:
    """The record's format, told from its keys."""
    if "conversations" in obj or "messages" in obj:
        return "sharegpt"
    if "instruction" in obj:
        return "dolly" if "response" in obj else "alpaca"
    return "prompt_response" if "prompt" in obj else "unknown"


def _sharegpt(obj: dict) -> Conversation:
    """A ShareGPT record (the authors' human/agent records too): an optional system message first, then user and
    assistant messages alternating."""
    messages = obj.get("conversations", obj.get("messages"))
    if not isinstance(messages, list):
        raise ValueError("missing field: 'conversations' is not a list")
    system, turns, pending = "", [], None
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"invalid message {i}: not an object")
        role = str(m.get("from", m.get("role", ""))).lower()
        value = m.get("value", m.get("content"))
        if not isinstance(value, str):
            raise ValueError(f"missing field: message {i} has no text")
        if role in _SYSTEM and i == 0:
            system = value
        elif role in _USER and pending is None:
            pending = value
        elif role in _ASSISTANT and pending is not None:
            turns.append((pending, value))
            pending = None
        else:
            raise ValueError(f"invalid conversation: unexpected {role or 'unknown'!r} message at {i}")
    return Conversation(tuple(turns), system=system)


def parse_record(obj: dict, fmt: str = "auto") -> Conversation:
    """One record as a Conversation; raises ValueError naming the problem."""
    if fmt == "auto":
        fmt = _format_of(obj)

    def text(key):
        value = obj.get(key)
        if not isinstance(value, str):
            raise ValueError(f"missing field: {key!r}")
        return value

    if fmt in ("alpaca", "dolly"):  # Dolly names Alpaca's input and output `context` and `response`
        context, answer = ("input", "output") if fmt == "alpaca" else ("context", "response")
        instruction, output = text("instruction"), text(answer)
        extra = obj.get(context) or ""
        if not isinstance(extra, str):
            raise ValueError(f"missing field: {context!r} is not a string")
        return _checked(Conversation(((instruction, output),), input=extra))
    if fmt == "prompt_response":
        return _checked(Conversation(((text("prompt"), text("response")),)))
    if fmt == "sharegpt":
        return _checked(_sharegpt(obj))
    raise ValueError(
        "unknown format: expected instruction/output, instruction/response, conversations/messages or prompt/response"
    )


def _checked(conv: Conversation) -> Conversation:
    if not conv.turns:
        raise ValueError("empty text: no complete user/assistant turn")
    for user, assistant in conv.turns:
        if not user.strip() or not assistant.strip():
            raise ValueError("empty text: a turn has an empty message")
    return conv


def read_conversations(path: str | Path, report: Report, fmt: str = "auto") -> Iterator[tuple[str, Conversation]]:
    for where, obj in records(path, report):
        # Self-Instruct's layout: one instruction with several (input, output) instances.
        instances = obj.get("instances") if fmt in ("auto", "alpaca") and "instruction" in obj else None
        parts = (
            [
                dict(instance, instruction=obj["instruction"]) if isinstance(instance, dict) else instance
                for instance in instances
            ]
            if isinstance(instances, list)
            else [obj]
        )
        for k, record in enumerate(parts):
            here = where if len(parts) == 1 else f"{where} instance {k}"
            try:
                if not isinstance(record, dict):
                    raise ValueError("invalid record: an instance is not an object")
                yield here, parse_record(record, fmt)
            except ValueError as e:
                report.skip(here, str(e))


# ----------------------------------------------------------------------------------------- rendering


def render(
    conv: Conversation, template: Template, tokenizer: Tokenizer, train_on_eos: bool = True
) -> tuple[list[int], list[int]]:
    """Token ids and loss weights (1 exactly on response tokens, and EOS if train_on_eos)."""
    ids: list[int] = []
    weights: list[int] = []
    clean = str.strip if template.strip else (lambda text: text)

    def add(tokens, weight):
        ids.extend(tokens)
        weights.extend([weight] * len(tokens))

    for i, (user, assistant) in enumerate(conv.turns):
        user, assistant = clean(user), clean(assistant)
        if i == 0 or template.bos_each_turn:
            add([tokenizer.bos_id], 0)
        if i == 0:
            if conv.input.strip():
                user = user + template.input_format.format(input=clean(conv.input))
            if conv.system.strip():
                user = template.system_format.format(system=clean(conv.system)) + user
        prompt = (template.preamble if i == 0 else "") + template.user_format.format(user=user)
        add(tokenizer.encode(prompt), 0)
        add(tokenizer.encode(assistant), 1)
        add([tokenizer.eos_id], 1 if train_on_eos else 0)
    return ids, weights


# ----------------------------------------------------------------------------------------- prepare


def _examples(
    inputs,
    tokenizer: Tokenizer,
    tpl: Template,
    seq_len: int,
    fmt: str,
    truncation: str,
    report: Report,
    train_on_eos: bool,
) -> tuple[list, int]:
    """(token ids, loss weights) of every usable example, and how many were truncated."""
    truncated, examples = 0, []
    for path in inputs:
        for where, conv in read_conversations(path, report, fmt):
            ids, weights = render(conv, tpl, tokenizer, train_on_eos)
            if len(ids) > seq_len:
                if truncation == "drop":
                    report.skip(where, f"too long: {len(ids)} tokens > {seq_len}")
                    continue
                ids, weights = ids[:seq_len], weights[:seq_len]
                if not any(weights):
                    report.skip(where, f"response truncated away: the prompt alone fills {seq_len} tokens")
                    continue
                truncated += 1
            examples.append((ids, weights))
    if not examples:
        raise BadRecord(f"{', '.join(map(str, inputs))}: no usable examples ({report.summary()})")
    return examples, truncated


@dataclasses.dataclass(frozen=True)
class InstructDataRequest:
    """One `prepare instruct`: what `mellama-jax prepare instruct` parses, and what `prepare_instruct` takes."""

    inputs: tuple[str | Path, ...] = option(
        help=".json, .jsonl(.gz/.zst), .parquet, .arrow, or a datasets folder "
        "(save_to_disk output or a folder of those files)",
        positional=True,
        nargs="+",
    )
    tokenizer: str | Path = option()
    out: str | Path = option()
    seq_len: int = option(4096, type=POSITIVE)
    template: str = option(
        "llama2_chat",
        "llama2_chat, alpaca, mellama (the Me-LLaMA authors' Human:/Assistant: wrapper), or a template YAML file",
    )
    format: str = option("auto", choices=["auto", "alpaca", "dolly", "sharegpt", "prompt_response"])
    # "truncate" keeps the first seq_len tokens; "drop" skips longer examples. An example whose response would
    # be cut away entirely is skipped either way.
    truncation: str = option("truncate", choices=["truncate", "drop"])
    pack: bool = option(False, "pack several examples per row (with segment ids)")
    strict: bool = option(False)
    train_on_eos: bool = option(True, "do not train on the EOS after each response", flag="--no-eos-loss")
    overwrite: bool = option(False, "replace an earlier `prepare instruct` output")


def prepare_instruct(r: InstructDataRequest) -> dict:
    """Render, tokenise and store examples (or packed rows) as ArrayRecord; returns the manifest.

    Records are int32 arrays of shape (3, n): token ids, loss weights, segment ids (one per example).
    Every skip is counted with its location. The output folder appears whole or not at all
    (outputs.atomic_output).
    """
    if r.truncation not in ("truncate", "drop"):
        raise ValueError(f"truncation must be 'truncate' or 'drop', got {r.truncation!r}")
    tokenizer = Tokenizer.load(r.tokenizer)
    tpl = load_template(r.template)
    report = Report(strict=r.strict)
    seq_len = r.seq_len
    with atomic_output(r.out, "prepare-instruct", r.overwrite, r.inputs) as out:
        examples, truncated = _examples(
            r.inputs, tokenizer, tpl, seq_len, r.format, r.truncation, report, r.train_on_eos
        )
        rows = (
            _pack(examples, seq_len)
            if r.pack
            else [np.stack([np.asarray(i), np.asarray(w), np.ones(len(i))]).astype(np.int32) for i, w in examples]
        )
        writer = ArrayRecordWriter(str(out / "examples.arrayrecord"), "group_size:1")
        for row in rows:
            writer.write(row.tobytes())
        writer.close()
        tokenizer.save(out)
        report.documents = len(examples)
        report.tokens = sum(len(i) for i, _ in examples)
        manifest = {
            "format": "mellama-instruct-v1",
            "seq_len": seq_len,
            "template": tpl.name,
            "packed": r.pack,
            "rows": len(rows),
            "response_tokens": int(sum(sum(w) for _, w in examples)),
            "truncated": truncated,
            "report": report.to_dict(),
            "tokenizer_sha256": hashlib.sha256(tokenizer.model_proto).hexdigest(),
        }
        (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def _pack(examples, seq_len: int) -> list[np.ndarray]:
    """Greedy, in order: start a new row when the next example does not fit."""
    rows, ids, weights, segs = [], [], [], []
    for i, w in examples:
        if len(ids) + len(i) > seq_len:
            rows.append(np.stack([ids, weights, segs]).astype(np.int32))
            ids, weights, segs = [], [], []
        seg = (segs[-1] + 1) if segs else 1
        ids, weights, segs = ids + list(i), weights + list(w), segs + [seg] * len(i)
    rows.append(np.stack([ids, weights, segs]).astype(np.int32))
    return rows
