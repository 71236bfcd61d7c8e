"""PostgreSQL's ``pgoutput`` logical replication messages (protocol version 1), parsed.

What ``pg_logical_slot_peek_binary_changes(slot, NULL, n, 'proto_version', '1',
'publication_names', 'pub')`` returns in its ``data`` column: one message per
row, in the format of PostgreSQL's "Logical Replication Message Formats"
(written by ``src/backend/replication/logical/proto.c``). Pure: bytes in,
frozen values out, no I/O, so that every odd input can be tried in a test.

Only protocol version 1 is understood. Later versions put a transaction id
in front of the changes of a streamed transaction and add messages (stream
start/stop/commit/abort, two-phase) that this parser refuses as unknown: the
daemon asks for version 1, and a message it cannot read must stop it loudly,
never be skipped (a skipped Insert is a missed order).

Every malformed input raises :class:`PgoutputError`, naming what was wrong and
at which offset; no other exception escapes :func:`parse_message`.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import ClassVar, Final, Literal, TypeAlias, final

from order_monitor.errors import OrderMonitorError

#: At most this many bytes of the input are quoted in an error: a message can
#: carry a whole row, and a log line is no place for an order's data.
EXCERPT_BYTES: Final = 64


class PgoutputError(OrderMonitorError):
    """A pgoutput message that cannot be read, or that does not fit what came before it."""


@final
class UnchangedToast:
    """The value of a column an UPDATE did not change and that is stored out of line (TOAST).

    pgoutput does not send such a value again ('u'): it is neither NULL nor
    known. One instance, :data:`UNCHANGED_TOAST`.
    """

    __slots__ = ()
    _instance: ClassVar[UnchangedToast | None] = None

    def __new__(cls) -> UnchangedToast:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNCHANGED_TOAST"

    def __reduce__(self) -> str:
        return "UNCHANGED_TOAST"


UNCHANGED_TOAST: Final = UnchangedToast()


class Binary(bytes):
    """A column value sent in the type's binary ``send`` format ('b'), not as text ('t').

    A ``bytes`` like the text form, so code that only passes values along need
    not care; :func:`text_value` refuses it, since decoding it as text would
    be wrong without a word. pgoutput sends it only when asked with the
    ``binary`` option, which the daemon never sets.
    """

    __slots__ = ()

    def __repr__(self) -> str:
        return f"Binary({bytes(self)!r})"


# Values stay bytes, not str: pgoutput writes a text value in the database's
# encoding (the SQL interface returns bytea, so no client_encoding conversion
# happens), which need not be UTF-8, and a binary value is no text at all.
# Only the caller knows the encoding, and the daemon reads two or three
# columns of a row, so decoding is left to text_value, for the columns it reads.
Value: TypeAlias = bytes | UnchangedToast | None
TupleData: TypeAlias = tuple[Value, ...]

#: Which old tuple an Update or Delete carries: the replica identity's key
#: columns ('K'), or the whole old row under REPLICA IDENTITY FULL ('O').
OldKind: TypeAlias = Literal["K", "O"]


@dataclass(frozen=True, slots=True)
class Begin:
    final_lsn: int
    #: Microseconds since 2000-01-01 00:00 UTC (PostgreSQL's epoch).
    commit_time_us: int
    xid: int


@dataclass(frozen=True, slots=True)
class Commit:
    flags: int
    commit_lsn: int
    end_lsn: int
    commit_time_us: int


@dataclass(frozen=True, slots=True)
class Origin:
    commit_lsn: int
    name: str


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    type_oid: int
    type_modifier: int
    #: Part of the replica identity (the primary key by default).
    is_key: bool


@dataclass(frozen=True, slots=True)
class Relation:
    relation_id: int
    namespace: str
    name: str
    #: pg_class.relreplident: 'd' default, 'n' nothing, 'f' full, 'i' index.
    replica_identity: str
    #: Only the published ones: a publication's column list leaves the others out.
    columns: tuple[Column, ...]


@dataclass(frozen=True, slots=True)
class Type:
    type_oid: int
    namespace: str
    name: str


@dataclass(frozen=True, slots=True)
class Insert:
    relation_id: int
    new: TupleData


@dataclass(frozen=True, slots=True)
class Update:
    relation_id: int
    #: Sent only when the replica identity's columns changed ('K') or the table
    #: has REPLICA IDENTITY FULL ('O'); else None.
    old: TupleData | None
    old_kind: OldKind | None
    new: TupleData


@dataclass(frozen=True, slots=True)
class Delete:
    relation_id: int
    old_kind: OldKind
    old: TupleData


@dataclass(frozen=True, slots=True)
class Truncate:
    relation_ids: tuple[int, ...]
    options: int

    @property
    def cascade(self) -> bool:
        return bool(self.options & 1)

    @property
    def restart_identity(self) -> bool:
        return bool(self.options & 2)


@dataclass(frozen=True, slots=True)
class LogicalMessage:
    """A message written by ``pg_logical_emit_message`` ('M'), sent when asked with ``messages``."""

    flags: int
    lsn: int
    prefix: str
    content: bytes

    @property
    def transactional(self) -> bool:
        return bool(self.flags & 1)


# Named Message for the union (what parse_message returns); the 'M' message
# itself is LogicalMessage, as PostgreSQL calls what pg_logical_emit_message writes.
Message: TypeAlias = (
    Begin | Commit | Origin | Relation | Type | Insert | Update | Delete | Truncate | LogicalMessage
)

_U16: Final = struct.Struct("!H")
_U32: Final = struct.Struct("!I")
_I32: Final = struct.Struct("!i")
_U64: Final = struct.Struct("!Q")
_BEGIN: Final = struct.Struct("!QqI")
_COMMIT: Final = struct.Struct("!BQQq")


def excerpt(data: bytes, offset: int) -> str:
    """At most EXCERPT_BYTES of *data* around *offset*, escaped, with where they start."""
    start = max(0, min(offset, len(data)) - EXCERPT_BYTES // 2)
    piece = bytes(data[start : start + EXCERPT_BYTES])
    more = "…" if start + EXCERPT_BYTES < len(data) else ""
    return f"bytes {start}..: {piece!r}{more} (message of {len(data)} bytes)"


class _Reader:
    """A cursor over one message that refuses to read past its end."""

    __slots__ = ("data", "kind", "pos")

    def __init__(self, data: bytes, kind: str) -> None:
        self.data = data
        self.kind = kind
        self.pos = 0

    def fail(self, what: str, offset: int | None = None) -> PgoutputError:
        at = self.pos if offset is None else offset
        return PgoutputError(
            f"pgoutput {self.kind} message: {what} at offset {at}; {excerpt(self.data, at)}"
        )

    def need(self, size: int, what: str) -> None:
        # Checked before every read, so that neither struct.error nor a short
        # slice (which Python would hand back silently) is ever seen.
        if size > len(self.data) - self.pos:
            raise self.fail(f"{what} needs {size} bytes, only {len(self.data) - self.pos} are left")

    def unpack(self, shape: struct.Struct, what: str) -> tuple[int, ...]:
        self.need(shape.size, what)
        values = shape.unpack_from(self.data, self.pos)
        self.pos += shape.size
        return values

    def u8(self, what: str) -> int:
        self.need(1, what)
        value = self.data[self.pos]
        self.pos += 1
        return value

    def u16(self, what: str) -> int:
        return self.unpack(_U16, what)[0]

    def u32(self, what: str) -> int:
        return self.unpack(_U32, what)[0]

    def u64(self, what: str) -> int:
        return self.unpack(_U64, what)[0]

    def length(self, what: str) -> int:
        start = self.pos
        size: int = self.unpack(_I32, what)[0]
        if size < 0:
            raise self.fail(f"{what} is negative ({size})", start)
        self.need(size, f"the {size} bytes that {what} announces")
        return size

    def raw(self, size: int) -> bytes:
        value = self.data[self.pos : self.pos + size]
        self.pos += size
        return value

    def cstring(self, what: str) -> str:
        end = self.data.find(b"\0", self.pos)
        if end < 0:
            raise self.fail(f"{what} has no terminating NUL byte")
        raw = self.data[self.pos : end]
        self.pos = end + 1
        # Names are in the database's encoding too; surrogateescape keeps
        # every byte (a name that is not UTF-8 still round-trips, and simply
        # never equals the name the daemon looks for) and never raises.
        return raw.decode("utf-8", "surrogateescape")

    def namespace(self, what: str) -> str:
        name = self.cstring(what)
        # pgoutput writes pg_catalog as the empty string, to save space.
        return name or "pg_catalog"

    def end(self) -> None:
        if self.pos != len(self.data):
            # Extra bytes mean we misread the format (another protocol
            # version?): better loud than a row quietly misparsed.
            raise self.fail(f"{len(self.data) - self.pos} unexpected bytes after the message")

    def tuple_data(self, what: str) -> TupleData:
        data = self.data
        size = len(data)
        start = self.pos
        count = self.u16("the tuple's column count")
        # Each column takes at least its kind byte: a count the rest of the
        # message cannot hold is refused before any work is done for it.
        if count > size - self.pos:
            raise self.fail(
                f"{what} declares {count} columns, only {size - self.pos} bytes are left", start
            )
        # The one loop that runs per column of every row: bounds are checked
        # inline and a description is formatted only for an error.
        values: list[Value] = []
        pos = self.pos
        for index in range(count):
            if pos >= size:
                self.pos = pos
                raise self.fail(f"{what}'s column {index}: the message ends before its kind")
            kind = data[pos]
            if kind == 0x74 or kind == 0x62:  # 't' text, 'b' binary
                if size - pos < 5:
                    self.pos = pos
                    raise self.fail(f"{what}'s column {index}: the message ends in its length")
                length: int = _I32.unpack_from(data, pos + 1)[0]
                if length < 0 or length > size - pos - 5:
                    self.pos = pos + 1
                    if length < 0:
                        raise self.fail(f"{what}'s column {index} length is negative ({length})")
                    raise self.fail(
                        f"{what}'s column {index} announces {length} bytes,"
                        f" only {size - pos - 5} are left"
                    )
                pos += 5 + length
                value = data[pos - length : pos]
                values.append(value if kind == 0x74 else Binary(value))
            elif kind == 0x6E:  # 'n'
                values.append(None)
                pos += 1
            elif kind == 0x75:  # 'u'
                values.append(UNCHANGED_TOAST)
                pos += 1
            else:
                self.pos = pos
                raise self.fail(
                    f"{what}'s column {index} has unknown kind {bytes([kind])!r}"
                    " (expected 'n', 'u', 't' or 'b')"
                )
        self.pos = pos
        return tuple(values)

    def old_kind(self, what: str) -> OldKind:
        at = self.pos
        kind = self.u8(what)
        if kind == 0x4B:
            return "K"
        if kind == 0x4F:
            return "O"
        raise self.fail(f"{what} is {bytes([kind])!r}, expected 'K' or 'O'", at)

    def new_marker(self, what: str = "the new tuple's marker") -> None:
        at = self.pos
        kind = self.u8(what)
        if kind != 0x4E:
            raise self.fail(f"{what} is {bytes([kind])!r}, expected 'N'", at)


def _begin(r: _Reader) -> Begin:
    final_lsn, commit_time, xid = r.unpack(_BEGIN, "Begin's fields")
    return Begin(final_lsn=final_lsn, commit_time_us=commit_time, xid=xid)


def _commit(r: _Reader) -> Commit:
    flags, commit_lsn, end_lsn, commit_time = r.unpack(_COMMIT, "Commit's fields")
    return Commit(flags=flags, commit_lsn=commit_lsn, end_lsn=end_lsn, commit_time_us=commit_time)


def _origin(r: _Reader) -> Origin:
    lsn = r.u64("the origin's commit LSN")
    return Origin(commit_lsn=lsn, name=r.cstring("the origin's name"))


def _relation(r: _Reader) -> Relation:
    relation_id = r.u32("the relation id")
    namespace = r.namespace("the relation's namespace")
    name = r.cstring("the relation's name")
    identity = chr(r.u8("the replica identity"))
    start = r.pos
    count = r.u16("the relation's column count")
    # A column takes at least 10 bytes (flags, NUL, type oid, typmod).
    if count * 10 > len(r.data) - r.pos:
        raise r.fail(
            f"the relation declares {count} columns, only {len(r.data) - r.pos} bytes are left",
            start,
        )
    columns = []
    for index in range(count):
        flags = r.u8(f"column {index}'s flags")
        column_name = r.cstring(f"column {index}'s name")
        type_oid = r.u32(f"column {index}'s type oid")
        type_modifier: int = r.unpack(_I32, f"column {index}'s type modifier")[0]
        columns.append(Column(column_name, type_oid, type_modifier, is_key=bool(flags & 1)))
    return Relation(relation_id, namespace, name, identity, tuple(columns))


def _type(r: _Reader) -> Type:
    oid = r.u32("the type oid")
    namespace = r.namespace("the type's namespace")
    return Type(type_oid=oid, namespace=namespace, name=r.cstring("the type's name"))


def _insert(r: _Reader) -> Insert:
    relation_id = r.u32("the relation id")
    r.new_marker()
    return Insert(relation_id=relation_id, new=r.tuple_data("the new tuple"))


def _update(r: _Reader) -> Update:
    relation_id = r.u32("the relation id")
    old: TupleData | None = None
    old_kind: OldKind | None = None
    if r.pos < len(r.data) and r.data[r.pos] in b"KO":
        old_kind = r.old_kind("the old tuple's marker")
        old = r.tuple_data("the old tuple")
    if old is None:
        r.new_marker("the tuple marker ('K' or 'O' for an old tuple, 'N' for the new one)")
    else:
        r.new_marker()
    return Update(relation_id, old, old_kind, r.tuple_data("the new tuple"))


def _delete(r: _Reader) -> Delete:
    relation_id = r.u32("the relation id")
    old_kind = r.old_kind("the old tuple's marker")
    return Delete(relation_id, old_kind, r.tuple_data("the old tuple"))


def _truncate(r: _Reader) -> Truncate:
    start = r.pos
    count = r.u32("the relation count")
    options = r.u8("the options")
    if count * 4 > len(r.data) - r.pos:
        raise r.fail(
            f"the message declares {count} relations, the {len(r.data) - r.pos} bytes left"
            " cannot hold them",
            start,
        )
    ids = struct.unpack_from(f"!{count}I", r.data, r.pos)
    r.pos += count * 4
    return Truncate(relation_ids=ids, options=options)


def _logical_message(r: _Reader) -> LogicalMessage:
    flags = r.u8("the flags")
    lsn = r.u64("the LSN")
    prefix = r.cstring("the prefix")
    content = r.raw(r.length("the content's length"))
    return LogicalMessage(flags=flags, lsn=lsn, prefix=prefix, content=content)


_PARSERS: Final[dict[int, tuple[str, Callable[[_Reader], Message]]]] = {
    ord("B"): ("Begin", _begin),
    ord("C"): ("Commit", _commit),
    ord("O"): ("Origin", _origin),
    ord("R"): ("Relation", _relation),
    ord("Y"): ("Type", _type),
    ord("I"): ("Insert", _insert),
    ord("U"): ("Update", _update),
    ord("D"): ("Delete", _delete),
    ord("T"): ("Truncate", _truncate),
    ord("M"): ("Message", _logical_message),
}


def parse_message(data: bytes) -> Message:
    """The message in *data* (one row's ``data`` of a peek), or PgoutputError."""
    if not isinstance(data, bytes):
        # bytearray and memoryview would parse, but their slices are not
        # bytes: the frozen values must not share a caller's mutable buffer.
        data = bytes(data)
    if not data:
        raise PgoutputError("pgoutput message: empty at offset 0")
    entry = _PARSERS.get(data[0])
    if entry is None:
        raise PgoutputError(
            f"pgoutput message: unknown message type {data[:1]!r} at offset 0"
            f" (protocol version 1 knows B C O R Y I U D T M); {excerpt(data, 0)}"
        )
    kind, parse = entry
    reader = _Reader(data, kind)
    reader.pos = 1
    message: Message = parse(reader)
    reader.end()
    return message


def text_value(value: Value, encoding: str = "utf-8") -> str | UnchangedToast | None:
    """A column value as text: None for NULL, UNCHANGED_TOAST as is.

    Bytes that are not valid in *encoding* come out as lone surrogates
    (surrogateescape) rather than raising: a status spelled in bytes the
    daemon cannot read is no status it follows, not a reason to stop reading
    the WAL.
    """
    if value is None or isinstance(value, UnchangedToast):
        return value
    if isinstance(value, Binary):
        raise PgoutputError(
            "pgoutput value: sent in binary format; ask for changes without the 'binary' option"
        )
    return value.decode(encoding, "surrogateescape")


class RelationCache:
    """The Relation messages seen so far, by relation id.

    pgoutput describes a relation once, before its first change in a decoding
    session (and again after its definition changes); the changes that follow
    name it only by id. Keep one cache for as long as messages keep coming:
    a newer description replaces the older one.
    """

    __slots__ = ("_relations",)

    def __init__(self) -> None:
        self._relations: dict[int, Relation] = {}

    def remember(self, relation: Relation) -> None:
        self._relations[relation.relation_id] = relation

    def relation(self, relation_id: int) -> Relation:
        try:
            return self._relations[relation_id]
        except KeyError:
            raise PgoutputError(
                f"pgoutput: a change of relation id {relation_id}, which no Relation message"
                " described before it"
            ) from None

    def new_row(self, change: Insert | Update, schema: str, table: str) -> dict[str, Value] | None:
        """The new tuple of *change* by column name, or None when it is another table's."""
        relation = self.relation(change.relation_id)
        if relation.namespace != schema or relation.name != table:
            return None
        if len(change.new) != len(relation.columns):
            raise PgoutputError(
                f"pgoutput: a change of {relation.namespace}.{relation.name} carries"
                f" {len(change.new)} columns, its Relation message described"
                f" {len(relation.columns)}"
            )
        return {
            column.name: value for column, value in zip(relation.columns, change.new, strict=True)
        }


def changed_rows(
    messages: Iterable[Message],
    schema: str,
    table: str,
    *,
    cache: RelationCache | None = None,
    encoding: str = "utf-8",
) -> list[dict[str, str | UnchangedToast | None]]:
    """The new rows of every Insert and Update of *schema*.*table* in *messages*, in order.

    Each as ``{column: text}`` for the published columns. Deletes and
    truncates are left out (an order that is gone is nothing to follow), as
    are other tables' changes. Pass the *cache* of earlier calls when a batch
    may start after its Relation message.

    An Update is there even when none of the published columns changed: a
    publication's column list filters the columns sent, not the updates, so
    the caller applies its own rule to the values.
    """
    relations = RelationCache() if cache is None else cache
    rows: list[dict[str, str | UnchangedToast | None]] = []
    for index, message in enumerate(messages):
        if isinstance(message, Relation):
            relations.remember(message)
        elif isinstance(message, Insert | Update):
            try:
                row = relations.new_row(message, schema, table)
            except PgoutputError as error:
                raise PgoutputError(f"{error} (message {index} of the batch)") from None
            if row is not None:
                rows.append({name: text_value(value, encoding) for name, value in row.items()})
    return rows
