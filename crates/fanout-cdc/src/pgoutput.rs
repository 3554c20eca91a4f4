//! Decoder for pgoutput (protocol version 1) logical replication messages.
//!
//! The input of [`decode`] is one whole `XLogData` payload as delivered by the replication stream (the
//! walsender sends exactly one logical replication message per `XLogData`). The format is described in
//! PostgreSQL's "Logical Replication Message Formats" chapter. All integers are big-endian, strings are
//! NUL-terminated and must be valid UTF-8 (the replication connection is expected to use
//! `client_encoding=UTF8`).
//!
//! Column values are not interpreted here: a text-format value is kept as the raw bytes Postgres sent
//! ([`Datum::Text`]), sliced out of the input buffer without copying. See [`crate::value`] for typing them.
//!
//! Streaming-transaction messages (protocol version 2 and later: `'S'`, `'E'`, `'c'`, `'A'`) and
//! two-phase-commit messages are not part of protocol version 1 and are rejected with
//! [`DecodeError::UnknownTag`].
//!
//! The decoder is pure (no I/O) and never panics, whatever the input: malformed input yields a
//! [`DecodeError`].

use bytes::Bytes;

/// A PostgreSQL object identifier (relation ids, type ids).
pub type Oid = u32;

/// One column of a [`Relation`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// Whether the column is part of the replica identity key (bit 1 of the column flags).
    pub key: bool,
    /// Column name.
    pub name: String,
    /// OID of the column's data type (see [`crate::value::builtin_type_name`]).
    pub type_oid: Oid,
    /// Type modifier of the column (`atttypmod`), `-1` when there is none.
    pub type_modifier: i32,
}

/// Description of a table, sent before the first change of that table in a session and again whenever
/// its definition changed. Later change messages refer to it by [`Relation::id`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    /// OID of the relation.
    pub id: Oid,
    /// Schema of the relation, exactly as sent. Postgres sends an empty string for `pg_catalog`; it is
    /// kept as `""` here, so callers that need the schema name must map `""` to `"pg_catalog"`.
    pub namespace: String,
    /// Name of the relation.
    pub name: String,
    /// Replica identity setting (`pg_class.relreplident`).
    pub replica_identity: ReplicaIdentity,
    /// Columns in attribute order, as they appear in tuples of this relation.
    pub columns: Vec<Column>,
}

/// Replica identity setting of a relation, which determines what old-row data updates and deletes carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaIdentity {
    /// `'d'`: the primary key columns (if any).
    Default,
    /// `'n'`: nothing.
    Nothing,
    /// `'f'`: all columns.
    Full,
    /// `'i'`: the columns of a specific unique index.
    Index,
}

impl ReplicaIdentity {
    /// Parses the `relreplident` byte.
    pub fn from_byte(byte: u8) -> Option<Self> {
        match byte {
            b'd' => Some(Self::Default),
            b'n' => Some(Self::Nothing),
            b'f' => Some(Self::Full),
            b'i' => Some(Self::Index),
            _ => None,
        }
    }

    /// The `relreplident` byte of this setting.
    pub fn as_byte(self) -> u8 {
        match self {
            Self::Default => b'd',
            Self::Nothing => b'n',
            Self::Full => b'f',
            Self::Index => b'i',
        }
    }
}

/// One column value of a [`Tuple`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Datum {
    /// `'n'`: SQL NULL.
    Null,
    /// `'u'`: an unchanged TOASTed value; the actual value is not sent.
    UnchangedToast,
    /// `'t'`: a value in the type's text output format (not NUL-terminated, not validated as UTF-8).
    Text(Bytes),
    /// `'b'`: a value in the type's binary format (only with the `binary` publication option).
    Binary(Bytes),
}

/// The values of one row, one [`Datum`] per column of the [`Relation`].
pub type Tuple = Vec<Datum>;

/// Which kind of old-row data an update or delete carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OldTuple {
    /// `'K'`: only the replica identity key columns are meaningful (the others are null).
    Key,
    /// `'O'`: the whole old row (replica identity `FULL`).
    Full,
}

/// A decoded pgoutput message.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// `'B'`: start of a transaction.
    Begin {
        /// LSN of the transaction's commit record.
        final_lsn: u64,
        /// Commit time in microseconds since 2000-01-01 00:00:00 UTC.
        commit_time_micros: i64,
        /// Transaction id.
        xid: u32,
    },
    /// `'C'`: end of a transaction.
    Commit {
        /// Flags (currently unused, 0).
        flags: u8,
        /// LSN of the commit record.
        commit_lsn: u64,
        /// End LSN of the transaction (the position to confirm as flushed once processed).
        end_lsn: u64,
        /// Commit time in microseconds since 2000-01-01 00:00:00 UTC.
        commit_time_micros: i64,
    },
    /// `'O'`: the transaction originated on another node (replication origin).
    Origin {
        /// LSN of the commit on the origin server.
        commit_lsn: u64,
        /// Name of the origin.
        name: String,
    },
    /// `'R'`: description of a relation.
    Relation(Relation),
    /// `'Y'`: description of a non-built-in data type used by a following relation.
    Type {
        /// OID of the type.
        oid: Oid,
        /// Schema of the type (`""` means `pg_catalog`).
        namespace: String,
        /// Name of the type.
        name: String,
    },
    /// `'I'`: a row was inserted.
    Insert {
        /// OID of the relation.
        relation: Oid,
        /// The new row.
        new: Tuple,
    },
    /// `'U'`: a row was updated.
    Update {
        /// OID of the relation.
        relation: Oid,
        /// The old row or its key, present only if the key changed or the replica identity is `FULL`.
        old: Option<(OldTuple, Tuple)>,
        /// The new row (unchanged TOASTed columns are [`Datum::UnchangedToast`]).
        new: Tuple,
    },
    /// `'D'`: a row was deleted.
    Delete {
        /// OID of the relation.
        relation: Oid,
        /// The old row's key ([`OldTuple::Key`]) or the whole old row ([`OldTuple::Full`]).
        old: (OldTuple, Tuple),
    },
    /// `'T'`: relations were truncated.
    Truncate {
        /// Option bits: [`TRUNCATE_CASCADE`], [`TRUNCATE_RESTART_IDENTITY`].
        options: u8,
        /// OIDs of the truncated relations.
        relations: Vec<Oid>,
    },
    /// `'M'`: a logical decoding message (`pg_logical_emit_message`), only sent with the `messages` option.
    LogicalMessage {
        /// Whether the message is transactional (flags bit 1).
        transactional: bool,
        /// LSN of the message.
        lsn: u64,
        /// Prefix of the message.
        prefix: String,
        /// Content of the message.
        content: Bytes,
    },
}

/// [`Message::Truncate`] option bit: `TRUNCATE ... CASCADE`.
pub const TRUNCATE_CASCADE: u8 = 1;
/// [`Message::Truncate`] option bit: `TRUNCATE ... RESTART IDENTITY`.
pub const TRUNCATE_RESTART_IDENTITY: u8 = 2;

/// Why a message could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The message ended before the named field was complete.
    #[error("pgoutput message truncated while reading {what}")]
    Truncated {
        /// The field being read.
        what: &'static str,
    },
    /// The first byte is not a known protocol version 1 message type.
    #[error("unknown pgoutput message tag {}", show_byte(.0))]
    UnknownTag(u8),
    /// The tuple marker is not the one allowed at this position (`'N'` for the new tuple, `'K'`/`'O'` for
    /// the old one).
    #[error("unexpected tuple marker {} in pgoutput message", show_byte(.0))]
    BadTupleKind(u8),
    /// A column value kind is not one of `'n'`, `'u'`, `'t'`, `'b'`.
    #[error("unknown column value kind {} in pgoutput tuple", show_byte(.0))]
    BadDatumKind(u8),
    /// The replica identity byte of a relation message is not one of `'d'`, `'n'`, `'f'`, `'i'`.
    #[error("unknown replica identity {} in pgoutput relation message", show_byte(.0))]
    BadReplicaIdentity(u8),
    /// A length field is negative.
    #[error("negative length {len} for {what} in pgoutput message")]
    NegativeLength {
        /// The field whose length is negative.
        what: &'static str,
        /// The length as sent.
        len: i32,
    },
    /// A string is not valid UTF-8.
    #[error("{what} in pgoutput message is not valid UTF-8")]
    BadUtf8 {
        /// The string field.
        what: &'static str,
    },
    /// Bytes remain after a complete message.
    #[error("{count} unexpected trailing byte(s) after pgoutput message")]
    TrailingBytes {
        /// Number of bytes left over.
        count: usize,
    },
}

/// Renders a byte for error messages: `'S' (0x53)`, or `byte 0x00` when it is not printable ASCII.
fn show_byte(byte: &u8) -> String {
    if byte.is_ascii_graphic() {
        format!("'{}' (0x{byte:02x})", char::from(*byte))
    } else {
        format!("byte 0x{byte:02x}")
    }
}

/// Decodes one message (the whole XLogData payload). Never panics on any input.
///
/// Text and binary column values share the memory of `data` (see [`Bytes::slice`]).
pub fn decode(data: &Bytes) -> Result<Message, DecodeError> {
    let mut r = Reader { buf: data, pos: 0 };
    let tag = r.u8("message tag")?;
    let message = match tag {
        b'B' => Message::Begin {
            final_lsn: r.u64("begin final LSN")?,
            commit_time_micros: r.i64("begin commit timestamp")?,
            xid: r.u32("begin xid")?,
        },
        b'C' => Message::Commit {
            flags: r.u8("commit flags")?,
            commit_lsn: r.u64("commit LSN")?,
            end_lsn: r.u64("commit end LSN")?,
            commit_time_micros: r.i64("commit timestamp")?,
        },
        b'O' => Message::Origin {
            commit_lsn: r.u64("origin commit LSN")?,
            name: r.string("origin name")?,
        },
        b'R' => Message::Relation(decode_relation(&mut r)?),
        b'Y' => Message::Type {
            oid: r.u32("type OID")?,
            namespace: r.string("type namespace")?,
            name: r.string("type name")?,
        },
        b'I' => {
            let relation = r.u32("insert relation OID")?;
            match r.u8("insert tuple marker")? {
                b'N' => Message::Insert {
                    relation,
                    new: r.tuple()?,
                },
                other => return Err(DecodeError::BadTupleKind(other)),
            }
        }
        b'U' => {
            let relation = r.u32("update relation OID")?;
            let (old, marker) = match r.u8("update tuple marker")? {
                marker @ (b'K' | b'O') => {
                    let kind = if marker == b'K' { OldTuple::Key } else { OldTuple::Full };
                    let old = r.tuple()?;
                    (Some((kind, old)), r.u8("update new tuple marker")?)
                }
                marker => (None, marker),
            };
            if marker != b'N' {
                return Err(DecodeError::BadTupleKind(marker));
            }
            Message::Update {
                relation,
                old,
                new: r.tuple()?,
            }
        }
        b'D' => {
            let relation = r.u32("delete relation OID")?;
            let kind = match r.u8("delete tuple marker")? {
                b'K' => OldTuple::Key,
                b'O' => OldTuple::Full,
                other => return Err(DecodeError::BadTupleKind(other)),
            };
            Message::Delete {
                relation,
                old: (kind, r.tuple()?),
            }
        }
        b'T' => {
            let count = r.u32("truncate relation count")?;
            let options = r.u8("truncate options")?;
            // Bound the allocation by what the input can actually hold.
            let mut relations = Vec::with_capacity((count as usize).min(r.remaining() / 4));
            for _ in 0..count {
                relations.push(r.u32("truncate relation OID")?);
            }
            Message::Truncate { options, relations }
        }
        b'M' => {
            let flags = r.u8("message flags")?;
            let lsn = r.u64("message LSN")?;
            let prefix = r.string("message prefix")?;
            let len = r.len("message content length")?;
            Message::LogicalMessage {
                transactional: flags & 1 != 0,
                lsn,
                prefix,
                content: r.bytes(len, "message content")?,
            }
        }
        other => return Err(DecodeError::UnknownTag(other)),
    };
    match r.remaining() {
        0 => Ok(message),
        count => Err(DecodeError::TrailingBytes { count }),
    }
}

/// Decodes the body of a `'R'` message.
fn decode_relation(r: &mut Reader<'_>) -> Result<Relation, DecodeError> {
    let id = r.u32("relation OID")?;
    let namespace = r.string("relation namespace")?;
    let name = r.string("relation name")?;
    let identity = r.u8("relation replica identity")?;
    let replica_identity = ReplicaIdentity::from_byte(identity).ok_or(DecodeError::BadReplicaIdentity(identity))?;
    let count = r.u16("relation column count")?;
    // Each column takes at least 10 bytes (flags, empty name, type OID, type modifier).
    let mut columns = Vec::with_capacity(usize::from(count).min(r.remaining() / 10));
    for _ in 0..count {
        let flags = r.u8("column flags")?;
        columns.push(Column {
            key: flags & 1 != 0,
            name: r.string("column name")?,
            type_oid: r.u32("column type OID")?,
            type_modifier: r.i32("column type modifier")?,
        });
    }
    Ok(Relation {
        id,
        namespace,
        name,
        replica_identity,
        columns,
    })
}

/// A bounds-checked cursor over a message.
struct Reader<'a> {
    buf: &'a Bytes,
    pos: usize,
}

impl Reader<'_> {
    /// Number of bytes not yet consumed.
    fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    /// Consumes exactly `N` bytes.
    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], DecodeError> {
        let end = self.pos.checked_add(N).ok_or(DecodeError::Truncated { what })?;
        let slice = self.buf.get(self.pos..end).ok_or(DecodeError::Truncated { what })?;
        let mut out = [0u8; N];
        out.copy_from_slice(slice);
        self.pos = end;
        Ok(out)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.array(what)?))
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array(what)?))
    }

    fn i32(&mut self, what: &'static str) -> Result<i32, DecodeError> {
        Ok(i32::from_be_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array(what)?))
    }

    fn i64(&mut self, what: &'static str) -> Result<i64, DecodeError> {
        Ok(i64::from_be_bytes(self.array(what)?))
    }

    /// Reads an Int32 length, rejecting negative values.
    fn len(&mut self, what: &'static str) -> Result<usize, DecodeError> {
        let len = self.i32(what)?;
        usize::try_from(len).map_err(|_| DecodeError::NegativeLength { what, len })
    }

    /// Consumes `len` bytes as a zero-copy slice of the input.
    fn bytes(&mut self, len: usize, what: &'static str) -> Result<Bytes, DecodeError> {
        if len > self.remaining() {
            return Err(DecodeError::Truncated { what });
        }
        let start = self.pos;
        self.pos += len;
        Ok(self.buf.slice(start..self.pos))
    }

    /// Reads a NUL-terminated UTF-8 string.
    fn string(&mut self, what: &'static str) -> Result<String, DecodeError> {
        let rest = self.buf.get(self.pos..).ok_or(DecodeError::Truncated { what })?;
        let nul = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or(DecodeError::Truncated { what })?;
        let text = rest.get(..nul).ok_or(DecodeError::Truncated { what })?;
        let text = std::str::from_utf8(text)
            .map_err(|_| DecodeError::BadUtf8 { what })?
            .to_owned();
        self.pos += nul + 1;
        Ok(text)
    }

    /// Reads a TupleData: an Int16 column count followed by one value per column.
    fn tuple(&mut self) -> Result<Tuple, DecodeError> {
        let count = self.u16("tuple column count")?;
        // Each value takes at least one byte.
        let mut tuple = Vec::with_capacity(usize::from(count).min(self.remaining()));
        for _ in 0..count {
            let datum = match self.u8("column value kind")? {
                b'n' => Datum::Null,
                b'u' => Datum::UnchangedToast,
                b't' => {
                    let len = self.len("text value length")?;
                    Datum::Text(self.bytes(len, "text value")?)
                }
                b'b' => {
                    let len = self.len("binary value length")?;
                    Datum::Binary(self.bytes(len, "binary value")?)
                }
                other => return Err(DecodeError::BadDatumKind(other)),
            };
            tuple.push(datum);
        }
        Ok(tuple)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Test-only builder of pgoutput messages.
    struct Enc(Vec<u8>);

    impl Enc {
        fn tag(tag: u8) -> Self {
            Self(vec![tag])
        }
        fn u8(mut self, v: u8) -> Self {
            self.0.push(v);
            self
        }
        fn u16(mut self, v: u16) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn u32(mut self, v: u32) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn i32(mut self, v: i32) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn u64(mut self, v: u64) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn i64(mut self, v: i64) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn str(mut self, s: &str) -> Self {
            self.0.extend_from_slice(s.as_bytes());
            self.0.push(0);
            self
        }
        fn raw(mut self, b: &[u8]) -> Self {
            self.0.extend_from_slice(b);
            self
        }
        fn tuple(mut self, values: &[Datum]) -> Self {
            self = self.u16(values.len() as u16);
            for v in values {
                self = match v {
                    Datum::Null => self.u8(b'n'),
                    Datum::UnchangedToast => self.u8(b'u'),
                    Datum::Text(b) => self.u8(b't').i32(b.len() as i32).raw(b),
                    Datum::Binary(b) => self.u8(b'b').i32(b.len() as i32).raw(b),
                };
            }
            self
        }
        fn bytes(self) -> Bytes {
            Bytes::from(self.0)
        }
    }

    fn text(s: &str) -> Datum {
        Datum::Text(Bytes::copy_from_slice(s.as_bytes()))
    }

    fn sample_row() -> Vec<Datum> {
        vec![
            text("42"),
            Datum::Null,
            Datum::UnchangedToast,
            Datum::Binary(Bytes::from_static(&[0, 1, 2, 0xff])),
        ]
    }

    /// One valid instance of every message kind, with its expected decoding.
    fn samples() -> Vec<(Bytes, Message)> {
        let relation = Relation {
            id: 16384,
            namespace: "public".into(),
            name: "messages".into(),
            replica_identity: ReplicaIdentity::Default,
            columns: vec![
                Column {
                    key: true,
                    name: "id".into(),
                    type_oid: 20,
                    type_modifier: -1,
                },
                Column {
                    key: false,
                    name: "body".into(),
                    type_oid: 1043,
                    type_modifier: 259,
                },
            ],
        };
        vec![
            (
                Enc::tag(b'B')
                    .u64(0x0000_0001_6B37_4D48)
                    .i64(817_960_605_123_456)
                    .u32(771)
                    .bytes(),
                Message::Begin {
                    final_lsn: 0x0000_0001_6B37_4D48,
                    commit_time_micros: 817_960_605_123_456,
                    xid: 771,
                },
            ),
            (
                Enc::tag(b'C').u8(0).u64(100).u64(200).i64(-5).bytes(),
                Message::Commit {
                    flags: 0,
                    commit_lsn: 100,
                    end_lsn: 200,
                    commit_time_micros: -5,
                },
            ),
            (
                Enc::tag(b'O').u64(7).str("node_a").bytes(),
                Message::Origin {
                    commit_lsn: 7,
                    name: "node_a".into(),
                },
            ),
            (
                Enc::tag(b'R')
                    .u32(16384)
                    .str("public")
                    .str("messages")
                    .u8(b'd')
                    .u16(2)
                    .u8(1)
                    .str("id")
                    .u32(20)
                    .i32(-1)
                    .u8(0)
                    .str("body")
                    .u32(1043)
                    .i32(259)
                    .bytes(),
                Message::Relation(relation),
            ),
            (
                Enc::tag(b'Y').u32(99999).str("public").str("mood").bytes(),
                Message::Type {
                    oid: 99999,
                    namespace: "public".into(),
                    name: "mood".into(),
                },
            ),
            (
                Enc::tag(b'I').u32(16384).u8(b'N').tuple(&sample_row()).bytes(),
                Message::Insert {
                    relation: 16384,
                    new: sample_row(),
                },
            ),
            (
                Enc::tag(b'U').u32(16384).u8(b'N').tuple(&[text("1")]).bytes(),
                Message::Update {
                    relation: 16384,
                    old: None,
                    new: vec![text("1")],
                },
            ),
            (
                Enc::tag(b'U')
                    .u32(16384)
                    .u8(b'K')
                    .tuple(&[text("1"), Datum::Null])
                    .u8(b'N')
                    .tuple(&[text("2")])
                    .bytes(),
                Message::Update {
                    relation: 16384,
                    old: Some((OldTuple::Key, vec![text("1"), Datum::Null])),
                    new: vec![text("2")],
                },
            ),
            (
                Enc::tag(b'U')
                    .u32(5)
                    .u8(b'O')
                    .tuple(&sample_row())
                    .u8(b'N')
                    .tuple(&sample_row())
                    .bytes(),
                Message::Update {
                    relation: 5,
                    old: Some((OldTuple::Full, sample_row())),
                    new: sample_row(),
                },
            ),
            (
                Enc::tag(b'D').u32(16384).u8(b'K').tuple(&[text("1")]).bytes(),
                Message::Delete {
                    relation: 16384,
                    old: (OldTuple::Key, vec![text("1")]),
                },
            ),
            (
                Enc::tag(b'D').u32(16384).u8(b'O').tuple(&sample_row()).bytes(),
                Message::Delete {
                    relation: 16384,
                    old: (OldTuple::Full, sample_row()),
                },
            ),
            (
                Enc::tag(b'T')
                    .u32(2)
                    .u8(TRUNCATE_CASCADE | TRUNCATE_RESTART_IDENTITY)
                    .u32(10)
                    .u32(11)
                    .bytes(),
                Message::Truncate {
                    options: 3,
                    relations: vec![10, 11],
                },
            ),
            (
                Enc::tag(b'M').u8(1).u64(55).str("fanout").i32(5).raw(b"hello").bytes(),
                Message::LogicalMessage {
                    transactional: true,
                    lsn: 55,
                    prefix: "fanout".into(),
                    content: Bytes::from_static(b"hello"),
                },
            ),
        ]
    }

    #[test]
    fn decodes_every_message_kind() {
        for (bytes, expected) in samples() {
            assert_eq!(decode(&bytes), Ok(expected));
        }
    }

    #[test]
    fn every_truncation_is_an_error() {
        for (bytes, _) in samples() {
            for len in 0..bytes.len() {
                let prefix = bytes.slice(..len);
                let result = decode(&prefix);
                assert!(
                    matches!(result, Err(DecodeError::Truncated { .. })),
                    "prefix {len} of {bytes:?}: {result:?}"
                );
            }
        }
    }

    #[test]
    fn truncated_errors_name_the_field() {
        assert_eq!(
            decode(&Bytes::new()),
            Err(DecodeError::Truncated { what: "message tag" })
        );
        let msg = Enc::tag(b'B').u64(1).bytes();
        assert_eq!(
            decode(&msg),
            Err(DecodeError::Truncated {
                what: "begin commit timestamp"
            })
        );
        let msg = Enc::tag(b'O').u64(1).raw(b"no-nul").bytes();
        assert_eq!(decode(&msg), Err(DecodeError::Truncated { what: "origin name" }));
        let msg = Enc::tag(b'I')
            .u32(1)
            .u8(b'N')
            .u16(1)
            .u8(b't')
            .i32(10)
            .raw(b"short")
            .bytes();
        assert_eq!(decode(&msg), Err(DecodeError::Truncated { what: "text value" }));
        let msg = Enc::tag(b'T').u32(u32::MAX).u8(0).u32(1).bytes();
        assert_eq!(
            decode(&msg),
            Err(DecodeError::Truncated {
                what: "truncate relation OID"
            })
        );
    }

    #[test]
    fn text_and_binary_datums_share_the_input_buffer() {
        let msg = Enc::tag(b'I')
            .u32(1)
            .u8(b'N')
            .tuple(&[text("hello"), Datum::Binary(Bytes::from_static(b"\x00\x01"))]);
        let bytes = msg.bytes();
        let Ok(Message::Insert { new, .. }) = decode(&bytes) else {
            panic!("not an insert")
        };
        let base = bytes.as_ptr() as usize;
        let range = base..base + bytes.len();
        for datum in &new {
            let (Datum::Text(b) | Datum::Binary(b)) = datum else {
                panic!("unexpected {datum:?}")
            };
            assert!(range.contains(&(b.as_ptr() as usize)), "datum was copied");
        }
        assert_eq!(new[0], text("hello"));
        assert_eq!(new[1], Datum::Binary(Bytes::from_static(b"\x00\x01")));
    }

    #[test]
    fn empty_values_and_tuples() {
        let msg = Enc::tag(b'I')
            .u32(1)
            .u8(b'N')
            .tuple(&[text(""), Datum::Binary(Bytes::new())])
            .bytes();
        assert_eq!(
            decode(&msg),
            Ok(Message::Insert {
                relation: 1,
                new: vec![text(""), Datum::Binary(Bytes::new())]
            })
        );
        let msg = Enc::tag(b'I').u32(1).u8(b'N').tuple(&[]).bytes();
        assert_eq!(
            decode(&msg),
            Ok(Message::Insert {
                relation: 1,
                new: vec![]
            })
        );
        let msg = Enc::tag(b'T').u32(0).u8(0).bytes();
        assert_eq!(
            decode(&msg),
            Ok(Message::Truncate {
                options: 0,
                relations: vec![]
            })
        );
        let msg = Enc::tag(b'M').u8(0).u64(1).str("").i32(0).bytes();
        assert_eq!(
            decode(&msg),
            Ok(Message::LogicalMessage {
                transactional: false,
                lsn: 1,
                prefix: String::new(),
                content: Bytes::new()
            })
        );
    }

    #[test]
    fn relation_variants() {
        for (byte, identity) in [
            (b'd', ReplicaIdentity::Default),
            (b'n', ReplicaIdentity::Nothing),
            (b'f', ReplicaIdentity::Full),
            (b'i', ReplicaIdentity::Index),
        ] {
            assert_eq!(identity.as_byte(), byte);
            // Empty namespace (pg_catalog) is kept as sent; key flag is bit 1 only.
            let msg = Enc::tag(b'R')
                .u32(1)
                .str("")
                .str("t")
                .u8(byte)
                .u16(1)
                .u8(3)
                .str("c")
                .u32(25)
                .i32(-1)
                .bytes();
            let expected = Relation {
                id: 1,
                namespace: String::new(),
                name: "t".into(),
                replica_identity: identity,
                columns: vec![Column {
                    key: true,
                    name: "c".into(),
                    type_oid: 25,
                    type_modifier: -1,
                }],
            };
            assert_eq!(decode(&msg), Ok(Message::Relation(expected)));
        }
        let msg = Enc::tag(b'R').u32(1).str("s").str("t").u8(b'x').u16(0).bytes();
        assert_eq!(decode(&msg), Err(DecodeError::BadReplicaIdentity(b'x')));
        let msg = Enc::tag(b'R').u32(1).str("s").str("t").u8(b'f').u16(0).bytes();
        assert!(matches!(decode(&msg), Ok(Message::Relation(Relation { columns, .. })) if columns.is_empty()));
    }

    #[test]
    fn malformed_inputs() {
        for tag in [b'S', b'E', b'c', b'A', b'P', b'K', b'x', 0] {
            assert_eq!(decode(&Enc::tag(tag).u64(0).bytes()), Err(DecodeError::UnknownTag(tag)));
        }
        let msg = Enc::tag(b'I').u32(1).u8(b'K').tuple(&[]).bytes();
        assert_eq!(decode(&msg), Err(DecodeError::BadTupleKind(b'K')));
        let msg = Enc::tag(b'U').u32(1).u8(b'X').tuple(&[]).bytes();
        assert_eq!(decode(&msg), Err(DecodeError::BadTupleKind(b'X')));
        let msg = Enc::tag(b'U').u32(1).u8(b'K').tuple(&[]).u8(b'O').tuple(&[]).bytes();
        assert_eq!(decode(&msg), Err(DecodeError::BadTupleKind(b'O')));
        let msg = Enc::tag(b'D').u32(1).u8(b'N').tuple(&[]).bytes();
        assert_eq!(decode(&msg), Err(DecodeError::BadTupleKind(b'N')));
        let msg = Enc::tag(b'I').u32(1).u8(b'N').u16(1).u8(b'z').bytes();
        assert_eq!(decode(&msg), Err(DecodeError::BadDatumKind(b'z')));
        let msg = Enc::tag(b'I').u32(1).u8(b'N').u16(1).u8(b't').i32(-1).bytes();
        assert_eq!(
            decode(&msg),
            Err(DecodeError::NegativeLength {
                what: "text value length",
                len: -1
            })
        );
        let msg = Enc::tag(b'M').u8(0).u64(0).str("p").i32(i32::MIN).bytes();
        assert_eq!(
            decode(&msg),
            Err(DecodeError::NegativeLength {
                what: "message content length",
                len: i32::MIN
            })
        );
        let msg = Enc::tag(b'Y').u32(1).raw(b"\xff\xfe\0").str("t").bytes();
        assert_eq!(decode(&msg), Err(DecodeError::BadUtf8 { what: "type namespace" }));
        let msg = Enc::tag(b'C').u8(0).u64(1).u64(2).i64(3).raw(b"xy").bytes();
        assert_eq!(decode(&msg), Err(DecodeError::TrailingBytes { count: 2 }));
    }

    #[test]
    fn error_messages_are_readable() {
        assert_eq!(
            DecodeError::UnknownTag(b'S').to_string(),
            "unknown pgoutput message tag 'S' (0x53)"
        );
        assert_eq!(
            DecodeError::BadDatumKind(0).to_string(),
            "unknown column value kind byte 0x00 in pgoutput tuple"
        );
        assert_eq!(
            DecodeError::Truncated { what: "commit LSN" }.to_string(),
            "pgoutput message truncated while reading commit LSN"
        );
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let tags = b"BCORYIUDTM";
        let mut decoded = 0;
        for i in 0..20_000 {
            let len = (next() % 64) as usize;
            let mut buf: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            // Mostly start with a valid tag so the decoder gets past the first byte.
            if i % 4 != 0 && !buf.is_empty() {
                buf[0] = tags[(next() % tags.len() as u64) as usize];
            }
            decoded += usize::from(decode(&Bytes::from(buf)).is_ok());
        }
        // Not an assertion on behaviour, just that the loop ran; most random inputs are errors.
        assert!(decoded < 20_000);
    }

    #[test]
    fn mutated_valid_messages_never_panic() {
        let mut state: u64 = 0x0123_4567_89AB_CDEF;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for (bytes, _) in samples() {
            for _ in 0..500 {
                let mut buf = bytes.to_vec();
                let flips = 1 + next() % 3;
                for _ in 0..flips {
                    let at = (next() % buf.len() as u64) as usize;
                    buf[at] = next() as u8;
                }
                let _ = decode(&Bytes::from(buf));
            }
        }
    }
}
