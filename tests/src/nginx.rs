//! nginx (Debian's nginx-light) serving a directory over HTTP and HTTPS on loopback, for the
//! HTTP client tests. The HTTPS side uses a certificate made for the test: a throwaway CA
//! (`ca.pem`, which clients must be told to trust) signs a leaf for `127.0.0.1` and `localhost`.
//!
//! Besides the directory itself the server has `/old/…` (a redirect to `/…`) and `/norange/…`
//! (the same files without range support).

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running nginx; stopped when dropped.
pub struct Nginx {
    child: Child,
    /// Port of the plain HTTP server.
    pub http_port: u16,
    /// Port of the HTTPS server.
    pub https_port: u16,
    /// The CA certificate (PEM) that signed the HTTPS server's certificate.
    pub ca: PathBuf,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The nginx binary; panics when it is not installed (CI installs nginx-light).
fn nginx_binary() -> PathBuf {
    let path = std::env::var("PATH").unwrap_or_default();
    for dir in path.split(':').chain(["/usr/sbin", "/sbin"]) {
        let p = Path::new(dir).join("nginx");
        if p.is_file() {
            return p;
        }
    }
    panic!("nginx is required for this test but is not installed (apt-get install nginx-light)");
}

/// Runs `openssl args...` in `dir`, panicking on failure.
fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run openssl (apt-get install openssl): {e}"));
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Makes `ca.pem` and the server's `server.pem` / `server.key` in `dir`.
fn make_certificates(dir: &Path) {
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend(["-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=vdisk test CA"]);
    openssl(dir, &ca);
    let mut req = vec!["req"];
    req.extend(ec);
    req.extend(["-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost"]);
    openssl(dir, &req);
    std::fs::write(dir.join("server.ext"), "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n")
        .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "server.ext",
        ],
    );
}

/// A port that was free a moment ago.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn config(work: &Path, root: &Path, http: u16, https: u16) -> String {
    let w = work.display();
    let r = root.display();
    format!(
        "daemon off; master_process off; worker_processes 1; pid {w}/nginx.pid; error_log {w}/error.log;
events {{ worker_connections 256; }}
http {{
  access_log off;
  client_body_temp_path {w}/t; proxy_temp_path {w}/t; fastcgi_temp_path {w}/t;
  uwsgi_temp_path {w}/t; scgi_temp_path {w}/t;
  default_type application/octet-stream;
  server {{
    listen 127.0.0.1:{http};
    root {r};
    location /old/ {{ rewrite ^/old/(.*)$ /$1 redirect; }}
    location /norange/ {{ max_ranges 0; alias {r}/; }}
  }}
  server {{
    listen 127.0.0.1:{https} ssl;
    ssl_certificate {w}/server.pem;
    ssl_certificate_key {w}/server.key;
    root {r};
  }}
}}
"
    )
}

impl Nginx {
    /// Serves `root`, keeping its configuration, certificates and logs in `work`.
    pub fn start(root: &Path, work: &Path) -> Nginx {
        make_certificates(work);
        std::fs::create_dir_all(work.join("t")).unwrap();
        // Another process may take a port between free_port and nginx's bind: try again.
        for _ in 0..5 {
            let (http_port, https_port) = (free_port(), free_port());
            let conf = work.join("nginx.conf");
            std::fs::write(&conf, config(work, root, http_port, https_port)).unwrap();
            let mut child = Command::new(nginx_binary())
                .args(["-c", conf.to_str().unwrap(), "-e", work.join("error.log").to_str().unwrap()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("cannot start nginx");
            let start = Instant::now();
            let listening = loop {
                if TcpStream::connect(("127.0.0.1", http_port)).is_ok()
                    && TcpStream::connect(("127.0.0.1", https_port)).is_ok()
                {
                    break true;
                }
                if child.try_wait().ok().flatten().is_some() || start.elapsed() > Duration::from_secs(20) {
                    break false;
                }
                std::thread::sleep(Duration::from_millis(20));
            };
            if listening {
                return Nginx { child, http_port, https_port, ca: work.join("ca.pem") };
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        let log = std::fs::read_to_string(work.join("error.log")).unwrap_or_default();
        panic!("nginx did not start: {log}");
    }

    /// `http://127.0.0.1:PORT/path`.
    pub fn http(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}/{path}", self.http_port)
    }

    /// `https://127.0.0.1:PORT/path`.
    pub fn https(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}/{path}", self.https_port)
    }
}
