"""Translation of `EntityQuery` predicates into tantivy queries over a mutation index (SPEC 3.6).

`QueryCompiler(schema).compile(query)` -> `CompiledQuery(query, ordering, trait_type, sort_field, sort_kind,
ascending)`; compiled queries are cached (LRU keyed by predicate + ordering bytes + registry version) and can
be run on both indices, which share the `IndexSchema`.

Predicates (default ordering when `query.ordering` has no value):

* ``match``: each token of the text (index analyzer) is a SHOULD term on `all_text`; unless ``no_fuzzy``,
  tokens longer than 3 bytes add a SHOULD fuzzy term (distance 1 up to 6 bytes, 2 above, transposition
  costs 1) -> score desc;
* ``trait``: `trait_type` term (the name may also be a short name or a full name in another case) AND its
  trait query -> operation id desc; with a ``match`` trait query -> score desc; with a ``query_string`` ->
  the query string's ordering. Only one trait type per query (`InvalidArgument` otherwise);
* ``ids`` / ``operations``: term sets (empty -> nothing) -> operation id asc;
* ``reference``: `entity<id>` term, plus `trait<id>` as an adjacent phrase when set -> operation id asc;
* ``all`` -> operation id desc;
* ``boolean``: SHOULD/MUST/MUST_NOT of sub-predicates; ordering of the first sub-predicate. Beyond the
  original: a boolean with only MUST_NOT clauses matches everything else (tantivy would match nothing);
* ``query_string``: see `_QueryStringBuilder` -> score desc unless ``sort:``;
* ``test``: always fails (`InvalidArgument`).

Trait field predicates (beyond the original, which only had string equality): the field is a dotted path or
a prefix of mapped fields (all OR-ed). string values: exact term on string fields, token / phrase match on
text fields, entity reference on reference fields, parsed as a number (or ISO-8601 date) on numeric fields;
int64 / uint64 / date values: EQUAL/GT/GTE/LT/LTE on int, uint, bool and date fields (range queries; dates
in ns since the epoch). Unknown trait types, unknown fields, unsorted ordering fields and type mismatches
are `InvalidArgument` naming the type and field (ARCHITECTURE "Clarifications": a trait of an unknown type is
still found by type, ids, operations and `all`).
"""

from __future__ import annotations

import datetime
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import tantivy

from exocommon.errors import InvalidArgument
from exocore.store import query_pb2
from exostore.query_string import Occur, Part, PartKind, parse_query_string
from exostore.schema import (
    F_ALL_REFS,
    F_ALL_TEXT,
    F_CREATION_DATE,
    F_ENTITY_ID,
    F_MODIFICATION_DATE,
    F_OPERATION_ID,
    F_TRAIT_TYPE,
    I64_MAX,
    I64_MIN,
    U64_MAX,
    FieldKind,
    IndexSchema,
    MappedField,
    TraitMapping,
    ValueKind,
    entity_token,
    trait_token,
)
from exostore.types import SortKind

Operator = query_pb2.TraitFieldPredicate.Operator
_TOCC = {Occur.SHOULD: tantivy.Occur.Should, Occur.MUST: tantivy.Occur.Must, Occur.MUST_NOT: tantivy.Occur.MustNot}
_BOOL_OCCUR = {
    query_pb2.BooleanPredicate.SHOULD: Occur.SHOULD,
    query_pb2.BooleanPredicate.MUST: Occur.MUST,
    query_pb2.BooleanPredicate.MUST_NOT: Occur.MUST_NOT,
}
_OP_NAMES = {Operator.EQUAL: "EQUAL", Operator.GT: "GT", Operator.GTE: "GTE", Operator.LT: "LT", Operator.LTE: "LTE"}
_CMP_PREFIXES = (
    (">=", Operator.GTE),
    ("<=", Operator.LTE),
    (">", Operator.GT),
    ("<", Operator.LT),
    ("=", Operator.EQUAL),
)


@dataclass(frozen=True, slots=True)
class OrderSpec:
    """An ordering: value kind ("score", "operation_id", "created_at", "updated_at", "field"), direction."""

    value: str
    ascending: bool = False
    field: str = ""


SCORE_DESC = OrderSpec("score")
OP_DESC = OrderSpec("operation_id")
OP_ASC = OrderSpec("operation_id", True)


@dataclass(frozen=True, slots=True)
class CompiledQuery:
    query: tantivy.Query
    ordering: query_pb2.Ordering  # effective ordering (value always set; flags copied from the query)
    trait_type: str | None  # the trait type the query is constrained to, if any
    sort_field: str | None  # fast field to order by; None: relevance score
    sort_kind: SortKind
    ascending: bool


class _Context:
    def __init__(self, schema: IndexSchema) -> None:
        self.schema = schema
        self.tschema = schema.tantivy_schema
        self.trait_type: str | None = None

    def set_trait(self, full_name: str) -> None:
        if self.trait_type is not None and self.trait_type != full_name:
            raise InvalidArgument(
                f"a query may only constrain one trait type, got {self.trait_type!r} and {full_name!r}"
            )
        self.trait_type = full_name

    def resolve_type(self, name: str) -> str:
        return self.schema.registry.resolve_type_name(name) or name

    def mapping(self, what: str) -> TraitMapping:
        """The trait context's mapping, for something that needs the schema (`what`, for the error)."""
        if self.trait_type is None:
            raise InvalidArgument(f"{what} needs a trait type (use a trait predicate or type:<name>)")
        mapping = self.schema.mapping(self.trait_type)
        if mapping is None:
            raise InvalidArgument(f"unknown trait type {self.trait_type!r}: {what} needs its schema")
        return mapping

    def fields(self, path: str, what: str) -> list[MappedField]:
        mapping = self.mapping(what)
        found = mapping.resolve(path)
        if not found and path != path.lower():
            found = mapping.resolve(path.lower())
        if not found:
            lower = path.lower()
            found = [f for p, f in mapping.fields.items() if p.lower() == lower or p.lower().startswith(lower + ".")]
        if not found:
            indexed = ", ".join(mapping.fields) or "none"
            raise InvalidArgument(
                f"unknown field {path!r} for trait type {mapping.full_name!r} (indexed fields: {indexed})"
            )
        return found


# --- building blocks ------------------------------------------------------------------------------------


def boolean(clauses: Sequence[tuple[tantivy.Occur, tantivy.Query]]) -> tantivy.Query:
    if len(clauses) == 1 and clauses[0][0] != tantivy.Occur.MustNot:
        return clauses[0][1]
    return tantivy.Query.boolean_query(list(clauses))


def any_of(queries: Sequence[tantivy.Query]) -> tantivy.Query:
    if not queries:
        return tantivy.Query.empty_query()
    if len(queries) == 1:
        return queries[0]
    return tantivy.Query.boolean_query([(tantivy.Occur.Should, q) for q in queries])


SMALL_TERM_SET = 64


def terms_query(schema: IndexSchema, field: str, values: Sequence[str | int]) -> tantivy.Query:
    """Documents having any of `values` (exact terms), constant score 1. Small sets use OR-ed term queries:
    tantivy's term set query costs ~130 µs of setup, a term query ~3 µs."""
    values = list(dict.fromkeys(values))
    if not values:
        return tantivy.Query.empty_query()
    tschema = schema.tantivy_schema
    if len(values) > SMALL_TERM_SET:
        return tantivy.Query.term_set_query(tschema, field, values)
    terms = [tantivy.Query.term_query(tschema, field, v, index_option="basic") for v in values]
    query = terms[0] if len(terms) == 1 else tantivy.Query.boolean_query([(tantivy.Occur.Should, t) for t in terms])
    return tantivy.Query.const_score_query(query, 1.0)


def fuzzy_distance(token: str) -> int:
    """0 (exact only) for tokens of up to 3 bytes, 1 for 4-6 bytes, 2 above."""
    size = len(token.encode())
    if size <= 3:
        return 0
    return 1 if size <= 6 else 2


def match_query(schema: IndexSchema, field: str, text: str, fuzzy: bool) -> tantivy.Query:
    """SPEC 3.6 `new_fuzzy_match_query`: SHOULD term per token (+ SHOULD fuzzy term when long enough).

    A fuzzy term scores a constant 1.0 on every document holding a word within its distance. When the
    schema's `Vocabulary` knows those words (`field` is `all_text` or a text field, whose words all are in
    `all_text` too), it becomes their term queries at a constant 1.0 (just the token's when no other word is
    that close): the same documents and scores, without building a Levenshtein automaton and walking every
    segment's term dictionary with it (most of a match query's cost)."""
    tschema = schema.tantivy_schema
    vocabulary = schema.vocabulary
    clauses: list[tuple[tantivy.Occur, tantivy.Query]] = []
    for token in schema.analyze(text):
        clauses.append((tantivy.Occur.Should, tantivy.Query.term_query(tschema, field, token)))
        distance = fuzzy_distance(token) if fuzzy else 0
        if not distance:
            continue
        words = vocabulary.neighbors(token, distance)
        if words is None:
            near = tantivy.Query.fuzzy_term_query(tschema, field, token, distance, True)
        else:
            terms = [tantivy.Query.term_query(tschema, field, word, index_option="basic") for word in (token, *words)]
            any_term = terms[0] if len(terms) == 1 else any_of(terms)
            near = tantivy.Query.const_score_query(any_term, 1.0)
        clauses.append((tantivy.Occur.Should, near))
    if not clauses:
        return tantivy.Query.empty_query()
    return tantivy.Query.boolean_query(clauses)


def phrase_query(schema: IndexSchema, field: str, text: str) -> tantivy.Query:
    tokens = schema.analyze(text)
    if not tokens:
        raise InvalidArgument(f"empty phrase {text!r}")
    if len(tokens) == 1:  # tantivy panics on single-term phrases
        return tantivy.Query.term_query(schema.tantivy_schema, field, tokens[0])
    return tantivy.Query.phrase_query(schema.tantivy_schema, field, tokens)


def reference_query(schema: IndexSchema, field: str, entity_id: str, trait_id: str) -> tantivy.Query:
    """`entity<id>`, plus `trait<id>` right after it when a trait id is given."""
    tschema = schema.tantivy_schema
    if not entity_id:
        if not trait_id:
            raise InvalidArgument("reference predicate needs an entity_id")
        return tantivy.Query.term_query(tschema, field, trait_token(trait_id))
    if not trait_id:
        return tantivy.Query.term_query(tschema, field, entity_token(entity_id))
    return tantivy.Query.phrase_query(tschema, field, [entity_token(entity_id), trait_token(trait_id)])


def numeric_query(schema: IndexSchema, mapped: MappedField, operator: int, value: int) -> tantivy.Query:
    """EQUAL/GT/GTE/LT/LTE on an int/uint/date/bool field, bounds clipped to the field's domain."""
    signed = mapped.kind.is_signed
    low_dom, high_dom = (I64_MIN, I64_MAX) if signed else (0, U64_MAX)
    if operator == Operator.EQUAL:
        low, high = value, value
    elif operator == Operator.GT:
        low, high = value + 1, high_dom
    elif operator == Operator.GTE:
        low, high = value, high_dom
    elif operator == Operator.LT:
        low, high = low_dom, value - 1
    elif operator == Operator.LTE:
        low, high = low_dom, value
    else:
        raise InvalidArgument(f"unknown operator {operator} on field {mapped.path!r}")
    low, high = max(low, low_dom), min(high, high_dom)
    tschema = schema.tantivy_schema
    if low > high:
        return tantivy.Query.empty_query()
    if low == high:
        return tantivy.Query.term_query(tschema, mapped.name, low)
    field_type = tantivy.FieldType.Integer if signed else tantivy.FieldType.Unsigned
    return tantivy.Query.range_query(
        tschema, mapped.name, field_type, low, high, use_inverted_index=not mapped.kind.is_fast
    )


def _parse_number(mapped: MappedField, text: str) -> int | None:
    text = text.strip()
    if mapped.value_kind is ValueKind.BOOL and text.lower() in ("true", "false"):
        return int(text.lower() == "true")
    try:
        return int(text)
    except ValueError:
        pass
    if mapped.value_kind is ValueKind.TIMESTAMP:
        try:
            date = datetime.datetime.fromisoformat(text)
        except ValueError:
            return None
        if date.tzinfo is None:
            date = date.replace(tzinfo=datetime.UTC)
        delta = date - datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
        return (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1000
    return None


def _type_error(mapped: MappedField, trait_type: str, detail: str) -> InvalidArgument:
    return InvalidArgument(
        f"field {mapped.path!r} of trait type {trait_type!r} is a {mapped.value_kind.value} field: {detail}"
    )


def _string_value_query(
    schema: IndexSchema, mapped: MappedField, trait_type: str, value: str, operator: int
) -> tantivy.Query:
    """A string value compared to a mapped field of any kind."""
    kind = mapped.value_kind
    if mapped.kind.is_numeric:
        number = _parse_number(mapped, value)
        if number is None:
            raise _type_error(mapped, trait_type, f"{value!r} is not a number")
        return numeric_query(schema, mapped, operator, number)
    if operator != Operator.EQUAL:
        raise _type_error(mapped, trait_type, f"operator {_OP_NAMES.get(operator, operator)} needs a numeric field")
    if kind is ValueKind.STRING:
        return tantivy.Query.term_query(schema.tantivy_schema, mapped.name, value)
    if kind is ValueKind.REFERENCE:
        return reference_query(schema, mapped.name, value, "")
    if not schema.analyze(value):
        return tantivy.Query.empty_query()
    return phrase_query(schema, mapped.name, value)  # one token: a term query


def field_predicate_query(ctx: _Context, pred: query_pb2.TraitFieldPredicate) -> tantivy.Query:
    which = pred.WhichOneof("value")
    fields = ctx.fields(pred.field, f"field predicate on {pred.field!r}")
    trait_type = ctx.trait_type or ""
    if which is None:
        raise InvalidArgument(f"field predicate on {pred.field!r} of trait type {trait_type!r} has no value")
    queries: list[tantivy.Query] = []
    errors: list[InvalidArgument] = []
    for mapped in fields:
        try:
            if which == "string":
                queries.append(_string_value_query(ctx.schema, mapped, trait_type, pred.string, pred.operator))
                continue
            if not mapped.kind.is_numeric:
                raise _type_error(mapped, trait_type, f"a {which} value needs a numeric or date field")
            if which == "date":
                number = pred.date.seconds * 1_000_000_000 + pred.date.nanos
            else:
                number = int(getattr(pred, which))
            queries.append(numeric_query(ctx.schema, mapped, pred.operator, number))
        except InvalidArgument as exc:
            errors.append(exc)
    if not queries:
        raise errors[0]
    return any_of(queries)


# --- query string -----------------------------------------------------------------------------------------


def _sort_spec(ctx: _Context, value: str, negated: bool) -> OrderSpec:
    value = value.lower()
    if value.startswith("update"):
        spec = OrderSpec("updated_at")
    elif value == "date" or value.startswith("create"):
        spec = OrderSpec("created_at")
    elif value == "score":
        spec = OrderSpec("score")
    else:
        mapping = ctx.schema.mapping(ctx.trait_type) if ctx.trait_type else None
        mapped = mapping.fields.get(value) if mapping else None
        if mapped is None or not mapped.sorted:
            raise InvalidArgument(f"unknown sort {value!r} (use score, created, updated or a sorted field)")
        spec = OrderSpec("field", False, mapped.path)
    return OrderSpec(spec.value, negated, spec.field)


def query_string_query(ctx: _Context, text: str) -> tuple[tantivy.Query, OrderSpec]:
    """SPEC 3.6 query string. ``type:`` parts are filters applied to the rest of the query (MUST, or MUST_NOT
    with ``-``) and set the trait context used by ``field:`` parts and ``sort:<field>``."""
    parts = parse_query_string(text)
    type_clauses: list[tuple[tantivy.Occur, tantivy.Query]] = []
    for part in parts:
        if part.field == "type" and part.kind is not PartKind.GROUP:
            full = ctx.resolve_type(part.text)
            occur = tantivy.Occur.MustNot if part.occur is Occur.MUST_NOT else tantivy.Occur.Must
            if occur == tantivy.Occur.Must:
                ctx.set_trait(full)
            type_clauses.append((occur, tantivy.Query.term_query(ctx.tschema, F_TRAIT_TYPE, full)))

    ordering = SCORE_DESC
    clauses: list[tuple[tantivy.Occur, tantivy.Query]] = []
    words: list[str] = []
    positive = False
    for part in parts:
        if part.field == "type" and part.kind is not PartKind.GROUP:
            continue
        if part.field == "sort":
            ordering = _sort_spec(ctx, part.text, part.occur is Occur.MUST_NOT)
            continue
        if part.kind is PartKind.WORD and part.field is None and part.occur is Occur.SHOULD:
            words.append(part.text)
            positive = True
            continue
        occur = part.occur
        if part.kind is PartKind.PHRASE and occur is Occur.SHOULD:
            occur = Occur.MUST
        clauses.append((_TOCC[occur], _part_query(ctx, part)))
        positive = positive or occur is not Occur.MUST_NOT
    if words:
        clauses.append((tantivy.Occur.Should, match_query(ctx.schema, F_ALL_TEXT, " ".join(words), fuzzy=True)))
    if not positive:
        clauses.append((tantivy.Occur.Should, tantivy.Query.all_query()))
    query = boolean(clauses)
    if type_clauses:
        query = tantivy.Query.boolean_query([(tantivy.Occur.Must, query), *type_clauses])
    return query, ordering


def _part_query(ctx: _Context, part: Part) -> tantivy.Query:
    fuzzy = part.occur is not Occur.MUST_NOT  # an exclusion only removes what it names exactly
    if part.field is None or ctx.trait_type is None:
        if part.kind is PartKind.PHRASE:
            return phrase_query(ctx.schema, F_ALL_TEXT, part.text)
        return match_query(ctx.schema, F_ALL_TEXT, part.text, fuzzy)
    fields = ctx.fields(part.field, f"query string field {part.field!r}")
    queries: list[tantivy.Query] = []
    errors: list[InvalidArgument] = []
    trait_type = ctx.trait_type
    for mapped in fields:
        try:
            if part.kind is PartKind.PHRASE and mapped.value_kind is ValueKind.TEXT:
                queries.append(phrase_query(ctx.schema, mapped.name, part.text))
            elif mapped.value_kind is ValueKind.TEXT:
                queries.append(match_query(ctx.schema, mapped.name, part.text, fuzzy))
            elif mapped.kind.is_numeric and part.kind is PartKind.WORD:
                operator, value = Operator.EQUAL, part.text
                for prefix, op in _CMP_PREFIXES:
                    if value.startswith(prefix):
                        operator, value = op, value[len(prefix) :]
                        break
                queries.append(_string_value_query(ctx.schema, mapped, trait_type, value, operator))
            else:
                queries.append(_string_value_query(ctx.schema, mapped, trait_type, part.text, Operator.EQUAL))
        except InvalidArgument as exc:
            errors.append(exc)
    if not queries:
        raise errors[0]
    return any_of(queries)


# --- predicates ---------------------------------------------------------------------------------------


def _trait_query(ctx: _Context, pred: query_pb2.TraitPredicate) -> tuple[tantivy.Query, OrderSpec]:
    if not pred.trait_name:
        raise InvalidArgument("trait predicate needs a trait_name")
    full = ctx.resolve_type(pred.trait_name)
    ctx.set_trait(full)
    type_query = tantivy.Query.term_query(ctx.tschema, F_TRAIT_TYPE, full)
    kind = pred.query.WhichOneof("predicate") if pred.HasField("query") else None
    if kind is None:
        return type_query, OP_DESC
    ordering = OP_DESC
    if kind == "match":
        sub = match_query(ctx.schema, F_ALL_TEXT, pred.query.match.query, not pred.query.match.no_fuzzy)
        ordering = SCORE_DESC
    elif kind == "field":
        sub = field_predicate_query(ctx, pred.query.field)
    elif kind == "reference":
        ref_pred = pred.query.reference
        ref = ref_pred.reference
        if not ref_pred.field:
            sub = reference_query(ctx.schema, F_ALL_REFS, ref.entity_id, ref.trait_id)
        else:
            fields = [
                f
                for f in ctx.fields(ref_pred.field, f"reference predicate on {ref_pred.field!r}")
                if f.value_kind is ValueKind.REFERENCE
            ]
            if not fields:
                raise InvalidArgument(f"field {ref_pred.field!r} of trait type {full!r} is not a reference field")
            sub = any_of([reference_query(ctx.schema, f.name, ref.entity_id, ref.trait_id) for f in fields])
    else:  # query_string
        sub, ordering = query_string_query(ctx, pred.query.query_string.query)
    return tantivy.Query.boolean_query([(tantivy.Occur.Must, type_query), (tantivy.Occur.Must, sub)]), ordering


def _boolean_query(ctx: _Context, pred: query_pb2.BooleanPredicate) -> tuple[tantivy.Query, OrderSpec | None]:
    clauses: list[tuple[tantivy.Occur, tantivy.Query]] = []
    ordering: OrderSpec | None = None
    positive = False
    for sub in pred.queries:
        kind = sub.WhichOneof("predicate")
        if kind is None:
            raise InvalidArgument("boolean sub-query without a predicate")
        query, sub_ordering = _predicate(ctx, kind, getattr(sub, kind))
        occur = _BOOL_OCCUR.get(sub.occur)
        if occur is None:
            raise InvalidArgument(f"unknown boolean occur {sub.occur}")
        clauses.append((_TOCC[occur], query))
        positive = positive or occur is not Occur.MUST_NOT
        if ordering is None:
            ordering = sub_ordering
    if not clauses:
        return tantivy.Query.empty_query(), None
    if not positive:
        clauses.append((tantivy.Occur.Should, tantivy.Query.all_query()))
    return tantivy.Query.boolean_query(clauses), ordering


def _predicate(ctx: _Context, kind: str, pred: object) -> tuple[tantivy.Query, OrderSpec | None]:
    if kind == "match":
        assert isinstance(pred, query_pb2.MatchPredicate)
        return match_query(ctx.schema, F_ALL_TEXT, pred.query, not pred.no_fuzzy), SCORE_DESC
    if kind == "trait":
        assert isinstance(pred, query_pb2.TraitPredicate)
        return _trait_query(ctx, pred)
    if kind == "ids":
        assert isinstance(pred, query_pb2.IdsPredicate)
        return terms_query(ctx.schema, F_ENTITY_ID, list(pred.ids)), OP_ASC
    if kind == "reference":
        assert isinstance(pred, query_pb2.ReferencePredicate)
        return reference_query(ctx.schema, F_ALL_REFS, pred.entity_id, pred.trait_id), OP_ASC
    if kind == "operations":
        assert isinstance(pred, query_pb2.OperationsPredicate)
        return terms_query(ctx.schema, F_OPERATION_ID, list(pred.operation_ids)), OP_ASC
    if kind == "all":
        return tantivy.Query.all_query(), OP_DESC
    if kind == "boolean":
        assert isinstance(pred, query_pb2.BooleanPredicate)
        return _boolean_query(ctx, pred)
    if kind == "query_string":
        assert isinstance(pred, query_pb2.QueryStringPredicate)
        return query_string_query(ctx, pred.query)
    if kind == "test":
        raise InvalidArgument("test predicate: query failed on purpose")
    raise InvalidArgument(f"unsupported predicate {kind!r}")


# --- ordering ------------------------------------------------------------------------------------------------


def _ordering_proto(query: query_pb2.EntityQuery, default: OrderSpec | None) -> query_pb2.Ordering:
    ordering = query_pb2.Ordering()
    ordering.CopyFrom(query.ordering)
    if ordering.WhichOneof("value") is None:
        spec = default or OP_DESC
        if spec.value == "field":
            ordering.field = spec.field
        else:
            setattr(ordering, spec.value, True)
        ordering.ascending = spec.ascending
    return ordering


def _sort_target(ctx: _Context, ordering: query_pb2.Ordering) -> tuple[str | None, SortKind]:
    value = ordering.WhichOneof("value")
    if value == "score":
        return None, SortKind.SCORE
    if value == "operation_id":
        return F_OPERATION_ID, SortKind.UINT
    if value == "created_at":
        return F_CREATION_DATE, SortKind.UINT
    if value == "updated_at":
        return F_MODIFICATION_DATE, SortKind.UINT
    assert value == "field"
    mapping = ctx.mapping(f"ordering by field {ordering.field!r}")
    mapped = mapping.fields.get(ordering.field)
    if mapped is None:
        raise InvalidArgument(f"unknown field {ordering.field!r} for trait type {mapping.full_name!r} in ordering")
    if not mapped.sorted or mapped.kind not in (FieldKind.U64_FAST, FieldKind.I64_FAST):
        raise InvalidArgument(f"field {ordering.field!r} of trait type {mapping.full_name!r} is not sorted")
    return mapped.name, SortKind.INT if mapped.kind.is_signed else SortKind.UINT


# --- compiler ---------------------------------------------------------------------------------------------


def compile_query(query: query_pb2.EntityQuery, schema: IndexSchema) -> CompiledQuery:
    """Translate `query` (predicate + ordering) without caching."""
    ctx = _Context(schema)
    kind = query.WhichOneof("predicate")
    if kind is None:
        raise InvalidArgument("query has no predicate")
    tquery, default = _predicate(ctx, kind, getattr(query, kind))
    ordering = _ordering_proto(query, default)
    sort_field, sort_kind = _sort_target(ctx, ordering)
    return CompiledQuery(tquery, ordering, ctx.trait_type, sort_field, sort_kind, ordering.ascending)


class QueryCompiler:
    """`compile_query` with an LRU cache; one per `IndexSchema`, shared by its indices (thread-safe)."""

    def __init__(self, schema: IndexSchema, cache_size: int = 1024) -> None:
        self.schema = schema
        self._cache: OrderedDict[tuple[int, int, str, bytes, bytes], CompiledQuery] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def compile(self, query: query_pb2.EntityQuery) -> CompiledQuery:
        kind = query.WhichOneof("predicate")
        if kind is None:
            raise InvalidArgument("query has no predicate")
        key = (
            self.schema.registry.version,
            self.schema.vocabulary.version,  # fuzzy terms depend on the words indexed so far
            kind,
            getattr(query, kind).SerializeToString(deterministic=True),
            query.ordering.SerializeToString(deterministic=True),
        )
        with self._lock:
            compiled = self._cache.get(key)
            if compiled is not None:
                self._cache.move_to_end(key)
                return compiled
        compiled = compile_query(query, self.schema)
        with self._lock:
            self._cache[key] = compiled
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return compiled
