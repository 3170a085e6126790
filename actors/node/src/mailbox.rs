//! What stage actors receive: an input for their stage (a message from the network, a
//! signal from another stage, a storage result, a timer).

use std::time::Instant;

use actix::prelude::*;
use ringkv::stage::Input;

/// An input for a stage actor; a message from the network carries when it was queued, so
/// the stage actor can report how long it waited (admission feedback).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Deliver(pub Input, pub Option<Instant>);
