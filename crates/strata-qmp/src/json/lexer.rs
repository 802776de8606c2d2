//! QEMU's JSON lexer (qobject/json-lexer.c as specified by qmp-spec.rst):
//! bytes in, tokens out, with single-quoted strings and error recovery that
//! skips to the next structural or control character.

/// The kind of a token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenKind {
    LCurly,
    RCurly,
    LSquare,
    RSquare,
    Colon,
    Comma,
    Integer,
    Float,
    Keyword,
    String,
    /// Bytes that cannot start or continue a token.
    Error,
    /// A token that grew past the size limit.
    TooLong,
}

/// Largest token the lexer builds (QEMU: MAX_TOKEN_SIZE).
pub const MAX_TOKEN_SIZE: usize = 64 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Start,
    Recovery,
    DqString,
    DqEscape,
    SqString,
    SqEscape,
    Zero,
    ExpDigits,
    ExpSign,
    ExpE,
    MantissaDigits,
    Mantissa,
    Digits,
    Sign,
    Keyword,
}

/// What one byte does in one state.
enum Step {
    /// Move to a state, taking the byte into the token.
    Go(State),
    /// A token ends; `true` when the byte belongs to it.
    Emit(TokenKind, bool),
    /// The byte is not part of the token and is looked at again from Start.
    Back,
    /// The byte is consumed and skipped (whitespace, recovery).
    Skip(State),
}

fn step(state: State, b: u8) -> Step {
    use State::*;
    use Step::*;
    let err = Emit(TokenKind::Error, true);
    match state {
        Start => match b {
            b'"' => Go(DqString),
            b'\'' => Go(SqString),
            b'0' => Go(Zero),
            b'1'..=b'9' => Go(Digits),
            b'-' => Go(Sign),
            b'{' => Emit(TokenKind::LCurly, true),
            b'}' => Emit(TokenKind::RCurly, true),
            b'[' => Emit(TokenKind::LSquare, true),
            b']' => Emit(TokenKind::RSquare, true),
            b',' => Emit(TokenKind::Comma, true),
            b':' => Emit(TokenKind::Colon, true),
            b'a'..=b'z' => Go(Keyword),
            b' ' | b'\t' | b'\r' | b'\n' => Skip(Start),
            _ => err,
        },
        // Structural and control characters are where a client can resync.
        Recovery => match b {
            b'\t' => Skip(Recovery),
            0..=0x1f | 0xfe | 0xff | b'[' | b']' | b'{' | b'}' | b':' | b',' => Back,
            _ => Skip(Recovery),
        },
        DqString => match b {
            b'\\' => Go(DqEscape),
            b'"' => Emit(TokenKind::String, true),
            0x20..=0xfd => Go(DqString),
            _ => err,
        },
        SqString => match b {
            b'\\' => Go(SqEscape),
            b'\'' => Emit(TokenKind::String, true),
            0x20..=0xfd => Go(SqString),
            _ => err,
        },
        DqEscape => match b {
            0x20..=0xfd => Go(DqString),
            _ => err,
        },
        SqEscape => match b {
            0x20..=0xfd => Go(SqString),
            _ => err,
        },
        Zero => match b {
            b'0'..=b'9' => err,
            b'.' => Go(Mantissa),
            _ => Emit(TokenKind::Integer, false),
        },
        Digits => match b {
            b'0'..=b'9' => Go(Digits),
            b'e' | b'E' => Go(ExpE),
            b'.' => Go(Mantissa),
            _ => Emit(TokenKind::Integer, false),
        },
        Sign => match b {
            b'0' => Go(Zero),
            b'1'..=b'9' => Go(Digits),
            _ => err,
        },
        Mantissa => match b {
            b'0'..=b'9' => Go(MantissaDigits),
            _ => err,
        },
        MantissaDigits => match b {
            b'0'..=b'9' => Go(MantissaDigits),
            b'e' | b'E' => Go(ExpE),
            _ => Emit(TokenKind::Float, false),
        },
        ExpE => match b {
            b'-' | b'+' => Go(ExpSign),
            b'0'..=b'9' => Go(ExpDigits),
            _ => err,
        },
        ExpSign => match b {
            b'0'..=b'9' => Go(ExpDigits),
            _ => err,
        },
        ExpDigits => match b {
            b'0'..=b'9' => Go(ExpDigits),
            _ => Emit(TokenKind::Float, false),
        },
        Keyword => match b {
            b'a'..=b'z' => Go(Keyword),
            _ => Emit(TokenKind::Keyword, false),
        },
    }
}

/// The lexer: feed it bytes, it hands complete tokens to a callback.
pub struct Lexer {
    state: State,
    token: Vec<u8>,
}

impl Default for Lexer {
    fn default() -> Self {
        Lexer {
            state: State::Start,
            token: Vec::new(),
        }
    }
}

impl Lexer {
    /// Feeds one byte; `emit` gets each token that it completes (a byte can
    /// end one token and start another).
    pub fn feed(&mut self, b: u8, emit: &mut impl FnMut(TokenKind, &[u8])) {
        loop {
            match step(self.state, b) {
                Step::Go(s) => {
                    self.token.push(b);
                    self.state = s;
                    break;
                }
                Step::Skip(s) => {
                    self.token.clear();
                    self.state = s;
                    break;
                }
                Step::Emit(kind, consumed) => {
                    if consumed {
                        self.token.push(b);
                    }
                    emit(kind, &self.token);
                    self.token.clear();
                    self.state = if kind == TokenKind::Error {
                        State::Recovery
                    } else {
                        State::Start
                    };
                    if consumed {
                        break;
                    }
                }
                Step::Back => {
                    self.token.clear();
                    self.state = State::Start;
                }
            }
        }
        // A single token may not grow without bound.
        if self.token.len() > MAX_TOKEN_SIZE {
            emit(TokenKind::TooLong, &self.token);
            self.token.clear();
            self.state = State::Start;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lex(s: &str) -> Vec<(TokenKind, String)> {
        let mut l = Lexer::default();
        let mut out = Vec::new();
        for b in s.bytes() {
            l.feed(b, &mut |k, t| {
                out.push((k, String::from_utf8_lossy(t).into_owned()))
            });
        }
        out
    }

    #[test]
    fn tokens_and_lookahead() {
        let t = lex("{'a': -1.5e3, \"b\": [true, 0]} ");
        let kinds: Vec<_> = t.iter().map(|x| x.0).collect();
        use TokenKind::*;
        assert_eq!(
            kinds,
            [
                LCurly, String, Colon, Float, Comma, String, Colon, LSquare, Keyword, Comma,
                Integer, RSquare, RCurly
            ]
        );
        assert_eq!(t[3].1, "-1.5e3");
    }

    #[test]
    fn errors_recover_at_structural_characters() {
        let t = lex("01 x garbage {");
        assert_eq!(t[0], (TokenKind::Error, "01".into()));
        // Everything up to the brace is skipped.
        assert_eq!(t[1], (TokenKind::LCurly, "{".into()));
        assert_eq!(t.len(), 2);
        let t = lex("\"a\nb\" ");
        assert_eq!(t[0], (TokenKind::Error, "\"a\n".into()));
    }
}
