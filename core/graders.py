"""Graders: how a GRPO job's completions are scored, declared in its spec as OpenAI defines them
for reinforcement fine-tuning (`string_check`, `text_similarity`, `multi`), plus `regex` and
`json_schema` checks of this server's own. Pure Python, no torch: the API checks a grader when the
job is submitted (its templates, its regex, its schema, its formula) and the trainer scores with
the same code (trainer/methods/grpo.py).

No grader runs a user's code. OpenAI's `python` grader (source code in the spec) and its model
graders are refused; an operator may allow installed reward modules by name (REWARD_MODULES), which
a `reward_module` grader then names.

Templates: `{{sample.output_text}}` is the completion (its text; a chat completion's assistant
content), `{{item.<field>}}` a field of the dataset row (`item.answer`, `item.meta.id`)."""

from __future__ import annotations

import ast
import difflib
import json
import math
import operator
import re
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator

NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]{0,63}$"
TEMPLATE_RE = re.compile(r"\{\{\s*(.*?)\s*\}\}")
SAMPLE_OUTPUT = "sample.output_text"
ITEM_FIELD_RE = re.compile(r"^item((?:\.[A-Za-z_][A-Za-z0-9_-]*)+)$")
MAX_TEMPLATE_CHARS = 10_000
MAX_PATTERN_CHARS = 1_000
# A regex is given this long per completion before it scores 0 (the `regex` module's timeout):
# a pattern that backtracks catastrophically cannot stall training.
REGEX_TIMEOUT_S = 0.5
MAX_GRADERS = 16
SIMILARITY_METRICS = (
    "fuzzy_match",
    "bleu",
    "gleu",
    "rouge_1",
    "rouge_2",
    "rouge_3",
    "rouge_4",
    "rouge_5",
    "rouge_l",
)
UNSUPPORTED_METRICS = {
    "cosine": "it needs an embedding model, which this server does not run",
    "meteor": "it needs WordNet, which this server does not ship",
}


# ---- templates -----------------------------------------------------------------------------------


def template_fields(template: str) -> list[str]:
    """The item fields a template reads (`answer` for {{item.answer}}); ValueError naming any
    placeholder that is neither {{sample.output_text}} nor {{item.<field>}}."""
    fields = []
    for placeholder in TEMPLATE_RE.findall(template):
        if placeholder == SAMPLE_OUTPUT:
            continue
        found = ITEM_FIELD_RE.match(placeholder)
        if found is None:
            raise ValueError(
                f"{{{{{placeholder}}}}} is not a template this server fills: use {{{{sample.output_text}}}} (the "
                "completion) or {{item.<field>}} (a field of the dataset row)"
            )
        fields.append(found.group(1)[1:])
    return fields


def _lookup(item: Mapping[str, Any], path: str) -> Any:
    value: Any = item
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def _text(value: Any) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def render(template: str, output_text: str, item: Mapping[str, Any]) -> str:
    def fill(found: re.Match[str]) -> str:
        placeholder = found.group(1)
        if placeholder == SAMPLE_OUTPUT:
            return output_text
        return _text(_lookup(item, placeholder[len("item.") :]))

    return TEMPLATE_RE.sub(fill, template)


def _check_template(value: str) -> str:
    template_fields(value)
    return value


Template = Annotated[str, Field(max_length=MAX_TEMPLATE_CHARS)]


# ---- the graders ---------------------------------------------------------------------------------


class _Grader(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN, description="how its score is named in the step logs (rewards/<name>)")

    def item_fields(self) -> set[str]:
        return set()

    def score(self, output_text: str, item: Mapping[str, Any]) -> float:
        """This grader's score of one completion. Every built-in type has one; a reward module is
        called by the trainer on a whole batch instead (trainer/methods/grpo.py), never here."""
        raise TypeError(f"a {type(self).__name__} is not scored one completion at a time")


class StringCheckGrader(_Grader):
    """1 when the comparison holds, else 0: `eq` equal, `ne` not equal, `like` the reference is in
    the input, `ilike` the same ignoring case (OpenAI's string_check)."""

    type: Literal["string_check"]
    input: Template = "{{sample.output_text}}"
    reference: Template
    operation: Literal["eq", "ne", "like", "ilike"]

    @field_validator("input", "reference")
    @classmethod
    def _templates(cls, value: str) -> str:
        return _check_template(value)

    def item_fields(self) -> set[str]:
        return set(template_fields(self.input) + template_fields(self.reference))

    def score(self, output_text: str, item: Mapping[str, Any]) -> float:
        value, reference = render(self.input, output_text, item), render(self.reference, output_text, item)
        if self.operation == "eq":
            return float(value == reference)
        if self.operation == "ne":
            return float(value != reference)
        if self.operation == "like":
            return float(reference in value)
        return float(reference.lower() in value.lower())


class TextSimilarityGrader(_Grader):
    """A similarity between 0 and 1 (OpenAI's text_similarity): fuzzy_match (difflib's ratio),
    bleu, gleu (sentence-level, up to 4-grams), rouge_1..rouge_5 and rouge_l (F1). `pass_threshold`
    is kept for OpenAI's sake; the reward is the similarity itself."""

    type: Literal["text_similarity"]
    input: Template = "{{sample.output_text}}"
    reference: Template
    evaluation_metric: str
    pass_threshold: float | None = Field(default=None, ge=0, le=1)

    @field_validator("input", "reference")
    @classmethod
    def _templates(cls, value: str) -> str:
        return _check_template(value)

    @field_validator("evaluation_metric")
    @classmethod
    def _metric(cls, value: str) -> str:
        if value in UNSUPPORTED_METRICS:
            raise ValueError(
                f"evaluation_metric {value!r} is not available here: {UNSUPPORTED_METRICS[value]}; use one of "
                f"{', '.join(SIMILARITY_METRICS)}"
            )
        if value not in SIMILARITY_METRICS:
            raise ValueError(f"evaluation_metric must be one of {', '.join(SIMILARITY_METRICS)}, not {value!r}")
        return value

    def item_fields(self) -> set[str]:
        return set(template_fields(self.input) + template_fields(self.reference))

    def score(self, output_text: str, item: Mapping[str, Any]) -> float:
        value, reference = render(self.input, output_text, item), render(self.reference, output_text, item)
        return similarity(self.evaluation_metric, value, reference)


class RegexGrader(_Grader):
    """1 when the pattern is found in the input (`search`), or matches all of it (`fullmatch`);
    else 0 (this server's own). The pattern is Python's syntax; a pattern that runs longer than
    REGEX_TIMEOUT_S on one completion scores 0."""

    type: Literal["regex"]
    input: Template = "{{sample.output_text}}"
    pattern: str = Field(min_length=1, max_length=MAX_PATTERN_CHARS)
    match: Literal["search", "fullmatch"] = "search"
    ignore_case: bool = False

    @field_validator("input")
    @classmethod
    def _templates(cls, value: str) -> str:
        return _check_template(value)

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, value: str) -> str:
        import regex

        try:
            regex.compile(value)
        except regex.error as exc:
            raise ValueError(f"pattern does not compile: {exc}") from None
        return value

    def item_fields(self) -> set[str]:
        return set(template_fields(self.input))

    def score(self, output_text: str, item: Mapping[str, Any]) -> float:
        import regex

        flags = regex.IGNORECASE if self.ignore_case else 0
        find = regex.fullmatch if self.match == "fullmatch" else regex.search
        try:
            found = find(self.pattern, render(self.input, output_text, item), flags, timeout=REGEX_TIMEOUT_S)
            return float(found is not None)
        except TimeoutError:
            return 0.0


class JsonSchemaGrader(_Grader):
    """1 when the input is JSON that the schema accepts, else 0 (this server's own). The schema
    keywords understood: type, properties, required, additionalProperties, items, enum, const,
    minimum, maximum, exclusiveMinimum, exclusiveMaximum, minLength, maxLength, pattern, minItems,
    maxItems, anyOf, allOf; any other is refused when the job is submitted."""

    type: Literal["json_schema"]
    input: Template = "{{sample.output_text}}"
    json_schema: dict[str, Any] = Field(alias="schema")

    model_config = ConfigDict(extra="forbid", populate_by_name=True, serialize_by_alias=True)

    @field_validator("input")
    @classmethod
    def _templates(cls, value: str) -> str:
        return _check_template(value)

    @field_validator("json_schema")
    @classmethod
    def _known_keywords(cls, value: dict[str, Any]) -> dict[str, Any]:
        check_schema(value)
        return value

    def item_fields(self) -> set[str]:
        return set(template_fields(self.input))

    def score(self, output_text: str, item: Mapping[str, Any]) -> float:
        try:
            document = json.loads(render(self.input, output_text, item))
        except (ValueError, RecursionError):
            return 0.0
        return float(schema_accepts(self.json_schema, document))


class RewardModuleGrader(_Grader):
    """A reward function of an installed module the operator allowed (REWARD_MODULES): called as
    TRL calls reward functions, `function(prompts=..., completions=..., **columns)`, returning one
    float per completion. Never code from the spec itself."""

    type: Literal["reward_module"]
    module: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$", max_length=200)
    function: str = Field(default="reward", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")


class _NeverValid(BaseModel):
    """A grader type that never validates: it exists to say why."""

    def item_fields(self) -> set[str]:
        return set()

    def score(self, output_text: str, item: Mapping[str, Any]) -> float:
        raise AssertionError("a refused grader is never scored")


class RefusedGrader(_NeverValid):
    """OpenAI's graders that would run code or another model here: refused, saying why."""

    model_config = ConfigDict(extra="allow")

    type: Literal["python", "score_model", "label_model", "endpoint"]

    @model_validator(mode="after")
    def _refuse(self) -> RefusedGrader:
        if self.type == "python":
            raise ValueError(
                "a 'python' grader runs the code in the spec, which this server never does; use string_check, "
                "text_similarity, regex, json_schema or multi, or ask the operator to install a reward module and "
                "allow it (REWARD_MODULES), then name it with a 'reward_module' grader"
            )
        raise ValueError(
            f"a {self.type!r} grader needs a model to grade with, which this server does not run; use "
            "string_check, text_similarity, regex, json_schema, multi, or an operator's reward_module"
        )


def _grader_type(value: Any) -> str:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return kind if isinstance(kind, str) and kind in GRADER_TYPES else "unknown"


class UnknownGrader(_NeverValid):
    type: Any = None

    @model_validator(mode="after")
    def _refuse(self) -> UnknownGrader:
        raise ValueError(
            f"grader type {self.type!r} is not one this server knows: use string_check, text_similarity, regex, "
            "json_schema, multi or reward_module"
        )


class MultiGrader(_Grader):
    """Several graders, combined by a formula of their names (OpenAI's multi): e.g.
    `"0.7 * exact + 0.3 * close"`. The formula may use + - * / ^ (or **), parentheses, numbers,
    and min, max, abs, floor, ceil, exp, sqrt, log; each grader's mean is logged too."""

    type: Literal["multi"]
    graders: dict[Annotated[str, Field(pattern=NAME_PATTERN)], Grader] = Field(min_length=1, max_length=MAX_GRADERS)
    calculate_output: str = Field(min_length=1, max_length=1000)

    @field_validator("graders", mode="before")
    @classmethod
    def _single(cls, value: Any) -> Any:
        # The SDK's type for `graders` is one grader; OpenAI's docs give a mapping of names to graders.
        if isinstance(value, dict) and "type" in value and isinstance(value.get("type"), str):
            return {str(value.get("name") or "grader"): value}
        return value

    @model_validator(mode="after")
    def _formula(self) -> MultiGrader:
        unknown = sorted(formula_names(self.calculate_output) - set(self.graders))
        if unknown:
            raise ValueError(
                f"calculate_output names {', '.join(unknown)}, which are not among the graders "
                f"({', '.join(sorted(self.graders))})"
            )
        return self

    def item_fields(self) -> set[str]:
        return set().union(*(grader.item_fields() for grader in self.graders.values()))

    def parts(self, output_text: str, item: Mapping[str, Any]) -> dict[str, float]:
        return {name: grader.score(output_text, item) for name, grader in self.graders.items()}

    def combine(self, parts: Mapping[str, float]) -> float:
        return evaluate_formula(self.calculate_output, parts)

    def score(self, output_text: str, item: Mapping[str, Any]) -> float:
        return self.combine(self.parts(output_text, item))


GRADER_TYPES = (
    "string_check",
    "text_similarity",
    "regex",
    "json_schema",
    "multi",
    "reward_module",
    "python",
    "score_model",
    "label_model",
    "endpoint",
)
Grader = Annotated[
    Annotated[StringCheckGrader, Tag("string_check")]
    | Annotated[TextSimilarityGrader, Tag("text_similarity")]
    | Annotated[RegexGrader, Tag("regex")]
    | Annotated[JsonSchemaGrader, Tag("json_schema")]
    | Annotated[MultiGrader, Tag("multi")]
    | Annotated[RewardModuleGrader, Tag("reward_module")]
    | Annotated[RefusedGrader, Tag("python")]
    | Annotated[RefusedGrader, Tag("score_model")]
    | Annotated[RefusedGrader, Tag("label_model")]
    | Annotated[RefusedGrader, Tag("endpoint")]
    | Annotated[UnknownGrader, Tag("unknown")],
    Discriminator(_grader_type),
]
MultiGrader.model_rebuild()


def reward_modules(grader: Any) -> list[RewardModuleGrader]:
    """The reward_module graders within a grader (multi's included)."""
    if isinstance(grader, RewardModuleGrader):
        return [grader]
    if isinstance(grader, MultiGrader):
        return [found for inner in grader.graders.values() for found in reward_modules(inner)]
    return []


def item_fields(grader: Any) -> set[str]:
    """The top-level dataset columns a grader reads ({{item.meta.id}} reads column `meta`)."""
    return {path.split(".")[0] for path in grader.item_fields()}


# ---- similarity metrics --------------------------------------------------------------------------

WORD_RE = re.compile(r"\w+", re.UNICODE)


def _words(text: str) -> list[str]:
    return WORD_RE.findall(text.lower())


def _ngrams(words: list[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def _f1(overlap: int, candidate: int, reference: int) -> float:
    if not overlap or not candidate or not reference:
        return 0.0
    precision, recall = overlap / candidate, overlap / reference
    return 2 * precision * recall / (precision + recall)


def _lcs(a: list[str], b: list[str]) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def similarity(metric: str, text: str, reference: str) -> float:
    """text_similarity's metrics, each between 0 and 1 (1: the same text)."""
    if metric == "fuzzy_match":
        return difflib.SequenceMatcher(None, text, reference, autojunk=False).ratio()
    candidate, target = _words(text), _words(reference)
    if metric.startswith("rouge_"):
        if metric == "rouge_l":
            return _f1(_lcs(candidate, target), len(candidate), len(target))
        n = int(metric[-1])
        found, wanted = _ngrams(candidate, n), _ngrams(target, n)
        return _f1(sum((found & wanted).values()), sum(found.values()), sum(wanted.values()))
    if not candidate or not target:
        return float(candidate == target)
    if metric == "gleu":  # Google's sentence GLEU: min(precision, recall) over 1- to 4-grams
        matches = found_total = wanted_total = 0
        for n in range(1, 5):
            found, wanted = _ngrams(candidate, n), _ngrams(target, n)
            matches += sum((found & wanted).values())
            found_total += sum(found.values())
            wanted_total += sum(wanted.values())
        return min(matches / found_total, matches / wanted_total) if found_total and wanted_total else 0.0
    # bleu: sentence BLEU up to 4-grams with add-one smoothing of the higher orders, and the brevity penalty
    orders = min(4, len(candidate))
    log_precision = 0.0
    for n in range(1, orders + 1):
        found, wanted = _ngrams(candidate, n), _ngrams(target, n)
        matched, total = sum((found & wanted).values()), sum(found.values())
        if n == 1 and not matched:
            return 0.0
        log_precision += math.log((matched + (n > 1)) / (total + (n > 1)))
    brevity = 1.0 if len(candidate) >= len(target) else math.exp(1 - len(target) / len(candidate))
    return brevity * math.exp(log_precision / orders)


# ---- JSON schema (a subset) ----------------------------------------------------------------------

SCHEMA_KEYWORDS = frozenset(
    {
        "type",
        "properties",
        "required",
        "additionalProperties",
        "items",
        "enum",
        "const",
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "exclusiveMaximum",
        "minLength",
        "maxLength",
        "pattern",
        "minItems",
        "maxItems",
        "anyOf",
        "allOf",
        # Annotations, which accept anything.
        "title",
        "description",
        "$schema",
        "$id",
        "default",
        "examples",
    }
)
JSON_TYPES = frozenset({"object", "array", "string", "number", "integer", "boolean", "null"})


def check_schema(schema: Any, where: str = "schema") -> None:
    """ValueError naming a keyword this subset does not understand (so a schema is never half
    applied), or a malformed one."""
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise ValueError(f"{where} must be an object")
    unknown = sorted(set(schema) - SCHEMA_KEYWORDS)
    if unknown:
        raise ValueError(
            f"{where} uses {', '.join(unknown)}, which this server's JSON-schema check does not understand; it "
            f"understands {', '.join(sorted(SCHEMA_KEYWORDS - {'title', 'description', '$schema', '$id'}))}"
        )
    shapes: dict[str, tuple[type, ...]] = {
        "properties": (dict,),
        "required": (list,),
        "enum": (list,),
        "anyOf": (list,),
        "allOf": (list,),
        "items": (dict, bool),
        "additionalProperties": (dict, bool),
        "minimum": (int, float),
        "maximum": (int, float),
        "exclusiveMinimum": (int, float),
        "exclusiveMaximum": (int, float),
        "minLength": (int,),
        "maxLength": (int,),
        "minItems": (int,),
        "maxItems": (int,),
        "pattern": (str,),
    }
    for key, kinds_allowed in shapes.items():
        if key in schema and (
            not isinstance(schema[key], kinds_allowed) or isinstance(schema[key], bool) and bool not in kinds_allowed
        ):
            raise ValueError(f"{where}.{key} must be {' or '.join(k.__name__ for k in kinds_allowed)}")
    kinds = schema.get("type")
    named = [kinds] if isinstance(kinds, str) else kinds if isinstance(kinds, list) else None
    if kinds is not None and named is None:
        raise ValueError(f"{where}.type must be a JSON type or a list of them")
    for kind in named or []:
        if not isinstance(kind, str) or kind not in JSON_TYPES:
            raise ValueError(f"{where}.type {kind!r} is not a JSON type ({', '.join(sorted(JSON_TYPES))})")
    if not all(isinstance(name, str) for name in schema.get("required", [])):
        raise ValueError(f"{where}.required must list property names")
    for name, inner in (schema.get("properties") or {}).items():
        check_schema(inner, f"{where}.properties.{name}")
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            check_schema(schema[key], f"{where}.{key}")
    for key in ("anyOf", "allOf"):
        for i, inner in enumerate(schema.get(key) or []):
            check_schema(inner, f"{where}.{key}[{i}]")
    if "pattern" in schema:
        import regex

        try:
            regex.compile(schema["pattern"])
        except (regex.error, TypeError) as exc:
            raise ValueError(f"{where}.pattern does not compile: {exc}") from None


def _is_type(value: Any, kind: str) -> bool:
    if kind == "null":
        return value is None
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool) or isinstance(value, float) and value.is_integer()
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "string":
        return isinstance(value, str)
    if kind == "array":
        return isinstance(value, list)
    return isinstance(value, dict)


def schema_accepts(schema: Any, value: Any) -> bool:
    if isinstance(schema, bool):
        return schema
    kinds = schema.get("type")
    if kinds is not None and not any(_is_type(value, k) for k in ([kinds] if isinstance(kinds, str) else kinds)):
        return False
    if "enum" in schema and value not in schema["enum"]:
        return False
    if "const" in schema and value != schema["const"]:
        return False
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        bounds: list[tuple[str, Callable[[Any, Any], bool]]] = [
            ("minimum", operator.ge),
            ("maximum", operator.le),
            ("exclusiveMinimum", operator.gt),
            ("exclusiveMaximum", operator.lt),
        ]
        if any(key in schema and not holds(value, schema[key]) for key, holds in bounds):
            return False
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0) or len(value) > schema.get("maxLength", math.inf):
            return False
        if "pattern" in schema:
            import regex

            try:
                if regex.search(schema["pattern"], value, timeout=REGEX_TIMEOUT_S) is None:
                    return False
            except TimeoutError:
                return False
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0) or len(value) > schema.get("maxItems", math.inf):
            return False
        if "items" in schema and not all(schema_accepts(schema["items"], v) for v in value):
            return False
    if isinstance(value, dict):
        if any(name not in value for name in schema.get("required", [])):
            return False
        properties = schema.get("properties") or {}
        for name, inner in properties.items():
            if name in value and not schema_accepts(inner, value[name]):
                return False
        extra = schema.get("additionalProperties", True)
        others = [v for k, v in value.items() if k not in properties]
        if extra is False and others or isinstance(extra, dict) and not all(schema_accepts(extra, v) for v in others):
            return False
    if "anyOf" in schema and not any(schema_accepts(inner, value) for inner in schema["anyOf"]):
        return False
    return all(schema_accepts(inner, value) for inner in schema.get("allOf", []))


# ---- multi's formula -----------------------------------------------------------------------------

_BINARY: dict[type[ast.operator], Callable[[float, float], float]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Pow: operator.pow,
}
_FUNCTIONS: dict[str, Callable[..., float]] = {
    "min": min,
    "max": max,
    "abs": abs,
    "floor": math.floor,
    "ceil": math.ceil,
    "exp": math.exp,
    "sqrt": math.sqrt,
    "log": math.log,
}


# How many arguments each function takes (at least, at most).
_ARITY = {"min": (1, 64), "max": (1, 64), "abs": (1, 1), "floor": (1, 1), "ceil": (1, 1), "exp": (1, 1)}
_ARITY |= {"sqrt": (1, 1), "log": (1, 2)}


def _parse_formula(formula: str) -> ast.expr:
    try:
        tree = ast.parse(formula.replace("^", "**"), mode="eval")
        nodes = list(ast.walk(tree))
    except (SyntaxError, ValueError) as exc:
        reason = exc.msg if isinstance(exc, SyntaxError) else str(exc)
        raise ValueError(f"calculate_output {echo_formula(formula)} is not a formula: {reason}") from None
    except RecursionError:
        raise ValueError("calculate_output is nested too deeply") from None
    for node in nodes:
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS:
            least, most = _ARITY[node.func.id]
            if not least <= len(node.args) <= most:
                raise ValueError(f"calculate_output: {node.func.id} takes {least} to {most} argument(s)")
        allowed = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.USub, ast.UAdd, ast.Constant, ast.Name, ast.Load)
        if isinstance(node, ast.operator) and type(node) in _BINARY:
            continue
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS:
            if node.keywords:
                raise ValueError("calculate_output: functions take positional arguments only")
            continue
        if isinstance(node, ast.Constant) and not isinstance(node.value, (int, float)):
            raise ValueError("calculate_output may hold numbers, grader names and + - * / ^ only")
        if not isinstance(node, allowed):
            shown = ast.unparse(node) if isinstance(node, ast.expr) else type(node).__name__
            raise ValueError(
                f"calculate_output may use numbers, the graders' names, + - * / ^, parentheses and "
                f"{', '.join(_FUNCTIONS)}; not {shown}"
            )
    return tree.body


def echo_formula(formula: str) -> str:
    shown = repr(formula)
    return shown if len(shown) <= 60 else f"{shown[:60]}..."


def formula_names(formula: str) -> set[str]:
    tree = _parse_formula(formula)
    called = {id(node.func) for node in ast.walk(tree) if isinstance(node, ast.Call)}
    return {node.id for node in ast.walk(tree) if isinstance(node, ast.Name) and id(node) not in called}


def evaluate_formula(formula: str, values: Mapping[str, float]) -> float:
    def value(node: ast.expr) -> float:
        if isinstance(node, ast.Constant):
            assert isinstance(node.value, (int, float))
            return float(node.value)
        if isinstance(node, ast.Name):
            return float(values[node.id])
        if isinstance(node, ast.UnaryOp):
            return -value(node.operand) if isinstance(node.op, ast.USub) else value(node.operand)
        if isinstance(node, ast.BinOp):
            return _BINARY[type(node.op)](value(node.left), value(node.right))
        assert isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
        return float(_FUNCTIONS[node.func.id](*(value(arg) for arg in node.args)))

    try:
        result = value(_parse_formula(formula))
    except (ZeroDivisionError, ValueError, OverflowError, TypeError, RecursionError):
        return 0.0
    return result if math.isfinite(result) else 0.0
