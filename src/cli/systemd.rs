//! systemd's service notifications (`Type=notify`): READY=1 once the mount
//! serves, STATUS= lines as its state changes, STOPPING=1 when it unmounts.
//! Nothing is sent outside systemd (no `$NOTIFY_SOCKET`). The daemon must
//! run in the foreground (`kmsfs mount -f`) to be the service's main process.

use sd_notify::NotifyState;

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        log::warn!("systemd notification failed: {e}");
    }
}

pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

pub fn stopping(status: &str) {
    send(&[NotifyState::Stopping, NotifyState::Status(status)]);
}
