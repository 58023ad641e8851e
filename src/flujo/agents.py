"""Agents in flujo, and the adapter for `pydantic-ai <https://ai.pydantic.dev>`_ agents.

For flujo an agent is any object with an ``async run(data, **kwargs)`` method; a step runs it
with ``Step(name, agent=...)`` (passing ``context=`` / ``resources=`` when ``run`` declares
parameters with those names). This module makes a ``pydantic_ai.Agent`` such an agent
(pydantic-ai is the optional extra ``pip install 'flujo[ai]'``)::

    from flujo import Flujo, Step
    from flujo.agents import make_agent

    answer = make_agent("test", system_prompt="Answer briefly.")
    result = Flujo(Step("answer", agent=answer), persist_state=False).run("hi")

:class:`PydanticAIAgent` wraps an existing pydantic-ai agent; :func:`make_agent` builds one.
Every call checks the run's usage limits first, reports the requests, tokens and cost it used
(:func:`price_of`), refuses tool calls the governance allowlist does not name, and turns model
text into the step's output type (:func:`coerce_output`).

Importing this module imports pydantic-ai when it is installed; ``import flujo`` does not.
"""

from __future__ import annotations

import json
import logging
import math
import re
import sys
import threading
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Final, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from flujo.domain.models import AppResources, PipelineContext
from flujo.domain.usage import Usage, check_usage_limits, current_step_meter, report_usage
from flujo.exceptions import (
    ConfigurationError,
    StructuredOutputError,
)
from flujo.state.serialization import flujo_default_serializer

_IMPORT_ERROR: ImportError | None
try:
    from pydantic_ai import (
        Agent,
        AudioUrl,
        BinaryContent,
        CachePoint,
        DocumentUrl,
        ImageUrl,
        ModelRequest,
        ModelResponse,
        NativeOutput,
        PromptedOutput,
        RetryPromptPart,
        RunUsage,
        SystemPromptPart,
        TextPart,
        ToolCallPart,
        ToolOutput,
        ToolReturnPart,
        UserPromptPart,
        VideoUrl,
        capture_run_messages,
    )
    from pydantic_ai.agent import AbstractAgent
    from pydantic_ai.capabilities import AbstractCapability
    from pydantic_ai.exceptions import ModelRetry, UnexpectedModelBehavior

    _IMPORT_ERROR = None
except ImportError as _exc:  # pragma: no cover - exercised by a subprocess test
    _IMPORT_ERROR = _exc

if TYPE_CHECKING:
    from pydantic_ai.capabilities.abstract import (
        RawOutput,
        ValidatedToolArgs,
        WrapOutputValidateHandler,
    )
    from pydantic_ai.messages import ModelMessage
    from pydantic_ai.models import ModelRequestContext
    from pydantic_ai.output import OutputContext
    from pydantic_ai.tools import RunContext, ToolDefinition

__all__ = [
    "DEFAULT_COERCION_LEVEL",
    "DEFAULT_STRUCTURED_OUTPUT",
    "STRUCTURED_OUTPUT_MODES",
    "ModelPrice",
    "PydanticAIAgent",
    "StructuredOutputMode",
    "as_agent",
    "coerce_output",
    "configure_prices",
    "configure_structured_output",
    "make_agent",
    "price_of",
]

logger = logging.getLogger("flujo.agents")

StructuredOutputMode = Literal["auto", "openai_json", "native", "prompted", "text"]
"""How a pydantic-ai agent is asked for structured output (``[aros] structured_output_default``).

``"auto"``: pydantic-ai's default (an output tool); ``"native"`` (alias ``"openai_json"``): the
provider's JSON-schema mode (``pydantic_ai.NativeOutput``); ``"prompted"``: the schema in the
instructions, JSON text back (``pydantic_ai.PromptedOutput``); ``"text"``: plain text the model
is asked to write as JSON, turned into the output type by flujo (:func:`coerce_output`).
"""

STRUCTURED_OUTPUT_MODES: Final = frozenset({"auto", "openai_json", "native", "prompted", "text"})
DEFAULT_STRUCTURED_OUTPUT: Final = "auto"
"""The mode used unless configured (``[aros] structured_output_default``) or passed."""
DEFAULT_COERCION_LEVEL: Final = 1
"""The coercion level used unless configured (``[aros] coercion_tolerant_level``) or passed.

Level 1 only removes what surrounds the JSON (markdown fences, prose around it), so a value
that validates is exactly what the model wrote. Level 2 rewrites the JSON itself (it may
close brackets or quote keys of a truncated or malformed answer, guessing what was meant), so
it is opt-in.
"""

#: The longest raw model text a StructuredOutputError carries (after scrubbing).
RAW_TEXT_LIMIT: Final = 2_000

_INSTALL_HINT: Final = "pip install 'flujo[ai]'"


def _require_pydantic_ai() -> None:
    if _IMPORT_ERROR is not None:
        raise ConfigurationError(
            f"pydantic-ai agents need the optional extra: {_INSTALL_HINT} "
            f"(importing pydantic_ai failed: {_IMPORT_ERROR})"
        )


# --------------------------------------------------------------------------------------------
# Settings: structured output
# --------------------------------------------------------------------------------------------


class _OutputDefaults:
    mode: str = DEFAULT_STRUCTURED_OUTPUT
    level: int = DEFAULT_COERCION_LEVEL


def _check_mode(mode: Any) -> str:
    if not isinstance(mode, str) or mode not in STRUCTURED_OUTPUT_MODES:
        raise ConfigurationError(
            f"structured output mode must be one of {sorted(STRUCTURED_OUTPUT_MODES)}, got {mode!r}"
        )
    return "native" if mode == "openai_json" else mode


def _check_level(level: Any) -> int:
    if isinstance(level, bool) or level not in (0, 1, 2):
        raise ConfigurationError(f"coercion level must be 0, 1 or 2, got {level!r}")
    return int(level)


def configure_structured_output(mode: str | None = None, coercion_level: int | None = None) -> None:
    """Set the defaults of agents that were not given ``structured_output`` / ``coercion_level``.

    flujo calls it with ``flujo.toml``'s ``[aros]`` table (``structured_output_default``,
    ``coercion_tolerant_level``); it applies to agents built before and after the call.
    ``mode`` is one of :data:`STRUCTURED_OUTPUT_MODES`; a bad value raises
    :class:`~flujo.exceptions.ConfigurationError`.

    >>> configure_structured_output("prompted", 2)
    >>> configure_structured_output("auto", 1)  # back to the defaults
    """
    _FROM_FILE.add("aros")  # set explicitly: flujo.toml does not override it
    if mode is not None:
        _OutputDefaults.mode = _check_mode(mode)
    if coercion_level is not None:
        _OutputDefaults.level = _check_level(coercion_level)


#: The flujo.toml tables already applied (or set explicitly, which wins over the file).
_FROM_FILE: set[str] = set()
_ARO_KEYS: Final = frozenset({"coercion_tolerant_level", "structured_output_default"})


def _apply_file_settings() -> None:
    """Apply ``flujo.toml``'s ``[pricing]`` and ``[aros]`` tables, once per process (unless
    :func:`configure_prices` / :func:`configure_structured_output` set them first)."""
    if {"pricing", "aros"} <= _FROM_FILE:
        return
    from flujo.config_file import config_path, configured_table  # noqa: PLC0415

    if "pricing" not in _FROM_FILE:
        table = configured_table("pricing")
        if table:
            try:
                configure_prices(table)
            except ConfigurationError as exc:
                raise ConfigurationError(f"{config_path()}: {exc}") from None
        _FROM_FILE.add("pricing")
    if "aros" not in _FROM_FILE:
        aros = configured_table("aros")
        for key in sorted(set(aros) - _ARO_KEYS):
            logger.warning("%s: unknown key %r in [aros]", config_path(), key)
        try:
            configure_structured_output(
                aros.get("structured_output_default"), aros.get("coercion_tolerant_level")
            )
        except ConfigurationError as exc:
            raise ConfigurationError(f"{config_path()}: [aros]: {exc}") from None


# --------------------------------------------------------------------------------------------
# Cost
# --------------------------------------------------------------------------------------------


class ModelPrice(BaseModel):
    """What a model costs, in US dollars per million tokens.

    >>> ModelPrice(input_per_million=2.5, output_per_million=10.0)
    ModelPrice(input_per_million=2.5, output_per_million=10.0)
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    input_per_million: float = Field(ge=0)
    """Dollars per million input (prompt) tokens."""
    output_per_million: float = Field(ge=0)
    """Dollars per million output (completion) tokens."""

    @field_validator("input_per_million", "output_per_million")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

    def cost(self, input_tokens: int, output_tokens: int) -> float:
        """The price of ``input_tokens`` plus ``output_tokens``."""
        return (
            input_tokens * self.input_per_million + output_tokens * self.output_per_million
        ) / 1_000_000


PriceSpec = ModelPrice | Mapping[str, Any]
"""A :class:`ModelPrice` or a mapping with its fields (``{"input_per_million": ...}``)."""

_price_table: dict[str, ModelPrice] = {}
_warned_models: set[str] = set()
_warned_lock = threading.Lock()
#: Providers whose models are offline test doubles: they cost nothing, without a warning.
_FREE_PROVIDERS: Final = frozenset({"test", "function"})


def _as_price(spec: Any, where: str) -> ModelPrice:
    if isinstance(spec, ModelPrice):
        return spec
    if not isinstance(spec, Mapping):
        raise ConfigurationError(
            f"{where}: expected {{input_per_million = ..., output_per_million = ...}}, got {spec!r}"
        )
    try:
        return ModelPrice.model_validate(dict(spec))
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'value'}: {err['msg']}"
            for err in exc.errors()
        )
        raise ConfigurationError(f"{where}: {problems}") from None


def configure_prices(table: Mapping[str, PriceSpec] | None) -> None:
    """Set the price table (``flujo.toml``'s ``[pricing]``): model name -> price.

    A name is a model as pydantic-ai names it (``"gpt-4o"``) or with its provider
    (``"openai:gpt-4o"``; the exact name wins). The table replaces the previous one; ``None``
    or ``{}`` clears it. Invalid entries raise :class:`~flujo.exceptions.ConfigurationError`
    naming the model.

    >>> configure_prices({"openai:gpt-4o": {"input_per_million": 2.5, "output_per_million": 10}})
    >>> price_of("openai:gpt-4o", 1_000_000, 0)
    2.5
    >>> configure_prices(None)
    """
    if table is None:
        new: dict[str, ModelPrice] = {}
    elif not isinstance(table, Mapping):
        raise ConfigurationError(f"[pricing] must be a table of model prices, got {table!r}")
    else:
        new = {}
        for name, spec in table.items():
            if not isinstance(name, str) or not name:
                raise ConfigurationError(f"[pricing]: model names must be strings, got {name!r}")
            new[name] = _as_price(spec, f"[pricing] {name!r}")
    global _price_table  # noqa: PLW0603 - replaced as a whole, never mutated
    _price_table = new
    _FROM_FILE.add("pricing")  # set explicitly: flujo.toml does not override it


def _split_model(model_name: str) -> tuple[str | None, str]:
    provider, sep, model = model_name.partition(":")
    if sep and provider and model:
        return provider, model
    return None, model_name


def price_of(
    model_name: str, input_tokens: int, output_tokens: int, *, pricing: PriceSpec | None = None
) -> float:
    """What ``input_tokens`` and ``output_tokens`` of ``model_name`` cost, in US dollars.

    The price comes from, in order: ``pricing`` (a price for this call); the price table
    (:func:`configure_prices`, ``[pricing]`` in ``flujo.toml``; the exact name, then the name
    without its ``provider:`` prefix); the prices bundled with the ``genai-prices`` library
    (never updated over the network). pydantic-ai's offline models (``"test"``, ``function:...``)
    cost 0. Any other model costs 0, with one warning per model name on the ``flujo.agents``
    logger: its cost cannot count toward a ``total_cost_usd_limit``.

    >>> price_of("my-model", 1_000, 500, pricing=ModelPrice(input_per_million=1,
    ...                                                     output_per_million=2))
    0.002
    >>> price_of("test", 1_000, 500)
    0.0
    """
    if pricing is not None:
        return _as_price(pricing, "pricing").cost(input_tokens, output_tokens)
    provider, model = _split_model(model_name)
    table = _price_table
    price = table.get(model_name)
    if price is None and provider is not None:
        price = table.get(model)
    if price is not None:
        return price.cost(input_tokens, output_tokens)
    if model_name == "test" or provider in _FREE_PROVIDERS:
        return 0.0
    cost = _genai_price(provider, model, input_tokens, output_tokens)
    if cost is not None:
        return cost
    _warn_unpriced(model_name)
    return 0.0


def _genai_price(
    provider: str | None, model: str, input_tokens: int, output_tokens: int
) -> float | None:
    """The price by genai-prices' bundled data, or None when it does not know the model."""
    try:
        import genai_prices  # noqa: PLC0415 - loads its price data; only for unknown models
    except ImportError:  # pragma: no cover - installed with pydantic-ai
        return None
    usage = genai_prices.Usage(input_tokens=input_tokens, output_tokens=output_tokens)
    # pydantic-ai's provider names mostly match genai-prices' ids; when they do not (for
    # example "google-gla"), genai-prices finds the provider from the model name alone.
    for provider_id in (provider, None) if provider else (None,):
        try:
            found = genai_prices.calc_price(usage, model_ref=model, provider_id=provider_id)
        except (LookupError, ValueError):
            continue
        except Exception:  # pricing never fails a run
            logger.debug("genai-prices failed for %r", model, exc_info=True)
            return None
        return float(found.total_price)
    return None


def _warn_unpriced(model_name: str) -> None:
    with _warned_lock:
        if model_name in _warned_models:
            return
        _warned_models.add(model_name)
    logger.warning(
        "no price is known for model %r: its calls count as costing $0, so a "
        "total_cost_usd_limit cannot stop them. Add a price to flujo.toml "
        '([pricing] "%s" = { input_per_million = ..., output_per_million = ... }) or pass '
        "pricing=ModelPrice(...) to make_agent / PydanticAIAgent",
        model_name,
        model_name,
    )


# --------------------------------------------------------------------------------------------
# Structured output: coercion
# --------------------------------------------------------------------------------------------

_FENCE = re.compile(r"```[^\n`]*\n(.*?)```", re.DOTALL)
_CLOSER = {"{": "}", "[": "]"}
_decoder = json.JSONDecoder()


def _fenced_blocks(text: str) -> list[str]:
    return [block.strip() for block in _FENCE.findall(text) if block.strip()]


def _first_openers(text: str) -> list[int]:
    """Where the first JSON object and the first JSON array start, in text order."""
    return sorted(pos for pos in (text.find("{"), text.find("[")) if pos >= 0)


def _extracted(text: str) -> Iterator[str]:
    """Level 1: the JSON inside markdown fences or surrounded by prose, unchanged."""
    yield from _fenced_blocks(text)
    for pos in _first_openers(text):
        try:
            _, end = _decoder.raw_decode(text, pos)
        except ValueError:
            continue
        yield text[pos:end]


def _repair_bases(text: str) -> Iterator[str]:
    """Level 2: the texts json-repair works on (fenced blocks, the outermost brackets, all)."""
    yield from _fenced_blocks(text)
    openers = _first_openers(text)
    if openers:
        start = openers[0]
        end = text.rfind(_CLOSER[text[start]])
        yield text[start : end + 1] if end > start else text[start:]
    yield text


def _repair(text: str) -> str:
    try:
        import json_repair  # noqa: PLC0415 - only coercion level 2 needs it
    except ImportError as exc:  # pragma: no cover - installed with flujo[ai]
        raise ConfigurationError(
            f"coercion level 2 needs the json-repair library: {_INSTALL_HINT}"
        ) from exc
    try:
        repaired = json_repair.repair_json(text, ensure_ascii=False)
    except Exception:  # a text json-repair cannot handle is simply not repaired
        return ""
    return repaired if isinstance(repaired, str) else ""


def _json_candidates(text: str, level: int) -> Iterator[str]:
    """The texts to validate, in order, at coercion ``level`` (``text`` itself first)."""
    yield text
    if level < 1:
        return
    seen = {text}
    for candidate in _extracted(text):
        if candidate not in seen:
            seen.add(candidate)
            yield candidate
    if level < 2:
        return
    for base in _repair_bases(text):
        repaired = _repair(base)
        if repaired and repaired not in seen:
            seen.add(repaired)
            yield repaired


@lru_cache(maxsize=256)
def _cached_adapter(output_type: Any) -> TypeAdapter[Any]:
    return TypeAdapter(output_type)


def _type_adapter(output_type: Any) -> TypeAdapter[Any]:
    try:
        return _cached_adapter(output_type)
    except TypeError:  # an unhashable type expression
        return TypeAdapter(output_type)


def _type_name(output_type: Any) -> str:
    if isinstance(output_type, type) and typing.get_origin(output_type) is None:
        return output_type.__qualname__
    return str(output_type).replace("typing.", "")


def _scrubbed(text: str) -> str:
    """``text`` scrubbed by the governance policy (when PII scrubbing is on), then truncated.

    Scrubbed first, so that a secret cut in two by the truncation is still found.
    """
    from flujo.governance import current_policy  # noqa: PLC0415 - only on failures

    scrubber = current_policy().scrubber
    if scrubber is not None:
        text = scrubber.scrub_text(text)
    if len(text) > RAW_TEXT_LIMIT:
        text = f"{text[:RAW_TEXT_LIMIT]}... [{len(text) - RAW_TEXT_LIMIT} more characters]"
    return text


def _structured_output_error(
    text: str, output_type: Any, level: int, error: ValidationError | None
) -> StructuredOutputError:
    name = _type_name(output_type)
    detail = ""
    if error is not None and error.errors():
        first = error.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        detail = f": {where + ': ' if where else ''}{first['msg']}"
    hint = (
        ""
        if level >= 2
        else " (coercion level 2, [aros] coercion_tolerant_level = 2, also repairs malformed JSON)"
    )
    return StructuredOutputError(
        f"the model's output is not a valid {name} at coercion level {level}{detail}{hint}",
        raw_text=_scrubbed(text),
        output_type=name,
    )


def coerce_output(text: str, output_type: Any, level: int = DEFAULT_COERCION_LEVEL) -> Any:
    """Turn a model's text into ``output_type`` (validated with pydantic).

    ``level`` is how much the text may be fixed first:

    * 0: none, the text must be JSON valid for ``output_type``;
    * 1: also take the JSON out of markdown code fences or the prose around it (the
      outermost JSON object or array), without changing it;
    * 2: also repair malformed JSON with the ``json-repair`` library (trailing commas, single
      quotes, unquoted keys, missing brackets, comments, ...).

    A ``str`` output type gets the text as it is. Failure raises
    :class:`~flujo.exceptions.StructuredOutputError` whose ``raw_text`` is the text (scrubbed
    when PII scrubbing is on, at most 2,000 characters).

    >>> coerce_output('Sure!\\n```json\\n{"a": 1}\\n```', dict[str, int], level=1)
    {'a': 1}
    >>> coerce_output("{'a': 1,}", dict[str, int], level=2)
    {'a': 1}
    """
    level = _check_level(level)
    if output_type is str:
        return text
    if not isinstance(text, str):
        raise TypeError(f"coerce_output needs the model's text (a str), got {type(text).__name__}")
    adapter = _type_adapter(output_type)
    error: ValidationError | None = None
    for candidate in _json_candidates(text, level):
        try:
            return adapter.validate_json(candidate)
        except ValidationError as exc:
            error = exc
    raise _structured_output_error(text, output_type, level, error)


def _text_instructions(output_type: Any) -> str:
    schema = orjson.dumps(_type_adapter(output_type).json_schema()).decode()
    return (
        "Reply with a single JSON value, and nothing else, that is valid for this JSON "
        f"schema:\n{schema}"
    )


# --------------------------------------------------------------------------------------------
# Tool allowlist
# --------------------------------------------------------------------------------------------


def _check_tool(name: str) -> None:
    """Raise ToolNotAllowedError unless ``FLUJO_GOVERNANCE_TOOL_ALLOWLIST`` allows ``name``."""
    from flujo.governance import current_policy  # noqa: PLC0415 - cached; cheap after the first

    current_policy().check_tool(name)


# --------------------------------------------------------------------------------------------
# The adapter
# --------------------------------------------------------------------------------------------


if _IMPORT_ERROR is None:

    @dataclass
    class _FlujoHooks(AbstractCapability[Any]):
        """Per-run pydantic-ai hooks: the tool allowlist and tolerant output parsing."""

        coercion_level: int
        budget: Callable[[RunUsage], None] | None = None

        async def before_model_request(
            self, ctx: RunContext[Any], request_context: ModelRequestContext
        ) -> ModelRequestContext:
            # The first request was checked before the agent run started; a further one (after
            # tool calls, or an output retry) starts only while the run is below its limits.
            if self.budget is not None and ctx.usage.requests:
                self.budget(ctx.usage)
            return request_context

        async def before_tool_execute(
            self,
            ctx: RunContext[Any],
            *,
            call: ToolCallPart,
            tool_def: ToolDefinition,
            args: ValidatedToolArgs,
        ) -> ValidatedToolArgs:
            # Raised before the tool runs; pydantic-ai propagates it (it is neither a
            # ModelRetry nor a ValidationError, so the model is not asked to try again).
            _check_tool(tool_def.name)
            return args

        async def wrap_output_validate(
            self,
            ctx: RunContext[Any],
            *,
            output_context: OutputContext,
            output: RawOutput,
            handler: WrapOutputValidateHandler,
        ) -> Any:
            try:
                return await handler(output)
            except (ValidationError, ModelRetry) as exc:
                level = self.coercion_level
                if level == 0 or not isinstance(output, str) or ctx.partial_output:
                    raise
                # Repair the text's JSON and let pydantic-ai validate it again, instead of
                # spending a request on asking the model to try again.
                for candidate in _json_candidates(output, level):
                    if candidate is output:
                        continue
                    try:
                        return await handler(candidate)
                    except (ValidationError, ModelRetry):
                        continue
                target = output_context.output_type
                if (
                    isinstance(exc, ValidationError)
                    and target is not None
                    and not output_context.has_function
                ):
                    # pydantic-ai wraps non-object types ({"response": ...}); the model may
                    # have answered with the bare value.
                    try:
                        return coerce_output(output, target, level)
                    except StructuredOutputError:
                        pass
                raise


_USER_CONTENT: tuple[type, ...] = (
    ()
    if _IMPORT_ERROR is not None
    else (ImageUrl, AudioUrl, DocumentUrl, VideoUrl, BinaryContent, CachePoint)
)


def _prompt(data: Any) -> Any:
    """The user prompt for ``data``: a str as is, anything else as JSON."""
    if isinstance(data, str):
        return data
    if (
        isinstance(data, (list, tuple))
        and data
        and all(isinstance(item, (str, *_USER_CONTENT)) for item in data)
        and not all(isinstance(item, str) for item in data)
    ):
        return list(data)  # pydantic-ai multimodal content (text with images, documents...)
    if isinstance(data, BaseModel):
        return data.model_dump_json()
    try:
        return orjson.dumps(
            data, default=flujo_default_serializer, option=orjson.OPT_NON_STR_KEYS
        ).decode()
    except (TypeError, orjson.JSONEncodeError):
        return str(data)


def _unwrap_output(spec: Any) -> Any:
    """The type a pydantic-ai output spec produces (the type inside NativeOutput(...) etc.)."""
    if _IMPORT_ERROR is None:
        if isinstance(spec, (NativeOutput, PromptedOutput)):
            return _unwrap_output(spec.outputs)
        if isinstance(spec, ToolOutput):
            return _unwrap_output(spec.output)
    if isinstance(spec, Sequence) and not isinstance(spec, str):
        members = tuple(_unwrap_output(item) for item in spec)
        if not members:
            return Any
        return members[0] if len(members) == 1 else typing.Union[members]  # noqa: UP007
    if isinstance(spec, type) or typing.get_origin(spec) is not None:
        return spec
    return Any  # an output function or another marker: its result is not described here


def _model_name(model: Any) -> str | None:
    if model is None:
        return None
    if isinstance(model, str):
        return model
    system = getattr(model, "system", None)
    name = getattr(model, "model_name", None)
    if system == "test":
        return "test"
    if system == "function" or not system:
        return name if isinstance(name, str) else None
    return f"{system}:{name}"


def _supports_native_output(model: Any) -> bool:
    profile = getattr(model, "profile", None)
    if isinstance(profile, Mapping):
        return bool(profile.get("supports_json_schema_output", True))
    return bool(getattr(profile, "supports_json_schema_output", True))


def _last_text(messages: Sequence[ModelMessage]) -> str | None:
    """The text of the model's last response, when it is only text (no tool calls)."""
    for message in reversed(messages):
        if isinstance(message, ModelResponse):
            if any(isinstance(part, ToolCallPart) for part in message.parts):
                return None
            return message.text
    return None


class PydanticAIAgent:
    """A ``pydantic_ai.Agent`` as a flujo agent: ``await agent.run(data)`` in a step.

    Args:
        agent: the pydantic-ai agent (any ``pydantic_ai.agent.AbstractAgent``).
        output_type: the type the step produces; default: the agent's own output type. A
            different type is requested from pydantic-ai for each run.
        structured_output: how structured output is asked for (:data:`StructuredOutputMode`);
            default: ``[aros] structured_output_default``, else ``"auto"``.
        coercion_level: 0, 1 or 2, see :func:`coerce_output`; default:
            ``[aros] coercion_tolerant_level``, else 1.
        pricing: this agent's price (:class:`ModelPrice`), before the price table.
        name: a name for messages; default: the agent's name or its model's.

    ``data`` becomes the user prompt: a str as it is, a pydantic model or other data as JSON
    (a list of text and pydantic-ai content such as ``ImageUrl`` as it is). The agent's
    ``deps`` are flujo's run context when its ``deps_type`` is a
    :class:`~flujo.domain.models.PipelineContext` subclass, the run's resources when it is an
    :class:`~flujo.domain.models.AppResources` subclass, and nothing otherwise.

    >>> from pydantic_ai import Agent
    >>> from flujo import Flujo, Step
    >>> agent = PydanticAIAgent(Agent("test"))
    >>> Flujo(Step("ask", agent=agent), persist_state=False).run("hi").output
    'success (no tool calls)'
    """

    def __init__(
        self,
        agent: Any,
        *,
        output_type: Any = None,
        structured_output: StructuredOutputMode | None = None,
        coercion_level: int | None = None,
        pricing: PriceSpec | None = None,
        name: str | None = None,
    ) -> None:
        _require_pydantic_ai()
        _apply_file_settings()
        if not isinstance(agent, AbstractAgent):
            raise ConfigurationError(
                f"PydanticAIAgent wraps a pydantic_ai.Agent, got {type(agent).__name__}"
            )
        self.agent: AbstractAgent[Any, Any] = agent
        self._own_type = _unwrap_output(agent.output_type)
        #: A pydantic-ai output spec given as ``output_type`` (``NativeOutput(City)``, ...).
        self._given_spec: Any = None
        if output_type is None:
            self.output_type: Any = self._own_type
        elif (
            output_type is Any
            or isinstance(output_type, type)
            or typing.get_origin(output_type) is not None
        ):
            self.output_type = output_type
        else:
            self._given_spec = output_type
            self.output_type = _unwrap_output(output_type)
        self._mode = None if structured_output is None else _check_mode(structured_output)
        self._level = None if coercion_level is None else _check_level(coercion_level)
        self.pricing: ModelPrice | None = None if pricing is None else _as_price(pricing, "pricing")
        self.model_name: str | None = _model_name(agent.model)
        """The model as ``provider:model`` (``"test"`` for pydantic-ai's test model), or None."""
        self.name: str = name or agent.name or self.model_name or "pydantic_ai_agent"
        deps_type = agent.deps_type
        self._deps: Literal["context", "resources"] | None = None
        if isinstance(deps_type, type):
            if issubclass(deps_type, PipelineContext):
                self._deps = "context"
            elif issubclass(deps_type, AppResources):
                self._deps = "resources"
        self._deps_type: Any = deps_type
        self._instructions: str | None = None

    def __repr__(self) -> str:
        return f"PydanticAIAgent({self.name!r}, output_type={_type_name(self.output_type)})"

    @property
    def structured_output(self) -> str:
        """The structured output mode in force (passed, configured, or ``"auto"``)."""
        return self._mode or _OutputDefaults.mode

    @property
    def coercion_level(self) -> int:
        """The coercion level in force (passed, configured, or 1)."""
        return _OutputDefaults.level if self._level is None else self._level

    async def run(self, data: Any, *, context: Any = None, resources: Any = None) -> Any:
        """Run the pydantic-ai agent on ``data`` and return its output.

        Raises :class:`~flujo.exceptions.UsageLimitExceededError` before any request when the
        run is at a usage limit (and when a limit is reached during this call),
        :class:`~flujo.exceptions.ToolNotAllowedError` when the model calls a tool the
        governance allowlist does not name (before the tool runs), and
        :class:`~flujo.exceptions.StructuredOutputError` when the model's text cannot be
        turned into :attr:`output_type`.
        """
        check_usage_limits()
        deps = self._deps_for(context, resources)
        spec, text_mode = self._output_spec()
        level = self.coercion_level
        meter = current_step_meter()
        budget = None
        if meter is not None and meter.run.limits is not None:
            run_meter = meter.run

            def budget(used: RunUsage) -> None:
                # Before each further request of this agent run: the run's usage, with what
                # this agent run used so far, must still be below every limit.
                cost = self._cost(used, ())
                run_meter.check(Usage(used.requests, used.input_tokens, used.output_tokens, cost))

        usage = RunUsage()
        messages: list[ModelMessage] = []
        try:
            with capture_run_messages() as messages:
                try:
                    result = await self.agent.run(
                        _prompt(data),
                        output_type=spec,
                        deps=deps,
                        usage=usage,
                        instructions=self._text_instructions() if text_mode else None,
                        capabilities=[_FlujoHooks(level, budget)],
                    )
                    output = result.output
                except UnexpectedModelBehavior as exc:
                    # pydantic-ai gave up on the model's structured output (after its output
                    # retries): the model may still have written the value as text.
                    text = _last_text(messages)
                    if text is None or self.output_type is str or self.output_type is Any:
                        raise
                    try:
                        output = coerce_output(text, self.output_type, level)
                    except StructuredOutputError as error:
                        raise error from exc
                    text_mode = False
        except BaseException:
            self._report(usage, messages)
            raise
        self._report(usage, messages)
        if text_mode and isinstance(output, str):
            return coerce_output(output, self.output_type, level)
        return output

    # ----------------------------------------------------------------------------------------

    # -- granular steps: one model turn at a time --------------------------------------------

    @property
    def tools(self) -> dict[str, Callable[..., Any]]:
        """The agent's function tools by name: what a granular step calls for it."""
        found: dict[str, Callable[..., Any]] = {}
        for toolset in self.agent.toolsets:
            for name, tool in (getattr(toolset, "tools", None) or {}).items():
                function = getattr(tool, "function", None)
                if callable(function) and not getattr(tool, "takes_ctx", False):
                    found[name] = function
        return found

    async def turn(self, transcript: Sequence[Mapping[str, Any]]) -> Any:
        """One model turn of a granular step (``Step.granular(name, agent)``): the transcript
        so far to the model, with the agent's system prompt and tools, in one request; its
        reply as an :class:`~flujo.AgentTurn` (tool calls to make, or the final output).

        The step, not pydantic-ai, calls the tools (so each call gets its idempotency key and
        its result is committed); a tool's ``idempotency_key`` parameter is hidden from the
        model. Usage is reported as for :meth:`run`; the final text is turned into
        :attr:`output_type` as in ``"text"`` mode.
        """
        from pydantic_ai.direct import model_request  # noqa: PLC0415
        from pydantic_ai.models import ModelRequestParameters  # noqa: PLC0415

        from flujo.domain.granular import AgentTurn, ToolCall  # noqa: PLC0415

        check_usage_limits()
        model = self.agent.model
        if model is None:
            raise ConfigurationError(
                f"agent {self.name!r} has no model: a granular step needs one (give the "
                "pydantic-ai Agent a model)"
            )
        params = ModelRequestParameters(function_tools=self._tool_definitions())
        response = await model_request(
            model, _turn_messages(self.agent, transcript), model_request_parameters=params
        )
        usage = RunUsage(
            requests=1,
            input_tokens=response.usage.input_tokens,
            output_tokens=response.usage.output_tokens,
        )
        self._report(usage, [response])
        calls = [
            ToolCall(part.tool_name, part.args_as_dict())
            for part in response.parts
            if isinstance(part, ToolCallPart)
        ]
        text = "".join(part.content for part in response.parts if isinstance(part, TextPart))
        if calls:
            return AgentTurn(output=text or None, tool_calls=calls)
        if self.output_type is str or self.output_type is Any:
            return AgentTurn(output=text)
        return AgentTurn(output=coerce_output(text, self.output_type, self.coercion_level))

    def _tool_definitions(self) -> list[ToolDefinition]:
        definitions = []
        for toolset in self.agent.toolsets:
            for tool in (getattr(toolset, "tools", None) or {}).values():
                definition = getattr(tool, "tool_def", None)
                if definition is None or getattr(tool, "takes_ctx", False):
                    continue
                schema = dict(definition.parameters_json_schema)
                properties = dict(schema.get("properties", {}))
                if (
                    properties.pop("idempotency_key", None) is not None
                ):  # the step's, not the model's
                    schema["properties"] = properties
                    schema["required"] = [
                        r for r in schema.get("required", []) if r != "idempotency_key"
                    ]
                definitions.append(replace(definition, parameters_json_schema=schema))
        return definitions

    def _deps_for(self, context: Any, resources: Any) -> Any:
        if self._deps is None:
            return None
        value = context if self._deps == "context" else resources
        if not isinstance(value, self._deps_type):
            hint = "Flujo(context_model=...)" if self._deps == "context" else "Flujo(resources=...)"
            raise ConfigurationError(
                f"agent {self.name!r} takes deps of type {_type_name(self._deps_type)}, but the "
                f"run's {self._deps} is {type(value).__name__}: pass {hint}"
            )
        return value

    def _output_spec(self) -> tuple[Any, bool]:
        """What to pass as pydantic-ai's ``output_type`` (None: the agent's own), and whether
        the model answers in text that flujo coerces."""
        target = self.output_type
        own = self.agent.output_type
        if target is str:
            return (None if own is str else str), False
        if (
            self._mode is None
            and self._given_spec is None
            and target is self._own_type
            and own is not target
        ):
            return None, False  # the agent was built with its own output marker: keep it
        mode = self.structured_output
        if mode == "text":
            return (None if own is str else str), True
        if mode == "native" and not _supports_native_output(self.agent.model):
            if self.model_name != "test":
                _warn_once(
                    f"native:{self.model_name}",
                    "model %r does not support native structured output; agent %r asks for "
                    "its output with an output tool instead",
                    self.model_name,
                    self.name,
                )
            mode = "auto"
        if mode == "auto":
            if self._given_spec is not None:
                return self._given_spec, False
            return (None if own is target else target), False
        if mode == "native":
            return NativeOutput(target), False
        return PromptedOutput(target), False

    def _text_instructions(self) -> str:
        if self._instructions is None:
            self._instructions = _text_instructions(self.output_type)
        return self._instructions

    def _report(self, usage: RunUsage, messages: Sequence[ModelMessage]) -> None:
        if not (usage.requests or usage.input_tokens or usage.output_tokens):
            return
        cost = self._cost(usage, messages)
        report_usage(Usage(usage.requests, usage.input_tokens, usage.output_tokens, cost))

    def _cost(self, usage: RunUsage, messages: Sequence[ModelMessage]) -> float:
        """What ``usage`` of this agent's model costs (named from ``messages`` when the
        model was chosen per run)."""
        model_name = self.model_name
        if model_name is None:  # the model was chosen per run: name it from its responses
            for message in reversed(messages):
                if isinstance(message, ModelResponse) and message.model_name:
                    provider = message.provider_name
                    model_name = (
                        f"{provider}:{message.model_name}" if provider else message.model_name
                    )
                    break
        if model_name is None and self.pricing is None:
            return 0.0
        return price_of(
            model_name or self.name, usage.input_tokens, usage.output_tokens, pricing=self.pricing
        )


def _turn_messages(agent: Any, transcript: Sequence[Mapping[str, Any]]) -> list[ModelMessage]:
    """A granular step's transcript as pydantic-ai messages (tool call ids by position)."""
    system = [SystemPromptPart(text) for text in getattr(agent, "_system_prompts", ()) or ()]
    messages: list[ModelMessage] = []
    pending: list[Any] = list(system)
    turn = 0
    calls: list[str] = []
    for message in transcript:
        role = message.get("role")
        if role == "user":
            pending.append(UserPromptPart(_prompt(message.get("content"))))
        elif role == "assistant":
            if pending:
                messages.append(ModelRequest(parts=pending))
                pending = []
            parts: list[Any] = []
            if message.get("content"):
                parts.append(TextPart(_as_text(message["content"])))
            calls = []
            for index, call in enumerate(message.get("tool_calls") or ()):
                call_id = f"flujo-{turn}-{index}"
                calls.append(call_id)
                parts.append(ToolCallPart(call["name"], dict(call.get("args") or {}), call_id))
            messages.append(ModelResponse(parts=parts))
            turn += 1
        elif role == "tool":
            call_id = calls.pop(0) if calls else f"flujo-{turn}-x"
            if "error" in message:
                pending.append(
                    RetryPromptPart(
                        str(message["error"]), tool_name=message.get("name"), tool_call_id=call_id
                    )
                )
            else:
                pending.append(
                    ToolReturnPart(str(message.get("name")), message.get("content"), call_id)
                )
    if pending:
        messages.append(ModelRequest(parts=pending))
    return messages


def _as_text(value: Any) -> str:
    return (
        value
        if isinstance(value, str)
        else orjson.dumps(value, default=flujo_default_serializer).decode()
    )


def _warn_once(key: str, message: str, *args: Any) -> None:
    with _warned_lock:
        if key in _warned_models:
            return
        _warned_models.add(key)
    logger.warning(message, *args)


def make_agent(
    model: Any,
    system_prompt: str | Sequence[str] = (),
    output_type: Any = str,
    tools: Sequence[Callable[..., Any]] = (),
    *,
    structured_output: StructuredOutputMode | None = None,
    coercion_level: int | None = None,
    pricing: PriceSpec | None = None,
    name: str | None = None,
    retries: int = 1,
    **agent_kwargs: Any,
) -> PydanticAIAgent:
    """Build a ``pydantic_ai.Agent`` and wrap it in a :class:`PydanticAIAgent`.

    ``model`` is any pydantic-ai model or model name (``"openai:gpt-4o"``; ``"test"`` for
    pydantic-ai's offline test model); ``tools`` are plain functions or ``pydantic_ai.Tool``;
    ``retries`` is pydantic-ai's retry budget for tools and output; other keyword arguments
    go to ``pydantic_ai.Agent``. The keyword arguments after ``*`` are
    :class:`PydanticAIAgent`'s.

    >>> from pydantic import BaseModel
    >>> class City(BaseModel):
    ...     name: str
    >>> agent = make_agent("test", "Name a city.", output_type=City)
    >>> agent.output_type is City, agent.model_name
    (True, 'test')
    """
    _require_pydantic_ai()
    try:
        agent: Agent[Any, Any] = Agent(
            model,
            output_type=output_type,
            system_prompt=system_prompt,
            tools=tools,
            name=name,
            retries=retries,
            **agent_kwargs,
        )
    except ImportError as exc:
        raise ConfigurationError(
            f"model {model!r} needs a package that is not installed: {exc}"
        ) from exc
    return PydanticAIAgent(
        agent,
        structured_output=structured_output,
        coercion_level=coercion_level,
        pricing=pricing,
        name=name,
    )


def as_agent(obj: Any) -> Any:
    """``obj`` as a flujo agent: a pydantic-ai agent wrapped in :class:`PydanticAIAgent`,
    anything else (flujo agents, adapters) as it is. Never imports pydantic-ai itself.

    >>> as_agent("not an agent")
    'not an agent'
    """
    if "pydantic_ai" not in sys.modules or _IMPORT_ERROR is not None:
        return obj
    if isinstance(obj, AbstractAgent):
        return PydanticAIAgent(obj)
    return obj
