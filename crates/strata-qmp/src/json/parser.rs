//! QEMU's JSON parser over the tokens of one message: recursive descent with
//! the first error kept, in QEMU's words ("JSON parse error, ...").

use super::lexer::TokenKind;
use serde_json::{Map, Number, Value};

/// A token of a message.
#[derive(Clone, Debug)]
pub struct Token {
    pub kind: TokenKind,
    pub text: Vec<u8>,
}

struct Parser<'a> {
    tokens: &'a [Token],
    pos: usize,
}

fn error(what: impl std::fmt::Display) -> String {
    format!("JSON parse error, {what}")
}

/// Parses the tokens of one message into a value.
pub fn parse(tokens: &[Token]) -> Result<Value, String> {
    let mut p = Parser { tokens, pos: 0 };
    p.value()
}

impl Parser<'_> {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.pos)
    }

    fn pop(&mut self) -> Option<&Token> {
        let t = self.tokens.get(self.pos);
        self.pos += 1;
        t
    }

    fn value(&mut self) -> Result<Value, String> {
        let Some(t) = self.peek() else {
            return Err(error("premature EOI"));
        };
        match t.kind {
            TokenKind::LCurly => self.object(),
            TokenKind::LSquare => self.array(),
            TokenKind::Integer | TokenKind::Float | TokenKind::String => self.literal(),
            TokenKind::Keyword => self.keyword(),
            _ => Err(error("expecting value")),
        }
    }

    fn object(&mut self) -> Result<Value, String> {
        self.pop();
        let mut m = Map::new();
        match self.peek() {
            None => return Err(error("premature EOI")),
            Some(t) if t.kind == TokenKind::RCurly => {
                self.pop();
                return Ok(Value::Object(m));
            }
            Some(_) => {}
        }
        loop {
            self.pair(&mut m)?;
            match self.pop().map(|t| t.kind) {
                None => return Err(error("premature EOI")),
                Some(TokenKind::RCurly) => return Ok(Value::Object(m)),
                Some(TokenKind::Comma) => {}
                Some(_) => return Err(error("expected separator in dict")),
            }
        }
    }

    fn pair(&mut self, m: &mut Map<String, Value>) -> Result<(), String> {
        if self.peek().is_none() {
            return Err(error("premature EOI"));
        }
        let Value::String(key) = self.value()? else {
            return Err(error("key is not a string in object"));
        };
        match self.pop().map(|t| t.kind) {
            None => return Err(error("premature EOI")),
            Some(TokenKind::Colon) => {}
            Some(_) => return Err(error("missing : in object pair")),
        }
        let v = self.value()?;
        if m.contains_key(&key) {
            return Err(error("duplicate key"));
        }
        m.insert(key, v);
        Ok(())
    }

    fn array(&mut self) -> Result<Value, String> {
        self.pop();
        let mut a = Vec::new();
        match self.peek() {
            None => return Err(error("premature EOI")),
            Some(t) if t.kind == TokenKind::RSquare => {
                self.pop();
                return Ok(Value::Array(a));
            }
            Some(_) => {}
        }
        loop {
            a.push(self.value()?);
            match self.pop().map(|t| t.kind) {
                None => return Err(error("premature EOI")),
                Some(TokenKind::RSquare) => return Ok(Value::Array(a)),
                Some(TokenKind::Comma) => {}
                Some(_) => return Err(error("expected separator in list")),
            }
        }
    }

    fn keyword(&mut self) -> Result<Value, String> {
        let t = self.pop().map(|t| t.text.clone()).unwrap_or_default();
        match t.as_slice() {
            b"true" => Ok(Value::Bool(true)),
            b"false" => Ok(Value::Bool(false)),
            b"null" => Ok(Value::Null),
            w => Err(error(format!(
                "invalid keyword '{}'",
                String::from_utf8_lossy(w)
            ))),
        }
    }

    fn literal(&mut self) -> Result<Value, String> {
        let Some(t) = self.pop().cloned() else {
            return Err(error("premature EOI"));
        };
        let text = String::from_utf8_lossy(&t.text).into_owned();
        match t.kind {
            TokenKind::String => string(&t.text).map(Value::String),
            TokenKind::Integer => {
                // i64 where it fits, else u64, else a double (QEMU's QNum).
                if let Ok(i) = text.parse::<i64>() {
                    return Ok(Value::Number(i.into()));
                }
                if !text.starts_with('-') {
                    if let Ok(u) = text.parse::<u64>() {
                        return Ok(Value::Number(u.into()));
                    }
                }
                Ok(double(&text))
            }
            _ => Ok(double(&text)),
        }
    }
}

fn double(text: &str) -> Value {
    let d: f64 = text.parse().unwrap_or(0.0);
    // Out of range literals are infinite in C; JSON has no such number.
    Number::from_f64(d).map_or(Value::Null, Value::Number)
}

/// QEMU's test for a code point it will put into a string.
fn valid_codepoint(cp: u32) -> bool {
    cp <= 0x10ffff
        && !(0xfdd0..=0xfdef).contains(&cp)
        && (cp & 0xfffe) != 0xfffe
        && !(0xd800..=0xdfff).contains(&cp)
}

fn hex4(s: &[u8]) -> Option<u32> {
    let h = s.get(..4)?;
    if !h.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    u32::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok()
}

/// One UTF-8 sequence as QEMU's modified UTF-8 reads it (`\xC0\x80` is NUL;
/// overlong forms, surrogates and noncharacters are refused).
fn utf8_codepoint(s: &[u8]) -> (Option<u32>, usize) {
    let b = s[0];
    if b < 0x80 {
        return (Some(b as u32), 1);
    }
    if b >= 0xfe || b & 0x40 == 0 {
        return (None, 1);
    }
    let len = b.leading_ones() as usize;
    let mut cp = (b as u32) & ((0x80u32 >> len) - 1);
    for i in 1..len {
        match s.get(i) {
            Some(&c) if c & 0xc0 == 0x80 => cp = (cp << 6) | (c as u32 & 0x3f),
            _ => return (None, i),
        }
    }
    const MIN: [u32; 5] = [0x80, 0x800, 0x10000, 0x200000, 0x4000000];
    if !valid_codepoint(cp) || (cp < MIN[len - 2] && !(cp == 0 && len == 2)) {
        return (None, len);
    }
    (Some(cp), len)
}

/// The contents of a string token, quotes stripped and escapes decoded.
fn string(tok: &[u8]) -> Result<String, String> {
    let quote = tok[0];
    let body = &tok[1..];
    let mut out = String::new();
    let mut i = 0;
    while i < body.len() && body[i] != quote {
        if body[i] != b'\\' {
            let (cp, n) = utf8_codepoint(&body[i..]);
            let Some(c) = cp.and_then(char::from_u32) else {
                return Err(error("invalid UTF-8 sequence in string"));
            };
            out.push(c);
            i += n;
            continue;
        }
        let beg = i;
        i += 1;
        let e = body.get(i).copied().unwrap_or(0);
        i += 1;
        let c = match e {
            b'"' | b'\'' | b'\\' | b'/' => e as char,
            b'b' => '\u{8}',
            b'f' => '\u{c}',
            b'n' => '\n',
            b'r' => '\r',
            b't' => '\t',
            b'u' => {
                let mut cp = hex4(&body[i..]);
                i += 4;
                if let Some(hi @ 0xd800..=0xdbff) = cp {
                    if body.get(i..i + 2) == Some(b"\\u") {
                        cp = match hex4(body.get(i + 2..).unwrap_or(&[])) {
                            Some(lo @ 0xdc00..=0xdfff) => {
                                i += 6;
                                Some(0x10000 + ((hi & 0x3ff) << 10) + (lo & 0x3ff))
                            }
                            _ => None,
                        };
                    }
                }
                match cp.filter(|&c| valid_codepoint(c)).and_then(char::from_u32) {
                    Some(c) => c,
                    None => {
                        // QEMU quotes the escape as far as it read it.
                        let end = i.min(body.len());
                        let esc = String::from_utf8_lossy(&body[beg..end]);
                        let esc = esc.split('\0').next().unwrap_or_default();
                        return Err(error(format!("{esc} is not a valid Unicode character")));
                    }
                }
            }
            _ => return Err(error("invalid escape sequence in string")),
        };
        out.push(c);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(s: &str) -> Vec<Token> {
        let mut l = super::super::lexer::Lexer::default();
        let mut out = Vec::new();
        for b in s.bytes().chain(std::iter::once(b'\n')) {
            l.feed(b, &mut |kind, t| {
                out.push(Token {
                    kind,
                    text: t.to_vec(),
                })
            });
        }
        out
    }

    #[test]
    fn values_and_numbers() {
        let v = parse(&toks(
            "{'a': [1, -2, 18446744073709551615, 1.5, true, null], \"b\": \"x\\u00e9\"}",
        ))
        .unwrap();
        assert_eq!(v["a"][2].as_u64(), Some(u64::MAX));
        assert!(v["a"][3].is_f64());
        assert_eq!(v["b"], "xé");
        // Too big for 64 bits: a double, as in QEMU.
        let v = parse(&toks("99999999999999999999")).unwrap();
        assert!(v.is_f64());
    }

    #[test]
    fn qemu_error_words() {
        let e = |s: &str| parse(&toks(s)).unwrap_err();
        assert_eq!(e("{'a' 1}"), "JSON parse error, missing : in object pair");
        assert_eq!(
            e("{1: 2}"),
            "JSON parse error, key is not a string in object"
        );
        assert_eq!(
            e("{'a': 1 'b'}"),
            "JSON parse error, expected separator in dict"
        );
        assert_eq!(e("[1 2]"), "JSON parse error, expected separator in list");
        assert_eq!(e("{'a': 1, 'a': 2}"), "JSON parse error, duplicate key");
        assert_eq!(e("{'a': }"), "JSON parse error, expecting value");
        assert_eq!(e("{'a': 1,"), "JSON parse error, premature EOI");
        assert_eq!(e("nul"), "JSON parse error, invalid keyword 'nul'");
        assert_eq!(
            e("'\\x'"),
            "JSON parse error, invalid escape sequence in string"
        );
        assert_eq!(
            e("'\\ud800'"),
            "JSON parse error, \\ud800 is not a valid Unicode character"
        );
        assert_eq!(
            parse(&toks("'\\ud83d\\ude00 \\u0000'")).unwrap(),
            Value::String("\u{1f600} \0".into())
        );
    }
}
