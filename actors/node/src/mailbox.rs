//! What stage actors receive: an input for their stage (a message from the network, a
//! signal from another stage, a storage result, a timer).

use actix::prelude::*;
use ringkv::stage::Input;

/// An input for a stage actor.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Deliver(pub Input);
