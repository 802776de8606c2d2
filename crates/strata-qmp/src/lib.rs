//! Strata's QMP monitor, the protocol side of `strata-daemon`, as QEMU
//! speaks it (docs/interop/qmp-spec.rst): a greeting, capabilities
//! negotiation, commands with QAPI-typed arguments and QEMU's error
//! replies, and events. It knows no block driver: the daemon registers its
//! commands and the schema of their arguments.

pub mod error;
mod ghash;
pub mod json;
pub mod keyval;
pub mod monitor;
pub mod schema;
pub mod visit;

pub use error::{ErrorClass, QmpError};
pub use monitor::{Gate, Handler, MonitorOptions, Qmp};
pub use schema::Schema;
