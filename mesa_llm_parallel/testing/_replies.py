"""What the loopback server answers: the request and reply types and the default reply.

A chat-completion request reaches the server's reply hook as a :class:`ChatRequest`
(every message, the tools, ``tool_choice``, ``response_format``...). The hook answers
with text, with tool calls (:class:`ToolCall`) or with a :class:`ChatReply`; without a
hook the server answers with :func:`default_reply`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Final

__all__ = [
    "MESSAGE_ROLES",
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

#: The roles a message may have.
MESSAGE_ROLES: Final = ("system", "developer", "user", "assistant", "tool", "function")

#: What ``response_format.json_schema.name`` may be.
_SCHEMA_NAME: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")

#: The ``response_format`` types the server knows.
_FORMAT_TYPES: Final = ("text", "json_object", "json_schema")

#: How deeply :func:`schema_example` follows nested schemas and ``$ref`` s.
_MAX_DEPTH: Final = 100


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
            ValueError: The body is not a valid chat-completion request. The message
                names the field and what is accepted; the exception's ``param``
                attribute is the field's path (``"tool_choice"``,
                ``"messages[2].role"``...), or None for the body as a whole.
        """
        if not isinstance(data, dict):
            raise _RequestError("the request body must be a JSON object")
        model = data.get("model")
        if not isinstance(model, str) or not model:
            raise _RequestError("'model' is required and must be a non-empty string", "model")
        messages = data.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _RequestError("'messages' is required and must be a non-empty array", "messages")
        for index, message in enumerate(messages):
            _check_message(index, message)
        tools = data.get("tools") or []
        if not isinstance(tools, list):
            raise _RequestError(f"'tools' must be an array of tools, got {tools!r}", "tools")
        for index, tool in enumerate(tools):
            if not (
                isinstance(tool, dict)
                and tool.get("type") == "function"
                and isinstance(tool.get("function"), dict)
                and isinstance(tool["function"].get("name"), str)
            ):
                raise _RequestError(
                    "every tool must be {'type': 'function', 'function': {'name': ...}}, "
                    f"got {tool!r}",
                    f"tools[{index}]",
                )
        tool_choice = data.get("tool_choice")
        names = [tool["function"]["name"] for tool in tools]
        _check_tool_choice(tool_choice, names)
        response_format = data.get("response_format")
        _check_response_format(response_format)
        stream = data.get("stream", False)
        if not isinstance(stream, bool) and stream is not None:
            raise _RequestError(f"'stream' must be true or false, got {stream!r}", "stream")
        seed = data.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise _RequestError(f"'seed' must be an integer, got {seed!r}", "seed")
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


class _RequestError(ValueError):
    """A request the API refuses with 400; ``param`` names the field, if one is at fault.

    Args:
        message: What is wrong and what is accepted.
        param: The field's path in the body (``"tool_choice"``, ``"messages[2].role"``,
            ``"response_format.json_schema.schema"``...), or None.
    """

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def _function(tool: Mapping[str, Any]) -> Mapping[str, Any]:
    return tool["function"]


def _check_message(index: int, message: object) -> None:
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise _RequestError(
            f"every message must be an object with a 'role'; {where} is {message!r}", where
        )
    role = message.get("role")
    if role not in MESSAGE_ROLES:
        what = "has no 'role'" if "role" not in message else f"has the role {role!r}"
        raise _RequestError(
            f"{where} {what}; a message's 'role' is one of {', '.join(map(repr, MESSAGE_ROLES))}",
            f"{where}.role",
        )


def _check_tool_choice(choice: object, names: Sequence[str]) -> None:
    if choice is None or choice in ("none", "auto"):
        return
    named = isinstance(choice, dict) and choice.get("type") == "function"
    if choice != "required" and not named:
        raise _RequestError(
            f"'tool_choice' must be one of {', '.join(map(repr, TOOL_CHOICES))} or "
            f"{{'type': 'function', 'function': {{'name': ...}}}}, got {choice!r}",
            "tool_choice",
        )
    if not names:
        raise _RequestError(
            f"'tool_choice' {choice!r} needs 'tools' to call, and the request offers none; "
            "give 'tools', or leave 'tool_choice' out (or 'none'/'auto')",
            "tool_choice",
        )
    if isinstance(choice, dict):
        function = choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if name not in names:
            raise _RequestError(
                f"'tool_choice' names the function {name!r}, which is not among the tools "
                f"{list(names)}",
                "tool_choice",
            )


def _check_response_format(response_format: object) -> None:
    if response_format is None:
        return
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind not in _FORMAT_TYPES:
        raise _RequestError(
            f"'response_format' must be an object whose 'type' is one of "
            f"{', '.join(map(repr, _FORMAT_TYPES))}, got {response_format!r}",
            "response_format.type" if isinstance(response_format, dict) else "response_format",
        )
    if kind != "json_schema" or not isinstance(response_format, dict):
        return
    shape = "'json_schema': {'name': ..., 'schema': {...}}"
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict):
        raise _RequestError(
            f"'response_format' of type 'json_schema' needs {shape}, got {response_format!r}",
            "response_format.json_schema",
        )
    name = spec.get("name")
    if not isinstance(name, str) or not _SCHEMA_NAME.fullmatch(name):
        raise _RequestError(
            f"'response_format.json_schema.name' must be 1 to 64 letters, digits, '_' or '-' "
            f"(the json_schema is {shape}), got {name!r}",
            "response_format.json_schema.name",
        )
    schema = spec.get("schema")
    if not isinstance(schema, dict):
        what = "has no 'schema'" if "schema" not in spec else f"has the schema {schema!r}"
        raise _RequestError(
            f"'response_format.json_schema' {what}; it needs {shape}, the schema a "
            "JSON-schema object",
            "response_format.json_schema.schema",
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

#: A reply hook: ``respond(request) -> text | tool call(s) | ChatReply``, a plain
#: function or an ``async def`` one (which the server awaits on its event loop).
type Responder = Callable[[ChatRequest], ReplyValue | Awaitable[ReplyValue]]


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
        ValueError: A schema this function cannot satisfy (see :func:`schema_example`),
            or a tool's ``parameters`` that are not an object schema.
    """
    try:
        return _default_reply(request, text)
    except _RequestError as exc:
        raise ValueError(str(exc)) from None


def _default_reply(request: ChatRequest, text: Callable[[str], str]) -> ChatReply:
    """:func:`default_reply`, whose schema errors name the request's field at fault.

    Raises:
        _RequestError: The schema the answer needs has no value this server can make;
            ``param`` is ``"tools[i].function.parameters"`` or
            ``"response_format.json_schema.schema"``.
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
            where = f"tools[{request.tool_names.index(name)}].function.parameters"
            parameters = request.tool(name).get("parameters") or {"type": "object"}
            answer = text(request.prompt)
            try:
                arguments = schema_example(parameters, text=answer)
            except ValueError as exc:
                raise _RequestError(f"the parameters of tool {name!r}: {exc}", where) from None
            if not isinstance(arguments, dict):
                raise _RequestError(
                    f"the parameters of tool {name!r} are not an object schema: {parameters!r}",
                    where,
                )
            return ChatReply(tool_calls=(ToolCall(name, arguments),))
    answer = text(request.prompt)
    response_format = request.response_format
    if response_format is not None:
        kind = response_format["type"]
        if kind == "json_schema":
            schema = response_format["json_schema"].get("schema", {})
            try:
                value = schema_example(schema, text=answer)
            except ValueError as exc:
                raise _RequestError(str(exc), "response_format.json_schema.schema") from None
            return ChatReply(content=json.dumps(value))
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

    Recursive schemas (a ``$ref`` inside the definition it points at, as pydantic
    writes for ``children: list["Node"]`` or ``next: Optional["Node"]``) get a finite
    value. Where a ``$ref`` is met again inside its own expansion (or below 32 levels
    of nesting), the value is the smallest one instead: only the ``required``
    properties, ``minItems`` items (``[]`` when 0), ``"null"`` first in a list of
    types, and the first ``anyOf``/``oneOf`` branch that does not lead back into a
    ``$ref`` being expanded. A branch, an optional property or an array item that can
    only recurse is left for the next branch, left out, or not made.

    Args:
        schema: The JSON schema (a mapping, or ``True``/``False``).
        text: The value of string fields.

    Raises:
        ValueError: A ``$ref`` that does not point into the schema, a schema with no
            finite value (a ``$ref`` that must contain itself again, through required
            properties, ``minItems`` or every branch), schemas nested deeper than 100
            levels, ``false`` as a schema, or bounds no value meets.
    """
    try:
        return _Example(schema, text).value(schema, 0, frozenset(), minimal=False)
    except _Endless as exc:
        raise ValueError(
            f"no finite value is valid against the schema: {exc.ref!r} must contain itself "
            "again (through required properties, minItems > 0, or every anyOf/oneOf branch "
            "or type), so every value of it would be infinite"
        ) from None


#: Nesting below which :func:`schema_example` makes the smallest values.
_RICH_DEPTH: Final = 32


class _Endless(Exception):  # noqa: N818 - internal signal, never reaches a caller
    """A ``$ref`` met again inside its own smallest expansion: no finite value here."""

    def __init__(self, ref: str) -> None:
        super().__init__(ref)
        self.ref = ref


class _Example:
    """The example-maker of one schema.

    ``value`` walks the schema. ``path`` holds the ``$ref`` s being expanded above the
    current point; ``minimal`` says whether the smallest value is wanted. A ``$ref``
    met again on the path switches to the smallest value of that definition, whose own
    path starts afresh; a ``$ref`` met again while making a smallest value raises
    :class:`_Endless`, which the nearest alternative (another branch, leaving out an
    optional property or an array's items) catches.
    """

    __slots__ = ("root", "smallest", "text")

    def __init__(self, root: Mapping[str, Any] | bool, text: str) -> None:
        self.root = root
        self.text = text
        self.smallest: dict[str, Any] = {}  # $ref -> its smallest value, once made

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

    def value(
        self, schema: Mapping[str, Any] | bool, depth: int, path: frozenset[str], *, minimal: bool
    ) -> Any:
        if depth > _MAX_DEPTH:
            raise ValueError(f"the schema nests deeper than {_MAX_DEPTH} levels")
        if depth > _RICH_DEPTH and not minimal:  # deep enough: the smallest values below
            minimal, path = True, frozenset()
        if schema is True:
            return self.text
        if schema is False or not isinstance(schema, Mapping):
            raise ValueError(f"no value is valid against the schema {schema!r}")
        if "$ref" in schema:
            return self.ref(schema["$ref"], depth, path, minimal=minimal)
        if "const" in schema:
            return schema["const"]
        if schema.get("enum"):
            return schema["enum"][0]
        if "default" in schema:
            return schema["default"]
        for key in ("anyOf", "oneOf"):
            if schema.get(key):
                return self.first(schema[key], depth, path, minimal=minimal)
        if schema.get("allOf"):
            return self.value(self.merge(schema), depth + 1, path, minimal=minimal)
        kind = schema.get("type")
        if isinstance(kind, list):
            kinds = sorted(kind, key=lambda k: (k != "null") == minimal) or ["null"]
            return self.first(
                [{**schema, "type": k} for k in kinds], depth - 1, path, minimal=minimal
            )
        if kind is None:
            if "properties" in schema or "required" in schema:
                kind = "object"
            elif "items" in schema or "prefixItems" in schema:
                kind = "array"
            else:
                kind = "string"
        return self.typed(kind, schema, depth, path, minimal=minimal)

    def ref(self, ref: str, depth: int, path: frozenset[str], *, minimal: bool) -> Any:
        """The value of ``{"$ref": ref}``: the smallest one when ``ref`` is on the path."""
        if ref in path and minimal:
            raise _Endless(ref)
        if ref in path or (minimal and ref in self.smallest):
            if ref not in self.smallest:
                target = self.resolve(ref)
                self.smallest[ref] = self.value(target, depth + 1, frozenset({ref}), minimal=True)
            return copy.deepcopy(self.smallest[ref])
        target = self.resolve(ref)
        value = self.value(target, depth + 1, path | {ref}, minimal=minimal)
        if minimal:
            self.smallest[ref] = copy.deepcopy(value)
        return value

    def first(
        self, branches: Sequence[Any], depth: int, path: frozenset[str], *, minimal: bool
    ) -> Any:
        """The value of the first branch that has a finite one."""
        endless: list[_Endless] = []
        for branch in branches:
            try:
                return self.value(branch, depth + 1, path, minimal=minimal)
            except _Endless as exc:
                endless.append(exc)
        raise endless[0]  # branches is never empty

    def merge(
        self, schema: Mapping[str, Any], seen: frozenset[str] = frozenset()
    ) -> dict[str, Any]:
        """``schema`` with its ``allOf`` branches merged in (nested ones too)."""
        merged = {k: v for k, v in schema.items() if k != "allOf"}
        for branch in schema.get("allOf") or ():
            part = branch
            if isinstance(branch, Mapping) and "$ref" in branch:
                ref = branch["$ref"]
                if ref in seen:
                    continue  # a definition that includes itself adds nothing new
                part = self.resolve(ref)
                seen |= {ref}
            if not isinstance(part, Mapping):
                raise ValueError(f"an allOf branch must be a schema object, got {part!r}")
            if part.get("allOf"):
                part = self.merge(part, seen)
            for key, value in part.items():
                if key == "properties":
                    merged["properties"] = {**merged.get("properties", {}), **value}
                elif key == "required":
                    merged["required"] = [*merged.get("required", []), *value]
                else:
                    merged.setdefault(key, value)
        return merged

    def typed(
        self,
        kind: str,
        schema: Mapping[str, Any],
        depth: int,
        path: frozenset[str],
        *,
        minimal: bool,
    ) -> Any:
        if kind == "object":
            return self.object(schema, depth, path, minimal=minimal)
        if kind == "array":
            return self.array(schema, depth, path, minimal=minimal)
        if kind == "string":
            return self.string(schema)
        if kind in ("integer", "number"):
            return _number(schema, integer=kind == "integer")
        if kind == "boolean":
            return True
        if kind == "null":
            return None
        raise ValueError(f"unknown JSON-schema type {kind!r} in {schema!r}")

    def object(
        self, schema: Mapping[str, Any], depth: int, path: frozenset[str], *, minimal: bool
    ) -> dict[str, Any]:
        properties = schema.get("properties") or {}
        required = list(dict.fromkeys(schema.get("required") or ()))
        value: dict[str, Any] = {}
        for name, sub in properties.items():
            if name in required:
                value[name] = self.value(sub, depth + 1, path, minimal=minimal)
            elif not minimal:
                with contextlib.suppress(_Endless):  # an optional property that only recurses
                    value[name] = self.value(sub, depth + 1, path, minimal=minimal)
        extra = schema.get("additionalProperties", True)
        for name in required:
            if name not in value:
                sub = extra if extra is not True else {}
                value[name] = self.value(sub, depth + 1, path, minimal=minimal)
        return value

    def array(
        self, schema: Mapping[str, Any], depth: int, path: frozenset[str], *, minimal: bool
    ) -> list[Any]:
        prefix = list(schema.get("prefixItems") or ())
        items = schema.get("items", {})
        low = schema.get("minItems", 0)
        high = schema.get("maxItems", math.inf)
        if low > high:
            raise ValueError(f"minItems {low} > maxItems {high} in {schema!r}")
        if items is False:
            high = min(high, len(prefix))
        count = low if minimal else min(max(low, len(prefix), 1), high)
        if count < low:
            raise ValueError(f"{schema!r} forbids items past its prefixItems but needs {low}")

        def make(count: int, *, minimal: bool) -> list[Any]:
            return [
                self.value(
                    prefix[i] if i < len(prefix) else items, depth + 1, path, minimal=minimal
                )
                for i in range(count)
            ]

        if count == low:
            return make(count, minimal=minimal)
        try:
            return make(count, minimal=minimal)
        except _Endless:  # items that only recurse: as few as allowed
            return make(low, minimal=minimal)

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
