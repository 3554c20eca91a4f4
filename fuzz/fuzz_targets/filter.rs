//! `postgres_changes` row filters (`column=op.value`, `in.(a,b)`) through
//! `Filter::parse`, and the binding they make. Asserts, beyond not
//! panicking: a refused filter is a syntax error; a parsed filter has a
//! column and a value (one unless `in`); it prints to text that parses back
//! to the same filter and prints the same again, so the binding id (derived
//! from the printed filter, and shared by every edge) is the same for the
//! filter as written and as printed; evaluated on rows, NULL and a missing
//! column behave as documented and a string cell equal to the (first)
//! value compares as equal for every operator.
#![no_main]

use fanout_core::changes::{Binding, BindingError, Filter, FilterEvalError, FilterOp};
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value, json};

fn row(column: &str, cell: Value) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert(column.to_owned(), cell);
    m
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let f = match Filter::parse(text) {
        Ok(f) => f,
        Err(e) => {
            assert!(matches!(e, BindingError::FilterSyntax(_)), "{e:?}");
            return;
        }
    };
    assert!(!f.column.is_empty());
    assert!(!f.values.is_empty());
    if f.op != FilterOp::In {
        assert_eq!(f.values.len(), 1);
    }

    let printed = f.to_string();
    let again = Filter::parse(&printed);
    assert_eq!(again.as_ref(), Ok(&f), "{text:?} prints as {printed:?}");
    assert_eq!(again.unwrap().to_string(), printed, "printing is not stable");
    let id = |filter: &str| Binding::new("*", "public", Some("t"), Some(filter)).map(|b| b.id);
    assert_eq!(
        id(text),
        id(&printed),
        "the binding id depends on how the filter is written"
    );

    // SQL NULL never matches; a row without the column is an error.
    assert_eq!(f.matches(&row(&f.column, Value::Null)), Ok(false));
    assert_eq!(
        f.matches(&Map::new()),
        Err(FilterEvalError::MissingColumn(f.column.clone()))
    );
    // A string cell equal to the first value.
    let equal = f.matches(&row(&f.column, Value::String(f.values[0].clone())));
    let expected = matches!(f.op, FilterOp::Eq | FilterOp::Lte | FilterOp::Gte | FilterOp::In);
    assert_eq!(equal, Ok(expected), "{f:?} on an equal string cell");
    // Other cell types may be incomparable with the value, but never panic.
    for cell in [json!(0), json!(-1.5), json!(true), json!([1]), json!({"a": 1})] {
        let _ = f.matches(&row(&f.column, cell));
    }
});
