//! The `pkcs11` provider: the master key is a non-extractable AES key in a
//! PKCS#11 token (CloudHSM, YubiHSM, Luna, SoftHSM…). Volume keys are sealed
//! inside the token with CKM_AES_GCM: random 96-bit IV, 128-bit tag, the
//! encryption context as AAD. Blob: 0x01 || IV (12) || ciphertext || tag.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::RvError;
use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::object::{Attribute, AttributeType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;
use zeroize::Zeroizing;

use super::http::{TIMEOUT_ENV, call_timeout};
use super::{EncryptionContext, KeyProvider, KeyStatus, KmsError, ProviderId};
use crate::crypto::{SecretKey, WrappedKey, random_array};

const BLOB_VERSION: u8 = 1;

/// How long `Drop` (and a fork) waits for the module's thread to close its
/// session and exit.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

struct Connection {
    session: Session,
    key: ObjectHandle,
    ctx: Pkcs11,
}

impl Connection {
    /// Closes the session and finalizes the library (dropping a context
    /// does not): a later connection, in this process or a child forked
    /// from it, starts from a clean library.
    fn close(self) {
        let Connection { session, ctx, .. } = self;
        drop(session);
        let _ = ctx.finalize();
    }
}

/// The token and key a provider names, and the PIN to log in with: all the
/// module's thread needs to connect.
struct Token {
    module: String,
    label: Option<String>,
    object: String,
    pin: Zeroizing<String>,
}

/// A call into the module, run on its thread with the connection (made on
/// the first call, and again after one failed to be made).
type Job = Box<dyn FnOnce(&Token, &mut Option<Connection>) + Send>;

/// The thread that makes every call into the module. A module may never
/// return (a network HSM whose link went away, a token directory on a hung
/// mount) and a call cannot be taken back from it: the caller waits at most
/// the call's budget, and the thread stays with the call.
struct Worker {
    pid: u32,
    jobs: mpsc::Sender<Job>,
    thread: std::thread::JoinHandle<()>,
}

pub struct Pkcs11Provider {
    token: Arc<Token>,
    /// How long one call may take (`KMSFS_PROVIDER_TIMEOUT`, `timeout=`).
    budget: Duration,
    /// Started on first use and again after a fork (threads and PKCS#11
    /// state do not survive one).
    worker: Mutex<Option<Worker>>,
    /// Set once a call was given up on: the module's thread may never come back.
    abandoned: AtomicBool,
    calls: AtomicU64,
}
fn read_pin(query: &BTreeMap<String, String>) -> Result<Zeroizing<String>, String> {
    if let Some(v) = query.get("pin-value") {
        return Ok(Zeroizing::new(v.clone()));
    }
    match query.get("pin-source").map(String::as_str) {
        Some(src) if src.starts_with("file:") => {
            let path = src.trim_start_matches("file:").trim_start_matches("//");
            let text =
                Zeroizing::new(std::fs::read_to_string(path).map_err(|e| format!("cannot read PIN file {path}: {e}"))?);
            Ok(Zeroizing::new(text.lines().next().unwrap_or("").to_string()))
        }
        Some(src) if src.starts_with("env:") => {
            let var = &src[4..];
            std::env::var(var)
                .map(Zeroizing::new)
                .map_err(|_| format!("PIN variable {var} is not set"))
        }
        Some(other) => Err(format!("unsupported pin-source {other} (use file:PATH or env:VAR)")),
        None => std::env::var("KMSFS_PKCS11_PIN")
            .map(Zeroizing::new)
            .map_err(|_| "no PIN: pin-source=file:PATH in the URI, or KMSFS_PKCS11_PIN".to_string()),
    }
}

impl Pkcs11Provider {
    pub fn new(path: &BTreeMap<String, String>, query: &BTreeMap<String, String>) -> Result<Self, KmsError> {
        let config = |message: String| KmsError::Config {
            provider: "pkcs11".into(),
            message,
        };
        let module = query
            .get("module-path")
            .cloned()
            .or_else(|| std::env::var("KMSFS_PKCS11_MODULE").ok())
            .ok_or_else(|| {
                config(
                    "no module configured for this token: give module-path= in --kms, set KMSFS_PKCS11_MODULE, \
                     or run `kmsfs init --kms` on this host"
                        .into(),
                )
            })?;
        let object = path
            .get("object")
            .cloned()
            .ok_or_else(|| config("no object= (key label) in the URI".into()))?;
        Ok(Pkcs11Provider {
            budget: call_timeout("pkcs11", query.get("timeout").map(String::as_str))?,
            token: Arc::new(Token {
                module,
                label: path.get("token").cloned(),
                object,
                pin: read_pin(query).map_err(config)?,
            }),
            worker: Mutex::new(None),
            abandoned: AtomicBool::new(false),
            calls: AtomicU64::new(0),
        })
    }

    /// Runs `op` with the session on the module's thread and waits for its
    /// answer at most the call's budget.
    fn call<T: Send + 'static>(
        &self,
        op: impl FnOnce(&Token, &Session, ObjectHandle) -> Result<T, KmsError> + Send + 'static,
    ) -> Result<T, KmsError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let (reply, answer) = mpsc::sync_channel(1);
        let job: Job = Box::new(move |token, conn| {
            let result = match conn {
                Some(c) => op(token, &c.session, c.key),
                None => token.connect().and_then(|c| {
                    let c = conn.insert(c);
                    op(token, &c.session, c.key)
                }),
            };
            let _ = reply.send(result);
        });
        self.submit(job)?;
        match answer.recv_timeout(self.budget) {
            Ok(result) => result,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                self.abandoned.store(true, Ordering::Relaxed);
                ABANDONED.store(true, Ordering::Relaxed);
                Err(self.token.unreachable(format!(
                    "no answer within {} s: the module has not returned from its call ({TIMEOUT_ENV} or \
                     timeout= in the provider URI sets how long a call may take)",
                    self.budget.as_secs_f64(),
                )))
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                Err(self.token.unreachable("the module's thread ended during the call"))
            }
        }
    }

    /// Hands `job` to the module's thread, starting one in this process if
    /// there is none or the last one ended.
    fn submit(&self, mut job: Job) -> Result<(), KmsError> {
        let mut worker = crate::util::lock(&self.worker);
        if worker.as_ref().is_some_and(|w| w.pid != std::process::id()) {
            // Inherited across a fork: its thread is not in this process and
            // the module's state is not ours to use or finalize.
            std::mem::forget(worker.take());
        }
        for _ in 0..2 {
            let w = match worker.as_mut() {
                Some(w) => w,
                None => worker.insert(
                    Worker::start(self.token.clone())
                        .map_err(|e| self.token.unreachable(format!("cannot start its thread: {e}")))?,
                ),
            };
            match w.jobs.send(job) {
                Ok(()) => return Ok(()),
                Err(mpsc::SendError(back)) => {
                    // The thread ended (a panic in the module's binding): a new one.
                    job = back;
                    *worker = None;
                }
            }
        }
        Err(self.token.unreachable("its thread keeps ending"))
    }

    fn seal(&self, key: &SecretKey, context: &EncryptionContext) -> Result<WrappedKey, KmsError> {
        let aad = context.canonical_bytes();
        let mut iv: [u8; 12] = random_array();
        let key = key.clone();
        let sealed = self.call(move |token, session, handle| {
            let params = GcmParams::new(&mut iv, &aad, 128.into()).map_err(|e| token.refused("CKM_AES_GCM", e))?;
            session
                .encrypt(&Mechanism::AesGcm(params), handle, key.expose())
                .map_err(|e| token.refused("C_Encrypt", e))
        })?;
        Ok(WrappedKey::from_bytes([&[BLOB_VERSION][..], &iv, &sealed].concat()))
    }
}

impl Pkcs11Provider {
    /// Ends the module's thread, which closes the session and finalizes the
    /// library, waiting for it a little (never for a call given up on).
    ///
    /// Waited for until the thread is gone, not only until its last call
    /// returned: a thread's exit runs the module's per-thread cleanup
    /// (OpenSSL's, under SoftHSM2), which takes the library's global locks.
    /// A fork at that moment leaves the child a lock no one will release,
    /// and its first call into the module, or its exit, waits forever.
    fn stop_worker(&self) {
        let worker = crate::util::lock(&self.worker).take();
        if let Some(worker) = worker {
            if worker.pid != std::process::id() || self.abandoned.load(Ordering::Relaxed) {
                std::mem::forget(worker);
                return;
            }
            drop(worker.jobs);
            if !join_within(worker.thread, CLOSE_WAIT.min(self.budget)) {
                log::warn!(
                    "{}: the module's thread has not ended after {} s",
                    self.token.name(),
                    CLOSE_WAIT.min(self.budget).as_secs_f64()
                );
            }
        }
    }
}

/// Joins `thread` if it ends within `wait`; otherwise leaves it running.
fn join_within(thread: std::thread::JoinHandle<()>, wait: Duration) -> bool {
    use std::os::unix::thread::JoinHandleExt;
    let native = thread.into_pthread_t();
    let mut deadline = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid clock id and a pointer to a timespec we own.
    if unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut deadline) } != 0 {
        // SAFETY: as below, never joined: its resources go when it ends.
        unsafe { libc::pthread_detach(native) };
        return false;
    }
    let nanos = deadline.tv_nsec as u64 + u64::from(wait.subsec_nanos());
    deadline.tv_sec += (wait.as_secs() + nanos / 1_000_000_000) as libc::time_t;
    deadline.tv_nsec = (nanos % 1_000_000_000) as libc::c_long;
    // SAFETY: `native` is a joinable thread whose ownership into_pthread_t
    // gave to this function, joined at most once; the thread returns no value.
    let joined = unsafe { libc::pthread_timedjoin_np(native, std::ptr::null_mut(), &deadline) == 0 };
    if !joined {
        // SAFETY: the same thread, not joined: its resources go when it ends.
        unsafe { libc::pthread_detach(native) };
    }
    joined
}

impl Drop for Pkcs11Provider {
    fn drop(&mut self) {
        self.stop_worker();
    }
}

impl Worker {
    fn start(token: Arc<Token>) -> std::io::Result<Worker> {
        let (jobs, queue) = mpsc::channel::<Job>();
        let thread = std::thread::Builder::new().name("kmsfs-pkcs11".into()).spawn(move || {
            let mut conn: Option<Connection> = None;
            for job in queue {
                job(&token, &mut conn);
            }
            if let Some(conn) = conn {
                conn.close();
            }
        })?;
        Ok(Worker {
            pid: std::process::id(),
            jobs,
            thread,
        })
    }
}

impl Token {
    fn name(&self) -> String {
        format!(
            "pkcs11 ({}, token {})",
            self.module,
            self.label.as_deref().unwrap_or("<first>")
        )
    }

    fn unreachable(&self, cause: impl std::fmt::Display) -> KmsError {
        KmsError::Unreachable {
            provider: self.name(),
            cause: cause.to_string(),
        }
    }

    fn refused(&self, what: &str, e: impl std::fmt::Display) -> KmsError {
        KmsError::Refused {
            provider: self.name(),
            code: what.to_string(),
            message: e.to_string(),
        }
    }

    fn connect(&self) -> Result<Connection, KmsError> {
        let ctx = Pkcs11::new(&self.module).map_err(|e| self.unreachable(format!("cannot load module: {e}")))?;
        let initialize = || ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK));
        match initialize() {
            // Initialized by the process this one forked from (or by a thread
            // of this provider that ended): its state is not this process's
            // to use. Finalized, and initialized again.
            Err(cryptoki::error::Error::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {
                let _ = ctx.clone().finalize();
                initialize()
            }
            other => other,
        }
        .map_err(|e| self.unreachable(format!("C_Initialize: {e}")))?;
        let slots = ctx
            .get_slots_with_token()
            .map_err(|e| self.unreachable(format!("C_GetSlotList: {e}")))?;
        let slot = slots
            .into_iter()
            .find(|s| match &self.label {
                Some(label) => ctx
                    .get_token_info(*s)
                    .map(|i| i.label().trim_end() == label)
                    .unwrap_or(false),
                None => true,
            })
            .ok_or_else(|| self.unreachable("no token with that label"))?;
        let session = ctx
            .open_ro_session(slot)
            .map_err(|e| self.unreachable(format!("C_OpenSession: {e}")))?;
        let pin = AuthPin::new(self.pin.as_str().to_string().into());
        session
            .login(UserType::User, Some(&pin))
            .map_err(|e| self.refused("C_Login", e))?;
        let found = session
            .find_objects(&[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::Label(self.object.as_bytes().to_vec()),
            ])
            .map_err(|e| self.refused("C_FindObjects", e))?;
        let key = match found.as_slice() {
            [key] => *key,
            [] => {
                return Err(self.refused(
                    "key not found",
                    format!("no secret key labelled {} in the token", self.object),
                ));
            }
            _ => {
                return Err(self.refused(
                    "ambiguous key",
                    format!("several secret keys are labelled {}", self.object),
                ));
            }
        };
        if let Ok(attrs) = session.get_attributes(key, &[AttributeType::Extractable])
            && attrs.iter().any(|a| matches!(a, Attribute::Extractable(true)))
        {
            log::warn!("PKCS#11 key {} is extractable; a master key should not be", self.object);
        }
        Ok(Connection { session, key, ctx })
    }
}

impl KeyProvider for Pkcs11Provider {
    fn id(&self) -> ProviderId {
        ProviderId::Pkcs11 {
            token: self.token.label.clone(),
            object: self.token.object.clone(),
        }
    }

    fn generate_data_key(&self, context: &EncryptionContext) -> Result<(SecretKey, WrappedKey), KmsError> {
        let key = SecretKey::random();
        let wrapped = self.seal(&key, context)?;
        Ok((key, wrapped))
    }

    fn decrypt(&self, wrapped: &WrappedKey, context: &EncryptionContext) -> Result<SecretKey, KmsError> {
        let blob = wrapped.as_bytes();
        if blob.len() != 1 + 12 + 32 + 16 || blob[0] != BLOB_VERSION {
            return Err(KmsError::InvalidCiphertext(self.token.object.clone()));
        }
        let mut iv = [0u8; 12];
        iv.copy_from_slice(&blob[1..13]);
        let sealed = blob[13..].to_vec();
        let aad = context.canonical_bytes();
        let plain = self.call(move |token, session, handle| {
            let params = GcmParams::new(&mut iv, &aad, 128.into()).map_err(|e| token.refused("CKM_AES_GCM", e))?;
            session
                .decrypt(&Mechanism::AesGcm(params), handle, &sealed)
                .map(Zeroizing::new)
                .map_err(|_| KmsError::InvalidCiphertext(token.object.clone()))
        })?;
        SecretKey::from_slice(&plain).ok_or_else(|| KmsError::InvalidCiphertext(self.token.object.clone()))
    }

    fn re_encrypt(&self, wrapped: &WrappedKey, context: &EncryptionContext) -> Result<WrappedKey, KmsError> {
        let key = self.decrypt(wrapped, context)?;
        self.seal(&key, context)
    }

    fn call_count(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    fn key_state(&self) -> Result<KeyStatus, KmsError> {
        self.call(|_, _, _| Ok(KeyStatus::of("Enabled (found in the token)")))
    }

    fn before_fork(&self) {
        self.stop_worker();
    }
}

/// Whether a provider call in this process was given up on: the module's
/// thread may still be inside it, and a module's exit handlers could wait
/// for it, so the process should leave with `_exit`.
pub fn abandoned_calls() -> bool {
    ABANDONED.load(Ordering::Relaxed)
}

static ABANDONED: AtomicBool = AtomicBool::new(false);
