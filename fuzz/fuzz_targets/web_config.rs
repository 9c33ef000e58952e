//! `--web.config.file`: any text is either a checked configuration or an error, never a
//! panic, a hang or a runaway allocation.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(config) = agent::web::parse(text) {
        // What the server reads from a valid configuration must not panic either.
        let _ = config.http_server_config.headers.pairs();
        if let Some(tls) = &config.tls_server_config {
            let _ = tls.client_auth_type.verifies();
        }
    }
});
