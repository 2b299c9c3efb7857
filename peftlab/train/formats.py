"""Dataset formats: turn one record into text segments (causal LM) or text + label (classification).

A causal-LM format yields `(text, trainable)` segments in order; the tokenizer step puts
labels on the trainable ones only (unless `train_on_inputs`). Field names can be remapped
per format with `fields={canonical_name: column_name}`.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from peftlab.train.records import DataError, Record

Segments = list[tuple[str, bool]]

# canonical field names per format; optional ones may be absent or null in a record
FIELDS: dict[str, tuple[str, ...]] = {
    "alpaca": ("instruction", "input", "output"),
    "chat": ("messages", "role", "content"),
    "text": ("text",),
    "prompt_completion": ("prompt", "completion"),
    "classification": ("text", "text_pair", "label"),
}
OPTIONAL = {"input", "text_pair"}
CAUSAL_FORMATS = ("alpaca", "chat", "text", "prompt_completion")

# The prompt of Stanford Alpaca (Taori et al., 2023), the de facto convention for this format.
ALPACA_PROMPT = ("Below is an instruction that describes a task. Write a response that "
                 "appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")

CHAT_ROLES = ("system", "user", "assistant", "tool")
ROLE_ALIASES = {"human": "user", "gpt": "assistant", "model": "assistant"}   # ShareGPT-style names


def check_fields(fmt: str, fields: Mapping[str, str]) -> None:
    """Reject a field remapping that names a field the format does not have."""
    unknown = sorted(set(fields) - set(FIELDS[fmt]))
    if unknown:
        raise DataError(f"fields: format '{fmt}' has no field {', '.join(map(repr, unknown))}; "
                        f"remappable fields are: {', '.join(FIELDS[fmt])}")


def get_field(record: Record, name: str, fields: Mapping[str, str], fmt: str,
              kinds: tuple[type, ...] = (str,)) -> Any:
    """The value of canonical field `name` (remapped through `fields`), checked for presence and type."""
    column = fields.get(name, name)
    value = record.get(column)
    if value is None:
        if name in OPTIONAL:
            return None
        state = "is null" if column in record else "is missing"
        have = ", ".join(map(repr, record)) or "none"
        raise DataError(f"{record.origin}: field '{column}' {state}, but format '{fmt}' needs it "
                        f"(the record has fields: {have}); map another column with fields.{name}")
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        wanted = " or ".join(_kind_name(k) for k in kinds)
        raise DataError(f"{record.origin}: field '{column}' must be {wanted}, got {_kind_name(type(value))}")
    return value


def _kind_name(kind: type) -> str:
    return {str: "a string", int: "an integer", list: "a list", dict: "an object", float: "a number",
            bool: "a boolean"}.get(kind, kind.__name__)


def alpaca_segments(record: Record, fields: Mapping[str, str]) -> Segments:
    """Alpaca prompt (masked) + output (trained)."""
    instruction = get_field(record, "instruction", fields, "alpaca")
    extra = get_field(record, "input", fields, "alpaca")
    output = get_field(record, "output", fields, "alpaca")
    if extra and extra.strip():
        prompt = ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=extra)
    else:
        prompt = ALPACA_PROMPT.format(instruction=instruction)
    return [(prompt, False), (output, True)]


def alpaca_messages(record: Record, fields: Mapping[str, str]) -> list[dict]:
    """An alpaca record as a two-turn conversation, for rendering with a chat template."""
    instruction = get_field(record, "instruction", fields, "alpaca")
    extra = get_field(record, "input", fields, "alpaca")
    user = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
    return [{"role": "user", "content": user},
            {"role": "assistant", "content": get_field(record, "output", fields, "alpaca")}]


def prompt_completion_segments(record: Record, fields: Mapping[str, str]) -> Segments:
    """Prompt (masked) + completion (trained), concatenated as written."""
    return [(get_field(record, "prompt", fields, "prompt_completion"), False),
            (get_field(record, "completion", fields, "prompt_completion"), True)]


def prompt_completion_messages(record: Record, fields: Mapping[str, str]) -> list[dict]:
    """A prompt/completion record as a two-turn conversation."""
    return [{"role": "user", "content": get_field(record, "prompt", fields, "prompt_completion")},
            {"role": "assistant", "content": get_field(record, "completion", fields, "prompt_completion")}]


def text_segments(record: Record, fields: Mapping[str, str]) -> Segments:
    """Plain text, trained on every token."""
    return [(get_field(record, "text", fields, "text"), True)]


def chat_messages(record: Record, fields: Mapping[str, str]) -> list[dict]:
    """The record's messages as [{role, content}], roles checked and aliases resolved."""
    messages = get_field(record, "messages", fields, "chat", kinds=(list,))
    if not messages:
        raise DataError(f"{record.origin}: field '{fields.get('messages', 'messages')}' is an empty list")
    role_key, content_key = fields.get("role", "role"), fields.get("content", "content")
    clean = []
    for i, message in enumerate(messages):
        where = f"{record.origin}: message {i}"
        if not isinstance(message, dict):
            raise DataError(f"{where} must be an object with '{role_key}' and '{content_key}', "
                            f"got {_kind_name(type(message))}")
        role, content = message.get(role_key), message.get(content_key)
        role = ROLE_ALIASES.get(role, role)
        if role not in CHAT_ROLES:
            raise DataError(f"{where} has unknown role {message.get(role_key)!r}; valid roles are "
                            f"{', '.join(CHAT_ROLES)} (or {', '.join(ROLE_ALIASES)})")
        if not isinstance(content, str):
            state = "missing" if content is None else f"{_kind_name(type(content))}, not a string"
            raise DataError(f"{where} ('{role}'): '{content_key}' is {state}")
        clean.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in clean):
        raise DataError(f"{record.origin}: the conversation has no assistant message, so nothing to learn")
    return clean


def render_chat(messages: list[dict], tokenizer: Any, origin: str, chat_template: str | None = None,
                generation_prompt: bool = False) -> str:
    """The conversation as text through the chat template (`chat_template` replaces the tokenizer's)."""
    try:
        return tokenizer.apply_chat_template(messages, chat_template=chat_template, tokenize=False,
                                             add_generation_prompt=generation_prompt)
    except Exception as err:   # jinja raises TemplateError and plain exceptions alike
        raise DataError(f"{origin}: the chat template failed on this conversation "
                        f"({str(err).splitlines()[0]})") from None


def chat_segments(messages: list[dict], tokenizer: Any, origin: str,
                  chat_template: str | None = None) -> Segments:
    """Render a conversation with the chat template, split into prompt and reply parts.

    Each assistant reply is the text the template adds between rendering the conversation up to
    that point with a generation prompt and rendering it with the reply: the reply's content
    plus the template's end-of-turn markup, so the model also learns to stop.
    """
    def render(upto: int, generation_prompt: bool = False) -> str:
        return render_chat(messages[:upto], tokenizer, origin, chat_template, generation_prompt)

    rewrites = DataError(f"{origin}: the chat template renders earlier turns differently once later "
                         "turns are added, so replies cannot be masked turn by turn; "
                         "set train_on_inputs: true or use a template that only appends")
    segments: Segments = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, after = render(i, generation_prompt=True), render(i + 1)
        if not (before.startswith(done) and after.startswith(before)):
            raise rewrites
        segments += [(before[len(done):], False), (after[len(before):], True)]
        done = after
    full = render(len(messages))
    if not full.startswith(done):
        raise rewrites
    segments.append((full[len(done):], False))
    return [(text, trainable) for text, trainable in segments if text]


class LabelMap:
    """Maps classification labels (integers or names) to class ids, with messages that list valid ones."""

    def __init__(self, names: Sequence[str] | None = None, num_labels: int | None = None,
                 by_name: Mapping[str, int] | None = None):
        if by_name is not None:
            ids = sorted(by_name.values())
            if ids != list(range(len(ids))):
                raise DataError(f"labels: a name-to-id mapping must use ids 0..{len(ids) - 1} once each, "
                                f"got {ids}")
            names = sorted(by_name, key=by_name.__getitem__)
        self.names = list(names) if names is not None else None
        self.num_labels = len(self.names) if self.names is not None else num_labels
        if not self.num_labels:
            raise DataError("labels: need at least one label name or a positive num_labels")

    @classmethod
    def infer(cls, values: Sequence[Any], origins: Sequence[str]) -> "LabelMap":
        """Build the map from the training labels: sorted names, or 0..max for integers."""
        ints = [_as_int(v) for v in values]
        if all(i is not None for i in ints):
            return cls(names=[str(i) for i in range(max(ints) + 1)], num_labels=max(ints) + 1)
        for value, origin in zip(values, origins):
            if not isinstance(value, str) or _as_int(value) is not None:
                raise DataError(f"{origin}: label {value!r} mixes with label names in other records; "
                                "use all names or all integers, or list them under labels")
        return cls(names=sorted(set(values)))

    def id_of(self, value: Any, origin: str) -> int:
        """The class id of one label value; `DataError` naming the valid labels if it has none."""
        number = _as_int(value)
        if self.names is not None and isinstance(value, str) and value in self.names:
            return self.names.index(value)
        if number is not None and 0 <= number < self.num_labels:
            return number
        if self.names is not None and not all(n == str(i) for i, n in enumerate(self.names)):
            valid = f"one of {', '.join(map(repr, self.names))} or an id 0..{self.num_labels - 1}"
        else:
            valid = f"an integer 0..{self.num_labels - 1}"
        kind = "out of range" if number is not None else "unknown"
        raise DataError(f"{origin}: label {value!r} is {kind}; valid labels are {valid}")


def _as_int(value: Any) -> int | None:
    """An integer label, also from text such as '3' (CSV cells are always text)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return None
