"""Dataset formats → the conversational examples TRL's trainers expect.

Every format is first mapped through the dataset's `columns` (LLaMA-Factory's dataset_info.json
names: prompt, query, response, system, history, messages, chosen, rejected, kto_tag, …), then
turned into one of these shapes:

- ``conversation``: ``{"messages": [{"role", "content"}, ...]}`` (sft)
- ``text``: ``{"text": str}`` (pt)
- ``preference``: ``{"prompt": [msgs], "chosen": [assistant msg], "rejected": [assistant msg]}``
- ``kto``: ``{"prompt": [msgs], "completion": [assistant msg], "label": bool}``
- ``prompt``: ``{"prompt": [msgs], **other columns}`` (online RL; extra columns reach rewards)
- ``choice``: ``{"question": str, "choices": [str, ...], "answer": int, "subject": str | None}``
  (multiple-choice questions of eval stages, the MMLU/CMMLU/C-Eval layout)

A column may be a path into a nested column (`answers.text[0]`, see columns.py): every role is
read through `_Ctx.get`, which walks it.

Errors name the dataset, the record (0-based index) and the column.
"""

from __future__ import annotations

from typing import Any

from ..api.errors import DataError
from ..api.spec import DatasetSpec
from .columns import MISSING, PathError, column_of, resolve

Kind = str  # "conversation" | "text" | "preference" | "kto" | "prompt" | "choice"

# Defaults of the column roles per format (LLaMA-Factory's names and layouts).
DEFAULT_COLUMNS: dict[str, dict[str, str]] = {
    "alpaca": {
        "prompt": "instruction", "query": "input", "response": "output", "system": "system",
        "history": "history", "chosen": "chosen", "rejected": "rejected", "kto_tag": "kto_tag",
    },
    "sharegpt": {
        "messages": "conversations", "system": "system", "tools": "tools",
        "chosen": "chosen", "rejected": "rejected", "kto_tag": "kto_tag",
    },
    "messages": {"messages": "messages", "chosen": "chosen", "rejected": "rejected", "kto_tag": "kto_tag", "tools": "tools"},
    "text": {"text": "text"},
    "preference": {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected", "system": "system"},
    "kto": {"prompt": "prompt", "completion": "completion", "kto_tag": "label", "system": "system"},
    "prompt": {"prompt": "prompt", "system": "system"},
    "choice": {"question": "question", "choices": "choices", "answer": "answer", "subject": "subject"},
}

FORMATS_FOR_KIND: dict[Kind, tuple[str, ...]] = {
    "conversation": ("alpaca", "sharegpt", "messages"),
    "text": ("text", "alpaca", "sharegpt", "messages"),
    "preference": ("preference", "alpaca", "sharegpt", "messages"),
    "kto": ("kto", "alpaca", "sharegpt", "messages"),
    "prompt": ("prompt", "alpaca", "sharegpt", "messages"),
    "choice": ("choice",),
}

CHOICE_LETTERS = "ABCDEFGHIJ"

OPENAI_ROLES = ("system", "user", "assistant", "tool")


class _Ctx:
    def __init__(self, ds: DatasetSpec, source_label: str | None = None):
        self.ds = ds
        self.where = f"dataset {ds.name!r} ({source_label or ds.source})"
        self.cols = {**DEFAULT_COLUMNS[ds.format], **ds.columns}
        if ds.format == "text" and "prompt" in ds.columns and "text" not in ds.columns:
            self.cols["text"] = ds.columns["prompt"]  # LLaMA-Factory pt datasets map `prompt`

    def col(self, role: str) -> str:
        return self.cols.get(role, role)

    def fail(self, index: int | None, message: str) -> DataError:
        at = f"record {index}: " if index is not None else ""
        return DataError(at + message, self.where)

    def require(self, records: list[dict[str, Any]], roles: list[str]) -> None:
        """Each role's column must exist; name what is there when it does not."""
        present = set().union(*(r.keys() for r in records[:100]))
        for role in roles:
            name = self.col(role)
            if name not in present and column_of(name) not in present:
                raise self.fail(
                    None,
                    f"column {name!r} (the {role!r} column of format {self.ds.format}) is missing; "
                    f"the records have: {', '.join(sorted(present)) or 'nothing'}. "
                    f"Map it with `columns: {{{role}: <your column>}}`.",
                )

    def get(self, record: dict[str, Any], index: int, role: str, required: bool = True) -> Any:
        name = self.col(role)
        try:
            value = resolve(record, name)
        except PathError as err:
            raise self.fail(index, f"column path {name!r} ({role}): {err}") from None
        if value is MISSING:
            if required:
                raise self.fail(index, f"column {name!r} ({role}) is missing")
            return None
        return value

    def text(self, record: dict[str, Any], index: int, role: str, required: bool = True, allow_empty: bool = False) -> str | None:
        value = self.get(record, index, role, required)
        if value is None:
            return None
        if not isinstance(value, str):
            raise self.fail(index, f"column {self.col(role)!r} ({role}) must be text, got {type(value).__name__}")
        if required and not allow_empty and not value.strip():
            raise self.fail(index, f"column {self.col(role)!r} ({role}) is empty")
        return value


def _user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def _assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


# ----------------------------------------------------------------------------- per-format parts


def _alpaca_prompt(ctx: _Ctx, r: dict[str, Any], i: int) -> list[dict[str, str]]:
    """system + history turns + the instruction (with its input) as the last user turn."""
    msgs: list[dict[str, str]] = []
    system = ctx.text(r, i, "system", required=False)
    if system:
        msgs.append({"role": "system", "content": system})
    history = ctx.get(r, i, "history", required=False) or []
    if not isinstance(history, list):
        raise ctx.fail(i, f"column {ctx.col('history')!r} (history) must be a list of [question, answer] pairs")
    for turn in history:
        if not (isinstance(turn, (list, tuple)) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
            raise ctx.fail(i, f"column {ctx.col('history')!r} (history) must hold [question, answer] pairs of text")
        msgs += [_user(turn[0]), _assistant(turn[1])]
    instruction = ctx.text(r, i, "prompt")
    query = ctx.text(r, i, "query", required=False)
    msgs.append(_user(f"{instruction}\n{query}" if query else instruction))
    return msgs


def _sharegpt_messages(ctx: _Ctx, r: dict[str, Any], i: int) -> list[dict[str, str]]:
    tags = ctx.ds.tags
    roles = {
        tags.user_tag: "user",
        tags.assistant_tag: "assistant",
        tags.observation_tag: "tool",
        tags.function_tag: "assistant",
        tags.system_tag: "system",
    }
    turns = ctx.get(r, i, "messages")
    if not isinstance(turns, list):
        raise ctx.fail(i, f"column {ctx.col('messages')!r} must be a list of turns")
    msgs: list[dict[str, str]] = []
    system = ctx.text(r, i, "system", required=False)
    if system:
        msgs.append({"role": "system", "content": system})
    for t, turn in enumerate(turns):
        if not isinstance(turn, dict) or tags.role_tag not in turn or tags.content_tag not in turn:
            raise ctx.fail(i, f"turn {t} needs the keys {tags.role_tag!r} and {tags.content_tag!r} (set `tags` for other names)")
        role = roles.get(turn[tags.role_tag])
        if role is None:
            raise ctx.fail(i, f"turn {t} has role {turn[tags.role_tag]!r}; expected one of {', '.join(roles)}")
        msgs.append({"role": role, "content": str(turn[tags.content_tag])})
    return msgs


def _openai_messages(ctx: _Ctx, r: dict[str, Any], i: int) -> list[dict[str, str]]:
    turns = ctx.get(r, i, "messages")
    if not isinstance(turns, list):
        raise ctx.fail(i, f"column {ctx.col('messages')!r} must be a list of {{role, content}} messages")
    msgs = []
    for t, m in enumerate(turns):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ctx.fail(i, f"message {t} needs `role` and `content`")
        if m["role"] not in OPENAI_ROLES:
            raise ctx.fail(i, f"message {t} has role {m['role']!r}; expected one of {', '.join(OPENAI_ROLES)}")
        msgs.append({"role": m["role"], "content": m["content"] if isinstance(m["content"], str) else str(m["content"])})
    return msgs


def _conversation(ctx: _Ctx, r: dict[str, Any], i: int) -> list[dict[str, str]]:
    fmt = ctx.ds.format
    if fmt == "alpaca":
        msgs = _alpaca_prompt(ctx, r, i)
        if not ctx.ds.ranking:
            msgs.append(_assistant(ctx.text(r, i, "response")))
        return msgs
    if fmt == "sharegpt":
        return _sharegpt_messages(ctx, r, i)
    return _openai_messages(ctx, r, i)


def _check_dialogue(ctx: _Ctx, msgs: list[dict[str, str]], i: int) -> None:
    if not any(m["role"] == "assistant" for m in msgs):
        raise ctx.fail(i, "the conversation has no assistant turn to learn from")
    if msgs[-1]["role"] != "assistant":
        raise ctx.fail(i, "the conversation must end with an assistant turn")
    for m in msgs:
        if m["role"] == "assistant" and not m["content"].strip():
            raise ctx.fail(i, "an assistant turn is empty")


def _answer(ctx: _Ctx, r: dict[str, Any], i: int, role: str) -> list[dict[str, str]]:
    """A chosen/rejected/completion answer: a string, a {from,value} / {role,content} message, or a list."""
    value = ctx.get(r, i, role)
    if isinstance(value, str):
        text = value
    elif isinstance(value, dict):
        tags = ctx.ds.tags
        text = value.get("content", value.get(tags.content_tag))
    elif isinstance(value, list) and value and isinstance(value[-1], dict):
        text = value[-1].get("content", value[-1].get(ctx.ds.tags.content_tag))
    else:
        text = None
    if not isinstance(text, str):
        raise ctx.fail(i, f"column {ctx.col(role)!r} ({role}) must be text or a message")
    if not text.strip():
        raise ctx.fail(i, f"column {ctx.col(role)!r} ({role}) is empty")
    return [_assistant(text)]


def _prompt_messages(ctx: _Ctx, r: dict[str, Any], i: int) -> list[dict[str, str]]:
    fmt = ctx.ds.format
    if fmt in ("preference", "kto", "prompt"):
        value = ctx.get(r, i, "prompt")
        msgs: list[dict[str, str]] = []
        system = ctx.text(r, i, "system", required=False)
        if system:
            msgs.append({"role": "system", "content": system})
        if isinstance(value, str):
            if not value.strip():
                raise ctx.fail(i, f"column {ctx.col('prompt')!r} (prompt) is empty")
            msgs.append(_user(value))
        elif isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
            msgs += [{"role": m["role"], "content": str(m["content"])} for m in value]
        else:
            raise ctx.fail(i, f"column {ctx.col('prompt')!r} (prompt) must be text or a list of messages")
        return msgs
    if fmt == "alpaca":
        return _alpaca_prompt(ctx, r, i)
    msgs = _sharegpt_messages(ctx, r, i) if fmt == "sharegpt" else _openai_messages(ctx, r, i)
    # Without ranking, a conversation ending in an answer: the prompt is everything before it.
    if not ctx.ds.ranking and msgs and msgs[-1]["role"] == "assistant":
        msgs = msgs[:-1]
    return msgs


def _implicit_prompt(ctx: _Ctx, r: dict[str, Any], i: int) -> list[dict[str, str]] | None:
    """TRL's implicit-prompt pairs: chosen and rejected are whole conversations that share every
    turn but the last; the shared turns are the prompt. None when the record is not laid out so."""
    chosen, rejected = ctx.get(r, i, "chosen", required=False), ctx.get(r, i, "rejected", required=False)
    if not (isinstance(chosen, list) and isinstance(rejected, list) and len(chosen) > 1):
        return None
    if not all(isinstance(m, dict) and "role" in m and "content" in m for m in chosen + rejected):
        return None
    if chosen[:-1] != rejected[:-1] or chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
        raise ctx.fail(i, f"without a {ctx.col('prompt')!r} column, chosen and rejected must be conversations that "
                          "share every turn but the last, an assistant answer (TRL's implicit prompt)")
    return [{"role": m["role"], "content": str(m["content"])} for m in chosen[:-1]]


def _label(ctx: _Ctx, r: dict[str, Any], i: int) -> bool:
    value = ctx.get(r, i, "kto_tag")
    if not isinstance(value, bool):
        raise ctx.fail(i, f"column {ctx.col('kto_tag')!r} (the KTO label) must be true or false, got {value!r}")
    return value


def _choice(ctx: _Ctx, r: dict[str, Any], i: int) -> dict[str, Any]:
    """question + choices (a `choices` list, or one column per letter A, B, C, ...) + the answer
    (a letter, or the 0-based index of the right choice)."""
    question = ctx.text(r, i, "question")
    listed = r.get(ctx.col("choices"))
    if listed is not None:
        if not (isinstance(listed, list) and all(isinstance(c, (str, int, float)) for c in listed)):
            raise ctx.fail(i, f"column {ctx.col('choices')!r} (choices) must be a list of texts")
        choices = [str(c) for c in listed]
    else:
        choices = []
        for letter in CHOICE_LETTERS:
            if letter not in r:
                break
            choices.append(str(r[letter]))
    if not 2 <= len(choices) <= len(CHOICE_LETTERS):
        raise ctx.fail(i, f"a question needs 2 to {len(CHOICE_LETTERS)} choices: a {ctx.col('choices')!r} list or "
                          f"columns A, B, C, ... (found {len(choices)})")
    answer = ctx.get(r, i, "answer")
    letters = CHOICE_LETTERS[: len(choices)]
    if isinstance(answer, str) and len(answer.strip()) == 1 and answer.strip().upper() in letters:
        index = letters.index(answer.strip().upper())
    elif isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(choices):
        index = answer
    else:
        raise ctx.fail(i, f"column {ctx.col('answer')!r} (answer) must be one of the letters {', '.join(letters)} "
                          f"(or a 0-based index), got {answer!r}")
    subject = r.get(ctx.col("subject"))
    return {"question": question, "choices": choices, "answer": index,
            "subject": str(subject) if subject is not None else None}


# ---------------------------------------------------------------------------------- entry point


def to_examples(records: list[dict[str, Any]], ds: DatasetSpec, kind: Kind, source_label: str | None = None) -> list[dict[str, Any]]:
    """Convert one dataset's records to examples of `kind`. Raises DataError."""
    ctx = _Ctx(ds, source_label)
    if ds.format not in FORMATS_FOR_KIND[kind]:
        raise ctx.fail(
            None,
            f"format {ds.format!r} cannot feed this stage (it needs {kind} data; use one of "
            f"{', '.join(FORMATS_FOR_KIND[kind])})",
        )
    out: list[dict[str, Any]] = []
    if kind == "text":
        if ds.format == "text":
            ctx.require(records, ["text"])
            return [{"text": ctx.text(r, i, "text")} for i, r in enumerate(records)]
        for i, r in enumerate(records):
            msgs = _conversation(ctx, r, i)
            out.append({"text": "\n".join(m["content"] for m in msgs)})
        return out
    if kind == "conversation":
        ctx.require(records, ["prompt", "response"] if ds.format == "alpaca" else ["messages"])
        for i, r in enumerate(records):
            msgs = _conversation(ctx, r, i)
            _check_dialogue(ctx, msgs, i)
            out.append({"messages": msgs})
        return out
    if kind == "preference":
        if ds.format in ("alpaca", "sharegpt", "messages") and not ds.ranking:
            raise ctx.fail(None, "preference stages need pairs: set `ranking: true` (chosen/rejected columns) or format preference")
        ctx.require(records, ["chosen", "rejected"])
        for i, r in enumerate(records):
            prompt = _implicit_prompt(ctx, r, i) if ds.format == "preference" and column_of(ctx.col("prompt")) not in r else None
            prompt = prompt if prompt is not None else _prompt_messages(ctx, r, i)
            out.append({"prompt": prompt, "chosen": _answer(ctx, r, i, "chosen"), "rejected": _answer(ctx, r, i, "rejected")})
        return out
    if kind == "kto":
        ctx.require(records, ["kto_tag"])
        for i, r in enumerate(records):
            if ds.format == "kto":
                completion = _answer(ctx, r, i, "completion")
                prompt = _prompt_messages(ctx, r, i)
            else:
                msgs = _conversation(ctx, r, i)
                _check_dialogue(ctx, msgs, i)
                prompt, completion = msgs[:-1], msgs[-1:]
            out.append({"prompt": prompt, "completion": completion, "label": _label(ctx, r, i)})
        return out
    if kind == "prompt":
        roles = ("prompt", "query", "system", "history", "messages", "response")
        used = {ctx.col(role) for role in roles} | {column_of(ctx.col(role)) for role in roles}
        for i, r in enumerate(records):
            prompt = _prompt_messages(ctx, r, i)
            if not prompt or prompt[-1]["role"] != "user":
                raise ctx.fail(i, "the prompt must end with a user turn")
            extra = {k: v for k, v in r.items() if k not in used}
            out.append({"prompt": prompt, **extra})
        return out
    if kind == "choice":
        ctx.require(records, ["question", "answer"])
        return [_choice(ctx, r, i) for i, r in enumerate(records)]
    raise ValueError(f"unknown kind {kind}")
