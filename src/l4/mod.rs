//! Layer 4: bytes forwarded, never parsed.
//!
//! [`tcp`] serves one accepted TCP connection, [`forward`] moves its bytes both ways (copy or
//! splice), [`udp`] runs a UDP listener with a session per client address.

pub mod forward;
pub mod tcp;
pub mod udp;
