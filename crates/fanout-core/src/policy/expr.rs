//! The rule language of channel and row policies.
//!
//! ```text
//! rule     = "public" | or
//! or       = and { "or" and }
//! and      = not { "and" not }
//! not      = "not" not | "(" or ")" | "true" | "false" | compare
//! compare  = operand op operand
//! op       = "==" | "!=" | "<" | "<=" | ">" | ">=" | "in" | "not in"
//! operand  = "claims." path            a claim of the token (dotted path; a
//!                                      segment may be quoted: claims."https://x".id)
//!          | "{" name "}"              a part captured from the channel name
//!          | column | "row." column    a column of the changed row (row rules)
//!          | "member." set               the values of a membership set for the
//!                                      token's user (right side of `in` only)
//!          | 'text' | "text" | number | true | false | null
//!          | "[" operand { "," operand } "]"
//! ```
//!
//! Values compare as JSON, with SQL's rule for NULL: a comparison that
//! involves `null` (a missing claim, a NULL column) is false, `!=` included,
//! so an anonymous token never matches rows whose owner is NULL. A string and
//! a number are equal when the string is that number's decimal text (a
//! channel capture is always text; a `workshops` claim may hold numbers).
//! `x in list` is true when `x` equals an element; a right side that is not a
//! list (and not `null`) is an evaluation error, as is a missing column or
//! ordering a number against a word.
//!
//! `member.<set>` ([`crate::membership`]) is read when the rule is decided,
//! from the mirror the caller passes in [`Context::members`]: binding a
//! row rule to a token fixes whose memberships it reads, not what they are,
//! so a membership granted or revoked later applies to the next change.

use std::cmp::Ordering;
use std::fmt;

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::{Map, Value};

use crate::membership::{Members, MembershipSet, NoMembers};

/// Where a rule is used: what its operands may refer to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope<'a> {
    /// A channel rule: claims and the named captures of its pattern.
    Channel { captures: &'a [String] },
    /// A row rule: claims and the changed row's columns.
    Row,
}

/// A rule that does not parse, or refers to what its scope lacks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("rule {rule:?}: {reason}")]
pub struct RuleError {
    pub rule: String,
    pub reason: String,
}

/// Why a rule could not be decided for one row or token. The rule is then
/// treated as false (fail closed) and the caller counts it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EvalError {
    #[error("the row has no column {0:?}")]
    MissingColumn(String),
    #[error("the right side of `in` is not a list")]
    NotAList,
    #[error("cannot order {0} against {1}")]
    Incomparable(&'static str, &'static str),
}

/// A parsed rule. See the module docs for the language.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expr {
    source: String,
    node: Node,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Node {
    Const(bool),
    Or(Vec<Node>),
    And(Vec<Node>),
    Not(Box<Node>),
    Cmp(Operand, Op, Operand),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Operand {
    Claim(Vec<String>),
    Capture(String),
    Column(String),
    /// `member.<set>`, read for the user named by the claim at `claim`.
    Member {
        set: String,
        claim: Vec<String>,
    },
    /// `member.<set>` bound to one user.
    MemberOf {
        set: String,
        user: String,
    },
    Lit(Value),
    List(Vec<Operand>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    In,
    NotIn,
}

/// What a rule reads besides the row: the token's claims (a JSON object),
/// the channel's captures and the membership sets.
#[derive(Clone, Copy)]
pub struct Context<'a> {
    pub claims: &'a Value,
    pub captures: &'a [(String, String)],
    pub members: &'a dyn Members,
}

/// No membership sets configured.
static NO_SETS: BTreeMap<String, MembershipSet> = BTreeMap::new();

impl Expr {
    /// Parses `source` for `scope`, on a server without membership sets.
    pub fn parse(source: &str, scope: Scope<'_>) -> Result<Self, RuleError> {
        Self::parse_with_sets(source, scope, &NO_SETS)
    }

    /// Parses `source` for `scope`; `member.<name>` may name `sets`.
    pub fn parse_with_sets(
        source: &str,
        scope: Scope<'_>,
        sets: &BTreeMap<String, MembershipSet>,
    ) -> Result<Self, RuleError> {
        let err = |reason: String| RuleError {
            rule: source.to_owned(),
            reason,
        };
        let tokens = lex(source).map_err(err)?;
        let mut p = Parser {
            tokens,
            at: 0,
            scope,
            sets,
        };
        let node = if p.tokens.len() == 1 && p.tokens[0] == Token::Word("public".into()) {
            p.at = 1;
            Node::Const(true)
        } else {
            p.or().map_err(err)?
        };
        if let Some(t) = p.tokens.get(p.at) {
            return Err(err(format!("unexpected {t} after the end of the rule")));
        }
        Ok(Self {
            source: source.to_owned(),
            node,
        })
    }

    /// The rule as written.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Whether the rule reads membership sets.
    pub fn reads_members(&self) -> bool {
        node_reads_members(&self.node)
    }

    /// Decides a rule that needs no row (a channel rule).
    pub fn eval(&self, ctx: Context<'_>) -> Result<bool, EvalError> {
        eval(&self.node, ctx, None)
    }

    /// Binds a row rule to one token: every claim becomes its value, and
    /// every part that no longer depends on the row or on memberships is
    /// decided now, so a change costs only the column lookups left. `None`
    /// when the rule holds for every row (`public`, or a claim that
    /// decides it).
    pub fn bind(&self, claims: &Value) -> Option<RowRule> {
        let ctx = Context {
            claims,
            captures: &[],
            members: &NoMembers,
        };
        match fold(&self.node, ctx) {
            Node::Const(true) => None,
            node => Some(RowRule {
                source: self.source.clone(),
                node,
            }),
        }
    }
}

impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

/// A row rule bound to one subscriber's claims ([`Expr::bind`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowRule {
    source: String,
    node: Node,
}

impl RowRule {
    /// Whether `row` may be sent to the subscriber, with its memberships
    /// as `members` has them now.
    pub fn allows(&self, row: &Map<String, Value>, members: &dyn Members) -> Result<bool, EvalError> {
        let ctx = Context {
            claims: &Value::Null,
            captures: &[],
            members,
        };
        eval(&self.node, ctx, Some(row))
    }

    /// Whether the rule reads membership sets (and so can change its
    /// answer without a new token).
    pub fn reads_members(&self) -> bool {
        node_reads_members(&self.node)
    }

    /// The rule as written (for logs).
    pub fn source(&self) -> &str {
        &self.source
    }
}

// ---- lexer ----

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Word(String),
    Str(String),
    Num(serde_json::Number),
    Capture(String),
    Op(&'static str),
    Dot,
    Comma,
    Open,
    Close,
    OpenList,
    CloseList,
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Token::Word(w) => write!(f, "`{w}`"),
            Token::Str(s) => write!(f, "'{s}'"),
            Token::Num(n) => write!(f, "{n}"),
            Token::Capture(c) => write!(f, "{{{c}}}"),
            Token::Op(o) => write!(f, "`{o}`"),
            Token::Dot => f.write_str("`.`"),
            Token::Comma => f.write_str("`,`"),
            Token::Open => f.write_str("`(`"),
            Token::Close => f.write_str("`)`"),
            Token::OpenList => f.write_str("`[`"),
            Token::CloseList => f.write_str("`]`"),
        }
    }
}

fn is_word_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

fn lex(s: &str) -> Result<Vec<Token>, String> {
    let mut out = Vec::new();
    let mut chars = s.char_indices().peekable();
    while let Some(&(i, c)) = chars.peek() {
        match c {
            c if c.is_whitespace() => {
                chars.next();
            }
            '(' | ')' | '[' | ']' | ',' | '.' => {
                chars.next();
                out.push(match c {
                    '(' => Token::Open,
                    ')' => Token::Close,
                    '[' => Token::OpenList,
                    ']' => Token::CloseList,
                    ',' => Token::Comma,
                    _ => Token::Dot,
                });
            }
            '\'' | '"' => {
                chars.next();
                let mut text = String::new();
                loop {
                    match chars.next() {
                        Some((_, ch)) if ch == c => break,
                        Some((_, '\\')) => match chars.next() {
                            Some((_, esc)) => text.push(esc),
                            None => return Err("unterminated string".into()),
                        },
                        Some((_, ch)) => text.push(ch),
                        None => return Err(format!("unterminated string starting at byte {i}")),
                    }
                }
                out.push(Token::Str(text));
            }
            '{' => {
                chars.next();
                let mut name = String::new();
                loop {
                    match chars.next() {
                        Some((_, '}')) => break,
                        Some((_, ch)) if is_word_char(ch) => name.push(ch),
                        _ => return Err(format!("a capture at byte {i} must be {{name}} with a plain name")),
                    }
                }
                if name.is_empty() {
                    return Err(format!("empty capture {{}} at byte {i}"));
                }
                out.push(Token::Capture(name));
            }
            '=' | '!' | '<' | '>' => {
                chars.next();
                let eq = chars.peek().is_some_and(|&(_, n)| n == '=');
                if eq {
                    chars.next();
                }
                out.push(Token::Op(match (c, eq) {
                    ('=', true) => "==",
                    ('!', true) => "!=",
                    ('<', true) => "<=",
                    ('>', true) => ">=",
                    ('<', false) => "<",
                    ('>', false) => ">",
                    _ => return Err(format!("unknown operator at byte {i}: use ==, !=, <, <=, >, >=")),
                }));
            }
            c if c.is_ascii_digit() || c == '-' => {
                let mut text = String::new();
                while let Some(&(_, ch)) = chars.peek() {
                    if ch.is_ascii_digit() || ch == '-' || ch == '.' || ch == 'e' || ch == 'E' || ch == '+' {
                        text.push(ch);
                        chars.next();
                    } else {
                        break;
                    }
                }
                let n = serde_json::from_str::<serde_json::Number>(&text)
                    .map_err(|_| format!("{text:?} is not a number"))?;
                out.push(Token::Num(n));
            }
            c if is_word_char(c) => {
                let mut word = String::new();
                while let Some(&(_, ch)) = chars.peek() {
                    if is_word_char(ch) {
                        word.push(ch);
                        chars.next();
                    } else {
                        break;
                    }
                }
                out.push(Token::Word(word));
            }
            other => return Err(format!("unexpected character {other:?} at byte {i}")),
        }
    }
    if out.is_empty() {
        return Err("the rule is empty (write `public` for a rule that always holds)".into());
    }
    Ok(out)
}

// ---- parser ----

struct Parser<'a> {
    tokens: Vec<Token>,
    at: usize,
    scope: Scope<'a>,
    sets: &'a BTreeMap<String, MembershipSet>,
}

impl Parser<'_> {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.at)
    }

    fn peek_word(&self, w: &str) -> bool {
        matches!(self.peek(), Some(Token::Word(x)) if x == w)
    }

    fn next(&mut self) -> Result<Token, String> {
        let t = self.tokens.get(self.at).cloned().ok_or("the rule ends too early")?;
        self.at += 1;
        Ok(t)
    }

    fn or(&mut self) -> Result<Node, String> {
        let mut parts = vec![self.and()?];
        while self.peek_word("or") {
            self.at += 1;
            parts.push(self.and()?);
        }
        Ok(if parts.len() == 1 {
            parts.remove(0)
        } else {
            Node::Or(parts)
        })
    }

    fn and(&mut self) -> Result<Node, String> {
        let mut parts = vec![self.not()?];
        while self.peek_word("and") {
            self.at += 1;
            parts.push(self.not()?);
        }
        Ok(if parts.len() == 1 {
            parts.remove(0)
        } else {
            Node::And(parts)
        })
    }

    fn not(&mut self) -> Result<Node, String> {
        if self.peek_word("not") {
            self.at += 1;
            return Ok(Node::Not(Box::new(self.not()?)));
        }
        if self.peek() == Some(&Token::Open) {
            self.at += 1;
            let inner = self.or()?;
            return match self.next()? {
                Token::Close => Ok(inner),
                t => Err(format!("expected `)`, found {t}")),
            };
        }
        if self.peek_word("public") {
            return Err("`public` must be the whole rule".into());
        }
        // A bare `true` / `false` (not the left side of a comparison).
        if let Some(Token::Word(w)) = self.peek()
            && (w == "true" || w == "false")
        {
            let compared = match self.tokens.get(self.at + 1) {
                Some(Token::Op(_)) => true,
                Some(Token::Word(x)) => x == "in" || x == "not",
                _ => false,
            };
            if !compared {
                let b = w == "true";
                self.at += 1;
                return Ok(Node::Const(b));
            }
        }
        let left = self.operand()?;
        let op = match self.next() {
            Ok(Token::Op(o)) => match o {
                "==" => Op::Eq,
                "!=" => Op::Ne,
                "<" => Op::Lt,
                "<=" => Op::Le,
                ">" => Op::Gt,
                _ => Op::Ge,
            },
            Ok(Token::Word(w)) if w == "in" => Op::In,
            Ok(Token::Word(w)) if w == "not" && self.peek_word("in") => {
                self.at += 1;
                Op::NotIn
            }
            Ok(t) => {
                return Err(format!(
                    "expected a comparison (==, !=, <, in, …) after an operand, found {t}"
                ));
            }
            Err(e) => return Err(format!("{e}: expected a comparison after an operand")),
        };
        let right = self.operand()?;
        if matches!(left, Operand::Member { .. }) {
            return Err("member.<set> is a set: it goes on the right of `in` (x in member.<set>)".into());
        }
        if matches!(right, Operand::Member { .. }) && !matches!(op, Op::In | Op::NotIn) {
            return Err("member.<set> is a set: compare with `in` or `not in`".into());
        }
        Ok(Node::Cmp(left, op, right))
    }

    fn operand(&mut self) -> Result<Operand, String> {
        match self.next()? {
            Token::Str(s) => Ok(Operand::Lit(Value::String(s))),
            Token::Num(n) => Ok(Operand::Lit(Value::Number(n))),
            Token::Capture(name) => match self.scope {
                Scope::Channel { captures } if captures.contains(&name) => Ok(Operand::Capture(name)),
                Scope::Channel { .. } => Err(format!("{{{name}}} is not captured by the channel pattern")),
                Scope::Row => Err(format!("{{{name}}}: a table rule has no channel captures")),
            },
            Token::OpenList => {
                let mut items = Vec::new();
                if self.peek() == Some(&Token::CloseList) {
                    self.at += 1;
                    return Ok(Operand::List(items));
                }
                loop {
                    items.push(self.operand()?);
                    match self.next()? {
                        Token::Comma => {}
                        Token::CloseList => return Ok(Operand::List(items)),
                        t => return Err(format!("expected `,` or `]` in a list, found {t}")),
                    }
                }
            }
            Token::Word(w) => match w.as_str() {
                "true" => Ok(Operand::Lit(Value::Bool(true))),
                "false" => Ok(Operand::Lit(Value::Bool(false))),
                "null" => Ok(Operand::Lit(Value::Null)),
                "claims" => Ok(Operand::Claim(self.path("claims")?)),
                "member" => {
                    let path = self.path("member")?;
                    let [name] = path.as_slice() else {
                        return Err("member.<set> names one membership set".into());
                    };
                    match self.sets.get(name) {
                        Some(set) => Ok(Operand::Member {
                            set: name.clone(),
                            claim: set.claim.clone(),
                        }),
                        None if self.sets.is_empty() => Err(format!(
                            "member.{name}: no membership sets are configured (add [auth.memberships.{name}])"
                        )),
                        None => Err(format!(
                            "member.{name}: no such membership set (configured: {})",
                            self.sets.keys().map(String::as_str).collect::<Vec<_>>().join(", ")
                        )),
                    }
                }
                "row" => {
                    let mut path = self.path("row")?;
                    if path.len() != 1 {
                        return Err("row.<column> names one column".into());
                    }
                    self.column(path.remove(0))
                }
                "and" | "or" | "not" | "in" | "public" => Err(format!("expected an operand, found `{w}`")),
                _ => self.column(w),
            },
            t => Err(format!("expected an operand, found {t}")),
        }
    }

    fn column(&self, name: String) -> Result<Operand, String> {
        match self.scope {
            Scope::Row => Ok(Operand::Column(name)),
            Scope::Channel { .. } => Err(format!(
                "{name:?}: a channel rule reads claims.…, {{captures}} and literals, not columns"
            )),
        }
    }

    /// `.segment { .segment }` after `claims` or `row`.
    fn path(&mut self, what: &str) -> Result<Vec<String>, String> {
        let mut segments = Vec::new();
        while self.peek() == Some(&Token::Dot) {
            self.at += 1;
            match self.next()? {
                Token::Word(w) | Token::Str(w) => segments.push(w),
                t => return Err(format!("expected a name after `{what}.`, found {t}")),
            }
        }
        if segments.is_empty() {
            return Err(format!("`{what}` needs a name: {what}.<name>"));
        }
        Ok(segments)
    }
}

// ---- evaluation ----

/// An operand's value: borrowed from the claims or row, or owned.
enum Val<'a> {
    Ref(&'a Value),
    Owned(Value),
    List(Vec<Val<'a>>),
    /// A membership set's values for one user (none: empty).
    Set(Option<Arc<[Value]>>),
}

impl Val<'_> {
    fn get(&self) -> Option<&Value> {
        match self {
            Val::Ref(v) => Some(v),
            Val::Owned(v) => Some(v),
            Val::List(_) | Val::Set(_) => None,
        }
    }
}

fn claim<'a>(claims: &'a Value, path: &[String]) -> &'a Value {
    let mut v = claims;
    for seg in path {
        match v.get(seg) {
            Some(next) => v = next,
            None => return &Value::Null,
        }
    }
    v
}

fn value<'a>(op: &'a Operand, ctx: Context<'a>, row: Option<&'a Map<String, Value>>) -> Result<Val<'a>, EvalError> {
    Ok(match op {
        Operand::Lit(v) => Val::Ref(v),
        Operand::Claim(path) => Val::Ref(claim(ctx.claims, path)),
        Operand::Capture(name) => match ctx.captures.iter().find(|(n, _)| n == name) {
            Some((_, v)) => Val::Owned(Value::String(v.clone())),
            None => Val::Ref(&Value::Null),
        },
        Operand::Column(name) => match row.map(|r| r.get(name)) {
            Some(Some(v)) => Val::Ref(v),
            _ => return Err(EvalError::MissingColumn(name.clone())),
        },
        Operand::List(items) => Val::List(items.iter().map(|i| value(i, ctx, row)).collect::<Result<_, _>>()?),
        Operand::Member { set, claim } => match crate::membership::user_of(ctx.claims, claim) {
            Some(user) => Val::Set(ctx.members.values(set, &user)),
            None => Val::Ref(&Value::Null),
        },
        Operand::MemberOf { set, user } => Val::Set(ctx.members.values(set, user)),
    })
}

fn eval(node: &Node, ctx: Context<'_>, row: Option<&Map<String, Value>>) -> Result<bool, EvalError> {
    match node {
        Node::Const(b) => Ok(*b),
        Node::Or(parts) => {
            // An error in one part does not hide a part that holds.
            let mut first_err = None;
            for p in parts {
                match eval(p, ctx, row) {
                    Ok(true) => return Ok(true),
                    Ok(false) => {}
                    Err(e) => first_err = first_err.or(Some(e)),
                }
            }
            first_err.map_or(Ok(false), Err)
        }
        Node::And(parts) => {
            for p in parts {
                if !eval(p, ctx, row)? {
                    return Ok(false);
                }
            }
            Ok(true)
        }
        Node::Not(inner) => Ok(!eval(inner, ctx, row)?),
        Node::Cmp(l, op, r) => compare(&value(l, ctx, row)?, *op, &value(r, ctx, row)?),
    }
}

fn compare(l: &Val<'_>, op: Op, r: &Val<'_>) -> Result<bool, EvalError> {
    match op {
        Op::In | Op::NotIn => {
            let Some(x) = l.get() else {
                return Err(EvalError::NotAList);
            };
            let found = match r {
                Val::List(items) => items.iter().any(|i| i.get().is_some_and(|v| equal(x, v))),
                Val::Set(values) => values.as_deref().is_some_and(|vs| vs.iter().any(|v| equal(x, v))),
                _ => match r.get() {
                    Some(Value::Array(items)) => items.iter().any(|v| equal(x, v)),
                    Some(Value::Null) => return Ok(false),
                    _ => return Err(EvalError::NotAList),
                },
            };
            if x.is_null() {
                return Ok(false);
            }
            Ok(found == (op == Op::In))
        }
        _ => {
            let (Some(a), Some(b)) = (l.get(), r.get()) else {
                return Err(EvalError::Incomparable("a list", "a value"));
            };
            if a.is_null() || b.is_null() {
                return Ok(false);
            }
            match op {
                Op::Eq => Ok(equal(a, b)),
                Op::Ne => Ok(!equal(a, b)),
                _ => {
                    let ord = order(a, b)?;
                    Ok(match op {
                        Op::Lt => ord == Ordering::Less,
                        Op::Le => ord != Ordering::Greater,
                        Op::Gt => ord == Ordering::Greater,
                        _ => ord != Ordering::Less,
                    })
                }
            }
        }
    }
}

/// JSON equality, with a number equal to its decimal text. Never true for null.
fn equal(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Null, _) | (_, Value::Null) => false,
        (Value::Number(x), Value::Number(y)) => num_eq(x, y),
        (Value::String(s), Value::Number(n)) | (Value::Number(n), Value::String(s)) => {
            serde_json::from_str::<serde_json::Number>(s).is_ok_and(|m| num_eq(n, &m))
        }
        _ => a == b,
    }
}

fn num_eq(x: &serde_json::Number, y: &serde_json::Number) -> bool {
    match (x.as_i64(), y.as_i64(), x.as_u64(), y.as_u64()) {
        (Some(a), Some(b), _, _) => a == b,
        (_, _, Some(a), Some(b)) => a == b,
        _ => x.as_f64() == y.as_f64(),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "text",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

fn order(a: &Value, b: &Value) -> Result<Ordering, EvalError> {
    let num = |v: &Value| match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.parse::<f64>().ok(),
        _ => None,
    };
    match (a, b) {
        (Value::String(x), Value::String(y)) => Ok(x.cmp(y)),
        (Value::Number(_), _) | (_, Value::Number(_)) => match (num(a), num(b)) {
            (Some(x), Some(y)) => x.partial_cmp(&y).ok_or(EvalError::Incomparable(kind(a), kind(b))),
            _ => Err(EvalError::Incomparable(kind(a), kind(b))),
        },
        _ => Err(EvalError::Incomparable(kind(a), kind(b))),
    }
}

/// Replaces claims by their values and decides what no longer needs the row.
fn fold(node: &Node, ctx: Context<'_>) -> Node {
    match node {
        Node::Const(b) => Node::Const(*b),
        Node::Not(inner) => match fold(inner, ctx) {
            Node::Const(b) => Node::Const(!b),
            n => Node::Not(Box::new(n)),
        },
        Node::Or(parts) => {
            let mut kept = Vec::new();
            for p in parts {
                match fold(p, ctx) {
                    Node::Const(true) => return Node::Const(true),
                    Node::Const(false) => {}
                    n => kept.push(n),
                }
            }
            match kept.len() {
                0 => Node::Const(false),
                1 => kept.remove(0),
                _ => Node::Or(kept),
            }
        }
        Node::And(parts) => {
            let mut kept = Vec::new();
            for p in parts {
                match fold(p, ctx) {
                    Node::Const(false) => return Node::Const(false),
                    Node::Const(true) => {}
                    n => kept.push(n),
                }
            }
            match kept.len() {
                0 => Node::Const(true),
                1 => kept.remove(0),
                _ => Node::And(kept),
            }
        }
        Node::Cmp(l, op, r) => {
            let (l, r) = (resolve(l, ctx), resolve(r, ctx));
            if !is_live(&l) && !is_live(&r) {
                // Neither the row nor memberships needed: decide now (an
                // error is false, fail closed).
                let decided = eval(&Node::Cmp(l, *op, r), ctx, None).unwrap_or(false);
                return Node::Const(decided);
            }
            Node::Cmp(l, *op, r)
        }
    }
}

fn resolve(op: &Operand, ctx: Context<'_>) -> Operand {
    match op {
        Operand::Claim(path) => Operand::Lit(claim(ctx.claims, path).clone()),
        Operand::List(items) => Operand::List(items.iter().map(|i| resolve(i, ctx)).collect()),
        Operand::Member { set, claim: path } => match crate::membership::user_of(ctx.claims, path) {
            Some(user) => Operand::MemberOf { set: set.clone(), user },
            // No user: the set is `null`, and `x in null` is false.
            None => Operand::Lit(Value::Null),
        },
        other => other.clone(),
    }
}

/// Whether an operand's value is only known when a change is decided: a
/// column of the row, or a membership set (which may change after the
/// rule was bound).
fn is_live(op: &Operand) -> bool {
    match op {
        Operand::Column(_) | Operand::MemberOf { .. } | Operand::Member { .. } => true,
        Operand::List(items) => items.iter().any(is_live),
        _ => false,
    }
}

fn node_reads_members(node: &Node) -> bool {
    match node {
        Node::Const(_) => false,
        Node::Or(parts) | Node::And(parts) => parts.iter().any(node_reads_members),
        Node::Not(inner) => node_reads_members(inner),
        Node::Cmp(l, _, r) => [l, r]
            .iter()
            .any(|o| matches!(o, Operand::Member { .. } | Operand::MemberOf { .. })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn row_rule(s: &str) -> Expr {
        Expr::parse(s, Scope::Row).unwrap()
    }

    fn row(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    fn allows(rule: &str, claims: Value, r: Value) -> Result<bool, EvalError> {
        match row_rule(rule).bind(&claims) {
            None => Ok(true),
            Some(bound) => bound.allows(&row(r), &NoMembers),
        }
    }

    #[test]
    fn the_issue_spellings_parse_and_decide() {
        let claims = json!({"sub": "u1", "workshops": [7, "9"], "role": "facilitator"});
        assert_eq!(
            allows(
                "session_id in claims.workshops",
                claims.clone(),
                json!({"session_id": 7})
            ),
            Ok(true)
        );
        assert_eq!(
            allows(
                "session_id in claims.workshops",
                claims.clone(),
                json!({"session_id": "9"})
            ),
            Ok(true)
        );
        assert_eq!(
            allows(
                "session_id in claims.workshops",
                claims.clone(),
                json!({"session_id": 42})
            ),
            Ok(false)
        );
        assert_eq!(
            allows("user_id == claims.sub", claims.clone(), json!({"user_id": "u1"})),
            Ok(true)
        );
        assert_eq!(
            allows("user_id == claims.sub", claims.clone(), json!({"user_id": "u2"})),
            Ok(false)
        );
        assert!(row_rule("public").bind(&claims).is_none());

        let captures = ["id".to_owned()];
        let scope = Scope::Channel { captures: &captures };
        let read = Expr::parse("{id} in claims.workshops", scope).unwrap();
        let write = Expr::parse("{id} in claims.workshops and claims.role == 'facilitator'", scope).unwrap();
        let at = |id: &str, claims: &Value| {
            let caps = [("id".to_owned(), id.to_owned())];
            let ctx = Context {
                claims,
                captures: &caps,
                members: &NoMembers,
            };
            (read.eval(ctx).unwrap(), write.eval(ctx).unwrap())
        };
        assert_eq!(at("7", &claims), (true, true));
        assert_eq!(at("42", &claims), (false, false));
        let participant = json!({"workshops": [7], "role": "participant"});
        assert_eq!(at("7", &participant), (true, false));
    }

    #[test]
    fn null_never_matches_so_anonymous_tokens_see_no_ownerless_rows() {
        let anon = json!({"role": "anon"});
        assert_eq!(
            allows("user_id == claims.sub", anon.clone(), json!({"user_id": null})),
            Ok(false)
        );
        assert_eq!(
            allows("user_id != claims.sub", anon.clone(), json!({"user_id": "u"})),
            Ok(false)
        );
        assert_eq!(
            allows("session_id in claims.workshops", anon, json!({"session_id": 7})),
            Ok(false)
        );
    }

    #[test]
    fn claims_that_decide_the_rule_are_folded_at_bind() {
        let rule = row_rule("claims.role == 'admin' or session_id in claims.workshops");
        assert!(rule.bind(&json!({"role": "admin"})).is_none());
        let bound = rule.bind(&json!({"role": "x", "workshops": [1]})).unwrap();
        assert_eq!(
            bound.node,
            Node::Cmp(Operand::Column("session_id".into()), Op::In, Operand::Lit(json!([1])))
        );
        let never = row_rule("claims.role == 'admin' and user_id == claims.sub").bind(&json!({"role": "x"}));
        assert_eq!(never.unwrap().allows(&row(json!({})), &NoMembers), Ok(false));
    }

    #[test]
    fn evaluation_errors_are_reported_not_guessed() {
        let c = json!({"workshops": "7"});
        assert_eq!(
            allows("session_id in claims.workshops", c.clone(), json!({"session_id": 7})),
            Err(EvalError::NotAList)
        );
        assert_eq!(
            allows("missing == 1", c.clone(), json!({"id": 1})),
            Err(EvalError::MissingColumn("missing".into()))
        );
        assert_eq!(
            allows("size > 3", c.clone(), json!({"size": "big"})),
            Err(EvalError::Incomparable("text", "a number"))
        );
        // An error in one branch of `or` does not hide a branch that holds.
        assert_eq!(allows("missing == 1 or id == 1", c, json!({"id": 1})), Ok(true));
    }

    #[test]
    fn the_rest_of_the_language() {
        let c = json!({"sub": "u1", "app": {"teams": ["a"]}, "https://x.io/claims": {"org": 5}});
        assert_eq!(allows("not (id == 1)", c.clone(), json!({"id": 2})), Ok(true));
        assert_eq!(allows("id not in [1, 2]", c.clone(), json!({"id": 3})), Ok(true));
        assert_eq!(
            allows("team in claims.app.teams", c.clone(), json!({"team": "a"})),
            Ok(true)
        );
        assert_eq!(
            allows(
                "org == claims.\"https://x.io/claims\".org",
                c.clone(),
                json!({"org": 5})
            ),
            Ok(true)
        );
        assert_eq!(allows("row.in == 'x'", c.clone(), json!({"in": "x"})), Ok(true));
        assert_eq!(
            allows("score >= 2.5 and score < 10", c.clone(), json!({"score": 3})),
            Ok(true)
        );
        assert_eq!(allows("name < 'm'", c.clone(), json!({"name": "alice"})), Ok(true));
        assert_eq!(allows("id == -1", c.clone(), json!({"id": -1})), Ok(true));
        assert_eq!(allows("false", c.clone(), json!({})), Ok(false));
        assert_eq!(allows("true", c.clone(), json!({})), Ok(true));
        assert_eq!(allows("true and id == 1", c, json!({"id": 1})), Ok(true));
    }

    #[test]
    fn bad_rules_say_what_is_wrong() {
        let captures = ["id".to_owned()];
        let chan = Scope::Channel { captures: &captures };
        let reason = |s: &str, scope| Expr::parse(s, scope).unwrap_err().reason;
        assert!(reason("", Scope::Row).contains("empty"));
        assert!(reason("session_id in", Scope::Row).contains("ends too early"));
        assert!(reason("session_id = 1", Scope::Row).contains("unknown operator"));
        assert!(reason("{room} in claims.x", chan).contains("not captured"));
        assert!(reason("user_id == claims.sub", chan).contains("not columns"));
        assert!(reason("{id} == 1", Scope::Row).contains("no channel captures"));
        assert!(reason("public and id == 1", Scope::Row).contains("whole rule"));
        assert!(reason("id == 'open", Scope::Row).contains("unterminated"));
        assert!(reason("id == 1 id", Scope::Row).contains("after the end"));
        assert!(reason("claims == 1", Scope::Row).contains("claims.<name>"));
        assert!(reason("x in member.workshops", Scope::Row).contains("membership"));
        assert!(reason("(id == 1", Scope::Row).contains("ends too early"));
    }

    /// A fixed mirror for the tests.
    struct Fixed(std::collections::HashMap<(String, String), Arc<[Value]>>);

    impl Members for Fixed {
        fn values(&self, set: &str, user: &str) -> Option<Arc<[Value]>> {
            self.0.get(&(set.to_owned(), user.to_owned())).cloned()
        }
    }

    fn sets() -> BTreeMap<String, MembershipSet> {
        let spec = crate::membership::MembershipSpec {
            table: "public.workshop_participants".into(),
            user: "user_id".into(),
            value: "session_id".into(),
            claim: None,
        };
        let set = MembershipSet::from_spec("workshops", &spec).unwrap();
        BTreeMap::from([("workshops".to_owned(), set)])
    }

    #[test]
    fn member_sets_are_read_when_a_change_is_decided() {
        let rule = Expr::parse_with_sets("session_id in member.workshops", Scope::Row, &sets()).unwrap();
        assert!(rule.reads_members());
        let bound = rule
            .bind(&json!({"sub": "u1"}))
            .expect("depends on the row and the mirror");
        assert!(bound.reads_members());
        let mut mirror = Fixed(Default::default());
        let r7 = row(json!({"session_id": 7}));
        let r42 = row(json!({"session_id": "42"}));
        assert_eq!(bound.allows(&r7, &mirror), Ok(false), "no memberships yet");
        mirror
            .0
            .insert(("workshops".into(), "u1".into()), Arc::from(vec![json!(7)]));
        assert_eq!(bound.allows(&r7, &mirror), Ok(true));
        assert_eq!(bound.allows(&r42, &mirror), Ok(false));
        // Granted later: the same bound rule sees it.
        mirror
            .0
            .insert(("workshops".into(), "u1".into()), Arc::from(vec![json!(7), json!(42)]));
        assert_eq!(bound.allows(&r42, &mirror), Ok(true), "text 42 equals number 42");
        // Another user's memberships are not this token's.
        let other = rule.bind(&json!({"sub": "u2"})).unwrap();
        assert_eq!(other.allows(&r7, &mirror), Ok(false));
        // A token without the claim has no memberships at all.
        assert_eq!(rule.bind(&json!({})).unwrap().allows(&r7, &mirror), Ok(false));
        let not_in = Expr::parse_with_sets("session_id not in member.workshops", Scope::Row, &sets()).unwrap();
        assert_eq!(
            not_in.bind(&json!({"sub": "u2"})).unwrap().allows(&r7, &mirror),
            Ok(true)
        );
        assert_eq!(
            not_in.bind(&json!({"sub": "u1"})).unwrap().allows(&r7, &mirror),
            Ok(false)
        );
    }

    #[test]
    fn channel_rules_read_member_sets_with_captures() {
        let captures = ["id".to_owned()];
        let chan = Scope::Channel { captures: &captures };
        let rule = Expr::parse_with_sets("{id} in member.workshops", chan, &sets()).unwrap();
        let mirror = Fixed(std::collections::HashMap::from([(
            ("workshops".to_owned(), "u1".to_owned()),
            Arc::from(vec![json!(42)]),
        )]));
        let ctx = |claims: &'static Value, id: &str| {
            let caps = vec![("id".to_owned(), id.to_owned())];
            let claims: &Value = claims;
            rule.eval(Context {
                claims,
                captures: &caps,
                members: &mirror,
            })
        };
        static U1: std::sync::LazyLock<Value> = std::sync::LazyLock::new(|| json!({"sub": "u1"}));
        assert_eq!(ctx(&U1, "42"), Ok(true));
        assert_eq!(ctx(&U1, "7"), Ok(false));
        // Without memberships configured, rules that name them are refused.
        let reason = Expr::parse("{id} in member.workshops", chan).unwrap_err().reason;
        assert!(reason.contains("no membership sets are configured"), "{reason}");
        let reason = Expr::parse_with_sets("x in member.teams", Scope::Row, &sets())
            .unwrap_err()
            .reason;
        assert!(reason.contains("configured: workshops"), "{reason}");
        for bad in [
            "member.workshops in claims.x",
            "x == member.workshops",
            "x in member.a.b",
        ] {
            assert!(Expr::parse_with_sets(bad, Scope::Row, &sets()).is_err(), "{bad}");
        }
    }
}
