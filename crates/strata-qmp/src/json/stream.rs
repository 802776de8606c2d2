//! QEMU's JSON message streamer (qobject/json-streamer.c): counts braces and
//! brackets over the tokens and parses a message as soon as they balance,
//! so a client's requests need no framing; a lexical error, or a message
//! beyond the limits, is answered at once and the count starts over.

use super::lexer::{Lexer, TokenKind, MAX_TOKEN_SIZE};
use super::parser::{self, Token};
use serde_json::Value;

/// Most tokens one message may have (QEMU: MAX_TOKEN_COUNT).
const MAX_TOKEN_COUNT: usize = 2 << 20;
/// Deepest nesting of a message (QEMU: MAX_NESTING).
const MAX_NESTING: i64 = 1 << 10;

/// Splits a byte stream into JSON messages.
#[derive(Default)]
pub struct JsonStream {
    lexer: Lexer,
    tokens: Vec<Token>,
    braces: i64,
    brackets: i64,
    size: usize,
}

impl JsonStream {
    /// Feeds bytes; returns each message they complete, parsed or the error
    /// to report for it.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<Result<Value, String>> {
        let mut out = Vec::new();
        let mut lexer = std::mem::take(&mut self.lexer);
        for &b in bytes {
            lexer.feed(b, &mut |kind, text| {
                if let Some(m) = self.token(kind, text) {
                    out.push(m);
                }
            });
        }
        self.lexer = lexer;
        out
    }

    fn reset(&mut self) {
        self.tokens.clear();
        self.braces = 0;
        self.brackets = 0;
        self.size = 0;
    }

    fn token(&mut self, kind: TokenKind, text: &[u8]) -> Option<Result<Value, String>> {
        match kind {
            TokenKind::LCurly => self.braces += 1,
            TokenKind::RCurly => self.braces -= 1,
            TokenKind::LSquare => self.brackets += 1,
            TokenKind::RSquare => self.brackets -= 1,
            TokenKind::Error => {
                self.reset();
                return Some(Err(format!(
                    "JSON parse error, stray '{}'",
                    String::from_utf8_lossy(text)
                )));
            }
            _ => {}
        }
        let limit = if kind == TokenKind::TooLong || self.size + text.len() + 1 > MAX_TOKEN_SIZE {
            Some("JSON token size limit exceeded")
        } else if self.tokens.len() + 1 > MAX_TOKEN_COUNT {
            Some("JSON token count limit exceeded")
        } else if self.braces + self.brackets > MAX_NESTING {
            Some("JSON nesting depth limit exceeded")
        } else {
            None
        };
        if let Some(msg) = limit {
            self.reset();
            return Some(Err(msg.to_string()));
        }
        self.size += text.len();
        self.tokens.push(Token {
            kind,
            text: text.to_vec(),
        });
        if (self.braces > 0 || self.brackets > 0) && self.braces >= 0 && self.brackets >= 0 {
            return None;
        }
        let v = parser::parse(&self.tokens);
        self.reset();
        Some(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_split_without_framing() {
        let mut s = JsonStream::default();
        assert!(s.feed(b"{\"execute\":").is_empty());
        let m = s.feed(b" \"quit\"}{\"a\":[1,");
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].as_ref().unwrap()["execute"], "quit");
        let m = s.feed(b"2]}");
        assert_eq!(m[0].as_ref().unwrap()["a"][1], 2);
    }

    #[test]
    fn a_keyword_ends_at_the_next_byte_and_errors_resync() {
        let mut s = JsonStream::default();
        assert!(s.feed(b"garbage").is_empty());
        let m = s.feed(b"{");
        assert_eq!(
            m[0].as_ref().unwrap_err(),
            "JSON parse error, invalid keyword 'garbage'"
        );
        let m = s.feed(b"}");
        assert!(m[0].as_ref().unwrap().as_object().unwrap().is_empty());
        let m = s.feed(b"\x01 {}");
        assert_eq!(m[0].as_ref().unwrap_err(), "JSON parse error, stray '\x01'");
        assert!(m[1].is_ok());
        let m = s.feed(b"}");
        assert_eq!(
            m[0].as_ref().unwrap_err(),
            "JSON parse error, expecting value"
        );
    }

    #[test]
    fn nesting_limit() {
        let mut s = JsonStream::default();
        let deep = "[".repeat(1025);
        let m = s.feed(deep.as_bytes());
        assert_eq!(
            m[0].as_ref().unwrap_err(),
            "JSON nesting depth limit exceeded"
        );
    }
}
