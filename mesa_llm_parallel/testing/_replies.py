"""What the loopback server answers: the request and reply types and the default reply.

A chat-completion request reaches the server's reply hook as a :class:`ChatRequest`
(every message, the tools, ``tool_choice``, ``response_format``...). The hook answers
with text, with tool calls (:class:`ToolCall`) or with a :class:`ChatReply`; without a
hook the server answers with :func:`default_reply`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

__all__ = [
    "TOOL_CHOICES",
    "ChatReply",
    "ChatRequest",
    "ReplyValue",
    "Responder",
    "ToolCall",
    "default_reply",
    "deterministic_reply",
    "schema_example",
]

#: The string values of ``tool_choice`` (an object naming a function is accepted too).
TOOL_CHOICES: Final = ("none", "auto", "required")

#: The ``response_format`` types the server knows.
_FORMAT_TYPES: Final = ("text", "json_object", "json_schema")

#: How deeply :func:`schema_example` follows nested schemas and ``$ref`` s.
_MAX_DEPTH: Final = 32


def deterministic_reply(prompt: str) -> str:
    """The server's default answer to a prompt: ``"agree"`` or ``"disagree"``.

    A pure function of the text (about two thirds of prompts get ``"agree"``), so
    agents that act on the answer make the same decisions in every run. It is the
    same rule as the demo's simulated language model.
    """
    digest = hashlib.sha256(prompt.encode()).digest()
    return "agree" if digest[0] % 3 else "disagree"


def _text_of(content: object) -> str:
    """The text of a message's content: a string, or a list of content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part.get("text", "")
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text", ""), str)
        )
    return ""


# -- the request ----------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, slots=True)
class ChatRequest:
    """One chat-completion request, as the reply hook receives it.

    The fields hold the request's JSON values as they were sent (dicts and lists);
    treat them as read-only.

    Attributes:
        model: The model name the request gave.
        messages: Every message, in order (each a dict with at least ``"role"``).
        tools: The tools offered (``[{"type": "function", "function": {...}}]``), or
            an empty tuple.
        tool_choice: ``"none"``, ``"auto"``, ``"required"``, an object naming one
            function, or None when the request gave none.
        response_format: The request's ``response_format`` object, or None.
        stream: Whether the answer goes out as server-sent events.
        seed: The request's ``seed``, or None.
        body: The whole request body (every other parameter, e.g. ``temperature``).
    """

    model: str
    messages: tuple[Mapping[str, Any], ...]
    tools: tuple[Mapping[str, Any], ...] = ()
    tool_choice: str | Mapping[str, Any] | None = None
    response_format: Mapping[str, Any] | None = None
    stream: bool = False
    seed: int | None = None
    body: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def prompt(self) -> str:
        """The text of the last user message ("" when there is none)."""
        for message in reversed(self.messages):
            if message.get("role") == "user":
                return _text_of(message.get("content"))
        return ""

    @property
    def tool_names(self) -> tuple[str, ...]:
        """The names of the function tools offered, in the request's order."""
        return tuple(_function(tool)["name"] for tool in self.tools)

    def tool(self, name: str) -> Mapping[str, Any]:
        """The ``function`` object of the tool called ``name`` (name, parameters...).

        Raises:
            KeyError: No tool of that name was offered.
        """
        for tool in self.tools:
            function = _function(tool)
            if function["name"] == name:
                return function
        raise KeyError(f"no tool named {name!r}; the request offers {list(self.tool_names)}")

    @classmethod
    def from_body(cls, data: object) -> ChatRequest:
        """The request of a decoded JSON body.

        Raises:
            ValueError: The body is not a valid chat-completion request (the message
                names the field and what is accepted).
        """
        if not isinstance(data, dict):
            raise ValueError("the request body must be a JSON object")
        model = data.get("model")
        if not isinstance(model, str) or not model:
            raise ValueError("'model' is required and must be a non-empty string")
        messages = data.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ValueError("'messages' is required and must be a non-empty array")
        for message in messages:
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise ValueError("every message must be an object with a 'role'")
        tools = data.get("tools") or []
        if not isinstance(tools, list):
            raise ValueError(f"'tools' must be an array of tools, got {tools!r}")
        for tool in tools:
            if not (
                isinstance(tool, dict)
                and tool.get("type") == "function"
                and isinstance(tool.get("function"), dict)
                and isinstance(tool["function"].get("name"), str)
            ):
                raise ValueError(
                    "every tool must be {'type': 'function', 'function': {'name': ...}}, "
                    f"got {tool!r}"
                )
        tool_choice = data.get("tool_choice")
        names = [tool["function"]["name"] for tool in tools]
        _check_tool_choice(tool_choice, names)
        response_format = data.get("response_format")
        _check_response_format(response_format)
        stream = data.get("stream", False)
        if not isinstance(stream, bool) and stream is not None:
            raise ValueError(f"'stream' must be true or false, got {stream!r}")
        seed = data.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"'seed' must be an integer, got {seed!r}")
        return cls(
            model=model,
            messages=tuple(messages),
            tools=tuple(tools),
            tool_choice=tool_choice,
            response_format=response_format,
            stream=bool(stream),
            seed=seed,
            body=data,
        )


def _function(tool: Mapping[str, Any]) -> Mapping[str, Any]:
    return tool["function"]


def _check_tool_choice(choice: object, names: Sequence[str]) -> None:
    if choice is None or choice in TOOL_CHOICES:
        return
    if isinstance(choice, dict) and choice.get("type") == "function":
        function = choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if name in names:
            return
        raise ValueError(
            f"'tool_choice' names the function {name!r}, which is not among the tools {names}"
        )
    raise ValueError(
        f"'tool_choice' must be one of {', '.join(map(repr, TOOL_CHOICES))} or "
        f"{{'type': 'function', 'function': {{'name': ...}}}}, got {choice!r}"
    )


def _check_response_format(response_format: object) -> None:
    if response_format is None:
        return
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind not in _FORMAT_TYPES:
        raise ValueError(
            f"'response_format' must be an object whose 'type' is one of "
            f"{', '.join(map(repr, _FORMAT_TYPES))}, got {response_format!r}"
        )
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise ValueError(
                "'response_format' of type 'json_schema' needs "
                "'json_schema': {'name': ..., 'schema': {...}}, "
                f"got {response_format!r}"
            )


# -- the reply ------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, slots=True)
class ToolCall:
    """A function call the server answers with (``message.tool_calls``).

    Attributes:
        name: The function's name.
        arguments: Its arguments: a mapping (sent as JSON) or a JSON text sent as it is.
        id: The call's id; None lets the server make one (a digest of the request
            and the call's position, so the same request gets the same ids).

    Raises:
        TypeError: A name that is not a non-empty string, or arguments that are
            neither a mapping nor a string.
    """

    name: str
    arguments: Mapping[str, Any] | str = dataclasses.field(default_factory=dict)
    id: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise TypeError(f"ToolCall name must be a non-empty str, got {self.name!r}")
        if not isinstance(self.arguments, Mapping | str):
            raise TypeError(
                f"ToolCall arguments must be a mapping or a JSON string, got {self.arguments!r}"
            )
        if self.id is not None and not isinstance(self.id, str):
            raise TypeError(f"ToolCall id must be a str or None, got {self.id!r}")

    def arguments_json(self) -> str:
        """The arguments as the JSON text the API sends."""
        if isinstance(self.arguments, str):
            return self.arguments
        return json.dumps(dict(self.arguments), separators=(",", ":"))


@dataclasses.dataclass(frozen=True, slots=True)
class ChatReply:
    """The assistant message the server answers with.

    Attributes:
        content: The message's text; None for a reply made only of tool calls.
        tool_calls: The function calls; with any, ``finish_reason`` is
            ``"tool_calls"``, else ``"stop"``.

    Raises:
        TypeError: Content that is not a string or None, or a tool call that is not
            a :class:`ToolCall`.
    """

    content: str | None = None
    tool_calls: Sequence[ToolCall] = ()

    def __post_init__(self) -> None:
        if self.content is not None and not isinstance(self.content, str):
            raise TypeError(f"ChatReply content must be a str or None, got {self.content!r}")
        if isinstance(self.tool_calls, ToolCall | str | Mapping):
            raise TypeError(
                f"ChatReply tool_calls must be a sequence of ToolCall, got {self.tool_calls!r}"
            )
        calls = tuple(self.tool_calls)
        for call in calls:
            if not isinstance(call, ToolCall):
                raise TypeError(f"ChatReply tool_calls must hold ToolCall objects, got {call!r}")
        object.__setattr__(self, "tool_calls", calls)

    @property
    def finish_reason(self) -> str:
        """``"tool_calls"`` when the reply calls tools, else ``"stop"``."""
        return "tool_calls" if self.tool_calls else "stop"


#: What a reply hook may return: text, one tool call, several, or a whole reply.
type ReplyValue = str | ToolCall | Sequence[ToolCall] | ChatReply

#: A reply hook: ``respond(request) -> text | tool call(s) | ChatReply``.
type Responder = Callable[[ChatRequest], ReplyValue]


def as_reply(value: object) -> ChatReply:
    """The :class:`ChatReply` of what a reply hook returned.

    Raises:
        TypeError: The value is none of ``str``, :class:`ToolCall`, a sequence of
            them or :class:`ChatReply`.
    """
    if isinstance(value, ChatReply):
        return value
    if isinstance(value, str):
        return ChatReply(content=value)
    if isinstance(value, ToolCall):
        return ChatReply(tool_calls=(value,))
    if isinstance(value, Sequence) and value and all(isinstance(call, ToolCall) for call in value):
        return ChatReply(tool_calls=tuple(value))
    raise TypeError(
        "the reply hook must return a str, a ToolCall, a non-empty sequence of ToolCall "
        f"or a ChatReply; it returned {value!r}"
    )


def default_reply(
    request: ChatRequest, *, text: Callable[[str], str] = deterministic_reply
) -> ChatReply:
    """The server's answer when no reply hook is given (deterministic).

    Rules, in order:

    1. The request offers tools and ``tool_choice`` is not ``"none"``: one call of

       * the named function when ``tool_choice`` names one;
       * the first tool offered when it is ``"required"``;
       * the first tool offered when it is ``"auto"`` or absent, unless the last
         message is a tool result (``role: "tool"``), which is answered with text,
         so an agent's call-then-answer loop ends.

       Its arguments are :func:`schema_example` of the tool's ``parameters``.
    2. ``response_format`` ``{"type": "json_schema", ...}``: JSON text of
       :func:`schema_example` of the schema, its strings being ``text(prompt)``.
    3. ``response_format`` ``{"type": "json_object"}``: ``{"reply": text(prompt)}``.
    4. Otherwise ``text(prompt)``, the text of the last user message put through
       ``text`` (:func:`deterministic_reply` by default).

    Args:
        request: The request.
        text: The text of an answer to a prompt.

    Raises:
        ValueError: A schema this function cannot satisfy (see :func:`schema_example`).
    """
    choice = request.tool_choice
    if request.tools and choice != "none":
        name: str | None = None
        if isinstance(choice, Mapping):
            name = choice["function"]["name"]
        elif choice == "required" or not (
            request.messages and request.messages[-1].get("role") == "tool"
        ):
            name = request.tool_names[0]
        if name is not None:
            parameters = request.tool(name).get("parameters") or {"type": "object"}
            arguments = schema_example(parameters, text=text(request.prompt))
            if not isinstance(arguments, dict):
                raise ValueError(
                    f"the parameters of tool {name!r} are not an object schema: {parameters!r}"
                )
            return ChatReply(tool_calls=(ToolCall(name, arguments),))
    answer = text(request.prompt)
    response_format = request.response_format
    if response_format is not None:
        kind = response_format["type"]
        if kind == "json_schema":
            schema = response_format["json_schema"].get("schema", {})
            return ChatReply(content=json.dumps(schema_example(schema, text=answer)))
        if kind == "json_object":
            return ChatReply(content=json.dumps({"reply": answer}))
    return ChatReply(content=answer)


# -- JSON-schema examples ---------------------------------------------------------------
def schema_example(schema: Mapping[str, Any] | bool, *, text: str = "agree") -> Any:
    """A value valid against a JSON schema, made deterministically.

    Covers what function parameters and structured outputs use: ``type`` (one or a
    list: the first that is not ``"null"``), ``properties`` (every property is given),
    ``required``, ``items``, ``prefixItems``, ``minItems``/``maxItems`` (at least one
    item when the bounds allow), ``enum`` and ``const`` (the first value),
    ``minimum``/``maximum`` and their exclusive forms, ``minLength``/``maxLength``,
    ``anyOf``/``oneOf`` (the first branch), ``allOf`` (merged), ``$ref`` into the
    schema's ``$defs``/``definitions``, and ``default``. Strings are ``text`` (padded
    or cut to the length bounds); ``pattern``, ``format``, ``multipleOf`` and
    ``uniqueItems`` are not honoured.

    Args:
        schema: The JSON schema (a mapping, or ``True``/``False``).
        text: The value of string fields.

    Raises:
        ValueError: A ``$ref`` that does not point into the schema, schemas nested
            deeper than 32 levels, ``false`` as a schema, or bounds no value meets.
    """
    return _Example(schema, text).value(schema, 0)


class _Example:
    __slots__ = ("root", "text")

    def __init__(self, root: Mapping[str, Any] | bool, text: str) -> None:
        self.root = root
        self.text = text

    def resolve(self, ref: str) -> Mapping[str, Any]:
        target: Any = self.root
        if not ref.startswith("#"):
            raise ValueError(f"only $ref into the schema itself ('#/...') is supported: {ref!r}")
        for part in filter(None, ref[1:].split("/")):
            key = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(target, Mapping) or key not in target:
                raise ValueError(f"$ref {ref!r} points at nothing in the schema")
            target = target[key]
        return target

    def value(self, schema: Mapping[str, Any] | bool, depth: int) -> Any:
        if depth > _MAX_DEPTH:
            raise ValueError(
                f"the schema nests deeper than {_MAX_DEPTH} levels (a recursive $ref?)"
            )
        if schema is True:
            return self.text
        if schema is False or not isinstance(schema, Mapping):
            raise ValueError(f"no value is valid against the schema {schema!r}")
        if "$ref" in schema:
            return self.value(self.resolve(schema["$ref"]), depth + 1)
        if "const" in schema:
            return schema["const"]
        if schema.get("enum"):
            return schema["enum"][0]
        if "default" in schema:
            return schema["default"]
        for key in ("anyOf", "oneOf"):
            if schema.get(key):
                return self.value(schema[key][0], depth + 1)
        if schema.get("allOf"):
            return self.value(self.merge(schema), depth + 1)
        kind = schema.get("type")
        if isinstance(kind, list):
            kind = next((k for k in kind if k != "null"), "null")
        if kind is None:
            if "properties" in schema or "required" in schema:
                kind = "object"
            elif "items" in schema or "prefixItems" in schema:
                kind = "array"
            else:
                kind = "string"
        return self.typed(kind, schema, depth)

    def merge(self, schema: Mapping[str, Any]) -> dict[str, Any]:
        merged = {k: v for k, v in schema.items() if k != "allOf"}
        for branch in schema["allOf"]:
            part = self.resolve(branch["$ref"]) if "$ref" in branch else branch
            for key, value in part.items():
                if key == "properties":
                    merged["properties"] = {**merged.get("properties", {}), **value}
                elif key == "required":
                    merged["required"] = [*merged.get("required", []), *value]
                else:
                    merged.setdefault(key, value)
        return merged

    def typed(self, kind: str, schema: Mapping[str, Any], depth: int) -> Any:
        if kind == "object":
            properties = schema.get("properties") or {}
            value = {name: self.value(sub, depth + 1) for name, sub in properties.items()}
            for name in schema.get("required") or ():
                if name not in value:
                    extra = schema.get("additionalProperties", True)
                    value[name] = self.value(extra if extra is not True else {}, depth + 1)
            return value
        if kind == "array":
            return self.array(schema, depth)
        if kind == "string":
            return self.string(schema)
        if kind in ("integer", "number"):
            return _number(schema, integer=kind == "integer")
        if kind == "boolean":
            return True
        if kind == "null":
            return None
        raise ValueError(f"unknown JSON-schema type {kind!r} in {schema!r}")

    def array(self, schema: Mapping[str, Any], depth: int) -> list[Any]:
        prefix = list(schema.get("prefixItems") or ())
        items = schema.get("items", {})
        low = schema.get("minItems", 0)
        high = schema.get("maxItems", math.inf)
        count = max(low, len(prefix), 1 if items is not False else 0)
        count = min(count, high)
        if count < low:
            raise ValueError(f"minItems {low} > maxItems {high} in {schema!r}")
        return [
            self.value(prefix[i] if i < len(prefix) else items, depth + 1) for i in range(count)
        ]

    def string(self, schema: Mapping[str, Any]) -> str:
        value = self.text
        low = schema.get("minLength", 0)
        high = schema.get("maxLength")
        if len(value) < low:
            value = (value or "x") * math.ceil(low / max(1, len(value)))
        if high is not None:
            if high < low:
                raise ValueError(f"minLength {low} > maxLength {high} in {schema!r}")
            value = value[:high]
        return value


def _number(schema: Mapping[str, Any], *, integer: bool) -> int | float:
    low = schema.get("minimum", -math.inf)
    high = schema.get("maximum", math.inf)
    step = 1 if integer else 0.5
    exclusive_low = schema.get("exclusiveMinimum")
    exclusive_high = schema.get("exclusiveMaximum")
    if isinstance(exclusive_low, int | float) and not isinstance(exclusive_low, bool):
        low = max(low, exclusive_low + (step if integer else 0))
    if isinstance(exclusive_high, int | float) and not isinstance(exclusive_high, bool):
        high = min(high, exclusive_high - (step if integer else 0))
    if integer:
        low = math.ceil(low) if math.isfinite(low) else low
        high = math.floor(high) if math.isfinite(high) else high
    value: float = min(max(0, low), high)
    if not integer and value in (exclusive_low, exclusive_high):
        value = (
            (low + high) / 2
            if math.isfinite(low) and math.isfinite(high)
            else value + (step if value == exclusive_low else -step)
        )
    if value < low or value > high or value in (exclusive_low, exclusive_high):
        raise ValueError(f"no {'integer' if integer else 'number'} meets the bounds of {schema!r}")
    return int(value) if integer else float(value)
