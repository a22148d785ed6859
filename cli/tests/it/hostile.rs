//! `usine serve` under hostile clients, at the socket: a header sent a byte at a time, idle connections,
//! more connections than `max_connections`, a body that trickles, one far over `max_body_bytes`.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A running `usine serve` with `settings` in its `usine.toml`, and the lines of its stderr so far.
struct Server {
    child: Child,
    address: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
    _dir: tempfile::TempDir,
}

impl Server {
    fn start(settings: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("usine.toml"), settings).unwrap();
        let mut command = std::process::Command::new(assert_cmd::cargo::cargo_bin("usine"));
        for (key, _) in std::env::vars() {
            if key.starts_with("USINE_") {
                command.env_remove(key);
            }
        }
        let path: &Path = dir.path();
        let mut child = command
            .args(["serve", "--bind", "127.0.0.1:0"])
            .env("USINE_CACHE_DIR", path.join("cache"))
            .env("XDG_CONFIG_HOME", path.join("config"))
            .env("HOME", path)
            .current_dir(path)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let mut seen = Vec::new();
        let address = loop {
            let line = lines.next().unwrap_or_else(|| panic!("serve ended before it listened: {seen:?}")).unwrap();
            seen.push(line.clone());
            if let Some(rest) = line.strip_prefix("usine serve: listening on http://") {
                break rest.split(' ').next().unwrap().parse().unwrap();
            }
        };
        let log = Arc::new(Mutex::new(seen));
        let sink = Arc::clone(&log);
        std::thread::spawn(move || lines.map_while(Result::ok).for_each(|line| sink.lock().unwrap().push(line)));
        Self { child, address, log, _dir: dir }
    }

    fn connect(&self) -> TcpStream {
        let stream = TcpStream::connect(self.address).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        stream
    }

    /// `GET /health` on a new connection: its status line, or the error.
    fn health(&self) -> Result<String, String> {
        let mut stream = self.connect();
        stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        stream.write_all(b"GET /health HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n").unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).map_err(|error| error.to_string())?;
        Ok(answer.lines().next().unwrap_or_default().to_owned())
    }

    /// How many lines of the log contain `text`.
    fn lines_with(&self, text: &str) -> usize {
        self.log.lock().unwrap().iter().filter(|line| line.contains(text)).count()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads until the server closes: the answer, or what was read when the read failed.
fn read_to_close(stream: &mut TcpStream) -> String {
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

// Would catch: no header-read timeout (before: hyper waited for ever for a header that never ends, and a
// thousand such connections held their buffers), or one that counts from something else than the
// request's first byte.
#[test]
fn a_header_sent_a_byte_at_a_time_is_cut_at_the_header_read_timeout_with_a_408_naming_it() {
    let server = Server::start("header_read_timeout_ms = 500\n");
    let mut stream = server.connect();
    let mut writer = stream.try_clone().unwrap();
    let start = Instant::now();
    // A field a byte every 20 ms for ten seconds, never the blank line that ends the header.
    let trickle = std::thread::spawn(move || {
        let header = b"GET /health HTTP/1.1\r\nhost: localhost\r\n".iter().chain(b"x-slow: ".iter().cycle());
        for byte in header.take(500) {
            if writer.write_all(&[*byte]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    let answer = read_to_close(&mut stream);
    let elapsed = start.elapsed();
    assert!(answer.starts_with("HTTP/1.1 408 "), "{answer:?}");
    assert!(answer.contains("`header_read_timeout_ms` (500 ms)"), "{answer}");
    assert!(elapsed >= Duration::from_millis(500), "cut after {elapsed:?}, before the limit");
    assert!(elapsed < Duration::from_secs(5), "cut after {elapsed:?}: the trickle went on");
    trickle.join().unwrap();
}

// Would catch: idle connections never closed (before: 19,980 of them stopped /health), or /health not
// answered while many wait under the cap.
#[test]
fn idle_connections_are_closed_at_the_idle_timeout_and_health_answers_meanwhile() {
    let server = Server::start("idle_timeout_ms = 1000\nmax_connections = 256\n");
    let mut idle: Vec<TcpStream> = (0..200).map(|_| server.connect()).collect();
    let start = Instant::now();
    assert_eq!(server.health().unwrap(), "HTTP/1.1 200 OK", "with 200 idle connections open");
    for stream in &mut idle {
        let mut byte = [0; 1];
        assert_eq!(stream.read(&mut byte).unwrap(), 0, "closed by the server, silently");
    }
    let elapsed = start.elapsed();
    assert!(elapsed >= Duration::from_millis(900), "closed after {elapsed:?}");
    assert!(elapsed < Duration::from_secs(10), "closed after {elapsed:?}");
    assert_eq!(server.health().unwrap(), "HTTP/1.1 200 OK");
}

// Would catch: no cap (the fifth connection served at once), a cap that refuses instead of waiting, a
// freed slot not handed on, or the log line repeated per connection.
#[test]
fn past_max_connections_a_connection_waits_for_a_free_slot_and_the_cap_is_logged_once() {
    let server = Server::start("max_connections = 4\n");
    let held: Vec<TcpStream> = (0..4).map(|_| server.connect()).collect();
    let request = b"GET /health HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n";
    let mut waiting: Vec<TcpStream> = (0..3).map(|_| server.connect()).collect();
    for stream in &mut waiting {
        stream.write_all(request).unwrap();
        stream.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
        let mut byte = [0; 1];
        let error = stream.read(&mut byte).expect_err("no answer while every slot is taken");
        assert!(matches!(error.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut), "{error}");
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    }
    drop(held);
    for stream in &mut waiting {
        let answer = read_to_close(stream);
        assert!(answer.starts_with("HTTP/1.1 200 OK"), "served once slots were free: {answer:?}");
    }
    let reached = "4 connections open (`max_connections`); new ones wait until one closes";
    assert_eq!(server.lines_with(reached), 1, "{:?}", server.log.lock().unwrap());
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.lines_with("under `max_connections` again") == 0 {
        assert!(Instant::now() < deadline, "{:?}", server.log.lock().unwrap());
        std::thread::sleep(Duration::from_millis(10));
    }
}

// Would catch: no body-read timeout: a body that stops halfway held its connection for ever.
#[test]
fn a_body_that_stops_halfway_gets_a_408_naming_the_body_read_timeout() {
    let server = Server::start("body_read_timeout_ms = 500\n");
    let mut stream = server.connect();
    let start = Instant::now();
    stream
        .write_all(
            b"POST /v1/completions HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n\
              content-length: 100\r\n\r\n{\"model\":",
        )
        .unwrap();
    let answer = read_to_close(&mut stream);
    let elapsed = start.elapsed();
    assert!(answer.starts_with("HTTP/1.1 408 "), "{answer:?}");
    assert!(answer.contains("`body_read_timeout_ms` (500 ms)"), "{answer}");
    assert!(answer.to_ascii_lowercase().contains("connection: close"), "{answer}");
    assert!((Duration::from_millis(500)..Duration::from_secs(5)).contains(&elapsed), "{elapsed:?}");
}

// Would catch: a header over `max_header_bytes` read whole (hyper's default buffer was ~400 KB).
#[test]
fn a_header_over_max_header_bytes_gets_431() {
    let server = Server::start("max_header_bytes = 16384\n");
    let mut stream = server.connect();
    let field = "a".repeat(20_000);
    let request = format!("GET /health HTTP/1.1\r\nhost: localhost\r\nx-big: {field}\r\n\r\n");
    let _ = stream.write_all(request.as_bytes()); // the server may stop reading before the end
    let answer = read_to_close(&mut stream);
    assert!(answer.starts_with("HTTP/1.1 431 "), "{answer:?}");
    let mut stream = server.connect();
    let field = "a".repeat(12_000);
    let request = format!("GET /health HTTP/1.1\r\nhost: localhost\r\nx-big: {field}\r\nconnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).unwrap();
    assert!(read_to_close(&mut stream).starts_with("HTTP/1.1 200 OK"), "a header under the limit is served");
}

// Would catch: the 413 followed by a close with the body unread, which resets the connection: a client
// that sends its whole body before reading (Python's `http.client`, this one) saw a broken pipe.
#[test]
fn a_body_far_over_max_body_bytes_gets_a_413_the_sender_can_read() {
    let server = Server::start("max_body_bytes = 65536\n");
    let mut stream = server.connect();
    let body = vec![b'x'; 8 << 20];
    let head = format!(
        "POST /v1/completions HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(&body).expect("the whole body is taken, as nginx takes it");
    let answer = read_to_close(&mut stream);
    assert!(answer.starts_with("HTTP/1.1 413 "), "{answer:?}");
    assert!(answer.contains("larger than the limit of 65536 bytes"), "{answer}");
}

// The same with Python's own client (python3 is on every machine these tests run on).
#[test]
fn python_http_client_reads_the_413() {
    let server = Server::start("max_body_bytes = 65536\n");
    let script = format!(
        "import http.client\n\
         c = http.client.HTTPConnection('{}', {}, timeout=20)\n\
         c.request('POST', '/v1/completions', body=b'x' * (8 << 20), headers={{'content-type': 'application/json'}})\n\
         r = c.getresponse()\n\
         print(r.status, r.read().decode())\n",
        server.address.ip(),
        server.address.port()
    );
    let output = std::process::Command::new("python3").args(["-c", &script]).output().expect("python3 runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.starts_with("413 ") && stdout.contains("larger than the limit of 65536 bytes"), "{stdout}");
}
