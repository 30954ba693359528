//! The one client of the platform's control interface (newline-delimited JSON over the Unix
//! socket `<state>/control.sock`, served to the platform's own user only), and the waits on
//! its view of agents and tasks.
//!
//! Requests are sent as the tests write them: a response comes back as the JSON it is, an
//! `"ok": false` included (the tests assert on refusals). An I/O failure panics, except in the
//! `try_` methods.

use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use serde_json::{json, Value};

use crate::wait::{wait_until, CONNECT};

/// A client of one platform's control socket. Each request opens its own connection (so a
/// `Control` can be cloned into threads), unless sent on a [`Connection`].
#[derive(Clone, Debug)]
pub struct Control {
    socket: PathBuf,
    timeout: Duration,
}

/// One control connection carrying requests one after the other.
pub struct Connection {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Connection {
    /// Sends one request line; returns every line received through the response (event lines
    /// of a streaming `run` first, the response last).
    pub fn exchange(&mut self, line: &str) -> std::io::Result<Vec<Value>> {
        writeln!(self.writer, "{line}")?;
        let mut lines = Vec::new();
        loop {
            let mut text = String::new();
            if self.reader.read_line(&mut text)? == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("the control connection closed after {lines:?}"),
                ));
            }
            let value: Value = serde_json::from_str(text.trim()).map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("a control line that is not JSON ({e}): {text:?}"),
                )
            })?;
            let event = value.get("event").is_some() && value.get("ok").is_none();
            lines.push(value);
            if !event {
                return Ok(lines);
            }
        }
    }

    /// One request, its response.
    pub fn request(&mut self, request: &Value) -> Value {
        let mut lines = self
            .exchange(&request.to_string())
            .unwrap_or_else(|e| panic!("control request {request}: {e}"));
        lines.pop().unwrap()
    }
}

impl Control {
    /// The client of the control socket at `socket` (each response awaited 120 s at most).
    pub fn new(socket: impl Into<PathBuf>) -> Control {
        Control {
            socket: socket.into(),
            timeout: Duration::from_secs(120),
        }
    }

    /// The same client, waiting at most `timeout` for each line.
    pub fn with_timeout(mut self, timeout: Duration) -> Control {
        self.timeout = timeout;
        self
    }

    /// The socket's path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// A connection for several requests in a row.
    pub fn connect(&self) -> std::io::Result<Connection> {
        let writer = UnixStream::connect(&self.socket)?;
        writer.set_read_timeout(Some(self.timeout))?;
        writer.set_write_timeout(Some(self.timeout))?;
        Ok(Connection {
            reader: BufReader::new(writer.try_clone()?),
            writer,
        })
    }

    /// Sends `line` (a request, or anything else: the interface's answer to bad input is
    /// tested too) on a new connection; returns every line through the response.
    pub fn try_exchange(&self, line: &str) -> std::io::Result<Vec<Value>> {
        self.connect()?.exchange(line)
    }

    /// [`Control::try_exchange`]'s response; an I/O failure becomes `{"ok":false,"error":…}`
    /// (a platform a test killed meanwhile).
    pub fn try_request(&self, request: &Value) -> Value {
        match self.try_exchange(&request.to_string()) {
            Ok(mut lines) => lines.pop().unwrap(),
            Err(e) => json!({"ok": false, "error": e.to_string()}),
        }
    }

    /// The response to `line`.
    pub fn request_line(&self, line: &str) -> Value {
        let mut lines = self
            .try_exchange(line)
            .unwrap_or_else(|e| panic!("control request {line}: {e}"));
        lines.pop().unwrap()
    }

    /// The response to `request`.
    pub fn request(&self, request: &Value) -> Value {
        self.request_line(&request.to_string())
    }

    /// A streaming request's event lines and its response.
    pub fn stream(&self, request: &Value) -> (Vec<Value>, Value) {
        let mut lines = self
            .try_exchange(&request.to_string())
            .unwrap_or_else(|e| panic!("control request {request}: {e}"));
        let response = lines.pop().unwrap();
        (lines, response)
    }

    // -----------------------------------------------------------------------------------------
    // Requests

    /// The agents the platform knows (`agents`).
    pub fn agents(&self) -> Vec<Value> {
        let r = self.request(&json!({"cmd": "agents"}));
        assert_eq!(r["ok"], true, "{r}");
        r["agents"].as_array().unwrap().clone()
    }

    /// Agent `id` as the platform lists it, if it does.
    pub fn agent(&self, id: &str) -> Option<Value> {
        self.agents().into_iter().find(|a| a["id"] == id)
    }

    /// Agent `id` as the platform lists it; panics when it does not.
    #[track_caller]
    pub fn listed(&self, id: &str) -> Value {
        let agents = self.agents();
        match agents.iter().find(|a| a["id"] == id) {
            Some(a) => a.clone(),
            None => panic!("agent {id} is not listed: {}", Value::from(agents)),
        }
    }

    /// Whether agent `id` is connected now.
    pub fn connected(&self, id: &str) -> bool {
        self.agent(id).is_some_and(|a| a["connected"] == true)
    }

    /// A new enrollment token (`token`).
    pub fn token(&self) -> String {
        let r = self.request(&json!({"cmd": "token"}));
        r["token"]
            .as_str()
            .unwrap_or_else(|| panic!("no token: {r}"))
            .to_string()
    }

    /// `run` of `module` (sent with the request) on agent `id` with `input`.
    pub fn run_module(
        &self,
        id: &str,
        module: &[u8],
        input: Value,
        task_id: Option<&str>,
    ) -> Value {
        let mut req = json!({
            "cmd": "run",
            "agent": id,
            "module": base64::engine::general_purpose::STANDARD.encode(module),
            "input": input,
            "timeout_ms": 60000,
        });
        if let Some(t) = task_id {
            req["task_id"] = json!(t);
        }
        self.request(&req)
    }

    /// The SHA-256 of the module a `run` answer ran: its result's `file_sha256`, or
    /// `module_sha256` from an agent before protocol version 2 (a benchmark's baseline build).
    pub fn module_sha256(answer: &Value) -> String {
        ["file_sha256", "module_sha256"]
            .iter()
            .find_map(|k| answer["result"][k].as_str())
            .unwrap_or_else(|| panic!("no module SHA-256 in {answer}"))
            .to_string()
    }

    /// `run` of the named `command` on agent `id`, with `extra` fields (`args`, `task_id`,
    /// `input`…).
    pub fn run_command(&self, id: &str, command: &str, extra: Value) -> Value {
        self.request(&run_command_request(id, command, extra))
    }

    /// The stored result of `task_id` (`result`, not waiting).
    pub fn result(&self, task_id: &str) -> Value {
        self.request(&json!({"cmd": "result", "task_id": task_id}))
    }

    // -----------------------------------------------------------------------------------------
    // Waits on the platform's view

    /// Waits (at most `within`) until agent `id` is listed and `holds` for its entry
    /// (`{"id","connected","enrolled_at","last_seen","status"}`); returns the entry. The
    /// failure shows the entry last seen.
    #[track_caller]
    pub fn wait_agent(
        &self,
        id: &str,
        what: &str,
        within: Duration,
        holds: impl Fn(&Value) -> bool,
    ) -> Value {
        wait_until(&format!("agent {id}: {what}"), within, || {
            match self.agent(id) {
                Some(a) if holds(&a) => Ok(a),
                Some(a) => Err(a.to_string()),
                None => Err("not listed".into()),
            }
        })
    }

    /// Waits until agent `id` is connected (30 s).
    #[track_caller]
    pub fn wait_connected(&self, id: &str) -> Value {
        self.wait_agent(id, "connected", CONNECT, |a| a["connected"] == true)
    }

    /// Waits until agent `id` is listed but not connected (30 s).
    #[track_caller]
    pub fn wait_disconnected(&self, id: &str) -> Value {
        self.wait_agent(id, "disconnected", CONNECT, |a| a["connected"] == false)
    }

    /// Waits until agent `id` is connected and has sent a status report (its session is open
    /// on both ends: an agent reports its status once the platform's `welcome` reached it).
    #[track_caller]
    pub fn wait_status(&self, id: &str) -> Value {
        self.wait_agent(id, "connected with a status report", CONNECT, |a| {
            a["connected"] == true && a["status"].is_object()
        })
    }

    /// Waits until agent `id`'s status report lists task `task_id` as running. Status reports
    /// come every `[platform] status_secs`: set it low (1) for this wait.
    #[track_caller]
    pub fn wait_running(&self, id: &str, task_id: &str) -> Value {
        self.wait_agent(id, &format!("running {task_id}"), CONNECT, |a| {
            a["status"]["running"]
                .as_array()
                .is_some_and(|r| r.iter().any(|t| t == task_id))
        })
    }

    /// What the platform knows of `task_id` (the control interface's `task`).
    pub fn task(&self, task_id: &str) -> Value {
        self.request(&json!({"cmd": "task", "task_id": task_id}))
    }

    /// Waits until the agent has answered `accepted` for `task_id` with `state` (`queued`,
    /// `running`), while the run is in flight.
    #[track_caller]
    pub fn wait_task_state(&self, task_id: &str, state: &str) -> Value {
        wait_until(&format!("task {task_id} {state}"), CONNECT, || {
            let task = self.task(task_id);
            if task["state"] == state {
                Ok(task)
            } else {
                Err(task.to_string())
            }
        })
    }

    /// Waits (at most `within`) until some agent is connected; returns its id.
    #[track_caller]
    pub fn wait_any_connected(&self, within: Duration) -> String {
        wait_until("an agent connected", within, || {
            let agents = self.agents();
            match agents.iter().find(|a| a["connected"] == true) {
                Some(a) => Ok(a["id"].as_str().unwrap().to_string()),
                None => Err(Value::from(agents).to_string()),
            }
        })
    }

    /// Waits (at most `within`) for the stored result of `task_id` (`result` with `wait_ms`);
    /// returns the response, `"ok": false` when none came.
    pub fn wait_result(&self, task_id: &str, within: Duration) -> Value {
        self.request(
            &json!({"cmd": "result", "task_id": task_id, "wait_ms": within.as_millis() as u64}),
        )
    }

    /// Waits until the stored result of `task_id` was delivered more than `deliveries` times
    /// (an agent sent it again); returns the response.
    #[track_caller]
    pub fn wait_deliveries(&self, task_id: &str, deliveries: u64) -> Value {
        wait_until(
            &format!("more than {deliveries} deliveries of {task_id}"),
            CONNECT,
            || {
                let r = self.result(task_id);
                if r["deliveries"].as_u64().is_some_and(|n| n > deliveries) {
                    Ok(r)
                } else {
                    Err(r.to_string())
                }
            },
        )
    }
}

/// The `run` request of the named `command` on agent `id` with `extra` fields.
pub fn run_command_request(id: &str, command: &str, extra: Value) -> Value {
    let mut req = json!({"cmd": "run", "agent": id, "command": command, "timeout_ms": 60000});
    for (k, v) in extra.as_object().expect("extra fields are an object") {
        req[k] = v.clone();
    }
    req
}

#[cfg(feature = "tokio")]
impl Control {
    /// Runs `f` with this client on a blocking thread: a test on a tokio runtime keeps its
    /// own tasks (a fake agent answering the platform) running meanwhile.
    pub async fn off_thread<T: Send + 'static>(
        &self,
        f: impl FnOnce(Control) -> T + Send + 'static,
    ) -> T {
        let control = self.clone();
        tokio::task::spawn_blocking(move || f(control))
            .await
            .expect("a control request panicked")
    }

    /// [`Control::request_line`], on a blocking thread.
    pub async fn request_async(&self, line: impl Into<String>) -> Value {
        let line = line.into();
        self.off_thread(move |c| c.request_line(&line)).await
    }

    /// Sends `request` in the background; resolves to every line received through the
    /// response (event lines first, the response last).
    pub fn background(&self, request: &Value) -> tokio::task::JoinHandle<Vec<Value>> {
        let (control, line) = (self.clone(), request.to_string());
        tokio::task::spawn_blocking(move || {
            control
                .try_exchange(&line)
                .unwrap_or_else(|e| panic!("control request {line}: {e}"))
        })
    }
}
