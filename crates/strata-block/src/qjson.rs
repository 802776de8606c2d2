//! QEMU's JSON dialect, as `json:` file names and QMP accept it: standard
//! JSON plus single-quoted strings (`{'driver': 'raw'}`) and `\'` escapes.
//! Objects keep their key order. Errors use QEMU's words, since scripts see
//! them ("JSON parse error, premature EOI").

use serde_json::{Map, Number, Value};

/// Deepest nesting accepted (QEMU: MAX_NESTING).
const MAX_NESTING: usize = 1024;

/// Parses exactly one JSON value from `s`.
pub fn parse(s: &str) -> Result<Value, String> {
    let mut p = Parser {
        s: s.as_bytes(),
        pos: 0,
        depth: 0,
    };
    p.skip_ws();
    if p.pos == p.s.len() {
        return Err("Expecting a JSON value".into());
    }
    let v = p.value()?;
    p.skip_ws();
    if p.pos != p.s.len() {
        return Err("Expecting at most one JSON value".into());
    }
    Ok(v)
}

struct Parser<'a> {
    s: &'a [u8],
    pos: usize,
    depth: usize,
}

fn parse_error(what: &str) -> String {
    format!("JSON parse error, {what}")
}

impl Parser<'_> {
    fn skip_ws(&mut self) {
        while self.pos < self.s.len() && matches!(self.s[self.pos], b' ' | b'\t' | b'\n' | b'\r') {
            self.pos += 1;
        }
    }

    fn peek(&mut self) -> Result<u8, String> {
        self.skip_ws();
        self.s
            .get(self.pos)
            .copied()
            .ok_or_else(|| parse_error("premature EOI"))
    }

    fn value(&mut self) -> Result<Value, String> {
        match self.peek()? {
            b'{' => self.nested(Self::object),
            b'[' => self.nested(Self::array),
            b'"' | b'\'' => self.string().map(Value::String),
            b'-' | b'0'..=b'9' => self.number(),
            b'a'..=b'z' => self.keyword(),
            b'}' | b']' | b',' | b':' => Err(parse_error("expecting value")),
            c => Err(parse_error(&format!("stray '{}'", c as char))),
        }
    }

    fn nested(&mut self, f: fn(&mut Self) -> Result<Value, String>) -> Result<Value, String> {
        self.depth += 1;
        if self.depth > MAX_NESTING {
            return Err("JSON nesting depth limit exceeded".into());
        }
        let v = f(self);
        self.depth -= 1;
        v
    }

    fn object(&mut self) -> Result<Value, String> {
        self.pos += 1;
        let mut m = Map::new();
        if self.peek()? == b'}' {
            self.pos += 1;
            return Ok(Value::Object(m));
        }
        loop {
            if !matches!(self.peek()?, b'"' | b'\'') {
                return Err(parse_error("key is not a string in object"));
            }
            let k = self.string()?;
            if self.peek()? != b':' {
                return Err(parse_error("missing : in object pair"));
            }
            self.pos += 1;
            let v = self.value()?;
            if m.contains_key(&k) {
                return Err(parse_error("duplicate key"));
            }
            m.insert(k, v);
            match self.peek()? {
                b',' => self.pos += 1,
                b'}' => {
                    self.pos += 1;
                    return Ok(Value::Object(m));
                }
                _ => return Err(parse_error("expected separator in dict")),
            }
        }
    }

    fn array(&mut self) -> Result<Value, String> {
        self.pos += 1;
        let mut a = Vec::new();
        if self.peek()? == b']' {
            self.pos += 1;
            return Ok(Value::Array(a));
        }
        loop {
            a.push(self.value()?);
            match self.peek()? {
                b',' => {
                    self.pos += 1;
                    if self.peek()? == b']' {
                        return Err(parse_error("expecting value"));
                    }
                }
                b']' => {
                    self.pos += 1;
                    return Ok(Value::Array(a));
                }
                _ => return Err(parse_error("expected separator in list")),
            }
        }
    }

    fn string(&mut self) -> Result<String, String> {
        let quote = self.s[self.pos];
        self.pos += 1;
        let mut out = Vec::new();
        loop {
            let Some(&c) = self.s.get(self.pos) else {
                return Err(parse_error("premature EOI"));
            };
            self.pos += 1;
            if c == quote {
                break;
            }
            if c != b'\\' {
                out.push(c);
                continue;
            }
            let Some(&e) = self.s.get(self.pos) else {
                return Err(parse_error("premature EOI"));
            };
            self.pos += 1;
            match e {
                b'"' | b'\'' | b'\\' | b'/' => out.push(e),
                b'b' => out.push(8),
                b'f' => out.push(12),
                b'n' => out.push(b'\n'),
                b'r' => out.push(b'\r'),
                b't' => out.push(b'\t'),
                b'u' => {
                    let cp = self.hex4()?;
                    let cp = if (0xd800..0xdc00).contains(&cp)
                        && self.s.get(self.pos..self.pos + 2) == Some(b"\\u")
                    {
                        self.pos += 2;
                        let lo = self.hex4()?;
                        0x10000 + ((cp - 0xd800) << 10) + (lo.wrapping_sub(0xdc00) & 0x3ff)
                    } else {
                        cp
                    };
                    let ch = char::from_u32(cp)
                        .ok_or_else(|| parse_error("invalid escape sequence in string"))?;
                    let mut b = [0; 4];
                    out.extend_from_slice(ch.encode_utf8(&mut b).as_bytes());
                }
                _ => return Err(parse_error("invalid escape sequence in string")),
            }
        }
        String::from_utf8(out).map_err(|_| parse_error("invalid UTF-8 sequence in string"))
    }

    fn hex4(&mut self) -> Result<u32, String> {
        let h = self
            .s
            .get(self.pos..self.pos + 4)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u32::from_str_radix(h, 16).ok())
            .ok_or_else(|| parse_error("invalid escape sequence in string"))?;
        self.pos += 4;
        Ok(h)
    }

    fn number(&mut self) -> Result<Value, String> {
        let start = self.pos;
        while self.pos < self.s.len()
            && matches!(
                self.s[self.pos],
                b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9'
            )
        {
            self.pos += 1;
        }
        let text = std::str::from_utf8(&self.s[start..self.pos]).unwrap_or("");
        if let Ok(i) = text.parse::<i64>() {
            return Ok(Value::Number(i.into()));
        }
        if let Ok(u) = text.parse::<u64>() {
            return Ok(Value::Number(u.into()));
        }
        text.parse::<f64>()
            .ok()
            .and_then(Number::from_f64)
            .map(Value::Number)
            .ok_or_else(|| parse_error(&format!("stray '{text}'")))
    }

    fn keyword(&mut self) -> Result<Value, String> {
        let start = self.pos;
        while self.pos < self.s.len() && self.s[self.pos].is_ascii_alphanumeric() {
            self.pos += 1;
        }
        let word = std::str::from_utf8(&self.s[start..self.pos]).unwrap_or("");
        match word {
            "true" => Ok(Value::Bool(true)),
            "false" => Ok(Value::Bool(false)),
            "null" => Ok(Value::Null),
            _ => Err(parse_error(&format!("invalid keyword '{word}'"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_quotes_and_order() {
        let v = parse("{'driver':'raw', \"b\": [1, -2, 3.5, true, null], 'a': 'it\\'s'}").unwrap();
        let keys: Vec<_> = v.as_object().unwrap().keys().cloned().collect();
        assert_eq!(keys, ["driver", "b", "a"]);
        assert_eq!(v["a"], "it's");
        assert_eq!(v["b"][1], -2);
    }

    #[test]
    fn qemu_error_words() {
        assert_eq!(parse("{").unwrap_err(), "JSON parse error, premature EOI");
        assert_eq!(parse("").unwrap_err(), "Expecting a JSON value");
        assert_eq!(
            parse("{\"a\":}").unwrap_err(),
            "JSON parse error, expecting value"
        );
        assert_eq!(
            parse("{\"a\" 1}").unwrap_err(),
            "JSON parse error, missing : in object pair"
        );
        assert_eq!(
            parse("{\"x\":1} junk").unwrap_err(),
            "Expecting at most one JSON value"
        );
        assert_eq!(
            parse("{1:2}").unwrap_err(),
            "JSON parse error, key is not a string in object"
        );
    }
}
