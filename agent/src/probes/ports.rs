//! The port sets the programs consult for the `port` label: watched ports (a bitmap) and
//! listening ports per network namespace (seeded and pruned here from sock_diag; the kernel
//! adds new listeners itself the moment they enter LISTEN).

use std::collections::HashSet;

use agent_common::{ListenPortKey, WATCH_PORT_WORDS};
use aya::maps::{Array, HashMap, MapData, MapError};

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

/// Makes `LISTEN_PORTS` hold, for each namespace in `listening`, exactly its ports: adds
/// what is missing, removes ports that no longer listen. Entries of namespaces not in
/// `listening` (not visited this time) are left alone.
pub fn sync_listen_ports(
    map: &mut HashMap<MapData, ListenPortKey, u8>,
    listening: &std::collections::HashMap<u32, HashSet<u16>>,
) -> Result<(), MapError> {
    let stale: Vec<ListenPortKey> = map
        .keys()
        .filter_map(Result::ok)
        .filter(|k| {
            listening
                .get(&k.netns)
                .is_some_and(|ports| !ports.contains(&k.port))
        })
        .collect();
    for key in stale {
        // A concurrent removal by a newer sync is fine.
        let _ = map.remove(&key);
    }
    for (&netns, ports) in listening {
        for &port in ports {
            map.insert(
                ListenPortKey {
                    netns,
                    port,
                    pad: 0,
                },
                1,
                0,
            )?;
        }
    }
    Ok(())
}
