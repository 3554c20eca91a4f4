//! Typing of pgoutput column values the way Supabase Realtime delivers them.
//!
//! Supabase Realtime sends `record`/`old_record` values as PostgreSQL's `to_jsonb` would render them:
//! integers and numerics as JSON numbers, booleans as `true`/`false`, `json`/`jsonb` as parsed JSON,
//! timestamps as ISO-8601 strings, arrays as JSON arrays and everything else as strings. pgoutput delivers
//! values in the types' text output format ([`crate::pgoutput::Datum::Text`]); [`text_to_json`] converts
//! such a text to JSON given the column's type OID.
//!
//! The conversions assume the replication session uses the default `DateStyle` (`ISO`), and
//! `extra_float_digits` ≥ 1 (the default since PostgreSQL 12); a value in another shape is never rejected
//! but is delivered as a JSON string of the raw text.
//!
//! Everything here is pure and infallible.

use serde_json::{Number, Value};

use crate::pgoutput::Oid;

/// OIDs of the built-in types that [`text_to_json`] converts specially.
pub mod oids {
    use super::Oid;

    /// `bool`.
    pub const BOOL: Oid = 16;
    /// `int8` (`bigint`).
    pub const INT8: Oid = 20;
    /// `int2` (`smallint`).
    pub const INT2: Oid = 21;
    /// `int4` (`integer`).
    pub const INT4: Oid = 23;
    /// `text`.
    pub const TEXT: Oid = 25;
    /// `oid`.
    pub const OID: Oid = 26;
    /// `json`.
    pub const JSON: Oid = 114;
    /// `box` (the only built-in type whose array delimiter is `;`).
    pub const BOX: Oid = 603;
    /// `float4` (`real`).
    pub const FLOAT4: Oid = 700;
    /// `float8` (`double precision`).
    pub const FLOAT8: Oid = 701;
    /// `varchar`.
    pub const VARCHAR: Oid = 1043;
    /// `date`.
    pub const DATE: Oid = 1082;
    /// `time`.
    pub const TIME: Oid = 1083;
    /// `timestamp` (without time zone).
    pub const TIMESTAMP: Oid = 1114;
    /// `timestamptz`.
    pub const TIMESTAMPTZ: Oid = 1184;
    /// `timetz`.
    pub const TIMETZ: Oid = 1266;
    /// `numeric`.
    pub const NUMERIC: Oid = 1700;
    /// `uuid`.
    pub const UUID: Oid = 2950;
    /// `jsonb`.
    pub const JSONB: Oid = 3802;
}

/// Built-in types: `(oid, pg_type.typname, element type OID for array types)`, sorted by OID.
const BUILTIN_TYPES: &[(Oid, &str, Option<Oid>)] = &[
    (16, "bool", None),
    (17, "bytea", None),
    (18, "char", None),
    (19, "name", None),
    (20, "int8", None),
    (21, "int2", None),
    (22, "int2vector", None),
    (23, "int4", None),
    (24, "regproc", None),
    (25, "text", None),
    (26, "oid", None),
    (27, "tid", None),
    (28, "xid", None),
    (29, "cid", None),
    (30, "oidvector", None),
    (114, "json", None),
    (142, "xml", None),
    (143, "_xml", Some(142)),
    (199, "_json", Some(114)),
    (271, "_xid8", Some(5069)),
    (600, "point", None),
    (601, "lseg", None),
    (602, "path", None),
    (603, "box", None),
    (604, "polygon", None),
    (628, "line", None),
    (629, "_line", Some(628)),
    (650, "cidr", None),
    (651, "_cidr", Some(650)),
    (700, "float4", None),
    (701, "float8", None),
    (718, "circle", None),
    (719, "_circle", Some(718)),
    (774, "macaddr8", None),
    (775, "_macaddr8", Some(774)),
    (790, "money", None),
    (791, "_money", Some(790)),
    (829, "macaddr", None),
    (869, "inet", None),
    (1000, "_bool", Some(16)),
    (1001, "_bytea", Some(17)),
    (1002, "_char", Some(18)),
    (1003, "_name", Some(19)),
    (1005, "_int2", Some(21)),
    (1006, "_int2vector", Some(22)),
    (1007, "_int4", Some(23)),
    (1008, "_regproc", Some(24)),
    (1009, "_text", Some(25)),
    (1010, "_tid", Some(27)),
    (1011, "_xid", Some(28)),
    (1012, "_cid", Some(29)),
    (1013, "_oidvector", Some(30)),
    (1014, "_bpchar", Some(1042)),
    (1015, "_varchar", Some(1043)),
    (1016, "_int8", Some(20)),
    (1017, "_point", Some(600)),
    (1018, "_lseg", Some(601)),
    (1019, "_path", Some(602)),
    (1020, "_box", Some(603)),
    (1021, "_float4", Some(700)),
    (1022, "_float8", Some(701)),
    (1027, "_polygon", Some(604)),
    (1028, "_oid", Some(26)),
    (1040, "_macaddr", Some(829)),
    (1041, "_inet", Some(869)),
    (1042, "bpchar", None),
    (1043, "varchar", None),
    (1082, "date", None),
    (1083, "time", None),
    (1114, "timestamp", None),
    (1115, "_timestamp", Some(1114)),
    (1182, "_date", Some(1082)),
    (1183, "_time", Some(1083)),
    (1184, "timestamptz", None),
    (1185, "_timestamptz", Some(1184)),
    (1186, "interval", None),
    (1187, "_interval", Some(1186)),
    (1231, "_numeric", Some(1700)),
    (1266, "timetz", None),
    (1270, "_timetz", Some(1266)),
    (1560, "bit", None),
    (1561, "_bit", Some(1560)),
    (1562, "varbit", None),
    (1563, "_varbit", Some(1562)),
    (1700, "numeric", None),
    (1790, "refcursor", None),
    (2201, "_refcursor", Some(1790)),
    (2205, "regclass", None),
    (2206, "regtype", None),
    (2210, "_regclass", Some(2205)),
    (2211, "_regtype", Some(2206)),
    (2950, "uuid", None),
    (2951, "_uuid", Some(2950)),
    (3220, "pg_lsn", None),
    (3221, "_pg_lsn", Some(3220)),
    (3614, "tsvector", None),
    (3615, "tsquery", None),
    (3643, "_tsvector", Some(3614)),
    (3645, "_tsquery", Some(3615)),
    (3802, "jsonb", None),
    (3807, "_jsonb", Some(3802)),
    (3904, "int4range", None),
    (3905, "_int4range", Some(3904)),
    (3906, "numrange", None),
    (3907, "_numrange", Some(3906)),
    (3908, "tsrange", None),
    (3909, "_tsrange", Some(3908)),
    (3910, "tstzrange", None),
    (3911, "_tstzrange", Some(3910)),
    (3912, "daterange", None),
    (3913, "_daterange", Some(3912)),
    (3926, "int8range", None),
    (3927, "_int8range", Some(3926)),
    (4072, "jsonpath", None),
    (4073, "_jsonpath", Some(4072)),
    (5069, "xid8", None),
];

fn builtin(oid: Oid) -> Option<&'static (Oid, &'static str, Option<Oid>)> {
    let index = BUILTIN_TYPES.binary_search_by_key(&oid, |entry| entry.0).ok()?;
    BUILTIN_TYPES.get(index)
}

/// Static name of a built-in type OID as Postgres' `pg_type.typname` spells it (`"int4"`, `"timestamptz"`,
/// `"_int4"` for `int4[]`, …), `None` if the OID is not a known built-in type.
///
/// Types created by extensions or users (enums, domains, composites, PostGIS, …) have OIDs assigned at
/// creation time; pgoutput describes them with a [`crate::pgoutput::Message::Type`] message instead.
pub fn builtin_type_name(oid: Oid) -> Option<&'static str> {
    builtin(oid).map(|entry| entry.1)
}

/// The element type OID of a built-in array type OID (e.g. 1007 `int4[]` → 23 `int4`), `None` if `oid` is
/// not a known built-in array type.
pub fn array_element(oid: Oid) -> Option<Oid> {
    builtin(oid).and_then(|entry| entry.2)
}

/// Converts a pgoutput text-format value of the given type to JSON, like `to_jsonb` would.
///
/// Never fails: a value that does not parse as its type becomes a JSON string of the raw text.
///
/// * `bool`: `t`/`f` → `true`/`false`.
/// * `int2`, `int4`, `int8`, `oid`: a JSON integer.
/// * `float4`, `float8`: a JSON number; `NaN`, `Infinity` and `-Infinity` stay strings (as in `to_jsonb`).
/// * `numeric`: a JSON number (an exact integer when it fits in 64 bits, else an `f64`); `NaN` and the
///   infinities stay strings. Precision beyond an `f64` is lost and trailing zeros are not kept (`1.50`
///   becomes `1.5`): `to_jsonb` keeps the exact digits, but serde_json's `arbitrary_precision` feature is
///   not enabled in this workspace.
/// * `json`, `jsonb`: the parsed JSON document.
/// * `timestamptz`: ISO 8601, `2026-11-22 03:16:45.123456+00` → `2026-11-22T03:16:45.123456+00:00`
///   (a `+HH` offset is completed to `+HH:00`; `+05:30` is kept). `timestamp` likewise without an offset,
///   and `timetz` gets its offset completed the same way (`03:16:45+02` → `03:16:45+02:00`), as `to_jsonb`
///   does. `infinity`, `-infinity` and BC dates are kept as sent.
/// * Built-in array types (see [`array_element`]): a JSON array whose elements are converted with the
///   element type, unquoted `NULL` becoming `null`; multi-dimensional arrays become nested arrays. An array
///   with explicit bounds (`[0:1]={1,2}`) is kept as a string of the raw text.
/// * Everything else (`text`, `varchar`, `uuid`, `date`, `time`, `interval`, `bytea`, unknown OIDs, …): a
///   JSON string of the text.
pub fn text_to_json(type_oid: Oid, text: &str) -> Value {
    convert(type_oid, text).unwrap_or_else(|| Value::String(text.to_owned()))
}

/// The typed conversion, `None` when `text` must be delivered as a plain string.
fn convert(type_oid: Oid, text: &str) -> Option<Value> {
    match type_oid {
        oids::BOOL => match text {
            "t" => Some(Value::Bool(true)),
            "f" => Some(Value::Bool(false)),
            _ => None,
        },
        oids::INT2 | oids::INT4 | oids::INT8 => text.parse::<i64>().ok().map(Value::from),
        oids::OID => text.parse::<u32>().ok().map(Value::from),
        oids::FLOAT4 | oids::FLOAT8 => finite_number(text),
        oids::NUMERIC => {
            if let Ok(int) = text.parse::<i64>() {
                Some(Value::from(int))
            } else if let Ok(int) = text.parse::<u64>() {
                Some(Value::from(int))
            } else {
                finite_number(text)
            }
        }
        oids::JSON | oids::JSONB => serde_json::from_str(text).ok(),
        oids::TIMESTAMPTZ => iso_timestamp(text, true).map(Value::String),
        oids::TIMESTAMP => iso_timestamp(text, false).map(Value::String),
        oids::TIMETZ => iso_timetz(text).map(Value::String),
        _ => {
            let element = array_element(type_oid)?;
            let delimiter = if element == oids::BOX { b';' } else { b',' };
            ArrayParser {
                text,
                pos: 0,
                element,
                delimiter,
            }
            .parse()
        }
    }
}

/// A JSON number for a finite float text (`NaN`/`Infinity` and overflowing values give `None`).
fn finite_number(text: &str) -> Option<Value> {
    let float = text.parse::<f64>().ok().filter(|f| f.is_finite())?;
    Number::from_f64(float).map(Value::Number)
}

/// `YYYY-MM-DD HH:MM:SS[.ffffff][±HH[:MM[:SS]]]` → `YYYY-MM-DDTHH:MM:SS[.ffffff][±HH:MM[:SS]]`.
fn iso_timestamp(text: &str, with_offset: bool) -> Option<String> {
    let (date, rest) = text.split_once(' ')?;
    if !is_date(date) {
        return None;
    }
    let time = if with_offset {
        iso_timetz(rest)?
    } else {
        is_time(rest).then(|| rest.to_owned())?
    };
    Some(format!("{date}T{time}"))
}

/// `HH:MM:SS[.ffffff]±HH[:MM[:SS]]` → `HH:MM:SS[.ffffff]±HH:MM[:SS]`.
fn iso_timetz(text: &str) -> Option<String> {
    let split = text.rfind(['+', '-'])?;
    let (time, offset) = text.split_at(split);
    if !is_time(time) {
        return None;
    }
    let (sign, offset) = offset.split_at(1);
    let parts: Vec<&str> = offset.split(':').collect();
    if parts.len() > 3 || !parts.iter().all(|part| is_digits(part, 2)) {
        return None;
    }
    let suffix = if parts.len() == 1 { ":00" } else { "" };
    Some(format!("{time}{sign}{offset}{suffix}"))
}

/// `YYYY-MM-DD` with at least four year digits.
fn is_date(date: &str) -> bool {
    let mut parts = date.split('-');
    let (Some(year), Some(month), Some(day), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    year.len() >= 4 && year.bytes().all(|b| b.is_ascii_digit()) && is_digits(month, 2) && is_digits(day, 2)
}

/// `HH:MM:SS` optionally followed by `.` and at least one digit.
fn is_time(time: &str) -> bool {
    let (whole, fraction) = match time.split_once('.') {
        Some((whole, fraction)) => (whole, Some(fraction)),
        None => (time, None),
    };
    let mut parts = whole.split(':');
    let hms = (parts.next(), parts.next(), parts.next(), parts.next());
    let (Some(h), Some(m), Some(s), None) = hms else {
        return false;
    };
    is_digits(h, 2)
        && is_digits(m, 2)
        && is_digits(s, 2)
        && fraction.is_none_or(|f| !f.is_empty() && f.bytes().all(|b| b.is_ascii_digit()))
}

/// Whether `text` is exactly `len` ASCII digits.
fn is_digits(text: &str, len: usize) -> bool {
    text.len() == len && text.bytes().all(|b| b.is_ascii_digit())
}

/// Maximum number of array dimensions Postgres supports (`MAXDIM`).
const MAX_DIMENSIONS: usize = 6;

/// Parser of Postgres array literals (`array_out` format) into JSON arrays.
struct ArrayParser<'a> {
    text: &'a str,
    pos: usize,
    element: Oid,
    delimiter: u8,
}

impl ArrayParser<'_> {
    /// Parses the whole text as one array; `None` if it is not a plain array literal.
    fn parse(mut self) -> Option<Value> {
        self.skip_whitespace();
        // Explicit bounds (`[0:1]={1,2}`) start with '[' and are not handled.
        let value = self.array(1)?;
        self.skip_whitespace();
        (self.pos == self.text.len()).then_some(value)
    }

    fn peek(&self) -> Option<u8> {
        self.text.as_bytes().get(self.pos).copied()
    }

    fn skip_whitespace(&mut self) {
        while self.peek().is_some_and(|b| b.is_ascii_whitespace()) {
            self.pos += 1;
        }
    }

    /// Parses `{…}` at the current position, at nesting level `depth` (1-based).
    fn array(&mut self, depth: usize) -> Option<Value> {
        if depth > MAX_DIMENSIONS || self.peek() != Some(b'{') {
            return None;
        }
        self.pos += 1;
        self.skip_whitespace();
        let mut items = Vec::new();
        if self.peek() == Some(b'}') {
            self.pos += 1;
            return Some(Value::Array(items));
        }
        // All items of one level must be sub-arrays, or none of them.
        let nested = self.peek() == Some(b'{');
        loop {
            self.skip_whitespace();
            let item = match self.peek()? {
                b'{' if nested => self.array(depth + 1)?,
                b'{' => return None,
                _ if nested => return None,
                b'"' => text_to_json(self.element, &self.quoted()?),
                _ => self.unquoted()?,
            };
            items.push(item);
            self.skip_whitespace();
            match self.peek()? {
                b if b == self.delimiter => self.pos += 1,
                b'}' => {
                    self.pos += 1;
                    return Some(Value::Array(items));
                }
                _ => return None,
            }
        }
    }

    /// Parses a double-quoted element with backslash escapes, returning its unescaped text.
    fn quoted(&mut self) -> Option<String> {
        let bytes = self.text.as_bytes();
        let mut out = String::new();
        self.pos += 1; // opening quote
        let mut segment = self.pos;
        loop {
            match *bytes.get(self.pos)? {
                b'"' => {
                    out.push_str(self.text.get(segment..self.pos)?);
                    self.pos += 1;
                    return Some(out);
                }
                b'\\' => {
                    out.push_str(self.text.get(segment..self.pos)?);
                    // The escaped character (possibly multi-byte) starts the next segment; skipping its first
                    // byte is enough since continuation bytes never equal '"' or '\\'.
                    segment = self.pos + 1;
                    self.pos += 2;
                }
                _ => self.pos += 1,
            }
        }
    }

    /// Parses an unquoted element: `NULL` or a plain value (as `array_out` writes them, without escapes).
    fn unquoted(&mut self) -> Option<Value> {
        let start = self.pos;
        while let Some(b) = self.peek() {
            match b {
                b'}' => break,
                b'{' | b'"' | b'\\' => return None,
                b if b == self.delimiter => break,
                _ => self.pos += 1,
            }
        }
        let raw = self
            .text
            .get(start..self.pos)?
            .trim_end_matches(|c: char| c.is_ascii_whitespace());
        if raw.is_empty() {
            None
        } else if raw.eq_ignore_ascii_case("NULL") {
            Some(Value::Null)
        } else {
            Some(text_to_json(self.element, raw))
        }
    }
}

/// Formats microseconds since 2000-01-01 00:00:00 UTC (the pgoutput commit time) as RFC 3339 UTC with
/// milliseconds, e.g. `"2026-11-22T03:16:45.123Z"` (the shape Supabase's `commit_timestamp` has).
///
/// Sub-millisecond digits are truncated toward the past (so the result never lies in the future of the
/// commit). Years outside 0000–9999 (only reachable with absurd inputs) are written with more digits and,
/// before year 0 of the proleptic Gregorian calendar, a leading `-`.
pub fn commit_timestamp(micros_since_2000: i64) -> String {
    /// Days from 1970-01-01 to 2000-01-01.
    const UNIX_DAYS_AT_2000: i64 = 10_957;
    const MILLIS_PER_DAY: i64 = 86_400_000;
    let millis = micros_since_2000.div_euclid(1000);
    let days = millis.div_euclid(MILLIS_PER_DAY) + UNIX_DAYS_AT_2000;
    let of_day = millis.rem_euclid(MILLIS_PER_DAY);
    let (year, month, day) = civil_from_days(days);
    let (hour, minute) = (of_day / 3_600_000, of_day / 60_000 % 60);
    let (second, milli) = (of_day / 1000 % 60, of_day % 1000);
    let sign = if year < 0 { "-" } else { "" };
    let year = year.unsigned_abs();
    format!("{sign}{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}.{milli:03}Z")
}

/// Converts days since 1970-01-01 to a proleptic Gregorian `(year, month, day)`.
///
/// Howard Hinnant's `civil_from_days` algorithm; exact for every `i64` day count whose year fits in `i64`
/// (the caller passes at most ~10^8 in magnitude).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    // Shift the epoch to 0000-03-01 so leap days fall at the end of each (March-based) year.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097); // [0, 146096]
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365; // [0, 399]
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100); // [0, 365]
    let month_index = (5 * day_of_year + 2) / 153; // [0, 11], 0 = March
    let day = day_of_year - (153 * month_index + 2) / 5 + 1; // [1, 31]
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    }; // [1, 12]
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    // Both are within small ranges by construction.
    (year, month as u32, day as u32)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn builtin_table_is_sorted_and_consistent() {
        for pair in BUILTIN_TYPES.windows(2) {
            assert!(pair[0].0 < pair[1].0, "{:?} not before {:?}", pair[0], pair[1]);
        }
        for &(oid, name, element) in BUILTIN_TYPES {
            match element {
                Some(element) => {
                    let element_name = builtin_type_name(element).expect("element type is in the table");
                    assert_eq!(name, format!("_{element_name}"), "array {oid}");
                }
                None => assert!(!name.starts_with('_'), "{name} has no element type"),
            }
        }
    }

    #[test]
    fn type_names() {
        let expected = [
            (16, "bool"),
            (17, "bytea"),
            (18, "char"),
            (19, "name"),
            (20, "int8"),
            (21, "int2"),
            (23, "int4"),
            (25, "text"),
            (26, "oid"),
            (114, "json"),
            (650, "cidr"),
            (700, "float4"),
            (701, "float8"),
            (829, "macaddr"),
            (869, "inet"),
            (1042, "bpchar"),
            (1043, "varchar"),
            (1082, "date"),
            (1083, "time"),
            (1114, "timestamp"),
            (1184, "timestamptz"),
            (1186, "interval"),
            (1266, "timetz"),
            (1700, "numeric"),
            (2950, "uuid"),
            (3802, "jsonb"),
            (199, "_json"),
            (1000, "_bool"),
            (1005, "_int2"),
            (1007, "_int4"),
            (1009, "_text"),
            (1015, "_varchar"),
            (1016, "_int8"),
            (1021, "_float4"),
            (1022, "_float8"),
            (1115, "_timestamp"),
            (1182, "_date"),
            (1185, "_timestamptz"),
            (1231, "_numeric"),
            (2951, "_uuid"),
            (3807, "_jsonb"),
        ];
        for (oid, name) in expected {
            assert_eq!(builtin_type_name(oid), Some(name), "oid {oid}");
        }
        assert_eq!(builtin_type_name(0), None);
        assert_eq!(builtin_type_name(16_385), None);
        assert_eq!(builtin_type_name(u32::MAX), None);
    }

    #[test]
    fn array_elements() {
        assert_eq!(array_element(1007), Some(23));
        assert_eq!(array_element(1009), Some(25));
        assert_eq!(array_element(1185), Some(1184));
        assert_eq!(array_element(3807), Some(3802));
        assert_eq!(array_element(199), Some(114));
        assert_eq!(array_element(23), None);
        assert_eq!(array_element(3802), None);
        assert_eq!(array_element(99_999), None);
    }

    #[test]
    fn booleans() {
        assert_eq!(text_to_json(oids::BOOL, "t"), json!(true));
        assert_eq!(text_to_json(oids::BOOL, "f"), json!(false));
        assert_eq!(text_to_json(oids::BOOL, "true"), json!("true"));
    }

    #[test]
    fn integers() {
        assert_eq!(text_to_json(oids::INT2, "-32768"), json!(-32768));
        assert_eq!(text_to_json(oids::INT4, "42"), json!(42));
        assert_eq!(text_to_json(oids::INT8, "9223372036854775807"), json!(i64::MAX));
        assert_eq!(text_to_json(oids::INT8, "-9223372036854775808"), json!(i64::MIN));
        assert_eq!(text_to_json(oids::OID, "4294967295"), json!(u32::MAX));
        assert_eq!(text_to_json(oids::OID, "-1"), json!("-1"));
        assert_eq!(text_to_json(oids::INT4, "4x"), json!("4x"));
        assert_eq!(text_to_json(oids::INT4, ""), json!(""));
    }

    #[test]
    fn floats() {
        assert_eq!(text_to_json(oids::FLOAT8, "1.5"), json!(1.5));
        assert_eq!(text_to_json(oids::FLOAT4, "2.75"), json!(2.75));
        assert_eq!(text_to_json(oids::FLOAT8, "-1e+30"), json!(-1e30));
        assert_eq!(
            text_to_json(oids::FLOAT8, "1.2345678901234567e-300"),
            json!(1.2345678901234567e-300)
        );
        // A float4 text parsed as f64 still prints as the shortest representation.
        assert_eq!(text_to_json(oids::FLOAT4, "0.1").to_string(), "0.1");
        for special in ["NaN", "Infinity", "-Infinity"] {
            assert_eq!(text_to_json(oids::FLOAT4, special), json!(special));
            assert_eq!(text_to_json(oids::FLOAT8, special), json!(special));
        }
        assert_eq!(text_to_json(oids::FLOAT8, "abc"), json!("abc"));
    }

    #[test]
    fn numerics() {
        assert_eq!(text_to_json(oids::NUMERIC, "12"), json!(12));
        assert_eq!(text_to_json(oids::NUMERIC, "-12.50"), json!(-12.5));
        assert_eq!(text_to_json(oids::NUMERIC, "18446744073709551615"), json!(u64::MAX));
        assert_eq!(
            text_to_json(oids::NUMERIC, "123456789012345678901234567890"),
            json!(1.2345678901234568e29)
        );
        assert_eq!(text_to_json(oids::NUMERIC, "0.000001"), json!(0.000001));
        assert_eq!(text_to_json(oids::NUMERIC, "NaN"), json!("NaN"));
        assert_eq!(text_to_json(oids::NUMERIC, "Infinity"), json!("Infinity"));
        assert_eq!(text_to_json(oids::NUMERIC, "-Infinity"), json!("-Infinity"));
        let huge = format!("1{}", "0".repeat(400));
        assert_eq!(text_to_json(oids::NUMERIC, &huge), json!(huge));
    }

    #[test]
    fn json_documents() {
        assert_eq!(
            text_to_json(oids::JSONB, r#"{"a": [1, null, "x"]}"#),
            json!({"a": [1, null, "x"]})
        );
        assert_eq!(text_to_json(oids::JSON, "  [1,2] "), json!([1, 2]));
        assert_eq!(text_to_json(oids::JSON, "\"s\""), json!("s"));
        assert_eq!(text_to_json(oids::JSONB, "null"), Value::Null);
        assert_eq!(text_to_json(oids::JSONB, "{bad"), json!("{bad"));
    }

    #[test]
    fn timestamps_with_time_zone() {
        let cases = [
            ("2026-11-22 03:16:45.123456+00", "2026-11-22T03:16:45.123456+00:00"),
            ("2026-11-22 03:16:45+00", "2026-11-22T03:16:45+00:00"),
            ("2026-11-22 03:16:45-08", "2026-11-22T03:16:45-08:00"),
            ("2026-11-22 08:46:45.5+05:30", "2026-11-22T08:46:45.5+05:30"),
            ("1900-01-01 00:00:00+00:53:28", "1900-01-01T00:00:00+00:53:28"),
            ("12026-11-22 03:16:45+00", "12026-11-22T03:16:45+00:00"),
        ];
        for (text, expected) in cases {
            assert_eq!(text_to_json(oids::TIMESTAMPTZ, text), json!(expected), "{text}");
        }
        for kept in [
            "infinity",
            "-infinity",
            "0044-03-15 12:00:00+00 BC",
            "Sun Nov 22 03:16:45 2026 PST",
            "2026-11-22 03:16:45",
            "2026-11-22 03:16:45.+00",
            "2026-11-22 03:16:45+0",
            "2026-11-22 03:16:45+00:00:00:00",
            "26-11-22 03:16:45+00",
            "2026-11-22 3:16:45+00",
            "2026-11-22T03:16:45+00",
        ] {
            assert_eq!(text_to_json(oids::TIMESTAMPTZ, kept), json!(kept), "{kept}");
        }
    }

    #[test]
    fn timestamps_without_time_zone() {
        assert_eq!(
            text_to_json(oids::TIMESTAMP, "2026-11-22 03:16:45"),
            json!("2026-11-22T03:16:45")
        );
        assert_eq!(
            text_to_json(oids::TIMESTAMP, "2024-02-29 23:59:59.999999"),
            json!("2024-02-29T23:59:59.999999")
        );
        for kept in [
            "infinity",
            "-infinity",
            "2026-11-22 03:16:45+00",
            "0044-03-15 12:00:00 BC",
            "2026-11-22",
        ] {
            assert_eq!(text_to_json(oids::TIMESTAMP, kept), json!(kept), "{kept}");
        }
    }

    #[test]
    fn times_and_other_strings() {
        assert_eq!(text_to_json(oids::TIMETZ, "03:16:45.25+02"), json!("03:16:45.25+02:00"));
        assert_eq!(text_to_json(oids::TIMETZ, "03:16:45-03:30"), json!("03:16:45-03:30"));
        assert_eq!(text_to_json(oids::TIMETZ, "bogus"), json!("bogus"));
        assert_eq!(text_to_json(oids::TIME, "03:16:45"), json!("03:16:45"));
        assert_eq!(text_to_json(oids::DATE, "2026-11-22"), json!("2026-11-22"));
        let uuid = "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11";
        assert_eq!(text_to_json(oids::UUID, uuid), json!(uuid));
        assert_eq!(text_to_json(oids::TEXT, "t"), json!("t"));
        assert_eq!(text_to_json(oids::VARCHAR, "42"), json!("42"));
        assert_eq!(text_to_json(1186, "1 day 02:00:00"), json!("1 day 02:00:00"));
        assert_eq!(text_to_json(17, "\\xdeadbeef"), json!("\\xdeadbeef"));
        assert_eq!(text_to_json(99_999, "{1,2}"), json!("{1,2}"));
    }

    #[test]
    fn one_dimensional_arrays() {
        assert_eq!(text_to_json(1007, "{1,2,3}"), json!([1, 2, 3]));
        assert_eq!(text_to_json(1007, "{}"), json!([]));
        assert_eq!(text_to_json(1007, "{1,NULL,3}"), json!([1, null, 3]));
        assert_eq!(text_to_json(1000, "{t,f,null}"), json!([true, false, null]));
        assert_eq!(
            text_to_json(1009, r#"{"a b","c\"d",NULL,"NULL","back\\slash",plain,"","{x}"}"#),
            json!(["a b", "c\"d", null, "NULL", "back\\slash", "plain", "", "{x}"])
        );
        assert_eq!(text_to_json(1009, r#"{"é\ü",日本}"#), json!(["éü", "日本"]));
        assert_eq!(
            text_to_json(1022, "{1.5,NaN,-Infinity}"),
            json!([1.5, "NaN", "-Infinity"])
        );
        assert_eq!(text_to_json(1231, "{1,2.50}"), json!([1, 2.5]));
        assert_eq!(
            text_to_json(3807, r#"{"{\"a\": 1}","[1, 2]",NULL}"#),
            json!([{"a": 1}, [1, 2], null])
        );
        assert_eq!(
            text_to_json(
                1185,
                r#"{"2026-11-22 03:16:45+00","2026-11-22 03:16:45.5+05:30",infinity}"#
            ),
            json!(["2026-11-22T03:16:45+00:00", "2026-11-22T03:16:45.5+05:30", "infinity"])
        );
        assert_eq!(
            text_to_json(2951, "{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}"),
            json!(["a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"])
        );
        // Whitespace accepted by array_in is tolerated.
        assert_eq!(text_to_json(1007, " { 1 , 2 } "), json!([1, 2]));
        // Unparsable elements become strings, like scalars.
        assert_eq!(text_to_json(1007, "{1,x}"), json!([1, "x"]));
        // box[] uses ';' as its delimiter.
        assert_eq!(
            text_to_json(1020, "{(1,1),(0,0);(2,2),(1,1)}"),
            json!(["(1,1),(0,0)", "(2,2),(1,1)"])
        );
    }

    #[test]
    fn multi_dimensional_arrays() {
        assert_eq!(text_to_json(1007, "{{1,2},{3,4}}"), json!([[1, 2], [3, 4]]));
        assert_eq!(
            text_to_json(1009, r#"{{{"a",b}},{{NULL,"}"}}}"#),
            json!([[["a", "b"]], [[null, "}"]]])
        );
        let six = "{{{{{{1}}}}}}";
        assert_eq!(text_to_json(1007, six), json!([[[[[[1]]]]]]));
        let seven = "{{{{{{{1}}}}}}}";
        assert_eq!(text_to_json(1007, seven), json!(seven));
    }

    #[test]
    fn malformed_arrays_stay_strings() {
        for raw in [
            "[0:1]={1,2}",
            "[1:2][1:1]={{1},{2}}",
            "{1,2",
            "1,2}",
            "{1,2}x",
            "{1,,2}",
            "{1,}",
            "{,}",
            "{\"unterminated}",
            "{\"a\"b}",
            "{a\"b}",
            "{a\\b}",
            "{1,{2}}",
            "{{1},2}",
            "{{1}{2}}",
            "",
            "{",
            "{\"\\",
        ] {
            assert_eq!(text_to_json(1007, raw), json!(raw), "{raw:?}");
        }
        let deep = "{".repeat(10_000);
        assert_eq!(text_to_json(1007, &deep), json!(deep));
    }

    #[test]
    fn commit_timestamps() {
        let cases = [
            (0, "2000-01-01T00:00:00.000Z"),
            (848_632_605_123_456, "2026-11-22T03:16:45.123Z"),
            (762_566_399_999_999, "2024-02-29T23:59:59.999Z"),
            (5_140_800_000_000, "2000-02-29T12:00:00.000Z"),
            (3_160_857_600_000_000, "2100-03-01T00:00:00.000Z"),
            (-946_684_800_000_000, "1970-01-01T00:00:00.000Z"),
            (-1, "1999-12-31T23:59:59.999Z"),
            (-1000, "1999-12-31T23:59:59.999Z"),
            (-1001, "1999-12-31T23:59:59.998Z"),
            (-3_150_640_371_991_000, "1900-02-28T06:07:08.009Z"),
            (-63_082_281_600_000_000, "0001-01-01T00:00:00.000Z"),
            (252_455_615_999_999_999, "9999-12-31T23:59:59.999Z"),
        ];
        for (micros, expected) in cases {
            assert_eq!(commit_timestamp(micros), expected, "{micros}");
        }
        assert!(commit_timestamp(i64::MIN).starts_with('-'));
        assert!(commit_timestamp(i64::MAX).ends_with('Z'));
    }

    /// Inverse of `civil_from_days` (Hinnant's `days_from_civil`), for a round-trip check.
    fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
        let year = if month <= 2 { year - 1 } else { year };
        let era = year.div_euclid(400);
        let year_of_era = year.rem_euclid(400);
        let month = i64::from(month);
        let day_of_year = (153 * (if month > 2 { month - 3 } else { month + 9 }) + 2) / 5 + i64::from(day) - 1;
        let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
        era * 146_097 + day_of_era - 719_468
    }

    #[test]
    fn civil_from_days_round_trips() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(10_957), (2000, 1, 1));
        assert_eq!(civil_from_days(-719_468), (0, 3, 1));
        let mut previous = civil_from_days(-800_000);
        for days in -799_999..800_000 {
            let date = civil_from_days(days);
            assert_eq!(days_from_civil(date.0, date.1, date.2), days);
            assert!(date > previous, "{date:?} after {previous:?}");
            assert!((1..=12).contains(&date.1) && (1..=31).contains(&date.2));
            previous = date;
        }
    }
}
