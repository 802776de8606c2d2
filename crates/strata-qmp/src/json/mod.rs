//! QEMU's JSON as QMP speaks it: a streaming lexer and parser that split
//! a byte stream into messages (reading), and QEMU's writer (QDict key
//! order, `%.17g` doubles, `\uXXXX` escapes) from strata-block (writing).

mod lexer;
mod parser;
mod stream;

pub use stream::JsonStream;

use serde_json::Value;

/// One line as a QMP monitor sends it: compact, or pretty with `pretty=on`,
/// every newline sent as CR LF.
pub fn to_line(v: &Value, pretty: bool) -> String {
    let text = if pretty {
        strata_block::qjson::to_string(v)
    } else {
        strata_block::qjson::to_compact_string(v)
    };
    let mut out = text.replace('\n', "\r\n");
    out.push_str("\r\n");
    out
}
