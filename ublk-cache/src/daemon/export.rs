//! Where a server serves its disk: the [`Export`] trait and its two
//! implementations, a ublk device ([`UblkExport`]) and NBD listeners
//! ([`NbdExport`]). Each is created before any data is touched (so a missing
//! `/dev/ublk-control` or a busy socket refuses the start cleanly), started
//! once the engine is attached, and stopped before the engine is.

use std::sync::mpsc::{self, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use tracing::info;

use super::error::{DaemonError, DaemonResult};
use super::stop::StopToken;
use crate::frontend::nbd::{ListenSpec, Listeners, NbdOptions, NbdServer};
use crate::frontend::ublk::{
    self as fe, DeviceInfo, ServeOutcome, StopHandle, StopKind, StoppedDevice, UblkError,
    UblkOptions,
};
use crate::Engine;

/// How an export ended.
#[derive(Debug)]
pub enum ExportEnd {
    /// Nothing is left behind.
    Closed,
    /// A stopped ublk device: delete it once the engine has written everything back.
    DeviceStopped(StoppedDevice),
    /// The ublk device stays for `recover`.
    DeviceKept { id: u32 },
}

/// What an export is, for placing its lines among the `--export`s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportKind {
    Ublk,
    Nbd,
}

/// One way of serving the disk.
pub trait Export: Send {
    fn kind(&self) -> ExportKind;

    /// Serve `target`; returns once the export is live, with its lines for
    /// stdout (the device path, or one URI per NBD listener). If the export
    /// ends by itself later (a ublk device stopped from outside), it asks
    /// `server` to stop.
    fn start(&mut self, target: Arc<Engine>, server: &StopToken) -> DaemonResult<Vec<String>>;

    /// The ublk device id, for an export that has one (it names the server).
    fn device_id(&self) -> Option<u32> {
        None
    }

    /// Stop taking requests; requests already received are answered first.
    /// `kind` says whether a device is to stay for a successor.
    fn stop(self: Box<Self>, kind: StopKind) -> DaemonResult<ExportEnd>;
}

enum UblkEvent {
    Live(DeviceInfo),
    Ended(Result<ServeOutcome, UblkError>),
}

/// A `/dev/ublkbN` device, created anew or (with `recover`) taken over.
pub struct UblkExport {
    opts: UblkOptions,
    recover: bool,
    stop: StopHandle,
    thread: Option<JoinHandle<()>>,
    events: Option<Receiver<UblkEvent>>,
    device: Option<DeviceInfo>,
    /// The serving loop's result, if it came before `stop` asked for it.
    ended: Option<Result<ServeOutcome, UblkError>>,
}

impl UblkExport {
    /// Checks that the kernel's ublk driver is there (nothing is created yet).
    pub fn new(opts: UblkOptions, recover: bool) -> DaemonResult<Self> {
        fe::check_control().map_err(|e| DaemonError::ublk("ublk", e))?;
        Ok(Self {
            opts,
            recover,
            stop: StopHandle::new(),
            thread: None,
            events: None,
            device: None,
            ended: None,
        })
    }

    fn ended(&mut self) -> Option<Result<ServeOutcome, UblkError>> {
        if let Some(e) = self.ended.take() {
            return Some(e);
        }
        let events = self.events.as_ref()?;
        loop {
            match events.recv() {
                Ok(UblkEvent::Live(_)) => continue,
                Ok(UblkEvent::Ended(r)) => return Some(r),
                Err(_) => return None,
            }
        }
    }
}

impl Export for UblkExport {
    fn kind(&self) -> ExportKind {
        ExportKind::Ublk
    }

    fn start(&mut self, target: Arc<Engine>, server: &StopToken) -> DaemonResult<Vec<String>> {
        let (tx, rx) = mpsc::channel();
        let (opts, recover, stop, server) = (
            self.opts.clone(),
            self.recover,
            self.stop.clone(),
            server.clone(),
        );
        let thread = std::thread::Builder::new()
            .name("ublk".into())
            .spawn(move || {
                let live = tx.clone();
                let on_live = move |info: &DeviceInfo| {
                    let _ = live.send(UblkEvent::Live(info.clone()));
                };
                let r = if recover {
                    fe::recover(target, &opts, on_live, stop)
                } else {
                    fe::serve(target, &opts, on_live, stop)
                };
                let _ = tx.send(UblkEvent::Ended(r));
                // However it ended, the server is done serving this device.
                server.stop();
            })
            .map_err(|e| DaemonError::io("starting the ublk thread", e))?;
        self.thread = Some(thread);
        let first = rx.recv();
        self.events = Some(rx);
        match first {
            Ok(UblkEvent::Live(info)) => {
                let line = info.bdev.display().to_string();
                info!(device = %line, "ublk device live");
                self.device = Some(info);
                Ok(vec![line])
            }
            Ok(UblkEvent::Ended(Err(e))) => Err(DaemonError::ublk("ublk", e)),
            Ok(UblkEvent::Ended(Ok(outcome))) => {
                self.ended = Some(Ok(outcome));
                Err(DaemonError::refused(
                    "the ublk device was stopped before it came live",
                ))
            }
            Err(_) => Err(DaemonError::refused("the ublk thread ended without a word")),
        }
    }

    fn device_id(&self) -> Option<u32> {
        self.device.as_ref().map(|d| d.id)
    }

    fn stop(mut self: Box<Self>, kind: StopKind) -> DaemonResult<ExportEnd> {
        match kind {
            StopKind::Stop => self.stop.stop(),
            StopKind::Detach => self.stop.detach(),
        }
        let ended = self.ended();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        match ended {
            None => Ok(ExportEnd::Closed),
            Some(Ok(ServeOutcome::Stopped { device, reason })) => {
                info!(?reason, "ublk device stopped");
                Ok(ExportEnd::DeviceStopped(device))
            }
            Some(Ok(ServeOutcome::Detached { id })) => Ok(ExportEnd::DeviceKept { id }),
            Some(Err(e)) => Err(DaemonError::ublk("ublk", e)),
        }
    }
}

/// NBD listeners (unix and TCP), bound at creation, serving once started.
pub struct NbdExport {
    listeners: Option<Listeners>,
    opts: NbdOptions,
    server: Option<NbdServer>,
}

impl NbdExport {
    /// Binds every listener now, before any data is touched.
    pub fn bind(specs: &[ListenSpec], socket_mode: u32, opts: NbdOptions) -> DaemonResult<Self> {
        let listeners =
            Listeners::bind(specs, socket_mode).map_err(|e| DaemonError::nbd("NBD export", e))?;
        Ok(Self {
            listeners: Some(listeners),
            opts,
            server: None,
        })
    }
}

impl Export for NbdExport {
    fn kind(&self) -> ExportKind {
        ExportKind::Nbd
    }

    fn start(&mut self, target: Arc<Engine>, _server: &StopToken) -> DaemonResult<Vec<String>> {
        let listeners = self
            .listeners
            .take()
            .ok_or_else(|| DaemonError::refused("the NBD export was started twice"))?;
        let s = NbdServer::start(listeners, target, self.opts.clone())
            .map_err(|e| DaemonError::nbd("NBD export", e))?;
        let uris = s.uris().to_vec();
        self.server = Some(s);
        Ok(uris)
    }

    fn stop(self: Box<Self>, _kind: StopKind) -> DaemonResult<ExportEnd> {
        // Listeners close, requests already read are answered, connections close.
        if let Some(s) = self.server {
            s.stop();
        }
        Ok(ExportEnd::Closed)
    }
}
