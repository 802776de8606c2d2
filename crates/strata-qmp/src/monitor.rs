//! The QMP server (qmp-spec.rst; QEMU: monitor/qmp.c, qapi/qmp-dispatch.c):
//! commands by name with their argument types, the capabilities
//! negotiation every connection starts in, one command at a time across
//! all connections, and events to every connection that negotiated.

use crate::error::{ErrorClass, QmpError};
use crate::json::{to_line, JsonStream};
use crate::schema::Schema;
use futures::future::BoxFuture;
use serde_json::{json, Map, Value};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

/// What a command does with its checked arguments.
/// What a command waits for before it runs.
pub type Gate = Arc<dyn Fn() -> BoxFuture<'static, ()> + Send + Sync>;

pub type Handler = Arc<dyn Fn(Value) -> BoxFuture<'static, Result<Value, QmpError>> + Send + Sync>;

/// The capabilities a monitor can offer (QEMU: QMPCapability).
const CAPABILITIES: &[&str] = &["oob"];

#[derive(Clone)]
enum Action {
    /// `qmp_capabilities`: ends negotiation.
    Capabilities,
    /// `query-version`.
    Version,
    /// `query-commands`.
    Commands,
    /// A command of the user of this crate.
    Call(Handler),
}

#[derive(Clone)]
struct Command {
    name: String,
    /// The object type of its arguments.
    args: String,
    action: Action,
}

/// Output queued for one connection.
enum Out {
    Line(String),
    /// Answered once everything before it is written.
    Flush(oneshot::Sender<()>),
}

/// A connected client, as events and shutdown see it.
struct Client {
    id: u64,
    tx: mpsc::UnboundedSender<Out>,
    negotiated: Arc<AtomicBool>,
    pretty: bool,
}

/// How one monitor (`--monitor`) talks to its clients.
#[derive(Clone, Copy, Debug, Default)]
pub struct MonitorOptions {
    /// Responses and events are pretty-printed (`pretty=on`).
    pub pretty: bool,
}

/// The commands, their argument types and the connected clients of a
/// process. Several monitors (sockets, stdio) share one.
pub struct Qmp {
    schema: Schema,
    commands: Vec<Command>,
    version: Value,
    clients: Mutex<Vec<Client>>,
    next_client: AtomicU64,
    /// Held while a command runs: commands never interleave.
    busy: tokio::sync::Mutex<()>,
    /// Awaited before each command runs (see [`Qmp::set_gate`]).
    gate: Option<Gate>,
    /// Connections whose client left but whose last answers are still
    /// being written; `flush` waits for them too.
    closing: AtomicU64,
    closed: tokio::sync::Notify,
}

/// The state of one connection.
struct Session {
    negotiated: Arc<AtomicBool>,
    oob: bool,
}

fn response(result: Result<Value, QmpError>, id: Option<Value>) -> Value {
    let mut m = Map::new();
    match result {
        Ok(v) => m.insert("return".into(), v),
        Err(e) => m.insert("error".into(), e.to_value()),
    };
    if let Some(id) = id {
        m.insert("id".into(), id);
    }
    Value::Object(m)
}

impl Qmp {
    /// A server answering `query-version` (and greeting) with `version`;
    /// `schema` declares the argument types of the commands to come.
    pub fn new(version: Value, mut schema: Schema) -> Qmp {
        schema
            .enumeration("QMPCapability", CAPABILITIES)
            .object(
                "q_obj_qmp_capabilities-arg",
                &[("*enable", "[QMPCapability]")],
            )
            .object("q_empty", &[]);
        Qmp {
            schema,
            commands: Vec::new(),
            version,
            clients: Mutex::new(Vec::new()),
            next_client: AtomicU64::new(1),
            busy: tokio::sync::Mutex::new(()),
            gate: None,
            closing: AtomicU64::new(0),
            closed: tokio::sync::Notify::new(),
        }
    }

    /// Makes every command wait for `gate` first: the server's background
    /// work that QEMU does in one go on its main loop finishes before the
    /// next command looks.
    pub fn set_gate(&mut self, gate: Gate) {
        self.gate = Some(gate);
    }

    /// Adds a command whose arguments are of object type `args` (None: it
    /// takes none). `query-commands` lists commands newest first.
    pub fn add_command(&mut self, name: &str, args: Option<&str>, handler: Handler) {
        self.commands.push(Command {
            name: name.into(),
            args: args.unwrap_or("q_empty").into(),
            action: Action::Call(handler),
        });
    }

    /// Adds the commands of the protocol itself: `qmp_capabilities`,
    /// `query-version`, `query-commands`.
    pub fn add_control_commands(&mut self) {
        for (name, args, action) in [
            (
                "qmp_capabilities",
                "q_obj_qmp_capabilities-arg",
                Action::Capabilities,
            ),
            ("query-version", "q_empty", Action::Version),
            ("query-commands", "q_empty", Action::Commands),
        ] {
            self.commands.push(Command {
                name: name.into(),
                args: args.into(),
                action,
            });
        }
    }

    /// The argument types and other types of this server.
    pub fn schema(&self) -> &Schema {
        &self.schema
    }

    /// Names of the undefined types the commands use (a bug if any).
    pub fn undefined_types(&self) -> Vec<String> {
        let mut missing = self.schema.undefined();
        for c in &self.commands {
            if self.schema.get(&c.args).is_none() {
                missing.push(c.args.clone());
            }
        }
        missing
    }

    fn lock_clients(&self) -> std::sync::MutexGuard<'_, Vec<Client>> {
        self.clients.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends an event to every client past negotiation (QEMU:
    /// monitor_qapi_event_emit), stamped with the time of day.
    pub fn emit(&self, event: &str, data: Option<Value>) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let mut m = Map::new();
        m.insert("event".into(), event.into());
        m.insert(
            "timestamp".into(),
            json!({"seconds": now.as_secs(), "microseconds": now.subsec_micros()}),
        );
        if let Some(d) = data {
            m.insert("data".into(), d);
        }
        let v = Value::Object(m);
        for c in self.lock_clients().iter() {
            if c.negotiated.load(Ordering::Acquire) {
                let _ = c.tx.send(Out::Line(to_line(&v, c.pretty)));
            }
        }
    }

    /// Waits for the command that runs, if any, and runs no more: what
    /// shutdown does before it closes what commands use.
    pub async fn stop(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.busy.lock().await
    }

    /// Waits until everything queued for every client is written (or its
    /// connection is gone): the last answers before the process ends.
    pub async fn flush(&self) {
        let waits: Vec<oneshot::Receiver<()>> = self
            .lock_clients()
            .iter()
            .filter_map(|c| {
                let (tx, rx) = oneshot::channel();
                c.tx.send(Out::Flush(tx)).ok().map(|_| rx)
            })
            .collect();
        for w in waits {
            let _ = w.await;
        }
        // A client that hung up right after its last command (stdin at
        // EOF) is off the list, but its answers must still go out.
        loop {
            let closed = self.closed.notified();
            tokio::pin!(closed);
            closed.as_mut().enable();
            if self.closing.load(Ordering::Acquire) == 0 {
                return;
            }
            closed.await;
        }
    }

    /// Serves one connection until the client goes: greeting, then
    /// requests and their answers, and events.
    pub async fn serve<R, W>(self: Arc<Self>, mut reader: R, mut writer: W, opts: MonitorOptions)
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let (tx, mut rx) = mpsc::unbounded_channel::<Out>();
        // A writer of its own, so answers and events keep their order.
        let write_task = tokio::spawn(async move {
            let mut dead = false;
            while let Some(out) = rx.recv().await {
                match out {
                    Out::Line(l) if !dead => {
                        dead = writer.write_all(l.as_bytes()).await.is_err()
                            || writer.flush().await.is_err();
                    }
                    Out::Line(_) => {}
                    Out::Flush(done) => {
                        let _ = done.send(());
                    }
                }
            }
        });
        let session = Session {
            negotiated: Arc::new(AtomicBool::new(false)),
            oob: false,
        };
        let id = self.next_client.fetch_add(1, Ordering::Relaxed);
        self.lock_clients().push(Client {
            id,
            tx: tx.clone(),
            negotiated: Arc::clone(&session.negotiated),
            pretty: opts.pretty,
        });
        let greeting = json!({"QMP": {"version": self.version, "capabilities": CAPABILITIES}});
        let _ = tx.send(Out::Line(to_line(&greeting, opts.pretty)));
        self.read_loop(&mut reader, &tx, session, opts).await;
        self.closing.fetch_add(1, Ordering::AcqRel);
        self.lock_clients().retain(|c| c.id != id);
        drop(tx);
        let _ = write_task.await;
        self.closing.fetch_sub(1, Ordering::AcqRel);
        self.closed.notify_waiters();
    }

    async fn read_loop<R: AsyncRead + Unpin>(
        &self,
        reader: &mut R,
        tx: &mpsc::UnboundedSender<Out>,
        mut session: Session,
        opts: MonitorOptions,
    ) {
        let mut stream = JsonStream::default();
        let mut buf = vec![0u8; 4096];
        loop {
            let n = match reader.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            for msg in stream.feed(&buf[..n]) {
                let rsp = self.handle(&mut session, msg).await;
                if tx.send(Out::Line(to_line(&rsp, opts.pretty))).is_err() {
                    return;
                }
            }
        }
    }

    /// Checks a request's members (QEMU: qmp_dispatch_check_obj), in the
    /// order QEMU's dictionary lists them.
    fn check_request(dict: &Map<String, Value>, oob: bool) -> Result<(String, bool), QmpError> {
        let mut exec: Option<&str> = None;
        for key in strata_block::qjson::qdict_order(dict.keys()) {
            let val = &dict[key.as_str()];
            match key.as_str() {
                k @ ("execute" | "exec-oob") if k == "execute" || oob => {
                    if !val.is_string() {
                        return Err(QmpError::generic(format!(
                            "QMP input member '{k}' must be a string"
                        )));
                    }
                    if let Some(first) = exec {
                        return Err(QmpError::generic(format!(
                            "QMP input member '{k}' clashes with '{first}'"
                        )));
                    }
                    exec = Some(if k == "execute" {
                        "execute"
                    } else {
                        "exec-oob"
                    });
                }
                "arguments" if !val.is_object() => {
                    return Err(QmpError::generic(
                        "QMP input member 'arguments' must be an object",
                    ))
                }
                "arguments" | "id" => {}
                k => {
                    return Err(QmpError::generic(format!(
                        "QMP input member '{k}' is unexpected"
                    )))
                }
            }
        }
        let Some(exec) = exec else {
            return Err(QmpError::generic("QMP input lacks member 'execute'"));
        };
        let name = dict[exec].as_str().unwrap_or_default().to_string();
        Ok((name, exec == "exec-oob"))
    }

    async fn handle(&self, session: &mut Session, msg: Result<Value, String>) -> Value {
        let negotiating = !session.negotiated.load(Ordering::Acquire);
        let (result, id) = match msg {
            Err(e) => (Err(QmpError::generic(e)), None),
            Ok(Value::Object(dict)) => {
                let id = dict.get("id").cloned();
                (self.dispatch(session, &dict).await, id)
            }
            Ok(_) => (
                Err(QmpError::generic("QMP input must be a JSON object")),
                None,
            ),
        };
        let result = match result {
            // Before negotiation, say what is expected instead.
            Err(e) if negotiating && e.class == ErrorClass::CommandNotFound => {
                Err(QmpError::command_not_found(
                    "Expecting capabilities negotiation with 'qmp_capabilities'",
                ))
            }
            r => r,
        };
        response(result, id)
    }

    async fn dispatch(
        &self,
        session: &mut Session,
        dict: &Map<String, Value>,
    ) -> Result<Value, QmpError> {
        let (name, oob) = Self::check_request(dict, session.oob)?;
        let negotiating = !session.negotiated.load(Ordering::Acquire);
        let cmd = self
            .commands
            .iter()
            .find(|c| c.name == name && (!negotiating || matches!(c.action, Action::Capabilities)))
            .ok_or_else(|| {
                QmpError::command_not_found(format!("The command {name} has not been found"))
            })?;
        if oob {
            // No command of this server runs out of band.
            return Err(QmpError::generic(format!(
                "The command {name} does not support OOB"
            )));
        }
        let args = dict
            .get("arguments")
            .cloned()
            .unwrap_or_else(|| Value::Object(Map::new()));
        let args = crate::visit::visit(&self.schema, &cmd.args, args, false)?;
        if let Some(gate) = &self.gate {
            gate().await;
        }
        let _busy = self.busy.lock().await;
        match &cmd.action {
            Action::Capabilities => self.capabilities(session, &args),
            Action::Version => Ok(self.version.clone()),
            Action::Commands => {
                let list: Vec<Value> = self
                    .commands
                    .iter()
                    .rev()
                    .map(|c| json!({"name": c.name}))
                    .collect();
                Ok(Value::Array(list))
            }
            Action::Call(h) => h(args).await,
        }
    }

    fn capabilities(&self, session: &mut Session, args: &Value) -> Result<Value, QmpError> {
        if session.negotiated.load(Ordering::Acquire) {
            return Err(QmpError::command_not_found(
                "Capabilities negotiation is already complete, command ignored",
            ));
        }
        let enable: Vec<&str> = args
            .get("enable")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let unavailable: Vec<&str> = enable
            .iter()
            .copied()
            .filter(|c| !CAPABILITIES.contains(c))
            .collect();
        if !unavailable.is_empty() {
            return Err(QmpError::generic(format!(
                "Capability {} not available",
                unavailable.join(", ")
            )));
        }
        session.oob = enable.contains(&"oob");
        session.negotiated.store(true, Ordering::Release);
        Ok(json!({}))
    }
}
