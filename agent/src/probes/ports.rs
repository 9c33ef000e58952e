//! Upkeep of the kernel maps: the port sets the programs consult for the `port` label
//! (watched ports, a bitmap; listening ports per network namespace, seeded and pruned here
//! from sock_diag while the kernel adds new listeners itself the moment they enter LISTEN),
//! and the removal of dead namespaces' entries from every map.

use std::collections::{HashMap as StdHashMap, HashSet};

use agent_common::{
    HandshakeCounts, ListenPortKey, ListenerKey, PORT_GROUP_ENTRIES, PORT_SEEN_ENTRIES,
    PORT_SEEN_SPAN, ResetKey, TimeWaitKey, WATCH_PORT_WORDS,
};
use aya::maps::{Array, HashMap, MapData, MapError, PerCpuHashMap};

/// Writes the watched ports into the `WATCH_PORTS` bitmap.
pub fn set_watch_ports(map: &mut Array<MapData, u64>, ports: &[u16]) -> Result<(), MapError> {
    let mut words = vec![0u64; WATCH_PORT_WORDS as usize];
    for port in ports {
        words[usize::from(*port / 64)] |= 1 << (port % 64);
    }
    for (index, word) in (0u32..).zip(words) {
        map.set(index, word, 0)?;
    }
    Ok(())
}

/// How many refreshes in a row a namespace must be missing before its entries go: one miss
/// can be a namespace whose only process was being replaced.
const MISSES_BEFORE_PRUNE: u8 = 2;

/// Second handles on the counter maps, for removing dead namespaces' entries (the collectors
/// own the first handles; the kernel serialises the updates).
pub struct CounterMaps {
    /// `RESETS_SENT` and `RESETS_RECV`.
    pub resets: Vec<PerCpuHashMap<MapData, ResetKey, u64>>,
    /// `LISTEN_EVENTS`.
    pub listen: Option<PerCpuHashMap<MapData, ListenerKey, u64>>,
    /// `HANDSHAKES`.
    pub handshakes: Option<PerCpuHashMap<MapData, ListenerKey, HandshakeCounts>>,
    /// `TIME_WAIT_ENTERED`.
    pub timewait: Option<PerCpuHashMap<MapData, TimeWaitKey, u64>>,
}

/// One entry of the mark arrays (`LISTEN_PORT_*`, `LISTEN_GROUP_*`).
type PortSpan = [u8; PORT_SEEN_SPAN as usize];

/// One of the agent's mark arrays and the copy it writes from.
struct Marks {
    map: Array<MapData, PortSpan>,
    spans: Vec<PortSpan>,
}

impl Marks {
    /// Sets byte `at` of entry `at / PORT_SEEN_SPAN`. The agent is the map's only writer, so
    /// writing the whole entry back loses no mark.
    fn set(&mut self, at: u32) -> Result<(), MapError> {
        let (index, byte) = (at / PORT_SEEN_SPAN, (at % PORT_SEEN_SPAN) as usize);
        let span = &mut self.spans[index as usize];
        if span[byte] != 0 {
            return Ok(());
        }
        let mut copy = *span;
        copy[byte] = 1;
        self.map.set(index, copy, 0)?;
        self.spans[index as usize] = copy;
        Ok(())
    }
}

/// The agent's marks in `LISTEN_PORT_SEEDED` and `LISTEN_GROUP_SEEDED`: the ports it
/// seeded, which the programs' port rule then looks up in `LISTEN_PORTS` (a port marked
/// nowhere is `other` at once). Marks are never cleared: a port whose listener went only
/// costs the exact lookup again.
pub struct SeededPorts {
    ports: Marks,
    groups: Marks,
}

impl SeededPorts {
    /// Wraps the `LISTEN_PORT_SEEDED` and `LISTEN_GROUP_SEEDED` maps (all clear: the
    /// programs were just loaded).
    pub fn new(ports: Array<MapData, PortSpan>, groups: Array<MapData, PortSpan>) -> Self {
        let marks = |map, entries| Marks {
            map,
            spans: vec![[0; PORT_SEEN_SPAN as usize]; entries as usize],
        };
        Self {
            ports: marks(ports, PORT_SEEN_ENTRIES),
            groups: marks(groups, PORT_GROUP_ENTRIES),
        }
    }

    /// Marks `port`, then its group: a program that finds the group's mark finds the
    /// port's too.
    fn mark(&mut self, port: u16) -> Result<(), MapError> {
        self.ports.set(u32::from(port))?;
        self.groups.set(u32::from(port) / PORT_SEEN_SPAN)
    }
}

/// The periodic upkeep: listener ports and dead namespaces.
pub struct Upkeep {
    ports: HashMap<MapData, ListenPortKey, u8>,
    seeded: SeededPorts,
    counters: CounterMaps,
    misses: StdHashMap<u32, u8>,
}

impl Upkeep {
    /// Upkeep of `LISTEN_PORTS` (with the marks of the ports seeded) and of the counter maps.
    pub fn new(
        ports: HashMap<MapData, ListenPortKey, u8>,
        seeded: SeededPorts,
        counters: CounterMaps,
    ) -> Self {
        Self {
            ports,
            seeded,
            counters,
            misses: StdHashMap::new(),
        }
    }

    /// One refresh: `found` holds every namespace seen now, `listening` the listener ports of
    /// those that could be read; `before` the listener-port keys as they were before the
    /// namespaces were read (a port the kernel added since then is kept).
    pub fn refresh(
        &mut self,
        before: &HashSet<ListenPortKey>,
        found: &HashSet<u32>,
        listening: &StdHashMap<u32, HashSet<u16>>,
    ) {
        for key in before {
            let stale = listening
                .get(&key.netns)
                .is_some_and(|ports| !ports.contains(&key.port));
            if stale {
                // A concurrent removal is fine.
                let _ = self.ports.remove(key);
            }
        }
        for (&netns, ports) in listening {
            for &port in ports {
                // A full map is counted by the kernel side too; keep seeding the others.
                if let Err(e) = self.ports.insert(
                    ListenPortKey {
                        netns,
                        port,
                        pad: 0,
                    },
                    1,
                    0,
                ) {
                    tracing::debug!(netns, port, "seeding a listener port: {e}");
                }
                // After the insert: the programs look the port up once they see its mark.
                if let Err(e) = self.seeded.mark(port) {
                    tracing::warn!(port, "marking a listener port: {e}");
                }
            }
        }
        let dead = self.dead_namespaces(found);
        if !dead.is_empty() {
            tracing::debug!(
                count = dead.len(),
                "removing the entries of namespaces that are gone"
            );
            prune(&mut self.ports, &dead, |k| k.netns);
            for map in &mut self.counters.resets {
                prune(map, &dead, |k| k.netns);
            }
            if let Some(map) = self.counters.listen.as_mut() {
                prune(map, &dead, |k| k.netns);
            }
            if let Some(map) = self.counters.handshakes.as_mut() {
                prune(map, &dead, |k| k.netns);
            }
            if let Some(map) = self.counters.timewait.as_mut() {
                prune(map, &dead, |k| k.netns);
            }
        }
    }

    /// The listener-port keys now, to pass to [`Upkeep::refresh`] after reading namespaces.
    pub fn port_keys(&self) -> HashSet<ListenPortKey> {
        self.ports.keys().filter_map(Result::ok).collect()
    }

    /// Namespaces that have entries in the maps but were missing from this many refreshes.
    fn dead_namespaces(&mut self, found: &HashSet<u32>) -> HashSet<u32> {
        let mut present: HashSet<u32> = self
            .ports
            .keys()
            .filter_map(Result::ok)
            .map(|k| k.netns)
            .collect();
        for map in &self.counters.resets {
            present.extend(map.keys().filter_map(Result::ok).map(|k| k.netns));
        }
        if let Some(map) = &self.counters.listen {
            present.extend(map.keys().filter_map(Result::ok).map(|k| k.netns));
        }
        if let Some(map) = &self.counters.handshakes {
            present.extend(map.keys().filter_map(Result::ok).map(|k| k.netns));
        }
        if let Some(map) = &self.counters.timewait {
            present.extend(map.keys().filter_map(Result::ok).map(|k| k.netns));
        }
        self.misses
            .retain(|netns, _| present.contains(netns) && !found.contains(netns));
        let mut dead = HashSet::new();
        for netns in present.difference(found) {
            let misses = self.misses.entry(*netns).or_insert(0);
            *misses += 1;
            if *misses >= MISSES_BEFORE_PRUNE {
                dead.insert(*netns);
            }
        }
        for netns in &dead {
            self.misses.remove(netns);
        }
        dead
    }
}

/// Removes the entries of `map` whose namespace is in `dead`.
trait Removable<K> {
    fn keys_now(&self) -> Vec<K>;
    fn remove_key(&mut self, key: &K);
}

impl<K: aya::Pod> Removable<K> for HashMap<MapData, K, u8> {
    fn keys_now(&self) -> Vec<K> {
        self.keys().filter_map(Result::ok).collect()
    }
    fn remove_key(&mut self, key: &K) {
        let _ = self.remove(key);
    }
}

impl<K: aya::Pod, V: aya::Pod> Removable<K> for PerCpuHashMap<MapData, K, V> {
    fn keys_now(&self) -> Vec<K> {
        self.keys().filter_map(Result::ok).collect()
    }
    fn remove_key(&mut self, key: &K) {
        let _ = self.remove(key);
    }
}

fn prune<K, M: Removable<K>>(map: &mut M, dead: &HashSet<u32>, netns: impl Fn(&K) -> u32) {
    for key in map.keys_now() {
        if dead.contains(&netns(&key)) {
            map.remove_key(&key);
        }
    }
}
