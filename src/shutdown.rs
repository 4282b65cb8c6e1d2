//! The signals that stop qsweep, handled the same way by `run`, `worker`
//! and `train`: SIGINT (Ctrl-C), SIGTERM (what Kubernetes, systemd and
//! `docker stop` send) and SIGHUP (a closed terminal or SSH session).
//!
//! Why handlers, not the default action: a process killed by a signal
//! writes no reports, hands no task back and leaves its staging
//! directories; and as PID 1 in a container, a signal with the default
//! action is ignored altogether, so a pod would wait out its whole grace
//! period and then be SIGKILLed. With handlers installed, qsweep stops
//! cleanly as PID 1 too, and the worker image needs no init process.

use tokio::signal::unix::{signal, SignalKind};

/// Which signal asked qsweep to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Interrupt,
    Terminate,
    Hangup,
}

impl Signal {
    /// The shell's convention, 128 + the signal's number: 130, 143, 129.
    pub fn exit_code(self) -> u8 {
        128 + match self {
            Signal::Hangup => libc::SIGHUP,
            Signal::Interrupt => libc::SIGINT,
            Signal::Terminate => libc::SIGTERM,
        } as u8
    }

    pub fn name(self) -> &'static str {
        match self {
            Signal::Interrupt => "SIGINT",
            Signal::Terminate => "SIGTERM",
            Signal::Hangup => "SIGHUP",
        }
    }
}

/// The three handlers, installed from the moment this is made (so a
/// signal that comes before anyone waits is not lost, nor fatal).
pub struct Signals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
    hangup: tokio::signal::unix::Signal,
}

impl Signals {
    /// Installs the handlers; needs a tokio runtime (`Runtime::enter`).
    pub fn install() -> std::io::Result<Self> {
        Ok(Self {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
            hangup: signal(SignalKind::hangup())?,
        })
    }

    /// The next signal to arrive.
    pub async fn recv(&mut self) -> Signal {
        tokio::select! {
            _ = self.interrupt.recv() => Signal::Interrupt,
            _ = self.terminate.recv() => Signal::Terminate,
            _ = self.hangup.recv() => Signal::Hangup,
        }
    }
}
