"""The pgoutput parser, on messages built by hand and by a small encoder written here.

The encoder follows proto.c's writers (logicalrep_write_*), field by field, so
that a round trip checks the parser against the format rather than against
itself; the byte strings spelled out in full below pin the layout once more.
"""

from __future__ import annotations

import pickle
import struct

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from order_monitor.decoding.pgoutput import (
    EXCERPT_BYTES,
    UNCHANGED_TOAST,
    Begin,
    Binary,
    Column,
    Commit,
    Delete,
    Insert,
    LogicalMessage,
    Message,
    Origin,
    PgoutputError,
    Relation,
    RelationCache,
    Truncate,
    TupleData,
    Type,
    UnchangedToast,
    Update,
    changed_rows,
    parse_message,
    text_value,
)
from order_monitor.errors import OrderMonitorError

# -- the test-side encoder ---------------------------------------------------


def cstring(value: str) -> bytes:
    return value.encode("utf-8", "surrogateescape") + b"\0"


def tuple_data(values: TupleData) -> bytes:
    out = [struct.pack("!H", len(values))]
    for value in values:
        if value is None:
            out.append(b"n")
        elif isinstance(value, UnchangedToast):
            out.append(b"u")
        elif isinstance(value, Binary):
            out.append(b"b" + struct.pack("!i", len(value)) + value)
        else:
            out.append(b"t" + struct.pack("!i", len(value)) + value)
    return b"".join(out)


def encode(message: Message) -> bytes:
    match message:
        case Begin(final_lsn, commit_time_us, xid):
            return b"B" + struct.pack("!QqI", final_lsn, commit_time_us, xid)
        case Commit(flags, commit_lsn, end_lsn, commit_time_us):
            return b"C" + struct.pack("!BQQq", flags, commit_lsn, end_lsn, commit_time_us)
        case Origin(commit_lsn, name):
            return b"O" + struct.pack("!Q", commit_lsn) + cstring(name)
        case Relation(relation_id, namespace, name, identity, columns):
            out = [b"R", struct.pack("!I", relation_id), cstring(namespace), cstring(name)]
            out.append(identity.encode("latin-1") + struct.pack("!H", len(columns)))
            for column in columns:
                out.append(bytes([int(column.is_key)]) + cstring(column.name))
                out.append(struct.pack("!Ii", column.type_oid, column.type_modifier))
            return b"".join(out)
        case Type(type_oid, namespace, name):
            return b"Y" + struct.pack("!I", type_oid) + cstring(namespace) + cstring(name)
        case Insert(relation_id, new):
            return b"I" + struct.pack("!I", relation_id) + b"N" + tuple_data(new)
        case Update(relation_id, old, old_kind, new):
            head = b"U" + struct.pack("!I", relation_id)
            if old is not None:
                assert old_kind is not None
                head += old_kind.encode() + tuple_data(old)
            return head + b"N" + tuple_data(new)
        case Delete(relation_id, old_kind, old):
            return b"D" + struct.pack("!I", relation_id) + old_kind.encode() + tuple_data(old)
        case Truncate(relation_ids, options):
            return (
                b"T"
                + struct.pack("!IB", len(relation_ids), options)
                + b"".join(struct.pack("!I", i) for i in relation_ids)
            )
        case LogicalMessage(flags, lsn, prefix, content):
            return (
                b"M"
                + struct.pack("!BQ", flags, lsn)
                + cstring(prefix)
                + struct.pack("!i", len(content))
                + content
            )
    raise AssertionError(message)


def orders_relation(relation_id: int = 16385) -> Relation:
    return Relation(
        relation_id,
        "public",
        "product_orders",
        "d",
        (
            Column("id", 2950, -1, is_key=True),
            Column("status", 1043, 54, is_key=False),
            Column("externalStatus", 1043, 34, is_key=False),
            Column("provider_referans", 1043, 259, is_key=False),
        ),
    )


def row(*values: bytes | None) -> TupleData:
    return tuple(values)


# -- layout, spelled out -----------------------------------------------------


def test_begin_and_commit_as_postgres_writes_them() -> None:
    begin = bytes.fromhex("42000000000150a3d80002b1c6e48f0a10000002ee")
    assert parse_message(begin) == Begin(0x150A3D8, 0x2B1C6E48F0A10, 750)
    commit = bytes.fromhex("4300000000000150a3d8000000000150a4080002b1c6e48f0a10")
    assert parse_message(commit) == Commit(0, 0x150A3D8, 0x150A408, 0x2B1C6E48F0A10)


def test_relation_and_insert_as_postgres_writes_them() -> None:
    relation = (
        b"R\x00\x00\x40\x01public\0product_orders\0d\x00\x02"
        b"\x01id\0\x00\x00\x0b\x86\xff\xff\xff\xff"
        b"\x00status\0\x00\x00\x04\x13\x00\x00\x00\x36"
    )
    assert parse_message(relation) == Relation(
        0x4001,
        "public",
        "product_orders",
        "d",
        (Column("id", 2950, -1, is_key=True), Column("status", 1043, 54, is_key=False)),
    )
    insert = b"I\x00\x00\x40\x01N\x00\x02t\x00\x00\x00\x03abcn"
    assert parse_message(insert) == Insert(0x4001, (b"abc", None))


def test_the_empty_namespace_is_pg_catalog() -> None:
    assert parse_message(b"Y\x00\x00\x00\x17\0int4\0") == Type(23, "pg_catalog", "int4")
    relation = parse_message(b"R\x00\x00\x00\x01\0pg_class\0n\x00\x00")
    assert isinstance(relation, Relation)
    assert relation.namespace == "pg_catalog"


@pytest.mark.parametrize(
    "message",
    [
        Update(7, None, None, row(b"1", None)),
        Update(7, row(b"1", None), "K", row(b"2", None)),
        Update(7, row(b"1", b"x"), "O", (b"2", UNCHANGED_TOAST)),
        Delete(7, "K", row(b"1", None)),
        Delete(7, "O", row(b"1", b"x")),
        Truncate((1, 2, 3), 3),
        LogicalMessage(1, 99, "order-monitor", b"\0\xff"),
        Origin(5, "sub_1"),
        Insert(7, (Binary(b"\x00\x01"), b"t")),
    ],
)
def test_round_trip_of_each_shape(message: Message) -> None:
    assert parse_message(encode(message)) == message
    assert encode(parse_message(encode(message))) == encode(message)


def test_truncate_and_message_flags() -> None:
    truncate = parse_message(encode(Truncate((1,), 3)))
    assert isinstance(truncate, Truncate)
    assert truncate.cascade
    assert truncate.restart_identity
    message = parse_message(encode(LogicalMessage(0, 1, "p", b"")))
    assert isinstance(message, LogicalMessage)
    assert not message.transactional


def test_a_bytearray_or_memoryview_parses_to_bytes() -> None:
    data = encode(Insert(1, row(b"abc")))
    for view in (bytearray(data), memoryview(data)):
        message = parse_message(view)  # type: ignore[arg-type]
        assert isinstance(message, Insert)
        assert type(message.new[0]) is bytes


# -- malformed input ---------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", "empty at offset 0"),
        (b"S\x00\x00\x00\x01\x01", "unknown message type b'S' at offset 0"),
        (b"B\x00\x00", "at offset 1"),
        (b"I\x00\x00\x00\x01X\x00\x00", "is b'X', expected 'N' at offset 5"),
        (b"I\x00\x00\x00\x01N\x00\x01x", "unknown kind b'x'"),
        (b"I\x00\x00\x00\x01N\x00\x01t\x7f\xff\xff\xff", "announces"),
        (b"I\x00\x00\x00\x01N\x00\x01t\xff\xff\xff\xfe", "negative (-2) at offset 9"),
        (b"I\x00\x00\x00\x01N\xff\xff", "declares 65535 columns"),
        (b"I\x00\x00\x00\x01N\x00\x00!", "1 unexpected bytes after the message at offset 8"),
        (b"U\x00\x00\x00\x01Z\x00\x00", "('K' or 'O' for an old tuple, 'N' for the new one)"),
        (b"U\x00\x00\x00\x01K\x00\x00Z\x00\x00", "is b'Z', expected 'N' at offset 8"),
        (b"D\x00\x00\x00\x01N\x00\x00", "expected 'K' or 'O'"),
        (b"T\xff\xff\xff\xff\x00\x00\x00\x00\x01", "declares 4294967295 relations"),
        (b"R\x00\x00\x00\x01public", "no terminating NUL byte"),
        (b"R\x00\x00\x00\x01public\0t\0d\xff\xff\x00", "declares 65535 columns"),
        (b"M\x01" + b"\x00" * 8 + b"p\0\x7f\xff\xff\xff", "announces"),
    ],
)
def test_malformed_input_is_one_error_naming_the_place(data: bytes, expected: str) -> None:
    with pytest.raises(PgoutputError) as caught:
        parse_message(data)
    assert expected in str(caught.value)
    assert isinstance(caught.value, OrderMonitorError)


def test_an_error_quotes_at_most_a_few_bytes_of_the_input() -> None:
    secret = b"s3cr3t-pin-" * 1000
    data = encode(Insert(1, row(secret))) + b"!"
    with pytest.raises(PgoutputError) as caught:
        parse_message(data)
    text = str(caught.value)
    assert "unexpected bytes" in text
    assert text.count("s3cr3t") <= EXCERPT_BYTES // len(b"s3cr3t-pin-") + 1
    assert len(text) < 400


def test_a_huge_declared_length_is_refused_before_anything_is_allocated() -> None:
    with pytest.raises(
        PgoutputError, match="announces 2147483647 bytes, only 0 are left at offset 9"
    ):
        parse_message(b"I\x00\x00\x00\x01N\x00\x01t\x7f\xff\xff\xff")


# -- values ------------------------------------------------------------------


def test_unchanged_toast_is_one_value_that_survives_pickling() -> None:
    assert UnchangedToast() is UNCHANGED_TOAST
    assert pickle.loads(pickle.dumps(UNCHANGED_TOAST)) is UNCHANGED_TOAST
    assert repr(UNCHANGED_TOAST) == "UNCHANGED_TOAST"


def test_text_value() -> None:
    assert text_value(None) is None
    assert text_value(UNCHANGED_TOAST) is UNCHANGED_TOAST
    assert text_value("ş'\"".encode()) == "ş'\""
    assert text_value(b"\xff") == "\udcff"
    assert text_value("ş".encode("iso-8859-9"), "iso-8859-9") == "ş"
    with pytest.raises(PgoutputError, match="binary"):
        text_value(Binary(b"\x00"))


# -- the relation cache and changed_rows -------------------------------------


def test_changed_rows_of_the_orders_table() -> None:
    other = Relation(16400, "public", "audit", "d", (Column("x", 23, -1, is_key=False),))
    messages: list[Message] = [
        Begin(1, 2, 3),
        orders_relation(),
        other,
        Insert(16385, row(b"a1", b"pending", b"sent", b"R-1")),
        Insert(16400, row(b"1")),
        Update(16385, None, None, (b"a1", b"pending", b"processing", UNCHANGED_TOAST)),
        Delete(16385, "K", row(b"a1", None, None, None)),
        Truncate((16385,), 0),
        Commit(0, 1, 2, 2),
    ]
    assert changed_rows(messages, "public", "product_orders") == [
        {"id": "a1", "status": "pending", "externalStatus": "sent", "provider_referans": "R-1"},
        {
            "id": "a1",
            "status": "pending",
            "externalStatus": "processing",
            "provider_referans": UNCHANGED_TOAST,
        },
    ]
    assert changed_rows(messages, "other", "product_orders") == []


def test_a_cache_carries_relations_across_batches_and_takes_the_newest() -> None:
    cache = RelationCache()
    assert changed_rows([orders_relation()], "public", "product_orders", cache=cache) == []
    insert = Insert(16385, row(b"a", b"s", b"e", None))
    assert changed_rows([insert], "public", "product_orders", cache=cache)[0]["id"] == "a"
    renamed = Relation(16385, "public", "orders_old", "d", orders_relation().columns)
    assert changed_rows([renamed, insert], "public", "product_orders", cache=cache) == []


def test_a_change_of_a_relation_never_described_is_an_error() -> None:
    with pytest.raises(PgoutputError, match=r"relation id 9, which no Relation.*message 1 of"):
        changed_rows([Begin(1, 1, 1), Insert(9, row(b"x"))], "public", "product_orders")


def test_a_tuple_that_does_not_fit_its_relation_is_an_error() -> None:
    cache = RelationCache()
    cache.remember(orders_relation())
    with pytest.raises(PgoutputError, match="carries 2 columns, its Relation message described 4"):
        cache.new_row(Insert(16385, row(b"a", b"b")), "public", "product_orders")
    with pytest.raises(PgoutputError, match="message 1 of the batch"):
        changed_rows(
            [orders_relation(), Update(16385, None, None, row(b"a"))], "public", "product_orders"
        )


def test_other_tables_are_none_in_the_cache() -> None:
    cache = RelationCache()
    cache.remember(orders_relation())
    assert cache.new_row(Insert(16385, row(b"a", b"b", b"c", b"d")), "public", "x") is None


# -- properties --------------------------------------------------------------

u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
i64 = st.integers(-(2**63), 2**63 - 1)
i32 = st.integers(-(2**31), 2**31 - 1)
u8 = st.integers(0, 255)

#: Names as the database could hold them: any characters but NUL (control
#: characters, quotes, non-Latin scripts), and any bytes but NUL, which
#: decode to lone surrogates where they are not UTF-8.
names = st.one_of(
    st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\0"), max_size=40),
    st.binary(max_size=40).map(lambda b: b.replace(b"\0", b"").decode("utf-8", "surrogateescape")),
)
namespaces = names.filter(bool)
#: Contents with NULs, invalid UTF-8, and now and then a very long one.
contents = st.one_of(
    st.binary(max_size=64),
    st.builds(
        lambda piece, n: piece * n,
        st.binary(min_size=1, max_size=3),
        st.sampled_from([300, 40_000, 70_000]),
    ),
)
values = st.one_of(st.none(), st.just(UNCHANGED_TOAST), contents, contents.map(Binary))
tuples = st.lists(values, max_size=8).map(tuple)
old_kinds = st.sampled_from(["K", "O"])

messages: st.SearchStrategy[Message] = st.one_of(
    st.builds(Begin, u64, i64, u32),
    st.builds(Commit, u8, u64, u64, i64),
    st.builds(Origin, u64, names),
    st.builds(
        Relation,
        u32,
        namespaces,
        names,
        st.sampled_from("dnfi"),
        st.lists(st.builds(Column, names, u32, i32, st.booleans()), max_size=8).map(tuple),
    ),
    st.builds(Type, u32, namespaces, names),
    st.builds(Insert, u32, tuples),
    st.builds(Update, u32, st.none(), st.none(), tuples),
    st.builds(lambda r, k, o, n: Update(r, o, k, n), u32, old_kinds, tuples, tuples),
    st.builds(Delete, u32, old_kinds, tuples),
    st.builds(Truncate, st.lists(u32, max_size=20).map(tuple), u8),
    st.builds(LogicalMessage, u8, u64, names, contents),
)


@given(messages)
def test_every_message_round_trips(message: Message) -> None:
    data = encode(message)
    parsed = parse_message(data)
    assert parsed == message
    # Equality takes Binary(b"x") for b"x": the bytes tell 't' from 'b' apart.
    assert encode(parsed) == data


def parses_or_refuses(data: bytes) -> None:
    """*data* parses, or is refused with a PgoutputError of bounded length; nothing else."""
    problem = ""
    try:
        parse_message(data)
    except PgoutputError as error:
        problem = str(error)
    assert len(problem) < 600


@given(st.binary(max_size=200))
def test_arbitrary_bytes(data: bytes) -> None:
    parses_or_refuses(data)


@given(st.sampled_from(b"BCORYIUDTM"), st.binary(max_size=200))
def test_arbitrary_bytes_after_a_known_type(kind: int, rest: bytes) -> None:
    parses_or_refuses(bytes([kind]) + rest)


@given(messages, st.data())
def test_any_truncation(message: Message, data: st.DataObject) -> None:
    encoded = encode(message)
    cut = data.draw(st.integers(0, len(encoded) - 1))
    with pytest.raises(PgoutputError):
        parse_message(encoded[:cut])


@given(messages, st.data())
def test_any_single_byte_mutation(message: Message, data: st.DataObject) -> None:
    encoded = encode(message)
    at = data.draw(st.integers(0, len(encoded) - 1))
    byte = data.draw(u8)
    assume(encoded[at] != byte)
    parses_or_refuses(encoded[:at] + bytes([byte]) + encoded[at + 1 :])


@given(messages, st.binary(min_size=1, max_size=8))
def test_bytes_after_a_whole_message_are_refused(message: Message, extra: bytes) -> None:
    with pytest.raises(PgoutputError, match="unexpected bytes"):
        parse_message(encode(message) + extra)
