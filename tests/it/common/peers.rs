//! Real key-provider peers on loopback, started (and stopped) by the tests:
//! the moto server (AWS KMS protocol), OpenBao in dev mode (Vault Transit),
//! SoftHSM2 (PKCS#11), and small scripted fakes. scripts/test.sh installs them.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const SOFTHSM_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

/// A server process, killed when dropped.
pub struct Peer {
    child: Child,
    pub port: u16,
    pub dir: tempfile::TempDir,
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Peer {
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn stop(self) {}

    /// Stops the server (SIGSTOP): it accepts connections and never
    /// answers, as a provider whose host hangs, until the guard is dropped.
    pub fn pause(&self) -> Paused<'_> {
        let pid = self.child.id() as libc::pid_t;
        assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0, "SIGSTOP");
        Paused { pid, _peer: self }
    }
}

/// A stopped server, continued when dropped.
pub struct Paused<'a> {
    pid: libc::pid_t,
    _peer: &'a Peer,
}

impl Drop for Paused<'_> {
    fn drop(&mut self) {
        unsafe { libc::kill(self.pid, libc::SIGCONT) };
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

fn require(program: &str) {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {program}"))
        .output()
        .map(|o| o.status.success());
    assert!(
        found.unwrap_or(false),
        "{program} is not installed: run scripts/test.sh, which installs the test peers"
    );
}

fn spawn(program: &str, args: &[&str], env: &[(&str, &str)]) -> Peer {
    require(program);
    let port: u16 = args.iter().find_map(|a| a.parse().ok()).unwrap_or(0);
    let dir = tempfile::tempdir().expect("tempdir");
    let log = std::fs::File::create(dir.path().join("peer.log")).expect("log");
    let child = Command::new(program)
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {program}: {e}"));
    Peer { child, port, dir }
}

fn wait_for_port(peer: &mut Peer, what: &str) {
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", peer.port)).is_err() {
        if let Ok(Some(status)) = peer.child.try_wait() {
            let log = std::fs::read_to_string(peer.dir.path().join("peer.log")).unwrap_or_default();
            panic!("{what} exited ({status}): {log}");
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{what} did not start listening"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The moto server: a real implementation of the AWS KMS protocol.
pub fn moto() -> Peer {
    let port = free_port().to_string();
    let mut peer = spawn("moto_server", &["-H", "127.0.0.1", "-p", &port], &[]);
    wait_for_port(&mut peer, "moto_server");
    peer
}

/// Creates a KMS key with an alias on moto (through boto3, which moto depends on).
pub fn moto_create_key(endpoint: &str, alias: &str) -> String {
    let script = format!(
        "import boto3\nc = boto3.client('kms', endpoint_url='{endpoint}', region_name='us-east-1', \
         aws_access_key_id='test', aws_secret_access_key='test')\n\
         k = c.create_key()['KeyMetadata']['KeyId']\nc.create_alias(AliasName='{alias}', TargetKeyId=k)\nprint(k)"
    );
    let out = Command::new("python3").arg("-c").arg(script).output().expect("python3");
    assert!(
        out.status.success(),
        "creating a moto key: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A scripted fake from tests/fakes.
pub fn python_fake(script: &str, args: &[&str]) -> Peer {
    let port = free_port().to_string();
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fakes").join(script);
    let mut all = vec![path.to_str().expect("path"), port.as_str()];
    all.extend_from_slice(args);
    let mut peer = spawn("python3", &all, &[]);
    peer.port = port.parse().expect("port");
    wait_for_port(&mut peer, script);
    peer
}

/// OpenBao in dev mode (root token "root") with a derived transit key `kmsfs`.
pub fn openbao(tls: bool) -> Peer {
    let port = free_port().to_string();
    let listen = format!("127.0.0.1:{port}");
    let tls_dir = tempfile::tempdir().expect("tempdir");
    let tls_arg = format!("-dev-tls-cert-dir={}", tls_dir.path().display());
    let mut args = vec!["server", "-dev", "-dev-root-token-id=root", "-dev-no-store-token"];
    let listen_arg = format!("-dev-listen-address={listen}");
    args.push(&listen_arg);
    if tls {
        args.push("-dev-tls");
        args.push(&tls_arg);
    }
    let mut peer = spawn("bao", &args, &[]);
    peer.port = port.parse().expect("port");
    wait_for_port(&mut peer, "bao server");
    if tls {
        std::fs::copy(tls_dir.path().join("vault-ca.pem"), peer.dir.path().join("ca.pem")).expect("CA");
    }
    bao(&peer, tls, &["secrets", "enable", "transit"]);
    bao(&peer, tls, &["write", "-f", "transit/keys/kmsfs", "derived=true"]);
    peer
}

pub fn bao_addr(peer: &Peer, tls: bool) -> String {
    format!("{}://127.0.0.1:{}", if tls { "https" } else { "http" }, peer.port)
}

/// Runs the bao CLI against a dev server; panics on failure.
pub fn bao(peer: &Peer, tls: bool, args: &[&str]) -> Output {
    let mut cmd = Command::new("bao");
    cmd.args(args)
        .env("BAO_ADDR", bao_addr(peer, tls))
        .env("BAO_TOKEN", "root");
    if tls {
        cmd.env("BAO_CACERT", peer.dir.path().join("ca.pem"));
    }
    let out = cmd.output().expect("bao");
    assert!(
        out.status.success(),
        "bao {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A SoftHSM2 token in a temporary directory with a non-extractable AES key.
pub struct SoftHsm {
    pub dir: tempfile::TempDir,
    pub conf: PathBuf,
    pub pin_file: PathBuf,
}

impl SoftHsm {
    pub fn new() -> Self {
        require("softhsm2-util");
        require("pkcs11-tool");
        assert!(
            Path::new(SOFTHSM_MODULE).exists(),
            "{SOFTHSM_MODULE} missing: run scripts/test.sh"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let tokens = dir.path().join("tokens");
        std::fs::create_dir(&tokens).expect("tokens dir");
        let conf = dir.path().join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                tokens.display()
            ),
        )
        .expect("conf");
        let pin_file = dir.path().join("pin");
        std::fs::write(&pin_file, "1234\n").expect("pin");
        let run = |program: &str, args: &[&str]| {
            let out = Command::new(program)
                .args(args)
                .env("SOFTHSM2_CONF", &conf)
                .output()
                .expect(program);
            assert!(
                out.status.success(),
                "{program} {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        run(
            "softhsm2-util",
            &[
                "--init-token",
                "--free",
                "--label",
                "kmsfs",
                "--pin",
                "1234",
                "--so-pin",
                "5678",
            ],
        );
        run(
            "pkcs11-tool",
            &[
                "--module",
                SOFTHSM_MODULE,
                "--token-label",
                "kmsfs",
                "--login",
                "--pin",
                "1234",
                "--keygen",
                "--key-type",
                "AES:32",
                "--label",
                "master",
            ],
        );
        SoftHsm { dir, conf, pin_file }
    }

    pub fn uri(&self, object: &str, pin_file: &Path) -> String {
        format!(
            "pkcs11:token=kmsfs;object={object}?module-path={SOFTHSM_MODULE}&pin-source=file:{}",
            pin_file.display()
        )
    }
}
