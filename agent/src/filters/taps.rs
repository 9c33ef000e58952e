//! The packet sockets ("taps") the built-in classifier and the named filters run on, one per
//! interface. Every tap costs every packet of its interface something (the kernel delivers
//! the packet to it and runs its program), so where both watch an interface they share one:
//! the socket carries the named filters' combined program, which ends with a tail call
//! through the interface's one-slot program array into the classifier. An interface with
//! the classifier alone carries the classifier itself; one with the filters alone, their
//! program, whose tail call then falls through. Filters that run their own program (classic
//! or translated alone) keep their own sockets ([`super::count`]).
//!
//! A reload attaches the new filters' program to the same socket: `SO_ATTACH_BPF` replaces
//! a socket's program in one step, so each packet meets either the old program or the new
//! one, and the classifier behind both counts it once.
//!
//! Loopback: libpcap counts one copy of each packet (the incoming one). The filters' own
//! sockets leave the outgoing copy out with `PACKET_IGNORE_OUTGOING`; a shared tap cannot
//! (the classifier counts both copies), so there the filters' program skips the filters for
//! an outgoing copy and hands it straight to the classifier.

use std::{
    collections::{BTreeMap, HashMap},
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, OwnedFd},
    sync::{Arc, Mutex},
};

use anyhow::Context as _;

use super::{
    bpf_sys::{self, ProgArray},
    count::{self, PACKET_IGNORE_OUTGOING, is_loopback, packet_socket, setsockopt},
    translate::Handover,
};

/// The agent's taps, shared by the classifier and the named filters.
#[derive(Default)]
pub struct Taps {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    taps: BTreeMap<String, Tap>,
    /// The classifier's program, once loaded.
    classifier: Option<OwnedFd>,
}

struct Tap {
    /// What the filters' program continues with: the classifier, when it watches here.
    chain: ProgArray,
    loopback: bool,
    /// The shared socket: the filters' program (handing over to the classifier when
    /// `chained`), or the classifier alone.
    socket: Option<OwnedFd>,
    /// The classifier is in `chain`.
    chained: bool,
    /// The classifier's own socket, where the kernel would not chain it.
    classifier_alone: Option<OwnedFd>,
    /// The named filters' program on the socket.
    filters: Option<Arc<OwnedFd>>,
}

impl Tap {
    /// The program the shared socket runs now.
    fn program<'a>(&'a self, classifier: Option<&'a OwnedFd>) -> Option<BorrowedFd<'a>> {
        match (&self.filters, classifier) {
            (Some(f), _) => Some(f.as_fd()),
            (None, Some(c)) if self.chained => Some(c.as_fd()),
            _ => None,
        }
    }

    /// Chains the classifier behind the filters' program already on the socket; false
    /// (said why) when the kernel refuses.
    fn chain_behind_filters(&mut self, iface: &str, prog: BorrowedFd<'_>) -> bool {
        let Some(socket) = &self.socket else {
            return false;
        };
        // From now on the filters' program hands each packet on, the outgoing copies on
        // loopback too.
        let outgoing =
            |on: libc::c_int| setsockopt(socket, libc::SOL_PACKET, PACKET_IGNORE_OUTGOING, &on);
        if self.loopback
            && let Err(e) = outgoing(0)
        {
            tracing::warn!(iface, "cannot let the outgoing copies in: {e}");
            return false;
        }
        match self.chain.set(prog) {
            Ok(()) => {
                self.chained = true;
                true
            }
            Err(e) => {
                tracing::warn!(
                    iface,
                    "the classifier cannot follow the named filters' program ({e}): it gets a packet socket of its own"
                );
                if self.loopback {
                    let _ = outgoing(1);
                }
                false
            }
        }
    }
}

impl State {
    fn tap(&mut self, iface: &str) -> std::io::Result<&mut Tap> {
        if !self.taps.contains_key(iface) {
            let tap = Tap {
                chain: ProgArray::create()?,
                loopback: is_loopback(iface),
                socket: None,
                chained: false,
                classifier_alone: None,
                filters: None,
            };
            self.taps.insert(iface.to_string(), tap);
        }
        Ok(self.taps.get_mut(iface).expect("just inserted"))
    }
}

fn attach(socket: &OwnedFd, prog: BorrowedFd<'_>) -> anyhow::Result<()> {
    let prog_fd: libc::c_int = prog.as_raw_fd();
    setsockopt(socket, libc::SOL_SOCKET, bpf_sys::SO_ATTACH_BPF, &prog_fd)
        .context("attaching a socket filter")
}

/// A packet socket on `iface` running `prog` from the first packet on.
fn open(iface: &str, prog: BorrowedFd<'_>, ignore_outgoing: bool) -> anyhow::Result<OwnedFd> {
    let (socket, _) = packet_socket(iface, |fd| {
        attach(fd, prog)?;
        if ignore_outgoing {
            count::ignore_outgoing(fd)?;
        }
        Ok(())
    })?;
    Ok(socket)
}

impl Taps {
    /// How the filters' program on `iface` ends (see [`Handover`]); the interface's program
    /// array is made on first use and lives as long as the taps.
    pub fn handover(&self, iface: &str) -> std::io::Result<Handover> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let tap = state.tap(iface)?;
        Ok(Handover {
            chain_fd: tap.chain.raw_fd(),
            loopback: tap.loopback,
        })
    }

    /// Puts the named filters' `programs` (one per interface, each translated with that
    /// interface's [`Self::handover`]) in place of the ones there before. An interface that
    /// keeps no filters program goes back to the classifier alone, or loses its tap. All or
    /// nothing: on error the taps stay as they were.
    pub fn set_filters(&self, programs: &[(String, Arc<OwnedFd>)]) -> anyhow::Result<()> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let State { taps, classifier } = &mut *state;
        let wanted: HashMap<&str, &Arc<OwnedFd>> =
            programs.iter().map(|(i, p)| (i.as_str(), p)).collect();
        // New sockets first, each with its program in place before the first packet.
        let mut opened = Vec::new();
        for (iface, prog) in programs {
            let tap = taps
                .get(iface)
                .with_context(|| format!("no program array for `{iface}`"))?;
            if tap.socket.is_none() {
                let socket = open(iface, prog.as_fd(), tap.loopback && !tap.chained)
                    .with_context(|| format!("the named filters on `{iface}`"))?;
                opened.push((iface.clone(), socket));
            }
        }
        // Then the swaps, undone if one fails.
        let mut swapped: Vec<&str> = Vec::new();
        for (iface, prog) in programs {
            let tap = &taps[iface];
            let Some(socket) = &tap.socket else { continue };
            if let Err(e) = attach(socket, prog.as_fd()) {
                for done in swapped {
                    let tap = &taps[done];
                    if let (Some(socket), Some(before)) =
                        (&tap.socket, tap.program(classifier.as_ref()))
                    {
                        let _ = attach(socket, before);
                    }
                }
                return Err(e).with_context(|| format!("the named filters on `{iface}`"));
            }
            swapped.push(iface);
        }
        for (iface, socket) in opened {
            if let Some(tap) = taps.get_mut(&iface) {
                tap.socket = Some(socket);
            }
        }
        for (iface, tap) in taps.iter_mut() {
            if let Some(prog) = wanted.get(iface.as_str()) {
                tap.filters = Some(Arc::clone(prog));
                continue;
            }
            let Some(before) = tap.filters.take() else {
                continue;
            };
            match (&tap.socket, classifier.as_ref().filter(|_| tap.chained)) {
                (Some(socket), Some(alone)) => {
                    if let Err(e) = attach(socket, alone.as_fd()) {
                        // The old program stays: it still hands every packet on to the
                        // classifier, and counts for no one.
                        tracing::warn!(iface, "putting the classifier back alone: {e:#}");
                        tap.filters = Some(before);
                    }
                }
                _ => tap.socket = None,
            }
        }
        Ok(())
    }

    /// Puts the classifier `prog` on every interface of `ifaces` that exists: behind the
    /// filters' program where that is there already, else on a socket of its own. Returns
    /// the interfaces watched, with their index; a missing one is skipped with a warning.
    pub fn set_classifier(
        &self,
        prog: BorrowedFd<'_>,
        ifaces: &[String],
    ) -> anyhow::Result<Vec<(String, u32)>> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.classifier = Some(
            prog.try_clone_to_owned()
                .context("duplicating the classifier's descriptor")?,
        );
        let mut watched = Vec::new();
        for iface in ifaces {
            let Ok(ifindex) = nix::net::if_::if_nametoindex(iface.as_str()) else {
                tracing::warn!(
                    "built-in socket filter on `{iface}`: interface `{iface}` does not exist in the agent's network namespace; skipped"
                );
                continue;
            };
            let put = state
                .tap(iface)
                .map_err(anyhow::Error::from)
                .and_then(|tap| {
                    if tap.chained || tap.classifier_alone.is_some() {
                        return Ok(());
                    }
                    if tap.socket.is_some() {
                        if !tap.chain_behind_filters(iface, prog) {
                            tap.classifier_alone = Some(open(iface, prog, false)?);
                        }
                        return Ok(());
                    }
                    let socket = open(iface, prog, false)?;
                    // Chained, for the filters' program a reload may put in front.
                    match tap.chain.set(prog) {
                        Ok(()) => {
                            tap.socket = Some(socket);
                            tap.chained = true;
                        }
                        Err(e) => {
                            tracing::debug!(iface, "the classifier cannot be chained: {e}");
                            tap.classifier_alone = Some(socket);
                        }
                    }
                    Ok(())
                });
            match put {
                Ok(()) => watched.push((iface.clone(), ifindex)),
                Err(e) => tracing::warn!("built-in socket filter on `{iface}`: {e:#}; skipped"),
            }
        }
        Ok(watched)
    }
}
