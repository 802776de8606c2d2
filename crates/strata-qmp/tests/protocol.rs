//! The QMP protocol end to end over in-memory connections: greeting,
//! negotiation, dispatch, QEMU's error replies, events, several clients.

use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;
use strata_qmp::{MonitorOptions, Qmp, QmpError, Schema};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, DuplexStream, ReadHalf, WriteHalf};

struct Client {
    rd: BufReader<ReadHalf<DuplexStream>>,
    wr: WriteHalf<DuplexStream>,
}

impl Client {
    async fn line(&mut self) -> String {
        let mut l = String::new();
        tokio::time::timeout(Duration::from_secs(5), self.rd.read_line(&mut l))
            .await
            .expect("no answer")
            .unwrap();
        l
    }
    async fn send(&mut self, s: &str) {
        self.wr.write_all(s.as_bytes()).await.unwrap();
    }
    async fn ask(&mut self, s: &str) -> Value {
        self.send(s).await;
        let l = self.line().await;
        assert!(l.ends_with("\r\n"), "{l:?}");
        serde_json::from_str(&l).unwrap()
    }
}

fn server() -> Arc<Qmp> {
    let mut schema = Schema::new();
    schema.object("EchoArgs", &[("text", "str"), ("*times", "int")]);
    let mut qmp = Qmp::new(
        json!({"qemu": {"major": 10, "minor": 0, "micro": 2}, "package": "x"}),
        schema,
    );
    qmp.add_command(
        "echo",
        Some("EchoArgs"),
        Arc::new(|args| {
            Box::pin(async move {
                if args["text"] == "fail" {
                    return Err(QmpError::generic("it failed"));
                }
                Ok(args)
            })
        }),
    );
    qmp.add_control_commands();
    assert!(qmp.undefined_types().is_empty());
    Arc::new(qmp)
}

fn connect(qmp: &Arc<Qmp>, pretty: bool) -> Client {
    let (a, b) = tokio::io::duplex(1 << 16);
    let (r, w) = tokio::io::split(b);
    tokio::spawn(Arc::clone(qmp).serve(r, w, MonitorOptions { pretty }));
    let (rd, wr) = tokio::io::split(a);
    Client {
        rd: BufReader::new(rd),
        wr,
    }
}

fn err(class: &str, desc: &str) -> Value {
    json!({"error": {"class": class, "desc": desc}})
}

#[tokio::test]
async fn greeting_and_negotiation() {
    let qmp = server();
    let mut c = connect(&qmp, false);
    let g = c.line().await;
    assert_eq!(
        g,
        "{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 2, \"minor\": 0, \"major\": 10}, \"package\": \"x\"}, \"capabilities\": [\"oob\"]}}\r\n"
    );
    assert_eq!(
        c.ask(r#"{"execute": "echo", "arguments": {"text": "a"}}"#)
            .await,
        err(
            "CommandNotFound",
            "Expecting capabilities negotiation with 'qmp_capabilities'"
        )
    );
    assert_eq!(
        c.ask(r#"{"execute": "qmp_capabilities", "arguments": {"enable": ["x"]}}"#)
            .await,
        err("GenericError", "Parameter 'null' does not accept value 'x'")
    );
    assert_eq!(
        c.ask(r#"{"execute": "qmp_capabilities"}"#).await,
        json!({"return": {}})
    );
    assert_eq!(
        c.ask(r#"{"execute": "qmp_capabilities", "id": 7}"#).await,
        json!({"error": {"class": "CommandNotFound", "desc": "Capabilities negotiation is already complete, command ignored"}, "id": 7})
    );
    assert_eq!(
        c.ask(
            r#"{"execute": "echo", "arguments": {"text": "a", "times": 2}, "id": [1, {"a": null}]}"#
        )
        .await,
        json!({"return": {"text": "a", "times": 2}, "id": [1, {"a": null}]})
    );
    assert_eq!(
        c.ask(r#"{"execute": "query-commands"}"#).await,
        json!({"return": [{"name": "query-commands"}, {"name": "query-version"}, {"name": "qmp_capabilities"}, {"name": "echo"}]})
    );
    assert_eq!(
        c.ask(r#"{"execute": "query-version"}"#).await["return"]["package"],
        "x"
    );
}

#[tokio::test]
async fn malformed_input_gets_qemus_errors() {
    let qmp = server();
    let mut c = connect(&qmp, false);
    c.line().await;
    c.ask(r#"{"execute": "qmp_capabilities"}"#).await;
    let g = |d: &str| err("GenericError", d);
    assert_eq!(c.ask("[1]").await, g("QMP input must be a JSON object"));
    assert_eq!(c.ask("{}").await, g("QMP input lacks member 'execute'"));
    assert_eq!(
        c.ask(r#"{"execute": 1}"#).await,
        g("QMP input member 'execute' must be a string")
    );
    assert_eq!(
        c.ask(r#"{"execute": "x", "foo": 1}"#).await,
        g("QMP input member 'foo' is unexpected")
    );
    assert_eq!(
        c.ask(r#"{"execute": "x", "arguments": []}"#).await,
        g("QMP input member 'arguments' must be an object")
    );
    assert_eq!(
        c.ask(r#"{"exec-oob": "echo"}"#).await,
        g("QMP input member 'exec-oob' is unexpected")
    );
    assert_eq!(
        c.ask(r#"{"execute": "nope", "id": "a"}"#).await,
        json!({"error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}, "id": "a"})
    );
    assert_eq!(
        c.ask(r#"{"execute": "echo"}"#).await,
        g("Parameter 'text' is missing")
    );
    assert_eq!(
        c.ask(r#"{"execute": "echo", "arguments": {"text": 1}}"#)
            .await,
        g("Invalid parameter type for 'text', expected: string")
    );
    assert_eq!(
        c.ask(r#"{"execute": "echo", "arguments": {"text": "a", "more": 1}}"#)
            .await,
        g("Parameter 'more' is unexpected")
    );
    assert_eq!(
        c.ask(r#"{"execute": "echo", "arguments": {"text": "fail"}}"#)
            .await,
        g("it failed")
    );
    assert_eq!(
        c.ask(r#"{"execute": "query-version", "arguments": {"a": 1}}"#)
            .await,
        g("Parameter 'a' is unexpected")
    );
    // A bare word is only known to end when the next byte comes.
    c.send("garbage").await;
    assert_eq!(
        c.ask("{").await,
        g("JSON parse error, invalid keyword 'garbage'")
    );
    assert_eq!(
        c.ask(r#""execute": "query-version"}"#).await["return"]["package"],
        "x"
    );
    assert_eq!(
        c.ask("\"str\"\n").await,
        g("QMP input must be a JSON object")
    );
    assert_eq!(
        c.ask("{'a' 1}").await,
        g("JSON parse error, missing : in object pair")
    );
    assert_eq!(c.ask("}").await, g("JSON parse error, expecting value"));
}

#[tokio::test]
async fn oob_is_negotiated_but_no_command_runs_out_of_band() {
    let qmp = server();
    let mut c = connect(&qmp, false);
    c.line().await;
    c.ask(r#"{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}"#)
        .await;
    assert_eq!(
        c.ask(r#"{"exec-oob": "query-version", "id": 1}"#).await,
        json!({"error": {"class": "GenericError", "desc": "The command query-version does not support OOB"}, "id": 1})
    );
}

#[tokio::test]
async fn events_reach_every_negotiated_client_and_pretty_output() {
    let qmp = server();
    let mut a = connect(&qmp, false);
    let mut b = connect(&qmp, true);
    let mut late = connect(&qmp, false);
    a.line().await;
    let mut greeting = String::new();
    for _ in 0..15 {
        greeting.push_str(&b.line().await);
    }
    assert!(
        greeting.starts_with("{\r\n    \"QMP\": {\r\n"),
        "{greeting}"
    );
    late.line().await;
    a.ask(r#"{"execute": "qmp_capabilities"}"#).await;
    b.send(r#"{"execute": "qmp_capabilities"}"#).await;
    assert_eq!(b.line().await, "{\r\n");
    assert_eq!(b.line().await, "    \"return\": {\r\n");
    assert_eq!(b.line().await, "    }\r\n");
    assert_eq!(b.line().await, "}\r\n");
    qmp.emit(
        "BLOCK_IMAGE_CORRUPTED",
        Some(json!({"node-name": "top", "fatal": true})),
    );
    let e: Value = serde_json::from_str(&a.line().await).unwrap();
    assert_eq!(e["event"], "BLOCK_IMAGE_CORRUPTED");
    assert_eq!(e["data"]["node-name"], "top");
    assert!(e["timestamp"]["seconds"].as_u64().unwrap() > 1_600_000_000);
    assert!(e["timestamp"]["microseconds"].as_u64().unwrap() < 1_000_000);
    assert_eq!(b.line().await, "{\r\n");
    // Not negotiated yet: no events, and the next line is its own answer.
    assert_eq!(
        late.ask(r#"{"execute": "qmp_capabilities"}"#).await,
        json!({"return": {}})
    );
    qmp.flush().await;
}
