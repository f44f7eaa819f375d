"""The mutation index schema (SPEC 3.4): fixed fields, dynamic field pools and per-trait-type mappings.

Every document of a mutation index (pending or chain) has the fixed fields below, plus the trait's flagged
fields mapped onto pools of generic fields, one pool per kind (`references_N`, `text_N`, `string_N`, `i64_N`,
`i64_fast_N`, `u64_N`, `u64_fast_N`, N < pool size, 10 by default).

Mapping of one trait type (`TraitMapping`), fixing the original's non-determinism (SPEC 11 item 8):

* fields are walked in **field-number order**; a message-typed field flagged `indexed`/`sorted`/`text` on the
  parent is recursed into (again in field-number order) and its flagged sub-fields are named `parent.child`
  and take slots from the *top-level* type's counters. The same descriptors therefore always give the same
  mapping, whatever order the types were registered in, and nothing needs to be persisted;
* kinds: string `text` -> text (also copied to `all_text`); string `indexed`/`sorted` -> string (exact);
  int32/int64/sint/sfixed/enum -> i64 (`sorted`: i64_fast); uint32/uint64/fixed/bool and
  `google.protobuf.Timestamp` (ns since the epoch) -> u64 (`sorted`: u64_fast); `exocore.store.Reference`
  -> references (also copied to `all_refs`, sets `has_reference`);
* repeated scalars, Timestamps and References take one slot and get one index value per element (a
  field predicate matches if any element does; a repeated field is never sorted);
* map / repeated message / float / bytes fields and pool exhaustion are skipped with a log line.

Values: strings are indexed when non-empty; scalars without presence are indexed even when 0 (proto3: unset
== 0, so `uint1 < 5` matches traits that never set it); fields with presence (oneof, `optional`) and
Timestamps only when set, except that a `sorted` Timestamp always gets a value (0 when unset) so that sorting
is total. Dates before the epoch are clamped to 0.

Tokenization:

* `all_text`, `text_N`: analyzer `exo_text` = tantivy's default (split on non-alphanumerics, drop tokens of
  40 bytes or more, lowercase); `text_analyzer()` gives the same analyzer for queries;
* `all_refs`, `references_N`: analyzer `exo_ref`, which only splits on spaces; a reference is indexed as the
  two tokens `entity<id>` and `trait<id>` with ids escaped by `ref_escape` (`%` -> `%25`, space -> `%20`), so
  ids containing `-`, `_` or any other character match exactly (the original split them, SPEC 3.4 Quirk);
* `trait_type`, `entity_id`, `trait_id`, `string_N`: exact terms (`raw`); `entity_trait_id` exists but stays empty.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import tantivy
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from exocore.store import options_pb2
from exostore.registry import TraitRegistry

log = logging.getLogger(__name__)

DEFAULT_POOL_SIZE = 10
TEXT_ANALYZER = "exo_text"
REF_ANALYZER = "exo_ref"
MAX_NESTING = 8

VOCABULARY_MAX_VARIANTS = 500_000  # ~70 MB (~25,000 words); past it fuzzy terms use tantivy's automaton

TIMESTAMP_TYPE = "google.protobuf.Timestamp"
REFERENCE_TYPE = "exocore.store.Reference"

# fixed fields
F_TRAIT_TYPE = "trait_type"
F_ENTITY_ID = "entity_id"
F_TRAIT_ID = "trait_id"
F_ENTITY_TRAIT_ID = "entity_trait_id"
F_CREATION_DATE = "creation_date"
F_MODIFICATION_DATE = "modification_date"
F_BLOCK_OFFSET = "block_offset"
F_OPERATION_ID = "operation_id"
F_DOCUMENT_TYPE = "document_type"
F_ALL_TEXT = "all_text"
F_ALL_REFS = "all_refs"
F_HAS_REFERENCE = "has_reference"

U64_MAX = 2**64 - 1
I64_MIN = -(2**63)
I64_MAX = 2**63 - 1


class FieldKind(enum.Enum):
    """A dynamic field pool; the value is the physical field name prefix."""

    REFERENCES = "references"
    TEXT = "text"
    STRING = "string"
    I64 = "i64"
    I64_FAST = "i64_fast"
    U64 = "u64"
    U64_FAST = "u64_fast"

    @property
    def is_fast(self) -> bool:
        return self in _FAST_KINDS

    @property
    def is_signed(self) -> bool:
        return self in _SIGNED_KINDS

    @property
    def is_numeric(self) -> bool:
        return self in _NUMERIC_KINDS


_FAST_KINDS = frozenset({FieldKind.I64_FAST, FieldKind.U64_FAST})
_SIGNED_KINDS = frozenset({FieldKind.I64, FieldKind.I64_FAST})
_NUMERIC_KINDS = frozenset({FieldKind.I64, FieldKind.I64_FAST, FieldKind.U64, FieldKind.U64_FAST})


class ValueKind(enum.Enum):
    """What a mapped proto field holds (several value kinds share a pool kind)."""

    TEXT = "text"
    STRING = "string"
    INT = "int"
    UINT = "uint"
    BOOL = "bool"
    TIMESTAMP = "timestamp"
    REFERENCE = "reference"


@dataclass(frozen=True, slots=True)
class MappedField:
    """One indexed field of a trait type."""

    path: str  # dotted field path, e.g. "struct1.string1"
    kind: FieldKind
    name: str  # physical index field, e.g. "text_0"
    sorted: bool
    value_kind: ValueKind
    descriptors: tuple[FieldDescriptor, ...]  # top-level field first, leaf last
    has_presence: bool = False
    signed: bool = False  # `kind.is_signed`, precomputed (read for every indexed value)
    repeated: bool = False  # one index value per element (never sorted: no single value to sort by)
    # `field_values` for this field, specialised once (it runs for every mapped field of every document)
    extract: Callable[[Message], list[str | int | tuple[str, str]]] = field(
        default=None, compare=False, repr=False  # type: ignore[assignment]
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "signed", self.kind.is_signed)
        object.__setattr__(self, "extract", _extractor(self))

    @property
    def attrs(self) -> tuple[str, ...]:
        return tuple(d.name for d in self.descriptors)


@dataclass(frozen=True, slots=True)
class TraitMapping:
    """The index mapping of one message type: field path -> mapped field, in walk order."""

    full_name: str
    fields: dict[str, MappedField]
    text_fields: tuple[MappedField, ...] = field(default=())
    reference_fields: tuple[MappedField, ...] = field(default=())

    def resolve(self, path: str) -> list[MappedField]:
        """Mapped fields equal to `path` or under it (`struct1` -> `struct1.string1`); empty if none."""
        exact = self.fields.get(path)
        if exact is not None:
            return [exact]
        prefix = path + "."
        return [f for p, f in self.fields.items() if p.startswith(prefix)]

    def describe(self) -> dict[str, tuple[str, str, bool]]:
        """path -> (kind, physical name, sorted): a comparable summary (tests, debugging)."""
        return {p: (f.kind.value, f.name, f.sorted) for p, f in self.fields.items()}

    def values(self, message: Message) -> Iterator[tuple[MappedField, str | int | tuple[str, str]]]:
        """Indexable values of `message` (see the module doc for which values are indexed). References are
        returned as (entity_id, trait_id); Timestamps as ns since the epoch; bools as 0/1; a repeated field
        gives one pair per element."""
        for mapped in self.fields.values():
            for value in field_values(message, mapped):
                yield mapped, value


def field_values(message: Message, mapped: MappedField) -> list[str | int | tuple[str, str]]:
    """The indexable values of one mapped field of `message`: none, one, or one per element."""
    return mapped.extract(message)


def _extractor(mapped: MappedField) -> Callable[[Message], list[str | int | tuple[str, str]]]:
    """`_field_values` for `mapped`, specialised: the same rules without the generic walk for a singular
    field (a note's ten mapped fields took ~10 µs per document the generic way)."""
    if mapped.repeated:
        return lambda message: _field_values(message, mapped)
    rule = _leaf_rule(mapped)
    path = [d.name for d in mapped.descriptors[:-1]]
    if not path:
        return rule
    if len(path) == 1:
        (name,) = path
        return lambda message: rule(getattr(message, name)) if message.HasField(name) else []

    def walk(message: Message) -> list[str | int | tuple[str, str]]:
        for step in path:
            if not message.HasField(step):
                return []
            message = getattr(message, step)
        return rule(message)

    return walk


def _leaf_rule(mapped: MappedField) -> Callable[[Message], list[str | int | tuple[str, str]]]:
    """`_extract` and `_convert` for a singular field of the message holding it."""
    leaf, kind = mapped.descriptors[-1].name, mapped.value_kind
    if kind is ValueKind.TEXT or kind is ValueKind.STRING:
        if mapped.has_presence:

            def present_text(parent: Message) -> list[str | int | tuple[str, str]]:
                value = getattr(parent, leaf) if parent.HasField(leaf) else None
                return [value] if value else []

            return present_text

        def text(parent: Message) -> list[str | int | tuple[str, str]]:
            value = getattr(parent, leaf)
            return [value] if value else []

        return text
    if kind is ValueKind.TIMESTAMP:
        absent: list[str | int | tuple[str, str]] = [0] if mapped.sorted else []

        def timestamp(parent: Message) -> list[str | int | tuple[str, str]]:
            if not parent.HasField(leaf):
                return list(absent)
            value = getattr(parent, leaf)
            return [max(0, value.seconds * 1_000_000_000 + value.nanos)]

        return timestamp
    if kind is ValueKind.REFERENCE:

        def reference(parent: Message) -> list[str | int | tuple[str, str]]:
            if not parent.HasField(leaf):
                return []
            value = getattr(parent, leaf)
            return [(value.entity_id, value.trait_id)] if value.entity_id else []

        return reference
    if mapped.has_presence:
        return lambda parent: [int(getattr(parent, leaf))] if parent.HasField(leaf) else []
    return lambda parent: [int(getattr(parent, leaf))]


def _field_values(message: Message, mapped: MappedField) -> list[str | int | tuple[str, str]]:
    if mapped.repeated:
        return _extract_repeated(message, mapped)
    value = _extract(message, mapped)
    return [] if value is None else [value]


def _extract_repeated(message: Message, mapped: MappedField) -> list[str | int | tuple[str, str]]:
    parent = _leaf_parent(message, mapped)
    if parent is None:
        return []
    kind = mapped.value_kind
    values = (_convert(kind, element) for element in getattr(parent, mapped.descriptors[-1].name))
    return [value for value in values if value is not None]


def _extract(message: Message, mapped: MappedField) -> str | int | tuple[str, str] | None:
    parent = _leaf_parent(message, mapped)
    if parent is None:
        return None
    leaf = mapped.descriptors[-1].name
    kind = mapped.value_kind
    if kind is ValueKind.TIMESTAMP:
        if not parent.HasField(leaf):
            return 0 if mapped.sorted else None
    elif kind is ValueKind.REFERENCE or mapped.has_presence:
        if not parent.HasField(leaf):
            return None
    return _convert(kind, getattr(parent, leaf))


def _leaf_parent(message: Message, mapped: MappedField) -> Message | None:
    """The message holding the mapped field (None when a message on the way is not set)."""
    current = message
    for parent in mapped.descriptors[:-1]:
        if not current.HasField(parent.name):
            return None
        current = getattr(current, parent.name)
    return current


def _convert(kind: ValueKind, value: Any) -> str | int | tuple[str, str] | None:
    """The index value of one field value (None: nothing to index)."""
    if kind is ValueKind.TIMESTAMP:
        return max(0, value.seconds * 1_000_000_000 + value.nanos)
    if kind is ValueKind.REFERENCE:
        return (value.entity_id, value.trait_id) if value.entity_id else None
    if kind is ValueKind.TEXT or kind is ValueKind.STRING:
        return value or None
    return int(value)


_SIGNED_TYPES = {
    FieldDescriptor.TYPE_INT32,
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_SINT32,
    FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_SFIXED32,
    FieldDescriptor.TYPE_SFIXED64,
    FieldDescriptor.TYPE_ENUM,
}
_UNSIGNED_TYPES = {
    FieldDescriptor.TYPE_UINT32,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_FIXED32,
    FieldDescriptor.TYPE_FIXED64,
}


def _flags(fd: FieldDescriptor) -> tuple[bool, bool, bool]:
    opts = fd.GetOptions()
    ext = opts.Extensions
    return bool(ext[options_pb2.indexed]), bool(ext[options_pb2.sorted]), bool(ext[options_pb2.text])


def build_mapping(desc: Descriptor, pool_size: int = DEFAULT_POOL_SIZE) -> TraitMapping:
    """Deterministic mapping of `desc`'s flagged fields onto the pools (see the module doc)."""
    counters: dict[FieldKind, int] = dict.fromkeys(FieldKind, 0)
    fields: dict[str, MappedField] = {}

    def assign(
        kind: FieldKind, path: str, sorted_: bool, value_kind: ValueKind, chain: tuple[FieldDescriptor, ...]
    ) -> None:
        repeated = chain[-1].is_repeated
        n = counters[kind]
        if n >= pool_size:
            log.error("%s.%s not indexed: no %s field left (pool size %d)", desc.full_name, path, kind.value, pool_size)
            return
        counters[kind] = n + 1
        leaf = chain[-1]
        presence = bool(leaf.has_presence) and leaf.type != FieldDescriptor.TYPE_MESSAGE
        fields[path] = MappedField(
            path, kind, f"{kind.value}_{n}", sorted_, value_kind, chain, presence and not repeated, repeated=repeated
        )

    def walk(message: Descriptor, prefix: str, chain: tuple[FieldDescriptor, ...], seen: tuple[str, ...]) -> None:
        for fd in sorted(message.fields, key=lambda f: f.number):
            indexed, sorted_, text = _flags(fd)
            if not (indexed or sorted_ or text):
                continue
            path = prefix + fd.name
            here = (*chain, fd)
            ftype = fd.type
            if fd.is_repeated:
                sub = fd.message_type if ftype == FieldDescriptor.TYPE_MESSAGE else None
                leaf_message = sub is not None and sub.full_name in (TIMESTAMP_TYPE, REFERENCE_TYPE)
                if sub is not None and (sub.GetOptions().map_entry or not leaf_message):
                    log.error(
                        "%s.%s not indexed: map fields and repeated messages are not supported", desc.full_name, path
                    )
                    continue
                if sorted_:
                    log.warning("%s.%s is repeated: indexed, but not sorted (no single value to sort by)",
                                desc.full_name, path)
                    sorted_ = False
            if ftype == FieldDescriptor.TYPE_MESSAGE:
                sub = fd.message_type
                if sub.full_name == TIMESTAMP_TYPE:
                    assign(FieldKind.U64_FAST if sorted_ else FieldKind.U64, path, sorted_, ValueKind.TIMESTAMP, here)
                elif sub.full_name == REFERENCE_TYPE:
                    assign(FieldKind.REFERENCES, path, False, ValueKind.REFERENCE, here)
                elif sub.full_name in seen or len(seen) >= MAX_NESTING:
                    log.error("%s.%s not indexed: recursive or too deep message", desc.full_name, path)
                else:
                    walk(sub, path + ".", here, (*seen, sub.full_name))
            elif ftype == FieldDescriptor.TYPE_STRING:
                if text:
                    assign(FieldKind.TEXT, path, False, ValueKind.TEXT, here)
                else:
                    assign(FieldKind.STRING, path, False, ValueKind.STRING, here)
            elif ftype in _SIGNED_TYPES:
                assign(FieldKind.I64_FAST if sorted_ else FieldKind.I64, path, sorted_, ValueKind.INT, here)
            elif ftype in _UNSIGNED_TYPES:
                assign(FieldKind.U64_FAST if sorted_ else FieldKind.U64, path, sorted_, ValueKind.UINT, here)
            elif ftype == FieldDescriptor.TYPE_BOOL:
                assign(FieldKind.U64_FAST if sorted_ else FieldKind.U64, path, sorted_, ValueKind.BOOL, here)
            else:
                log.error("%s.%s not indexed: unsupported field type %d", desc.full_name, path, ftype)

    walk(desc, "", (), (desc.full_name,))
    return TraitMapping(
        full_name=desc.full_name,
        fields=fields,
        text_fields=tuple(f for f in fields.values() if f.value_kind is ValueKind.TEXT),
        reference_fields=tuple(f for f in fields.values() if f.value_kind is ValueKind.REFERENCE),
    )


def ref_escape(value: str) -> str:
    """Escape an id for a reference token (deterministic; used for indexing and querying)."""
    return value.replace("%", "%25").replace(" ", "%20")


def entity_token(entity_id: str) -> str:
    return "entity" + ref_escape(entity_id)


def trait_token(trait_id: str) -> str:
    return "trait" + ref_escape(trait_id)


def reference_text(entity_id: str, trait_id: str) -> str:
    """What a reference adds to `all_refs` / `references_N`: ``entity<id> trait<id>``."""
    return f"{entity_token(entity_id)} {trait_token(trait_id)}"


def text_analyzer() -> tantivy.TextAnalyzer:
    """Tantivy's default analyzer: split on non-alphanumerics, drop tokens >= 40 bytes, lowercase."""
    return (
        tantivy.TextAnalyzerBuilder(tantivy.Tokenizer.simple())
        .filter(tantivy.Filter.remove_long(40))
        .filter(tantivy.Filter.lowercase())
        .build()
    )


# ASCII byte -> itself lowercased if alphanumeric, else a space: `text_words`' fast path
_ASCII_WORDS = bytes(
    (c | 0x20 if 65 <= c <= 90 else c) if chr(c).isascii() and chr(c).isalnum() else 32 for c in range(256)
)


def text_words(analyzer: tantivy.TextAnalyzer, text: str) -> list[str]:
    """The words `analyzer` (a `text_analyzer`) indexes in `text`, for the vocabulary. ASCII text is split
    without it: the simple tokenizer's tokens are then the runs of ASCII letters and digits, lowercased
    (~3 µs for a note instead of ~10); tokens of 40 bytes or more stay in, which a superset allows."""
    if text.isascii():
        return text.encode().translate(_ASCII_WORDS).decode().split()
    return list(analyzer.analyze(text))


def ref_analyzer() -> tantivy.TextAnalyzer:
    return tantivy.TextAnalyzerBuilder(tantivy.Tokenizer.regex(r"[^ ]+")).build()


def _build_tantivy_schema(pool_size: int) -> tantivy.Schema:
    sb = tantivy.SchemaBuilder()
    for name in (F_TRAIT_TYPE, F_ENTITY_ID, F_TRAIT_ID):
        sb.add_text_field(name, stored=True, tokenizer_name="raw", index_option="basic")
    # The original's `<entity>_<trait>` term, which no query of ours reads: no document gets it any more (a
    # term unique to each document cost tantivy ~6 µs of its ~42 per note); the field stays so that chain
    # indexes built before still open with this schema.
    sb.add_text_field(F_ENTITY_TRAIT_ID, tokenizer_name="raw", index_option="basic")
    for name in (F_CREATION_DATE, F_MODIFICATION_DATE, F_BLOCK_OFFSET, F_OPERATION_ID, F_DOCUMENT_TYPE):
        sb.add_unsigned_field(name, stored=True, indexed=True, fast=True)
    sb.add_unsigned_field(F_HAS_REFERENCE, stored=True, indexed=True, fast=True)
    sb.add_text_field(F_ALL_TEXT, tokenizer_name=TEXT_ANALYZER)
    sb.add_text_field(F_ALL_REFS, tokenizer_name=REF_ANALYZER)
    for n in range(pool_size):
        sb.add_text_field(f"{FieldKind.REFERENCES.value}_{n}", tokenizer_name=REF_ANALYZER)
        sb.add_text_field(f"{FieldKind.TEXT.value}_{n}", tokenizer_name=TEXT_ANALYZER)
        sb.add_text_field(f"{FieldKind.STRING.value}_{n}", tokenizer_name="raw", index_option="basic")
        sb.add_integer_field(f"{FieldKind.I64.value}_{n}", indexed=True)
        sb.add_integer_field(f"{FieldKind.I64_FAST.value}_{n}", indexed=True, fast=True)
        sb.add_unsigned_field(f"{FieldKind.U64.value}_{n}", indexed=True)
        sb.add_unsigned_field(f"{FieldKind.U64_FAST.value}_{n}", indexed=True, fast=True)
    return sb.build()


def _deletions(word: str, depth: int) -> set[str]:
    """`word` and every string obtained from it by deleting up to `depth` characters."""
    found = {word}
    frontier = found
    for _ in range(depth):
        frontier = {w[:i] + w[i + 1 :] for w in frontier for i in range(len(w))}
        found = found | frontier
    return found


def osa_distance(a: str, b: str, limit: int) -> int:
    """Levenshtein distance where swapping two adjacent characters costs 1 and no substring is edited twice
    (optimal string alignment); `limit + 1` as soon as it is known to exceed `limit`."""
    if abs(len(a) - len(b)) > limit:
        return limit + 1
    before: list[int] = []
    previous = list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        current = [i] + [0] * len(b)
        char = a[i - 1]
        for j in range(1, len(b) + 1):
            value = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char != b[j - 1]))
            if i > 1 and j > 1 and char == b[j - 2] and a[i - 2] == b[j - 1]:
                value = min(value, before[j - 2] + 1)
            current[j] = value
        if min(current) > limit:
            return limit + 1
        before, previous = previous, current
    return previous[len(b)]


def damerau_levenshtein_distance(a: str, b: str) -> int:
    """Levenshtein distance where swapping two adjacent characters costs 1, edits between swapped
    characters allowed (unrestricted Damerau-Levenshtein, Lowrance-Wagner)."""
    infinity = len(a) + len(b)
    table = [[infinity] * (len(b) + 2)] + [[infinity] + [0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(len(a) + 1):
        table[i + 1][1] = i
    for j in range(len(b) + 1):
        table[1][j + 1] = j
    last_row: dict[str, int] = {}
    for i in range(1, len(a) + 1):
        last_match_column = 0
        for j in range(1, len(b) + 1):
            k = last_row.get(b[j - 1], 0)
            col = last_match_column
            cost = 1
            if a[i - 1] == b[j - 1]:
                cost = 0
                last_match_column = j
            table[i + 1][j + 1] = min(
                table[i][j] + cost,
                table[i + 1][j] + 1,
                table[i][j + 1] + 1,
                table[k][col] + (i - k - 1) + 1 + (j - col - 1),
            )
        last_row[a[i - 1]] = i
    return table[len(a) + 1][len(b) + 1]


def _within_substitutions(a: str, b: str, distance: int) -> bool:
    """Same length and at most `distance` differing positions, or one swap of adjacent characters."""
    if len(a) != len(b):
        return False
    differing = [i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y]
    if len(differing) <= distance:
        return True
    return (
        len(differing) == 2
        and differing[1] == differing[0] + 1
        and a[differing[0]] == b[differing[1]]
        and (a[differing[1]] == b[differing[0]])
    )


class Vocabulary:
    """Every token ever indexed in `all_text` (which receives every text field's tokens too), kept so that a
    query can find the words a fuzzy term matches without tantivy's Levenshtein automaton (most of a match
    query's cost: built per search and run over every segment's term dictionary) and search them as plain
    terms: the same documents at the same constant score (see `query.match_query`).

    `neighbors(token, d)` lists the other words within `d` edits of `token`. Candidates first: each edit
    (substitution, insertion, deletion, adjacent transposition) removes at most one character of a longest
    common subsequence from each side, so two words within `d` edits both reduce to a common string by
    deleting at most `d` characters each; `_near[d - 1]` maps each such deletion variant to the words having
    it. Then each candidate's distance: tantivy's automaton counts a transposition as one edit; whether it
    is the restricted (optimal string alignment) or the unrestricted Damerau-Levenshtein distance, a word
    within `d` by the first is within `d` by both, and one beyond `d` by the second is beyond by both; a word
    where they disagree (rare) makes the answer None, as does a saturated vocabulary: the caller then uses
    the automaton.

    A superset of every index's term dictionary: words are added when their document is built (before it is
    committed, so a searcher that can match a word was opened after the word was added) and when an on-disk
    index is opened; they are never removed (a word that no index holds any more matches nothing). Past
    `max_variants` it stops tracking. Written by the indexing thread, read by query threads (each step is
    atomic under the GIL; a half-added word is either not found yet or found whole). `version` changes
    whenever a word is added (compiled queries depend on it)."""

    def __init__(self, max_variants: int = VOCABULARY_MAX_VARIANTS) -> None:
        self._words: set[str] = set()
        # deletion variant -> the word having it, or the list of the words having it (within 1, within 2)
        self._near: tuple[dict[str, str | list[str]], dict[str, str | list[str]]] = ({}, {})
        self._max_variants = max_variants
        self.saturated = False
        self.version = 0

    def __len__(self) -> int:
        return len(self._words)

    def __contains__(self, word: object) -> bool:
        return word in self._words

    def add_tokens(self, tokens: Iterable[str]) -> None:
        words = self._words
        if self.saturated:
            return
        if not isinstance(tokens, list | set | tuple):
            tokens = list(tokens)
        if words.issuperset(tokens):
            return
        for token in tokens:
            if token not in words:
                self._add(token)
                if self.saturated:
                    return

    def _add(self, word: str) -> None:
        for depth, near in enumerate(self._near, start=1):
            for variant in _deletions(word, depth):
                holders = near.get(variant)
                if holders is None:
                    near[variant] = word
                elif isinstance(holders, str):
                    near[variant] = [holders, word]
                else:
                    holders.append(word)
        self._words.add(word)
        self.version += 1
        if len(self._near[1]) > self._max_variants:
            log.warning(
                "more than %d fuzzy variants of indexed words: fuzzy terms use tantivy's automaton from now on",
                self._max_variants,
            )
            self.saturated = True
            self._near = ({}, {})

    def neighbors(self, token: str, distance: int, limit: int = 64) -> list[str] | None:
        """The indexed words other than `token` within `distance` (1 or 2) edits of it, sorted; None when
        unknown (saturated, an ambiguous word, more than `limit` of them)."""
        if self.saturated or distance not in (1, 2):
            return None
        levels = [{token}]  # strings obtained by deleting exactly i characters
        for _ in range(distance):
            levels.append({w[:i] + w[i + 1 :] for w in levels[-1] for i in range(len(w))})
        sure: set[str] = set()  # i deletions here and at most j there, i + j <= distance: that close
        maybe: set[str] = set()
        for deleted, level in enumerate(levels):
            for bound, near in enumerate(self._near[:distance], start=1):
                group = sure if deleted + bound <= distance else maybe
                for variant in level:
                    holders = near.get(variant)
                    if holders is None:
                        continue
                    if isinstance(holders, str):
                        group.add(holders)
                    else:
                        group.update(holders)
        sure.discard(token)
        maybe -= sure
        maybe.discard(token)
        found = list(sure)
        for word in maybe:
            if _within_substitutions(token, word, distance) or osa_distance(token, word, distance) <= distance:
                found.append(word)
            elif damerau_levenshtein_distance(token, word) <= distance:
                return None  # the two distances disagree: let tantivy decide
        if len(found) > limit:
            return None
        return sorted(found)

    def may_have_neighbor(self, token: str, distance: int) -> bool:
        """Whether some indexed word other than `token` may be within `distance` edits of it."""
        return self.neighbors(token, distance) != []


class IndexSchema:
    """The tantivy schema of a mutation index plus the trait mappings of a registry.

    Build one per registry and share it between the pending and the chain index: compiled queries are
    bound to its tantivy schema. Mappings are computed once per type and cached (a registered type never
    changes); unknown types are re-checked when the registry's version changes.
    """

    def __init__(self, registry: TraitRegistry, pool_size: int = DEFAULT_POOL_SIZE) -> None:
        self.registry = registry
        self.pool_size = pool_size
        self.tantivy_schema = _build_tantivy_schema(pool_size)
        self.text_analyzer = text_analyzer()
        self._mappings: dict[str, TraitMapping] = {}
        self._unknown: set[str] = set()
        self._unknown_version = registry.version
        self._lock = threading.Lock()
        self.query_compiler: object | None = None  # the shared `query.QueryCompiler`, set by `compiler_for`
        self.vocabulary = Vocabulary()  # words of `all_text` in every index of this schema

    def type_fingerprints(self) -> dict[str, str]:
        """Per registered type with indexed fields: a digest of its mapping (field path -> pool field,
        value kind, sorted). Documents on disk are only readable with the mapping they were indexed
        with: a type whose indexed fields changed (a new version of an app's schema or of a `schemas:`
        file) moves its fields to other pool slots, and field queries on its old documents would
        silently match the wrong values. The chain index records these and is rebuilt when a type's
        changes (mappings are per type: a new type changes no other)."""
        fingerprints: dict[str, str] = {}
        for name in sorted(self.registry.message_names()):
            mapping = self.mapping(name)
            if mapping is None or not mapping.fields:
                continue
            lines = "".join(
                f"{m.path}={m.name}/{m.value_kind.value}/{int(m.sorted)}\n" for m in mapping.fields.values()
            )
            fingerprints[name] = hashlib.sha256(lines.encode()).hexdigest()[:16]
        return fingerprints

    def register_analyzers(self, index: tantivy.Index) -> None:
        """Register the custom analyzers the schema refers to on an index (needed for each opened index)."""
        index.register_tokenizer(TEXT_ANALYZER, text_analyzer())
        index.register_tokenizer(REF_ANALYZER, ref_analyzer())

    def mapping(self, full_name: str) -> TraitMapping | None:
        """The mapping of a registered message type, None if the registry does not know it."""
        mapping = self._mappings.get(full_name)
        if mapping is not None:
            return mapping
        if self._unknown_version != self.registry.version:
            self._unknown.clear()
            self._unknown_version = self.registry.version
        if full_name in self._unknown:
            return None
        desc = self.registry.message_descriptor(full_name)
        with self._lock:
            if desc is None:
                self._unknown.add(full_name)
                return None
            mapping = self._mappings.get(full_name)
            if mapping is None:
                mapping = build_mapping(desc, self.pool_size)
                self._mappings[full_name] = mapping
        return mapping

    def analyze(self, text: str) -> list[str]:
        """Tokens of `text` as the text fields index them."""
        return list(self.text_analyzer.analyze(text))
