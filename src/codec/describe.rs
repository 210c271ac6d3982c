//! Python-repr-like rendering of a value tree.
//!
//! The format is the one of the `## decoded (classes and instance state)` sections of the reference
//! fixtures' `.dis.txt` files, so tests can compare our decoding with what CPython loaded:
//!
//! * non-empty containers put one item per line, indented by 4 spaces, the closing bracket on its own
//!   line; empty ones are `()`, `[]`, `{}`, `set()`, `frozenset()`; a 1-tuple keeps its trailing comma;
//! * an instance is `module.qualname(__dict__={...})`; reductions (exceptions, `Failure`) and instances
//!   with constructor arguments also show `args=(...)` first; a missing state shows as `__dict__={}`
//!   because that is what the instance's `__dict__` is in Python;
//! * `uuid.UUID` instances are `uuid.UUID: UUID('8-4-4-4-12')`;
//! * class and function references are `<ref module.qualname>`: the fixtures say `<class ref …>` or
//!   `<function ref …>`, which a decoder cannot know without importing, so tests normalise both;
//! * scalars use Python's `repr` (quote choice and escapes of `str`/`bytes`, shortest round-trip
//!   floats with Python's switch to exponent notation, big integers in decimal).
//!
//! * an instance of a dict subclass (items set on the instance, e.g. `egse.setup.Setup` and its
//!   `NavigableDict`s) renders as a plain dict of those items: the fixtures' renderer tested
//!   `isinstance(obj, dict)` first, so class and `__dict__` do not show. Likewise a list subclass with
//!   appended items renders as a list. An *empty* dict subclass cannot be recognised and renders as an
//!   instance.
//!
//! Not covered by the fixtures, chosen here: sets are `{item, ...}` laid out like dicts; a
//! `(dict, slots)` state shows as `__dict__=..., __slots__=...`; any other state as `state=...`;
//! NEWOBJ_EX keyword arguments as `kwargs={...}`.
use super::{Object, ObjectKind, Value};

/// Render a value the way the fixtures' `.dis.txt` files show decoded structures.
pub fn describe(value: &Value) -> String {
    let mut out = String::new();
    write_value(&mut out, value, 0);
    out
}

const INDENT: usize = 4;

fn pad(out: &mut String, indent: usize) {
    out.extend(std::iter::repeat_n(' ', indent));
}

/// Write `value` starting at the current position; continuation lines are indented by `indent`.
fn write_value(out: &mut String, value: &Value, indent: usize) {
    match value {
        Value::None => out.push_str("None"),
        Value::Bool(true) => out.push_str("True"),
        Value::Bool(false) => out.push_str("False"),
        Value::Int(i) => out.push_str(&i.to_string()),
        Value::BigInt(bytes) => out.push_str(&bigint_decimal(bytes)),
        Value::Float(f) => out.push_str(&float_repr(*f)),
        Value::Str(s) => out.push_str(&str_repr(s)),
        Value::Bytes(b) => out.push_str(&bytes_repr(b)),
        Value::ByteArray(b) => {
            out.push_str("bytearray(");
            out.push_str(&bytes_repr(b));
            out.push(')');
        }
        Value::List(items) => write_seq(out, items, indent, "[", "]", false),
        Value::Tuple(items) => write_seq(out, items, indent, "(", ")", items.len() == 1),
        Value::Set(items) if items.is_empty() => out.push_str("set()"),
        Value::Set(items) => write_seq(out, items, indent, "{", "}", false),
        Value::FrozenSet(items) if items.is_empty() => out.push_str("frozenset()"),
        Value::FrozenSet(items) => {
            out.push_str("frozenset(");
            write_seq(out, items, indent, "{", "}", false);
            out.push(')');
        }
        Value::Dict(pairs) => write_dict(out, pairs, indent),
        Value::Global { module, qualname } => {
            out.push_str("<ref ");
            out.push_str(module);
            out.push('.');
            out.push_str(qualname);
            out.push('>');
        }
        Value::Object(obj) => write_object(out, obj, indent),
    }
}

fn write_seq(out: &mut String, items: &[Value], indent: usize, open: &str, close: &str, trailing_comma: bool) {
    out.push_str(open);
    if items.is_empty() {
        out.push_str(close);
        return;
    }
    out.push('\n');
    for (i, item) in items.iter().enumerate() {
        pad(out, indent + INDENT);
        write_value(out, item, indent + INDENT);
        if i + 1 < items.len() || trailing_comma {
            out.push(',');
        }
        out.push('\n');
    }
    pad(out, indent);
    out.push_str(close);
}

fn write_dict(out: &mut String, pairs: &[(Value, Value)], indent: usize) {
    if pairs.is_empty() {
        out.push_str("{}");
        return;
    }
    out.push_str("{\n");
    for (i, (k, v)) in pairs.iter().enumerate() {
        pad(out, indent + INDENT);
        write_value(out, k, indent + INDENT);
        out.push_str(": ");
        write_value(out, v, indent + INDENT);
        if i + 1 < pairs.len() {
            out.push(',');
        }
        out.push('\n');
    }
    pad(out, indent);
    out.push('}');
}

fn write_object(out: &mut String, obj: &Object, indent: usize) {
    if !obj.dict_items.is_empty() {
        write_dict(out, &obj.dict_items, indent);
        return;
    }
    if !obj.list_items.is_empty() {
        write_seq(out, &obj.list_items, indent, "[", "]", false);
        return;
    }
    match &obj.class {
        Value::Global { module, qualname } => {
            if module == "uuid" && qualname == "UUID" {
                if let Some(text) = uuid_text(obj) {
                    out.push_str("uuid.UUID: UUID('");
                    out.push_str(&text);
                    out.push_str("')");
                    return;
                }
            }
            out.push_str(module);
            out.push('.');
            out.push_str(qualname);
        }
        other => write_value(out, other, indent),
    }
    out.push('(');
    let mut first = true;
    let mut sep = |out: &mut String| {
        if !first {
            out.push_str(", ");
        }
        first = false;
    };
    if obj.kind == ObjectKind::Reduce || !obj.args.is_empty() {
        sep(out);
        out.push_str("args=");
        write_seq(out, &obj.args, indent, "(", ")", obj.args.len() == 1);
    }
    if !obj.kwargs.is_empty() {
        sep(out);
        out.push_str("kwargs=");
        write_dict(out, &obj.kwargs, indent);
    }
    sep(out);
    match &obj.state {
        None | Some(Value::None) => out.push_str("__dict__={}"),
        Some(Value::Dict(pairs)) => {
            out.push_str("__dict__=");
            write_dict(out, pairs, indent);
        }
        Some(Value::Tuple(parts)) if parts.len() == 2 => {
            out.push_str("__dict__=");
            match parts.first() {
                Some(Value::None) | None => out.push_str("{}"),
                Some(d) => write_value(out, d, indent),
            }
            out.push_str(", __slots__=");
            if let Some(s) = parts.get(1) {
                write_value(out, s, indent);
            }
        }
        Some(other) => {
            out.push_str("state=");
            write_value(out, other, indent);
        }
    }
    out.push(')');
}

/// `8-4-4-4-12` text of a pickled `uuid.UUID` (its state holds the 128-bit `int`).
fn uuid_text(obj: &Object) -> Option<String> {
    let n: u128 = match obj.attr("int")? {
        Value::Int(i) => u128::try_from(*i).ok()?,
        Value::BigInt(bytes) => {
            if bytes.last().is_some_and(|b| b & 0x80 != 0) || bytes.len() > 17 {
                return None;
            }
            let mut buf = [0u8; 16];
            for (i, b) in bytes.iter().enumerate() {
                match buf.get_mut(i) {
                    Some(slot) => *slot = *b,
                    None if *b == 0 => {}
                    None => return None,
                }
            }
            u128::from_le_bytes(buf)
        }
        _ => return None,
    };
    let hex = format!("{n:032x}");
    Some(format!(
        "{}-{}-{}-{}-{}",
        hex.get(0..8)?,
        hex.get(8..12)?,
        hex.get(12..16)?,
        hex.get(16..20)?,
        hex.get(20..32)?
    ))
}

/// Bytes of the largest integer rendered in decimal: about CPython's own limit of 4300 digits for
/// `repr(int)`. The conversion is quadratic, so a huge LONG4 must not stall a log line.
const MAX_DECIMAL_INT_BYTES: usize = 1786;

/// Decimal text of a little-endian two's-complement integer of any length.
pub(crate) fn bigint_decimal(bytes: &[u8]) -> String {
    if bytes.len() > MAX_DECIMAL_INT_BYTES {
        return format!("<int of {} bytes>", bytes.len());
    }
    let negative = bytes.last().is_some_and(|b| b & 0x80 != 0);
    // Magnitude as little-endian bytes: negate (invert and add one) if negative.
    let mut mag: Vec<u8> = bytes.to_vec();
    if negative {
        let mut carry = true;
        for b in mag.iter_mut() {
            *b = !*b;
            if carry {
                let (v, c) = b.overflowing_add(1);
                *b = v;
                carry = c;
            }
        }
    }
    // Big-endian u32 limbs, then repeated division by 10^9.
    let mut limbs: Vec<u32> = mag
        .chunks(4)
        .rev()
        .map(|c| {
            let mut buf = [0u8; 4];
            for (dst, src) in buf.iter_mut().zip(c) {
                *dst = *src;
            }
            u32::from_le_bytes(buf)
        })
        .collect();
    let mut groups: Vec<u32> = Vec::new();
    while limbs.iter().any(|&l| l != 0) {
        let mut rem: u64 = 0;
        for limb in limbs.iter_mut() {
            let cur = (rem << 32) | u64::from(*limb);
            *limb = (cur / 1_000_000_000) as u32;
            rem = cur % 1_000_000_000;
        }
        groups.push(rem as u32);
        let leading_zeros = limbs.iter().take_while(|&&l| l == 0).count();
        limbs.drain(..leading_zeros);
    }
    let mut out = String::new();
    if negative {
        out.push('-');
    }
    match groups.split_last() {
        None => out.push('0'),
        Some((most, rest)) => {
            out.push_str(&most.to_string());
            for g in rest.iter().rev() {
                out.push_str(&format!("{g:09}"));
            }
        }
    }
    out
}

/// Python's `repr(float)`: shortest round-trip digits, exponent notation below 1e-4 and from 1e16.
pub fn float_repr(f: f64) -> String {
    if f.is_nan() {
        return "nan".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "inf".into() } else { "-inf".into() };
    }
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let negative = mantissa.starts_with('-');
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    let mut out = String::new();
    if negative {
        out.push('-');
    }
    if (-4..16).contains(&exp) {
        if exp >= 0 {
            let int_len = exp as usize + 1;
            let (int_part, frac) = if digits.len() > int_len {
                (digits.get(..int_len).unwrap_or(""), digits.get(int_len..).unwrap_or(""))
            } else {
                (digits.as_str(), "")
            };
            out.push_str(int_part);
            out.extend(std::iter::repeat_n('0', int_len.saturating_sub(digits.len())));
            out.push('.');
            out.push_str(if frac.is_empty() { "0" } else { frac });
        } else {
            out.push_str("0.");
            out.extend(std::iter::repeat_n('0', (-exp - 1) as usize));
            out.push_str(&digits);
        }
    } else {
        let (first, rest) = digits.split_at(1.min(digits.len()));
        out.push_str(first);
        if !rest.is_empty() {
            out.push('.');
            out.push_str(rest);
        }
        out.push('e');
        out.push(if exp < 0 { '-' } else { '+' });
        out.push_str(&format!("{:02}", exp.unsigned_abs()));
    }
    out
}

/// Python's `repr(str)`.
pub fn str_repr(s: &str) -> String {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    let mut out = String::with_capacity(s.len() + 2);
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => out.push_str(&format!("\\x{:02x}", c as u32)),
            c if c.is_ascii() || is_printable(c) => out.push(c),
            c => {
                let n = c as u32;
                if n <= 0xff {
                    out.push_str(&format!("\\x{n:02x}"));
                } else if n <= 0xffff {
                    out.push_str(&format!("\\u{n:04x}"));
                } else {
                    out.push_str(&format!("\\U{n:08x}"));
                }
            }
        }
    }
    out.push(quote);
    out
}

/// Approximation of Python's `str.isprintable` for non-ASCII characters: control, format,
/// separator (other than space), private-use and non-characters are escaped. Unassigned code points
/// need Unicode tables we do not carry and are treated as printable.
fn is_printable(c: char) -> bool {
    let n = c as u32;
    !(c.is_control()
        || matches!(
            n,
            0x00a0
                | 0x00ad
                | 0x0600..=0x0605
                | 0x061c
                | 0x06dd
                | 0x070f
                | 0x0890..=0x0891
                | 0x08e2
                | 0x1680
                | 0x180e
                | 0x2000..=0x200f
                | 0x2028..=0x202f
                | 0x205f..=0x2064
                | 0x2066..=0x206f
                | 0x3000
                | 0xe000..=0xf8ff
                | 0xfdd0..=0xfdef
                | 0xfeff
                | 0xfff9..=0xfffb
                | 0x110bd
                | 0x110cd
                | 0x13430..=0x1343f
                | 0x1bca0..=0x1bca3
                | 0x1d173..=0x1d17a
                | 0xe0001
                | 0xe0020..=0xe007f
                | 0xf0000..=0x10ffff
        )
        || n & 0xfffe == 0xfffe)
}

/// Python's `repr(bytes)`.
pub fn bytes_repr(b: &[u8]) -> String {
    let quote = if b.contains(&b'\'') && !b.contains(&b'"') {
        b'"'
    } else {
        b'\''
    };
    let mut out = String::with_capacity(b.len() + 3);
    out.push('b');
    out.push(quote as char);
    for &c in b {
        match c {
            b'\\' => out.push_str("\\\\"),
            b'\t' => out.push_str("\\t"),
            b'\n' => out.push_str("\\n"),
            b'\r' => out.push_str("\\r"),
            c if c == quote => {
                out.push('\\');
                out.push(c as char);
            }
            0x20..=0x7e => out.push(c as char),
            c => out.push_str(&format!("\\x{c:02x}")),
        }
    }
    out.push(quote as char);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_match_python_repr() {
        let cases = [
            (1000.0, "1000.0"),
            (1e-05, "1e-05"),
            (0.0001, "0.0001"),
            (1e16, "1e+16"),
            (1.5e16, "1.5e+16"),
            (1e15, "1000000000000000.0"),
            (123456789012345678.0, "1.2345678901234568e+17"),
            (0.1, "0.1"),
            (-0.0, "-0.0"),
            (0.0, "0.0"),
            (3.6837799549102783, "3.6837799549102783"),
            (0.000122345500017218, "0.000122345500017218"),
            (1.7976931348623157e308, "1.7976931348623157e+308"),
            (5e-324, "5e-324"),
            (f64::INFINITY, "inf"),
            (f64::NEG_INFINITY, "-inf"),
            (f64::NAN, "nan"),
            (-2.5, "-2.5"),
            (35.0, "35.0"),
        ];
        for (f, want) in cases {
            assert_eq!(float_repr(f), want, "{f:?}");
        }
    }

    #[test]
    fn strings_match_python_repr() {
        assert_eq!(str_repr("abc"), "'abc'");
        assert_eq!(str_repr("it's"), "\"it's\"");
        assert_eq!(str_repr("both ' and \""), "'both \\' and \"'");
        assert_eq!(str_repr("a\nb\tc\\"), "'a\\nb\\tc\\\\'");
        assert_eq!(
            str_repr("\x00\x7f\u{80}é€\u{a0}\u{200b}😀"),
            "'\\x00\\x7f\\x80é€\\xa0\\u200b😀'"
        );
        assert_eq!(bytes_repr(b"a'b\x00\xff"), "b\"a'b\\x00\\xff\"");
        assert_eq!(bytes_repr(b""), "b''");
    }

    #[test]
    fn big_ints_in_decimal() {
        assert_eq!(bigint_decimal(&[]), "0");
        assert_eq!(bigint_decimal(&[0xff]), "-1");
        assert_eq!(
            bigint_decimal(&[0, 0, 0, 0, 0, 0, 0, 0, 0x40]),
            "1180591620717411303424"
        );
        assert_eq!(
            bigint_decimal(&[0, 0, 0, 0, 0, 0, 0, 0, 0xc0]),
            "-1180591620717411303424"
        );
        if let Value::BigInt(b) = Value::from(u128::MAX) {
            assert_eq!(bigint_decimal(&b), u128::MAX.to_string());
        }
        assert_eq!(bigint_decimal(&[0x11; 1787]), "<int of 1787 bytes>");
        assert!(bigint_decimal(&[0x11; 1786]).bytes().all(|b| b.is_ascii_digit()));
    }
}
